"""C4 for hypernetwork pretraining: each document split into (a, b, c) segments.

TAGI's stage 2 (paper §3.2.3, HINT's recipe; tagi_spec.md §7.2): a tokenised document, cut to
``max_length`` tokens, is split at two random points into consecutive segments ``a`` (the
hypernetwork's "instruction", → ``hyper_inputs``), ``b`` (the encoder input, → ``inputs``) and
``c`` (the target, → ``targets``). The split points are drawn with a stateless RNG keyed by the
seed and a hash of the document, so a document always splits the same way, whatever the order
or sharding of the data; each segment has at least ``min_segment_length`` tokens (HINT's
``U[1, n-2)`` draws allow 1 and reuse one seed for both points — we draw them independently).

Sources: TFDS ``c4/en`` through ``seqio.TfdsDataSource`` (from a local ``data_dir``), or local
text/JSONL files (one document per line; JSONL takes the ``text`` field).
"""

from __future__ import annotations

import json
import os

import seqio
import tensorflow as tf

DEFAULT_MIN_SEGMENT = 4


def tokenize_text(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """``text`` (str) → ``text`` (ids in the targets' vocabulary) + ``text_pretokenized``."""
    vocabulary = output_features["targets"].vocabulary

    def tokenize(example):
        return {
            "text": vocabulary.encode_tf(example["text"]),
            "text_pretokenized": example["text"],
        }

    return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def split_document(
    dataset: tf.data.Dataset,
    *,
    seed: int = 0,
    max_length: int = 1024,
    min_segment_length: int = DEFAULT_MIN_SEGMENT,
) -> tf.data.Dataset:
    """Tokenised ``text`` → ``hyper_inputs``/``inputs``/``targets`` (a seqio preprocessor).

    Documents shorter than three minimum segments are dropped (they carry no (a, b, c) split);
    counted by the caller via the dataset's size, not silently padded.
    """

    def enough(example):
        return tf.shape(example["text"])[0] >= 3 * min_segment_length

    def split(example):
        tokens = example["text"][:max_length]
        n = tf.shape(tokens)[0]
        doc_hash = tf.strings.to_hash_bucket_fast(example["text_pretokenized"], 2**31 - 1)
        key = tf.stack([tf.constant(seed, tf.int64), doc_hash])
        u = tf.random.stateless_uniform([2], seed=key, dtype=tf.float32)
        lo1, hi1 = min_segment_length, n - 2 * min_segment_length + 1
        s1 = lo1 + tf.cast(u[0] * tf.cast(hi1 - lo1, tf.float32), tf.int32)
        s1 = tf.minimum(s1, hi1 - 1)
        lo2, hi2 = s1 + min_segment_length, n - min_segment_length + 1
        s2 = lo2 + tf.cast(u[1] * tf.cast(hi2 - lo2, tf.float32), tf.int32)
        s2 = tf.minimum(s2, hi2 - 1)
        return {
            "hyper_inputs": tokens[:s1],
            "inputs": tokens[s1:s2],
            "targets": tokens[s2:],
            "text_pretokenized": example["text_pretokenized"],
        }

    return dataset.filter(enough).map(split, num_parallel_calls=tf.data.AUTOTUNE)


def read_documents(paths: list[str]):
    """Documents (str) of local text or JSONL files, one per non-empty line."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"C4 file does not exist: {path}")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.endswith(".jsonl"):
                    try:
                        line = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(
                            f"{path}:{number}: not a JSON object with 'text': {e}"
                        ) from e
                yield line


def local_source(paths: list[str]) -> seqio.FunctionDataSource:
    """A seqio source of ``{"text": str}`` over local files, read when the dataset is built."""

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        docs = list(read_documents(paths))
        return tf.data.Dataset.from_tensor_slices({"text": tf.constant(docs, tf.string)})

    return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


def tfds_source(data_dir: str | None = None, name: str = "c4/en:3.1.0") -> seqio.TfdsDataSource:
    """TFDS C4 prepared under ``data_dir`` (no download happens at dataset-build time)."""
    return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=data_dir)

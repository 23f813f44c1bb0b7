"""C4 for hypernetwork pretraining: each document split into (a, b, c) segments.

TAGI's stage 2 (paper §3.2.3, HINT's recipe; tagi_spec.md §7.2): a tokenised document, cut to
``max_length`` tokens, is split at two random points into consecutive segments ``a`` (the
hypernetwork's "instruction", → ``hyper_inputs``), ``b`` (the encoder input, → ``inputs``) and
``c`` (the target, → ``targets``). The split points are drawn with a stateless RNG keyed by the
seed and a hash of the document, so a document always splits the same way, whatever the order
or sharding of the data; each segment has at least ``min_segment_length`` tokens (HINT's
``U[1, n-2)`` draws allow 1 and reuse one seed for both points — we draw them independently).

Sources: TFDS ``c4/en`` through ``seqio.TfdsDataSource`` (from a local ``data_dir``), or
text/JSONL files (one document per line; JSONL takes the ``text`` field), local or in cloud
storage (``gs://``, through ``tagi_jax.paths``: read streamed, or by line index for the per-host
stream, ``example_index``).
"""

from __future__ import annotations

import json

from tagi_jax import paths
from tagi_jax.data import example_index
from tagi_jax.data.tf_setup import import_tensorflow

# Before seqio: TensorFlow must never see the accelerators (JAX owns their memory).
tf = import_tensorflow()

import seqio  # noqa: E402

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
    drop_short: bool = True,
) -> tf.data.Dataset:
    """Tokenised ``text`` → ``hyper_inputs``/``inputs``/``targets`` (a seqio preprocessor).

    Documents shorter than three minimum segments are dropped (they carry no (a, b, c) split);
    counted by the caller via the dataset's size, not silently padded. ``drop_short=False``
    (the per-host training stream, ``tasks.indexed_source``: one example per document, so that
    which document fills example ``i`` is known without tokenizing the ones before it) splits
    such a document with shorter minimum segments instead, ``n // 3`` tokens of its ``n``; a
    document long enough splits the same either way.
    """

    def enough(example):
        return tf.shape(example["text"])[0] >= 3 * min_segment_length

    def split(example):
        tokens = example["text"][:max_length]
        n = tf.shape(tokens)[0]
        doc_hash = tf.strings.to_hash_bucket_fast(example["text_pretokenized"], 2**31 - 1)
        key = tf.stack([tf.constant(seed, tf.int64), doc_hash])
        u = tf.random.stateless_uniform([2], seed=key, dtype=tf.float32)
        m = tf.minimum(min_segment_length, n // 3)  # min_segment_length for every kept document
        lo1, hi1 = m, n - 2 * m + 1
        s1 = lo1 + tf.cast(u[0] * tf.cast(hi1 - lo1, tf.float32), tf.int32)
        s1 = tf.minimum(s1, hi1 - 1)
        lo2, hi2 = s1 + m, n - m + 1
        s2 = lo2 + tf.cast(u[1] * tf.cast(hi2 - lo2, tf.float32), tf.int32)
        s2 = tf.minimum(s2, hi2 - 1)
        return {
            "hyper_inputs": tokens[:s1],
            "inputs": tokens[s1:s2],
            "targets": tokens[s2:],
            "text_pretokenized": example["text_pretokenized"],
        }

    if drop_short:
        dataset = dataset.filter(enough)
    return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE)


def read_documents(files: list[str]):
    """Documents (str) of text or JSONL files (local or cloud), one per non-empty line."""
    for path in files:
        if not paths.isfile(path):
            raise FileNotFoundError(f"C4 file does not exist: {path}")
        with example_index.open_text(path) as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                yield _document(path, number, line)


def _document(path: str, number, line: str) -> str:
    """The document of a non-empty line of ``path``: JSONL's ``text``, else the line itself.
    ``number``: the line's number, or a function giving it (counted only for an error)."""
    if not path.endswith(".jsonl"):
        return line
    try:
        return json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        number = number() if callable(number) else number
        raise ValueError(f"{path}:{number}: not a JSON object with 'text': {e}") from e


class IndexedDocuments:
    """The documents ``read_documents`` gives, addressable as ``(file, row)`` (the row-th
    non-blank line of a file): building it scans each file's line ends
    (``example_index.LineIndex``, no decoding or parsing), reading a document reads its line
    alone."""

    def __init__(self, files: list[str]):
        for path in files:
            if not paths.isfile(path):
                raise FileNotFoundError(f"C4 file does not exist: {path}")
        self._files = [example_index.LineIndex(path) for path in files]
        self.sizes = [len(index) for index in self._files]

    def document(self, file: int, row: int) -> str:
        index = self._files[file]
        raw, offset = index.read(row)

        def number() -> int:
            return index.line_number(offset)

        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{index.path}:{number()}: not UTF-8: {e}") from None
        return _document(index.path, number, line.rstrip("\n"))


def local_source(files: list[str]) -> seqio.FunctionDataSource:
    """A seqio source of ``{"text": str}`` over text/JSONL files (local or cloud: not TFDS),
    read when the dataset is built."""

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        docs = list(read_documents(files))
        return tf.data.Dataset.from_tensor_slices({"text": tf.constant(docs, tf.string)})

    return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


def tfds_documents(data_dir: str | None, name: str, start: int) -> tf.data.Dataset:
    """``{"text"}`` of TFDS ``name``'s train split in file order from example ``start`` on,
    endless (the split again and again after its end); the order is the files' (TFDS shuffles
    examples when it writes a dataset). Starting there is TFDS's split slicing: the files
    before it are never opened and, within its file, the records before it are read but not
    parsed. Files are read one at a time (no interleaving), so that example ``j`` of the
    sliced split is example ``start + j`` of the whole one."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    size = builder.info.splits["train"].num_examples
    if not size:
        raise ValueError(f"TFDS {name} in {data_dir} has no train examples")
    read = tfds.ReadConfig(interleave_cycle_length=1, skip_prefetch=True)
    decoders = tfds.decode.PartialDecoding({"text": True})

    def split(slice_: str) -> tf.data.Dataset:
        return builder.as_dataset(
            split=f"train{slice_}", shuffle_files=False, read_config=read, decoders=decoders
        )

    first = split(f"[{start % size}:]")
    return first.concatenate(split("").repeat()).map(lambda ex: {"text": ex["text"]})


def tfds_source(data_dir: str | None = None, name: str = "c4/en:3.1.0") -> seqio.TfdsDataSource:
    """TFDS C4 prepared under ``data_dir`` (no download happens at dataset-build time)."""
    return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=data_dir)

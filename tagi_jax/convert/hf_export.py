"""A tagi_jax T5 (optionally with one task's LoRA folded in) as a Hugging Face model directory.

``write_hf(t5_config, t5_params, out, vocabulary=...)`` writes what
``transformers.T5ForConditionalGeneration.from_pretrained(out)`` and
``transformers.AutoTokenizer.from_pretrained(out)`` load offline: ``config.json`` and
``model.safetensors`` (``hf_t5.save``) plus the tokenizer files.

Tokenizers. Our vocabularies are seqio's (``tagi_jax.data.vocab``):

- a SentencePiece model: ``spiece.model`` is copied and ``tokenizer_config.json`` names
  ``T5Tokenizer`` with 100 extra ids, as seqio's T5 vocabulary has; transformers then gives the
  same ids as sentencepiece (plus the EOS it appends), and ``<extra_id_0>`` is the top id, as in
  seqio.
- ``"byte"``: seqio's ``ByteVocabulary`` (pad 0, EOS 1, UNK 2, byte b -> b + 3) is ByT5's layout,
  so ``ByT5Tokenizer`` with ``extra_ids=0`` (ours has no sentinels) gives the same ids.

transformers 5 silently ignores ``T5Tokenizer(vocab_file=...)`` (see
``shared/docs/dependencies.md``), so the files are written here, never through transformers:
nothing in this module imports torch or transformers.

``adapters`` (one task's, batch 1) are merged into the kernels first (``lora.merge``): the result
is a plain T5 that answers that task. A student whose adapted model still reads the instruction
at run time (fusion, instruction cross-attention) has no such plain-T5 form; that is refused.

Every directory is written beside its destination and renamed into place, so a crash never leaves
a half-written export under the final name. A destination in cloud storage (``gs://...``) is
written to a local temporary directory (safetensors and tokenizer files are written locally) and
then copied, its marker file (``config.json``, ``adapter_config.json``) last
(``paths.swap_dir``). transformers itself reads only local directories.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from tagi_jax import paths
from tagi_jax.convert import hf_t5
from tagi_jax.models import lora
from tagi_jax.models.t5_config import T5Config

# seqio's T5 vocabulary appends 100 sentinel ids (<extra_id_99> ... <extra_id_0>) to the model.
SENTENCEPIECE_EXTRA_IDS = 100
# seqio ByteVocabulary: pad 0, EOS 1, UNK 2, then the 256 byte values.
BYTE_SPECIAL_IDS = 3
BYTE_VOCAB_SIZE = BYTE_SPECIAL_IDS + 256

_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


# --- vocabularies -------------------------------------------------------------------------


def sentencepiece_model_path(vocabulary: str) -> str | None:
    """The ``spiece.model`` a vocabulary names; None for ``"byte"``.

    ``vocabulary`` is what gin's vocabulary settings hold: ``"byte"``, a ``spiece.model`` file or
    a directory holding one.
    """
    if not isinstance(vocabulary, str) or not vocabulary:
        raise ValueError(
            f"vocabulary must be 'byte' or a SentencePiece model path, got {vocabulary!r}"
        )
    if vocabulary == "byte":
        return None
    model = paths.join(vocabulary, "spiece.model") if paths.isdir(vocabulary) else vocabulary
    if not paths.isfile(model):
        raise FileNotFoundError(
            f"vocabulary {vocabulary!r}: SentencePiece model not found at {model} "
            "(pass 'byte', a spiece.model file or a directory holding one)"
        )
    return model


def _processor(model: str):
    """A SentencePiece processor of the model file ``model`` (local or in cloud storage)."""
    import sentencepiece

    if paths.is_uri(model):
        return sentencepiece.SentencePieceProcessor(model_proto=paths.read_bytes(model))
    return sentencepiece.SentencePieceProcessor(model_file=model)


def vocabulary_size(vocabulary: str) -> int:
    """How many ids the tokenizer can emit (SentencePiece pieces + 100 sentinels, or 259)."""
    model = sentencepiece_model_path(vocabulary)
    if model is None:
        return BYTE_VOCAB_SIZE
    return _processor(model).get_piece_size() + SENTENCEPIECE_EXTRA_IDS


def decode_ids(vocabulary: str, ids) -> str:
    """Text of token ids (padding, EOS and sentinels dropped), without seqio or TensorFlow."""
    ids = [int(i) for i in ids]
    model = sentencepiece_model_path(vocabulary)
    if model is None:
        data = bytes(i - BYTE_SPECIAL_IDS for i in ids if BYTE_SPECIAL_IDS <= i < BYTE_VOCAB_SIZE)
        return data.decode("utf-8", errors="replace")
    processor = _processor(model)
    size = processor.get_piece_size()
    return processor.decode([i for i in ids if 0 < i < size and i != processor.eos_id()])


def write_tokenizer(vocabulary: str, directory: str, model_max_length: int = 512) -> None:
    """Writes the tokenizer files ``AutoTokenizer.from_pretrained(directory)`` needs."""
    model = sentencepiece_model_path(vocabulary)
    if model is None:
        tokenizer = {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 0}
    else:
        paths.copyfile(model, paths.join(directory, "spiece.model"))
        # legacy=False: transformers 4's slow T5Tokenizer then matches sentencepiece exactly.
        tokenizer = {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": SENTENCEPIECE_EXTRA_IDS,
            "legacy": False,
        }
    tokenizer.update(_SPECIAL_TOKENS, model_max_length=model_max_length)
    write_json(paths.join(directory, "tokenizer_config.json"), tokenizer)
    write_json(paths.join(directory, "special_tokens_map.json"), dict(_SPECIAL_TOKENS))


def check_vocabulary_fits(t5_config: T5Config, vocabulary: str) -> None:
    size = vocabulary_size(vocabulary)
    if size > t5_config.vocab_size:
        raise ValueError(
            f"vocabulary {vocabulary!r} emits {size} ids but the model's vocab_size is "
            f"{t5_config.vocab_size}: this tokenizer does not belong to this model"
        )


# --- atomic directories -------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(out: str, *, kind: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh directory beside ``out`` that becomes ``out`` when the block succeeds (for
    an ``out`` in cloud storage: a local temporary directory, copied there at the end, the
    marker file last).

    ``out`` must be a place a ``kind`` output (``"hf"``, ``"peft"``) may go
    (``export_format.check_replaceable``: never a training run or anything that is not a
    previous output of that kind); an existing one is replaced only with ``overwrite``, and only
    after the new one is complete. On error the partial directory is removed and ``out`` is
    untouched.
    """
    from tagi_jax.artifacts import export_format

    out = export_format.check_replaceable(out, kind, overwrite=overwrite)
    # Local: beside `out`, so the final rename stays on one filesystem and is atomic.
    tmp = paths.local_dir_for(out, ".tmp-")
    try:
        yield tmp
        paths.swap_dir(tmp, out, last=export_format._markers(kind))
    except BaseException:
        with contextlib.suppress(OSError):
            paths.rmtree(tmp, missing_ok=True)
        raise


def write_json(path: str, value: Any) -> None:
    paths.write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# --- the export ---------------------------------------------------------------------------


def check_mergeable(t5_config: T5Config, student=None) -> None:
    """Raises ValueError when LoRA adapters of this model cannot become a plain HF T5.

    ``student``: the ``TagiConfig`` the adapters came from, if any (its ``fusion`` matters).
    """
    if t5_config.instruction_cross_attention:
        raise ValueError(
            "cannot export this student as a Hugging Face T5: T5Config."
            "instruction_cross_attention is on, so every encoder block also attends to the "
            "encoded instruction at run time, which no T5ForConditionalGeneration can do"
        )
    if student is not None and student.fusion:
        raise ValueError(
            "cannot export this student as a task-merged Hugging Face T5: TagiConfig.fusion is "
            "on, so its decoder also cross-attends to the encoded instruction at run time, "
            "which merged LoRA weights cannot express"
        )


def write_hf_into(
    t5_config: T5Config,
    t5_params,
    directory: str,
    *,
    vocabulary: str,
    adapters: lora.LoraAdapters | None = None,
    student=None,
) -> None:
    """``write_hf`` into an existing directory, without the atomic rename (for bigger exports
    that put a model directory inside their own)."""
    if adapters is not None:
        check_mergeable(t5_config, student)
        if adapters.batch_size != 1:
            raise ValueError(
                f"adapters hold {adapters.batch_size} rows; a merged export takes one task's "
                "adapters (batch 1, e.g. tagi.generate_adapters for one instruction)"
            )
        t5_params = lora.merge(t5_config, t5_params, adapters, 0)
    elif t5_config.instruction_cross_attention:
        check_mergeable(t5_config)
    check_vocabulary_fits(t5_config, vocabulary)
    hf_t5.save(t5_config, t5_params, directory)
    write_tokenizer(vocabulary, directory)


def write_hf(
    t5_config: T5Config,
    t5_params,
    out: str,
    *,
    vocabulary: str,
    adapters: lora.LoraAdapters | None = None,
    student=None,
    overwrite: bool = False,
) -> str:
    """Writes a Hugging Face T5 directory (model + tokenizer) to ``out``; returns its path.

    Args:
      t5_config, t5_params: the backbone (e.g. ``config.t5`` and ``params["t5"]`` of a student).
      out: the directory to create.
      vocabulary: ``"byte"``, or a ``spiece.model`` (or a directory holding one).
      adapters: one task's ``LoraAdapters`` (batch 1), merged into the kernels first.
      student: the ``TagiConfig`` that generated ``adapters``; a fusion student is refused.
      overwrite: replace an existing non-empty ``out``.
    """
    with atomic_directory(out, kind="hf", overwrite=overwrite) as tmp:
        write_hf_into(
            t5_config, t5_params, tmp, vocabulary=vocabulary, adapters=adapters, student=student
        )
    return paths.absolute(out)


def write_task_hf(
    config, params, instruction_tokens, out: str, *, vocabulary: str, overwrite: bool = False
) -> str:
    """One instruction's task-merged student (``TagiConfig``, its params) as a plain HF T5:
    ``write_hf`` with the adapters generated from ``instruction_tokens`` ``[1, length]``."""
    from tagi_jax.convert import peft_export
    from tagi_jax.models import tagi

    check_mergeable(config.t5, config)
    # encode_task: jitted once per config, as evaluation does.
    _, adapters = tagi.encode_task(config, params, peft_export.instruction_row(instruction_tokens))
    return write_hf(
        config.t5,
        params["t5"],
        out,
        vocabulary=vocabulary,
        adapters=adapters,
        student=config,
        overwrite=overwrite,
    )

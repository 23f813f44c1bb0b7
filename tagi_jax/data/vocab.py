"""Vocabularies: T5's SentencePiece from a checkpoint directory, or bytes.

Gin chooses through ``DataConfig.vocabulary`` (``"byte"`` or a SentencePiece path); this
module is imported lazily, after gin has locked its registry, so it registers nothing itself.

``seqio.SentencePieceVocabulary`` loads its model lazily (on first use), so building one here
reads no file; a missing ``spiece.model`` is reported when the path is checked below, naming it.
"""

from __future__ import annotations

from tagi_jax import paths
from tagi_jax.data.tf_setup import import_tensorflow

import_tensorflow()  # before seqio: TensorFlow must never see the accelerators

import seqio  # noqa: E402

VOCABULARIES = ("sentencepiece", "byte")


def get_vocabulary(kind: str = "sentencepiece", path: str | None = None, extra_ids: int = 100):
    """``sentencepiece``: ``path`` is a checkpoint directory holding ``spiece.model`` (or the
    model file itself), with T5's 100 sentinel ids by default. ``byte``: UTF-8 bytes + 3 special
    ids (pad 0, EOS 1, UNK 2), needing no file — the built-in suite's vocabulary."""
    if kind == "byte":
        return seqio.ByteVocabulary(extra_ids=0)
    if kind != "sentencepiece":
        raise ValueError(f"vocabulary kind={kind!r} is not one of {VOCABULARIES}")
    if path is None:
        raise ValueError("vocabulary.path is required for a sentencepiece vocabulary")
    # seqio reads the model through tf.io.gfile: a gs:// path works as a local one does
    model = paths.join(path, "spiece.model") if paths.isdir(path) else path
    if not paths.isfile(model):
        raise FileNotFoundError(f"SentencePiece model not found: {model}")
    return seqio.SentencePieceVocabulary(model, extra_ids=extra_ids)


def from_name(name: str):
    """What gin's ``vocabulary`` settings name: ``"byte"``, or a SentencePiece path (a
    checkpoint directory or a ``spiece.model``)."""
    if name == "byte":
        return get_vocabulary("byte")
    return get_vocabulary("sentencepiece", name)

"""Token ids outside the tf.data pipeline: text to padded ids, targets to decoder inputs.

The one host-side tokenize-and-pad (the predictor, evaluation, the LoRA-teacher stage, export)
and the one decoder-input shift (the LoRA-teacher batches, P3 scoring). They give the ids the
SeqIO pipeline gives (``seqio.preprocessors.tokenize`` + ``append_eos_after_trim`` + the
feature converter's padding and ``make_autoregressive_inputs``), which
``tests/test_data_config.py`` checks. TensorFlow-free: the vocabulary is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = 0  # T5's decoder starts from the pad id


def encode_padded(vocabulary, texts: Sequence[str], length: int) -> np.ndarray:
    """EOS-terminated ids, trimmed (EOS kept last) and padded to ``length``: ``int32
    [len(texts), length]``."""
    out = np.full((len(texts), length), PAD_ID, np.int32)
    for row, text in enumerate(texts):
        ids = list(vocabulary.encode(text))[: length - 1] + [EOS_ID]
        out[row, : len(ids)] = ids
    return out


def shift_right(targets: np.ndarray, start_id: int = DECODER_START_ID) -> np.ndarray:
    """Decoder inputs from targets (last axis: positions): ``start_id``, then the targets
    without their last position (teacher forcing)."""
    targets = np.asarray(targets)
    start = np.full_like(targets[..., :1], start_id)
    return np.concatenate([start, targets[..., :-1]], axis=-1)

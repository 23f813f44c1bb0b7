"""Evaluation of natural-instructions-format tasks: greedy decoding with adapters generated once
per task, ROUGE-L and exact match per task, per category and overall.

A task's instruction (definition + demonstrations) is the same for all its instances, so it is
encoded and the hypernetwork runs once per task (``tagi.encode_task``): ``lora.take`` expands
the adapters over each batch and the decoder's fused memory reuses the encoded instruction.
The base model (``use_adapters=False``) decodes with the plain T5 from the student's input
alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from tagi_jax.evaluation import ni_metrics
from tagi_jax.models import lora, t5, tagi
from tagi_jax.models.tagi_config import TagiConfig


def encode_padded(vocabulary, texts: Sequence[str], length: int) -> np.ndarray:
    """EOS-terminated ids, trimmed (EOS kept last) and padded to ``length``."""
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        ids = list(vocabulary.encode(text))[: length - 1] + [1]
        out[row, : len(ids)] = ids
    return out


def _text(vocabulary, ids: np.ndarray) -> str:
    ids = [int(i) for i in ids]
    if 1 in ids:
        ids = ids[: ids.index(1)]
    return vocabulary.decode([i for i in ids if i > 1])


def evaluate(
    model: TagiConfig,
    params,
    examples: Sequence[dict],
    vocabulary,
    *,
    input_length: int,
    instruction_length: int,
    max_decode_len: int,
    batch_size: int = 32,
    use_adapters: bool = True,
) -> dict:
    """Scores ``examples`` (from ``ni.iter_examples`` on an evaluation split).

    Returns ``ni_metrics.score`` results plus ``predictions`` (one per example, in order).
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i]["task_name"])
    by_task = itertools.groupby(order, key=lambda i: examples[i]["task_name"])
    result_slots: dict[int, str] = {}
    for _, indices in by_task:
        indices = list(indices)
        instruction = encode_padded(
            vocabulary, [examples[indices[0]]["hyper_inputs"]], instruction_length
        )
        states = adapters = None
        if use_adapters:
            states, adapters = tagi.encode_task(model, params, jnp.asarray(instruction))
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            # pad every batch to batch_size rows: one compilation for the whole evaluation
            rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
            enc = jnp.asarray(
                encode_padded(vocabulary, [examples[i]["inputs"] for i in rows], input_length)
            )
            if use_adapters:
                hyper = jnp.asarray(np.repeat(instruction, batch_size, axis=0))
                expanded = (
                    None
                    if adapters is None
                    else lora.take(adapters, jnp.zeros(batch_size, jnp.int32))
                )
                tokens = tagi.greedy_decode(
                    model,
                    params,
                    {"encoder_input_tokens": enc, "hyper_input_tokens": hyper},
                    max_decode_len=max_decode_len,
                    adapters=expanded,
                    instruction_states=states,
                )
            else:
                tokens = t5.greedy_decode(
                    model.t5, params["t5"], enc, max_decode_len=max_decode_len
                )
            tokens = np.asarray(tokens)
            for row, index in enumerate(chunk):
                result_slots[index] = _text(vocabulary, tokens[row])
    predictions = [result_slots[i] for i in range(len(examples))]
    results = ni_metrics.score(
        predictions,
        [e["references"] for e in examples],
        [e["task_name"] for e in examples],
        [e["category"] for e in examples],
    )
    results["predictions"] = predictions
    return results

"""Evaluation of natural-instructions-format tasks: decoding with adapters generated once per
instruction, ROUGE-L and exact match per task, per category and overall.

Decoding is the predictor's (``tagi_jax.predictor.Predictor``): a task's instruction
(definition + demonstrations) is encoded and the hypernetwork runs once per distinct
instruction text (``tagi.encode_task``), the adapters are expanded over each batch and the
decoder's fused memory reuses the encoded instruction. The base model (``use_adapters=False``)
decodes with the plain T5 from the student's input alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from tagi_jax.evaluation import ni_metrics
from tagi_jax.models.tagi_config import TagiConfig
from tagi_jax.predictor import Predictor


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
    beam_size: int = 1,
    alpha: float = 0.6,
    progress: bool = False,
) -> dict:
    """Scores ``examples`` (from ``ni.iter_examples`` on an evaluation split).

    Returns ``ni_metrics.score`` results plus ``predictions`` (one per example, in order).
    ``beam_size`` 1 is greedy; larger beams search with t5x's length penalty ``alpha``.
    ``progress``: a progress bar on stderr.
    """
    predictor = Predictor(
        model,
        params,
        vocabulary,
        input_length=input_length,
        instruction_length=instruction_length,
        max_decode_len=max_decode_len,
        batch_size=batch_size,
    )
    inputs = [e["inputs"] for e in examples]
    if use_adapters:
        predictions = predictor.generate(
            [e["hyper_inputs"] for e in examples],
            inputs,
            beam_size=beam_size,
            alpha=alpha,
            progress=progress,
        )
    else:
        predictions = predictor.generate_base(inputs, progress=progress)
    results = ni_metrics.score(
        predictions,
        [e["references"] for e in examples],
        [e["task_name"] for e in examples],
        [e["category"] for e in examples],
    )
    results["predictions"] = predictions
    return results

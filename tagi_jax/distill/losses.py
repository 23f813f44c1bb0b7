"""TAGI's distillation losses: pure, jit-compatible, float32 whatever the compute dtype.

Every loss returns ``(scalar, metrics)``. ``weights`` are per-token weights ``[batch, length]``
(0 for padding); a loss averages over positions with weight > 0 as ``sum(w * loss) / sum(w)``.
Non-finite logits are never averaged away silently: every loss counts them in
``metrics["nonfinite"]`` and ``check_finite`` raises on them, naming the term.

The KL terms run over the vocabulary in chunks of positions inside a rematerialised scan, so
neither the forward nor the backward pass holds a float32 ``[batch, length, vocab]`` copy of
the logits beyond the gradient itself.

Correct forms are the default; the authors' forms sit behind explicitly named fields of
``LossConfig`` (tagi_spec.md §6, §12): ``kl_average_over_padding`` (their KL has no mask) and
``alignment_mode="authors_swapped"`` (their A↔B comparison).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from tagi_jax.models import lora

Metrics = dict[str, jax.Array]

# Rows of [positions, vocab] handled per scan step in the KL terms: 128 x 32128 float32 is
# 16 MiB per temporary (a few live at once), whatever the batch and target length.
KL_CHUNK_ROWS = 128


def _weighted_mean(values, weights):
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.maximum(total, 1e-8), total


def _nonfinite(*arrays) -> jax.Array:
    return sum(jnp.sum(~jnp.isfinite(a)).astype(jnp.int32) for a in arrays)


def _check_shapes(name: str, logits, weights, other=None, other_name="targets"):
    if logits.ndim != 3:
        raise ValueError(f"{name}: logits must be [batch, length, vocab], got {logits.shape}")
    if weights.shape != logits.shape[:2]:
        raise ValueError(
            f"{name}: weights {weights.shape} do not match logits {logits.shape[:2]} (batch, length)"
        )
    if other is not None and other.shape[:2] != logits.shape[:2]:
        raise ValueError(f"{name}: {other_name} {other.shape} do not match logits {logits.shape}")


# --- cross-entropy ------------------------------------------------------------------------


def cross_entropy(logits, targets, weights, *, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """Token-level cross-entropy, weighted mean over positions with weight > 0.

    ``label_smoothing`` spreads ε uniformly over the whole vocabulary (as
    ``torch.nn.functional.cross_entropy``); ``z_loss`` adds ``z_loss · log(Z)²`` per token
    (PaLM/t5x), keeping the softmax normaliser near 1.
    """
    _check_shapes("cross_entropy", logits, weights, targets)
    logits32 = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits32, axis=-1)
    target_logit = jnp.take_along_axis(logits32, targets[..., None].astype(jnp.int32), axis=-1)[
        ..., 0
    ]
    nll = log_z - target_logit
    if label_smoothing:
        # cross-entropy against the uniform distribution is log Z - mean(logits)
        uniform_nll = log_z - jnp.mean(logits32, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform_nll
    per_token = nll + z_loss * jnp.square(log_z) if z_loss else nll
    loss, tokens = _weighted_mean(per_token, weights)
    # "The target's logit is the largest" rather than argmax == target: the same except on
    # exact ties, and a max reduction (which logsumexp already computes) instead of XLA's
    # (value, index) reduction, which took 2% of the CPU train step.
    correct = (target_logit >= jnp.max(logits32, axis=-1)).astype(jnp.float32)
    metrics = {
        "cross_entropy": _weighted_mean(nll, weights)[0],
        "z_loss": _weighted_mean(jnp.square(log_z), weights)[0] * z_loss,
        "accuracy": _weighted_mean(correct, weights)[0],
        "tokens": tokens,
        "nonfinite": _nonfinite(logits32),
    }
    return loss, metrics


# --- chunked KL terms --------------------------------------------------------------------


def _chunk_rows(num_rows: int, limit: int = KL_CHUNK_ROWS) -> int:
    """The largest divisor of ``num_rows`` not above ``limit`` (reshaping, not padding, keeps
    the logits uncopied)."""
    for size in range(min(limit, num_rows), 0, -1):
        if num_rows % size == 0:
            return size
    return 1


def _standardize(x):
    # The authors' z-score over the vocabulary: (x - mean) / (1e-7 + std), population std.
    mean = jnp.mean(x, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True))
    return (x - mean) / (1e-7 + std)


def _chunked_kl(
    student,
    teacher,
    weights,
    *,
    temperature: float,
    vocab_size: int | None,
    transform: Callable | None,
):
    """Σ_pos w·KL(p_t‖p_s) and Σ w, and the non-finite count, over chunks of positions."""
    batch, length, width = student.shape
    rows = batch * length
    chunk = _chunk_rows(rows)
    n_chunks = rows // chunk
    s = student.reshape(n_chunks, chunk, width)
    t = teacher.reshape(n_chunks, chunk, teacher.shape[-1])
    w = weights.astype(jnp.float32).reshape(n_chunks, chunk)

    @jax.checkpoint
    def chunk_kl(s_chunk, t_chunk):
        s32, t32 = s_chunk.astype(jnp.float32), t_chunk.astype(jnp.float32)
        if vocab_size is not None:
            s32, t32 = s32[:, :vocab_size], t32[:, :vocab_size]
        if transform is not None:
            s32, t32 = transform(s32), transform(t32)
        log_ps = jax.nn.log_softmax(s32 / temperature, axis=-1)
        log_pt = jax.nn.log_softmax(t32 / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
        nonfinite = jnp.sum(~jnp.isfinite(s32)) + jnp.sum(~jnp.isfinite(t32))
        return kl, nonfinite.astype(jnp.int32)

    def body(carry, xs):
        total, bad = carry
        s_chunk, t_chunk, w_chunk = xs
        kl, nonfinite = chunk_kl(s_chunk, t_chunk)
        return (total + jnp.sum(kl * w_chunk), bad + nonfinite), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (total, bad), _ = jax.lax.scan(body, init, (s, t, w))
    return total, jnp.sum(w), bad


def _check_pair(name: str, student, teacher, weights, vocab_size):
    _check_shapes(name, student, weights)
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"{name}: teacher logits {teacher.shape} and student logits {student.shape} differ "
            "in batch or length"
        )
    if vocab_size is None and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{name}: teacher logits have {teacher.shape[-1]} vocabulary columns and student "
            f"logits {student.shape[-1]}; set vocab_size to the shared vocabulary (e.g. 32100) "
            "so the extra rows are masked"
        )
    if vocab_size is not None and vocab_size > min(student.shape[-1], teacher.shape[-1]):
        raise ValueError(
            f"{name}: vocab_size={vocab_size} exceeds the logits' widths "
            f"{student.shape[-1]} (student) / {teacher.shape[-1]} (teacher)"
        )


def kl_divergence(
    student_logits,
    teacher_logits,
    weights,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    vocab_size: int | None = None,
):
    """KL(teacher‖student) of the softmaxes at ``temperature``, summed over the vocabulary and
    averaged over positions with weight > 0. ``vocab_size`` restricts both to their first
    ``vocab_size`` columns (a 32100-row tokenizer in 32128-row models). Chunked (see module)."""
    _check_pair("kl_divergence", student_logits, teacher_logits, weights, vocab_size)
    total, tokens, bad = _chunked_kl(
        student_logits,
        teacher_logits,
        weights,
        temperature=temperature,
        vocab_size=vocab_size,
        transform=None,
    )
    loss = total / jnp.maximum(tokens, 1e-8)
    if scale_by_temperature_squared:
        loss = loss * temperature**2
    return loss, {"kl": loss, "tokens": tokens, "nonfinite": bad}


def standardized_kl(
    student_logits, teacher_logits, weights, *, temperature: float, vocab_size: int | None = None
):
    """KL(teacher‖student) on logits z-scored over the vocabulary, times temperature²
    (the authors' ``logit_stand`` term, with the real teacher)."""
    _check_pair("standardized_kl", student_logits, teacher_logits, weights, vocab_size)
    total, tokens, bad = _chunked_kl(
        student_logits,
        teacher_logits,
        weights,
        temperature=temperature,
        vocab_size=vocab_size,
        transform=_standardize,
    )
    loss = total / jnp.maximum(tokens, 1e-8) * temperature**2
    return loss, {"standardized_kl": loss, "tokens": tokens, "nonfinite": bad}


# --- adapter alignment --------------------------------------------------------------------

ALIGNMENT_MODES = ("delta", "authors_swapped")


def _squared_delta_error(a_gen, b_gen, a_teacher, b_teacher, gen_scale, teacher_scale, keep):
    """Σ over kept examples and blocks of ||s_g·A_g·B_g − s_t·A_t·B_t||², one block at a time
    (a ``[batch, d_in, d_out]`` update at most, never all blocks at once)."""

    @jax.checkpoint
    def per_block(xs):
        ag, bg, at, bt = (x.astype(jnp.float32) for x in xs)
        delta = gen_scale * jnp.einsum("bir,bro->bio", ag, bg) - teacher_scale * jnp.einsum(
            "bir,bro->bio", at, bt
        )
        return jnp.sum(jnp.sum(jnp.square(delta), axis=(1, 2)) * keep)

    return jnp.sum(jax.lax.map(per_block, (a_gen, b_gen, a_teacher, b_teacher)))


def adapter_alignment(
    generated: lora.LoraAdapters,
    teacher: lora.LoraAdapters,
    *,
    mode: str = "delta",
    example_mask=None,
):
    """Mean squared error between generated and teacher LoRA.

    ``delta`` (default): in ΔW space, ``scale·A·B`` of each against the other, averaged over
    every element of every kept example's update matrices; independent of how either side
    factors its update (rank, scale). ``authors_swapped``: the authors' element-wise
    ``MSE(A_gen, B_teacherᵀ) + MSE(B_gen, A_teacherᵀ)`` in PEFT orientation, scales ignored
    (only defined when ``d_in == d_out``). ``example_mask`` ``[batch]`` (bool) drops examples
    without a teacher.
    """
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"adapter_alignment: mode={mode!r} is not one of {ALIGNMENT_MODES}")
    missing = sorted(set(generated.targets) - set(teacher.targets))
    if missing:
        raise ValueError(f"adapter_alignment: the teacher has no LoRA for targets {missing}")
    batch = generated.batch_size
    keep = (
        jnp.ones((batch,), jnp.float32)
        if example_mask is None
        else jnp.asarray(example_mask).astype(jnp.float32)
    )
    kept = jnp.maximum(jnp.sum(keep), 1.0)
    total, count = jnp.zeros((), jnp.float32), 0
    for name in generated.targets:
        ag, bg = generated.a[name], generated.b[name]
        at, bt = teacher.a[name], teacher.b[name]
        if ag.shape[:3] != at.shape[:3] or bg.shape[-1] != bt.shape[-1]:
            raise ValueError(
                f"adapter_alignment: {name}: generated A {ag.shape} / B {bg.shape} and teacher "
                f"A {at.shape} / B {bt.shape} disagree on layers, batch or widths"
            )
        layers, _, d_in, rank = ag.shape
        d_out = bg.shape[-1]
        if mode == "delta":
            total += _squared_delta_error(ag, bg, at, bt, generated.scale, teacher.scale, keep)
            count += layers * d_in * d_out
        else:
            if d_in != d_out or at.shape[-1] != rank:
                raise ValueError(
                    f"adapter_alignment: authors_swapped needs square updates of one rank; "
                    f"{name} has d_in={d_in}, d_out={d_out}, ranks {rank}/{at.shape[-1]}"
                )
            # PEFT stores lora_A.weight [r, d_in] = A_teacherᵀ and lora_B.weight [d_out, r]
            # = B_teacherᵀ; the authors regress A_gen [d_in, r] on lora_B.weight and B_gen
            # [r, d_out] on lora_A.weight.
            peft_b = jnp.swapaxes(bt, -1, -2).astype(jnp.float32)
            peft_a = jnp.swapaxes(at, -1, -2).astype(jnp.float32)
            err_a = jnp.sum(jnp.square(ag.astype(jnp.float32) - peft_b), axis=(0, 2, 3))
            err_b = jnp.sum(jnp.square(bg.astype(jnp.float32) - peft_a), axis=(0, 2, 3))
            total += jnp.sum((err_a + err_b) * keep)
            count += layers * d_in * rank
    # delta: the mean over update elements; authors_swapped: mean over A elements plus mean
    # over B elements, which have the same count.
    loss = total / (kept * count)
    nonfinite = _nonfinite(*generated.a.values(), *generated.b.values())
    return loss, {"alignment": loss, "nonfinite": nonfinite}


# --- the TAGI objective -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the TAGI objective (gin: ``LossConfig.<field>``).

    Default = the authors' logged weights in correct forms, with a calibrated alignment:
    ``0.6·CE + 0.4·KL(τ=3, padding masked) + w·MSE(ΔW)``, where the trainer sets ``w`` at the
    start of training so that the alignment's gradient norm is ``alignment_grad_ratio`` (0.25)
    times the weighted CE's (``training.loop``; the value is logged and kept for resumes).
    Why: the authors' ``σ(ℓ)·ℓ, ℓ = 1000·MSE`` was sized for raw A/B entries; on ΔW entries,
    which are orders of magnitude smaller, it contributes almost no gradient (WORKSPACE.md,
    "Alignment calibration"). ``losses/authors_exact.gin`` restores the authors' exact form;
    the ``paper`` preset is ``CE + λ1·KL + λ2·alignment`` without the gate.

    Attributes:
      ce_weight, kl_weight, standardized_kl_weight, alignment_weight: term weights.
      temperature: τ of both KL terms.
      kl_scale_by_temperature_squared: multiply the KL by τ² (Hinton); the authors do not.
      kl_average_over_padding: fidelity flag: average the KL over every position, padding
        included, as the authors' code does.
      alignment_scale: ℓ = alignment_scale · alignment.
      alignment_gate: ``sigmoid`` (σ(ℓ)·ℓ, the authors) or ``none`` (ℓ).
      alignment_mode: ``delta`` (ΔW space) or ``authors_swapped`` (fidelity flag).
      alignment_grad_ratio: when set, the trainer rescales ``alignment_weight`` on the first
        batch of a fresh run so that ‖∇ alignment term‖ = ratio · ‖∇ ce_weight·CE‖; None keeps
        ``alignment_weight`` as given.
      label_smoothing, z_loss: of the cross-entropy.
      vocab_size: compare teacher and student on their first ``vocab_size`` columns only.
    """

    ce_weight: float = 0.6
    kl_weight: float = 0.4
    standardized_kl_weight: float = 0.0
    alignment_weight: float = 1.0
    temperature: float = 3.0
    kl_scale_by_temperature_squared: bool = False
    kl_average_over_padding: bool = False
    alignment_scale: float = 1.0
    alignment_gate: str = "none"
    alignment_mode: str = "delta"
    alignment_grad_ratio: float | None = 0.25
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    vocab_size: int | None = None

    def __post_init__(self):
        if self.alignment_gate not in ("sigmoid", "none"):
            raise ValueError(
                f"LossConfig.alignment_gate={self.alignment_gate!r} is not sigmoid/none"
            )
        if self.alignment_mode not in ALIGNMENT_MODES:
            raise ValueError(
                f"LossConfig.alignment_mode={self.alignment_mode!r} is not one of {ALIGNMENT_MODES}"
            )
        if not self.temperature > 0:
            raise ValueError(f"LossConfig.temperature must be positive, got {self.temperature}")
        for name in ("ce_weight", "kl_weight", "standardized_kl_weight", "alignment_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        ratio = self.alignment_grad_ratio
        if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"LossConfig.alignment_grad_ratio must be > 0 or None, got {ratio}")

    def weighted_terms(self) -> tuple[str, ...]:
        """The names of the terms with a positive weight (``term/<name>`` metrics)."""
        weights = {
            "cross_entropy": self.ce_weight,
            "kl": self.kl_weight,
            "standardized_kl": self.standardized_kl_weight,
            "alignment": self.alignment_weight,
        }
        return tuple(name for name, weight in weights.items() if weight)

    @classmethod
    def paper(cls, kl_weight: float = 1.0, alignment_weight: float = 1.0) -> LossConfig:
        """Paper Eq. 6, ``L_pred + λ1·L_kl + λ2·L_ins``; the paper never gives λ1, λ2 (λ2 is
        calibrated like the default unless ``alignment_grad_ratio=None``)."""
        return cls(
            ce_weight=1.0,
            kl_weight=kl_weight,
            alignment_weight=alignment_weight,
            alignment_scale=1.0,
            alignment_gate="none",
        )


def tagi_loss(
    config: LossConfig,
    student_logits,
    targets,
    weights,
    *,
    teacher_logits=None,
    generated: lora.LoraAdapters | None = None,
    teacher_adapters: lora.LoraAdapters | None = None,
    teacher_mask=None,
):
    """The weighted TAGI objective and every term as a metric.

    Metrics: each term's raw value (``cross_entropy``, ``kl``, ``standardized_kl``,
    ``alignment``; ``alignment_term`` is the scaled and gated alignment) and its weighted
    contribution to the loss as ``term/<name>`` (``loss`` is their sum; the trainer
    differentiates each ``term/`` separately for its gradient share, see
    ``training.state.term_gradients``).

    Terms whose weight is 0 are skipped; a term with a positive weight whose inputs are missing
    is an error (not silently dropped).
    """
    metrics: Metrics = {}
    total = jnp.zeros((), jnp.float32)
    bad = jnp.zeros((), jnp.int32)
    if config.ce_weight:
        ce, m = cross_entropy(
            student_logits,
            targets,
            weights,
            label_smoothing=config.label_smoothing,
            z_loss=config.z_loss,
        )
        total += config.ce_weight * ce
        bad += m.pop("nonfinite")
        metrics.update(m)
        metrics["term/cross_entropy"] = config.ce_weight * ce
    kl_weights = jnp.ones_like(weights) if config.kl_average_over_padding else weights
    for weight, name, fn, kwargs in (
        (
            config.kl_weight,
            "kl",
            kl_divergence,
            {"scale_by_temperature_squared": config.kl_scale_by_temperature_squared},
        ),
        (config.standardized_kl_weight, "standardized_kl", standardized_kl, {}),
    ):
        if not weight:
            continue
        if teacher_logits is None:
            raise ValueError(f"tagi_loss: LossConfig weights {name} but no teacher_logits given")
        value, m = fn(
            student_logits,
            teacher_logits,
            kl_weights,
            temperature=config.temperature,
            vocab_size=config.vocab_size,
            **kwargs,
        )
        total += weight * value
        bad += m["nonfinite"]
        metrics[name] = value
        metrics[f"term/{name}"] = weight * value
    if config.alignment_weight:
        if generated is None or teacher_adapters is None:
            raise ValueError(
                "tagi_loss: LossConfig weights the adapter alignment but generated or teacher "
                "adapters are missing"
            )
        align, m = adapter_alignment(
            generated, teacher_adapters, mode=config.alignment_mode, example_mask=teacher_mask
        )
        ell = config.alignment_scale * align
        term = jax.nn.sigmoid(ell) * ell if config.alignment_gate == "sigmoid" else ell
        total += config.alignment_weight * term
        bad += m["nonfinite"]
        metrics["alignment"] = align
        metrics["alignment_term"] = term
        metrics["term/alignment"] = config.alignment_weight * term
    metrics["loss"] = total
    metrics["nonfinite"] = bad
    return total, metrics


def check_finite(metrics: Mapping[str, jax.Array]) -> None:
    """Host-side: raises FloatingPointError naming the non-finite terms (call it on the
    metrics of every step; the jitted losses cannot raise)."""
    problems = [
        name
        for name, value in metrics.items()
        if name != "nonfinite" and not math.isfinite(float(jnp.asarray(value)))
    ]
    count = int(metrics.get("nonfinite", 0))
    if count:
        problems.append(f"{count} non-finite logits/adapter values")
    if problems:
        raise FloatingPointError(f"non-finite loss terms: {', '.join(problems)}")

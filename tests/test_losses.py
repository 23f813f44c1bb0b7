"""Distillation losses against independent implementations (numpy, torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.distill import losses
from tagi_jax.models import lora

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _inputs(batch=3, length=5, vocab=11, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    student = (rng.standard_normal((batch, length, vocab)) * scale).astype(np.float32)
    teacher = (rng.standard_normal((batch, length, vocab)) * scale).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    weights = np.ones((batch, length), np.float32)
    weights[0, 3:] = 0  # padding
    weights[1, :] = 0  # a whole row dropped
    return student, teacher, targets, weights


def _numpy_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_kl(student, teacher, weights, temperature):
    log_ps = _numpy_log_softmax(student.astype(np.float64) / temperature)
    log_pt = _numpy_log_softmax(teacher.astype(np.float64) / temperature)
    per_pos = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    return (per_pos * weights).sum() / weights.sum()


# --- cross-entropy ---------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(label_smoothing):
    student, _, targets, weights = _inputs()
    loss, metrics = losses.cross_entropy(
        jnp.asarray(student),
        jnp.asarray(targets),
        jnp.asarray(weights),
        label_smoothing=label_smoothing,
    )
    mask = weights.reshape(-1) > 0
    expected = F.cross_entropy(
        torch.tensor(student.reshape(-1, student.shape[-1])[mask]),
        torch.tensor(targets.reshape(-1)[mask], dtype=torch.long),
        label_smoothing=label_smoothing,
    ).item()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["tokens"]) == mask.sum()
    assert int(metrics["nonfinite"]) == 0


def test_cross_entropy_z_loss_and_accuracy():
    student, _, targets, weights = _inputs(seed=1)
    loss, metrics = losses.cross_entropy(
        jnp.asarray(student), jnp.asarray(targets), jnp.asarray(weights), z_loss=1e-2
    )
    x = student.astype(np.float64)
    log_z = np.log(np.exp(x).sum(-1))
    nll = log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    expected = ((nll + 1e-2 * log_z**2) * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    accuracy = ((x.argmax(-1) == targets) * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)


# --- KL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("squared", [False, True])
def test_kl_matches_torch_kl_div(temperature, squared):
    student, teacher, _, weights = _inputs(seed=2)
    loss, metrics = losses.kl_divergence(
        jnp.asarray(student),
        jnp.asarray(teacher),
        jnp.asarray(weights),
        temperature=temperature,
        scale_by_temperature_squared=squared,
    )
    per_pos = F.kl_div(
        F.log_softmax(torch.tensor(student) / temperature, -1),
        F.log_softmax(torch.tensor(teacher) / temperature, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    w = torch.tensor(weights)
    expected = ((per_pos * w).sum() / w.sum()).item() * (temperature**2 if squared else 1.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(
        float(loss),
        _numpy_kl(student, teacher, weights, temperature) * (temperature**2 if squared else 1),
        rtol=1e-5,
    )
    assert float(metrics["tokens"]) == weights.sum()


def test_chunked_kl_equals_naive_on_a_real_vocabulary():
    student, teacher, _, weights = _inputs(batch=2, length=300, vocab=32128, seed=3, scale=4.0)
    s, t, w = jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights)
    chunked, _ = losses.kl_divergence(s, t, w, temperature=3.0)
    log_ps = jax.nn.log_softmax(s / 3.0)
    log_pt = jax.nn.log_softmax(t / 3.0)
    naive = jnp.sum(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1) * w) / jnp.sum(w)
    # 600 positions = 5 chunks of 120: the chunking is exercised
    assert losses._chunk_rows(600) == 120
    np.testing.assert_allclose(float(chunked), float(naive), atol=1e-6, rtol=0)
    # and gradients agree too
    g_chunked = jax.grad(lambda x: losses.kl_divergence(x, t, w, temperature=3.0)[0])(s)
    g_naive = jax.grad(
        lambda x: (
            jnp.sum(jnp.sum(jnp.exp(log_pt) * (log_pt - jax.nn.log_softmax(x / 3.0)), -1) * w)
            / jnp.sum(w)
        )
    )(s)
    np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_naive), atol=1e-9, rtol=1e-5)


def test_kl_gradient_formula():
    """dKL/ds = (p_s - p_t)/τ per kept position, divided by the number of kept positions."""
    student, teacher, _, weights = _inputs(seed=4)
    grad = jax.grad(
        lambda s: losses.kl_divergence(
            s, jnp.asarray(teacher), jnp.asarray(weights), temperature=3.0
        )[0]
    )(jnp.asarray(student))
    ps = np.exp(_numpy_log_softmax(student.astype(np.float64) / 3.0))
    pt = np.exp(_numpy_log_softmax(teacher.astype(np.float64) / 3.0))
    expected = (ps - pt) / 3.0 * weights[..., None] / weights.sum()
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-7)


def test_standardized_kl_matches_numpy():
    student, teacher, _, weights = _inputs(seed=5)
    loss, _ = losses.standardized_kl(
        jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), temperature=3.0
    )

    def z(x):
        x = x.astype(np.float64)
        return (x - x.mean(-1, keepdims=True)) / (1e-7 + x.std(-1, keepdims=True))

    expected = 9.0 * _numpy_kl(z(student), z(teacher), weights, 3.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_kl_over_a_shared_vocabulary():
    """32100-row tokenizer in 32128-row models: the extra columns are ignored, not compared."""
    student, teacher, _, weights = _inputs(vocab=20, seed=6)
    teacher_wide = np.concatenate([teacher, np.full((3, 5, 4), 50.0, np.float32)], axis=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        losses.kl_divergence(jnp.asarray(student), jnp.asarray(teacher_wide), jnp.asarray(weights))
    loss, _ = losses.kl_divergence(
        jnp.asarray(student), jnp.asarray(teacher_wide), jnp.asarray(weights), vocab_size=20
    )
    np.testing.assert_allclose(float(loss), _numpy_kl(student, teacher, weights, 1.0), rtol=1e-5)


# --- alignment ---------------------------------------------------------------------------


def _adapters(seed, rank=3, layers=2, batch=2, d_in=4, d_out=4, scale=1.0):
    rng = np.random.default_rng(seed)
    a = {"enc_self.q": jnp.asarray(rng.standard_normal((layers, batch, d_in, rank)), jnp.float32)}
    b = {"enc_self.q": jnp.asarray(rng.standard_normal((layers, batch, rank, d_out)), jnp.float32)}
    return lora.LoraAdapters(a=a, b=b, scale=scale)


def test_delta_alignment_matches_materialised_updates():
    gen = _adapters(0, scale=0.5)
    teacher = _adapters(1, rank=5, scale=2.0)  # another rank and scale: compared in ΔW space
    loss, _ = losses.adapter_alignment(gen, teacher)
    dg = 0.5 * np.einsum("lbir,lbro->lbio", gen.a["enc_self.q"], gen.b["enc_self.q"])
    dt = 2.0 * np.einsum("lbir,lbro->lbio", teacher.a["enc_self.q"], teacher.b["enc_self.q"])
    np.testing.assert_allclose(float(loss), np.mean((dg - dt) ** 2), rtol=1e-5)
    zero, _ = losses.adapter_alignment(gen, gen)
    assert float(zero) == 0.0
    masked, _ = losses.adapter_alignment(gen, teacher, example_mask=jnp.array([True, False]))
    np.testing.assert_allclose(float(masked), np.mean((dg - dt)[:, 0] ** 2), rtol=1e-5)


def test_authors_swapped_alignment_by_hand():
    # one block, one example, rank 1, d = 2: every element written out
    gen = lora.LoraAdapters(
        a={"enc_self.q": jnp.array([[[[1.0], [2.0]]]])},  # A_gen [d_in=2, r=1]
        b={"enc_self.q": jnp.array([[[[3.0, 4.0]]]])},  # B_gen [r=1, d_out=2]
    )
    teacher = lora.LoraAdapters(
        a={"enc_self.q": jnp.array([[[[0.5], [1.0]]]])},  # ours: A_t [2, 1] -> lora_A.weight [1, 2]
        b={"enc_self.q": jnp.array([[[[1.0, -1.0]]]])},  # ours: B_t [1, 2] -> lora_B.weight [2, 1]
        scale=2.0,  # ignored by the authors' form
    )
    loss, _ = losses.adapter_alignment(gen, teacher, mode="authors_swapped")
    # MSE(A_gen, lora_B.weight) = ((1-1)² + (2+1)²)/2 = 4.5
    # MSE(B_gen, lora_A.weight) = ((3-0.5)² + (4-1)²)/2 = (6.25 + 9)/2 = 7.625
    np.testing.assert_allclose(float(loss), 4.5 + 7.625, rtol=1e-6)


def test_alignment_errors():
    with pytest.raises(ValueError, match="mode"):
        losses.adapter_alignment(_adapters(0), _adapters(1), mode="l1")
    with pytest.raises(ValueError, match="square"):
        losses.adapter_alignment(
            _adapters(0, d_out=6), _adapters(1, d_out=6), mode="authors_swapped"
        )
    other = lora.LoraAdapters(
        a={"enc_self.v": jnp.zeros((2, 2, 4, 3))}, b={"enc_self.v": jnp.zeros((2, 2, 3, 4))}
    )
    with pytest.raises(ValueError, match="enc_self.q"):
        losses.adapter_alignment(_adapters(0), other)


# --- the total ---------------------------------------------------------------------------


def _full_objective(config):
    """``tagi_loss`` with every input on one fixed draw, and those inputs (plus the CE alone)."""
    student, teacher, targets, weights = _inputs(seed=7)
    gen, teach = _adapters(2), _adapters(3)
    s, y, w = jnp.asarray(student), jnp.asarray(targets), jnp.asarray(weights)
    out = losses.tagi_loss(
        config, s, y, w, teacher_logits=jnp.asarray(teacher), generated=gen, teacher_adapters=teach
    )
    ce = float(losses.cross_entropy(s, y, w)[0])
    return out, (student, teacher, weights, ce, gen, teach)


def test_tagi_loss_default_is_the_authors_weights_with_a_plain_delta_alignment():
    """0.6·CE + 0.4·KL(τ=3) + w·MSE(ΔW) (w = alignment_weight, which the trainer calibrates);
    each weighted contribution is a ``term/`` metric and they add up to the loss."""
    config = losses.LossConfig(alignment_weight=3.0)
    assert config.alignment_grad_ratio == 0.25  # calibrated in the trainer by default
    (total, metrics), (student, teacher, weights, ce, gen, teach) = _full_objective(config)
    kl = _numpy_kl(student, teacher, weights, 3.0)
    align = float(losses.adapter_alignment(gen, teach)[0])
    expected = 0.6 * ce + 0.4 * kl + 3.0 * align
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert set(metrics) >= {"cross_entropy", "kl", "alignment", "alignment_term", "loss"}
    assert config.weighted_terms() == ("cross_entropy", "kl", "alignment")
    terms = [float(metrics[f"term/{name}"]) for name in config.weighted_terms()]
    np.testing.assert_allclose(terms, [0.6 * ce, 0.4 * kl, 3.0 * align], rtol=1e-5)
    np.testing.assert_allclose(sum(terms), float(total), rtol=1e-6)


def test_tagi_loss_authors_exact_form():
    """losses/authors_exact.gin: σ(ℓ)·ℓ with ℓ = 1000·(swapped MSEs), KL over padding too."""
    config = losses.LossConfig(
        kl_average_over_padding=True,
        alignment_mode="authors_swapped",
        alignment_scale=1000.0,
        alignment_gate="sigmoid",
        alignment_grad_ratio=None,
    )
    (total, _), (student, teacher, weights, ce, gen, teach) = _full_objective(config)
    kl = _numpy_kl(student, teacher, np.ones_like(weights), 3.0)
    ell = 1000.0 * float(losses.adapter_alignment(gen, teach, mode="authors_swapped")[0])
    expected = 0.6 * ce + 0.4 * kl + ell / (1 + np.exp(-ell))
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="alignment_grad_ratio"):
        losses.LossConfig(alignment_grad_ratio=0.0)


def test_tagi_loss_paper_preset_and_fidelity_flags():
    student, teacher, targets, weights = _inputs(seed=8)
    s, t, y, w = (jnp.asarray(x) for x in (student, teacher, targets, weights))
    gen, teach = _adapters(4), _adapters(5)
    paper = losses.LossConfig.paper(kl_weight=0.5, alignment_weight=2.0)
    total, _ = losses.tagi_loss(
        paper, s, y, w, teacher_logits=t, generated=gen, teacher_adapters=teach
    )
    expected = (
        float(losses.cross_entropy(s, y, w)[0])
        + 0.5 * _numpy_kl(student, teacher, weights, 3.0)
        + 2.0 * float(losses.adapter_alignment(gen, teach)[0])
    )
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    # the authors' KL averages over padded positions too
    unmasked = losses.LossConfig(
        ce_weight=0, alignment_weight=0, kl_weight=1, kl_average_over_padding=True
    )
    value, _ = losses.tagi_loss(unmasked, s, y, w, teacher_logits=t)
    np.testing.assert_allclose(
        float(value), _numpy_kl(student, teacher, np.ones_like(weights), 3.0), rtol=1e-5
    )
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.tagi_loss(losses.LossConfig(alignment_weight=0), s, y, w)
    with pytest.raises(ValueError, match="alignment_mode"):
        losses.LossConfig(alignment_mode="swap")


def test_nonfinite_logits_are_reported():
    student, teacher, targets, weights = _inputs(seed=9)
    student[2, 1, 3] = np.nan
    config = losses.LossConfig(alignment_weight=0)
    total, metrics = losses.tagi_loss(
        config,
        jnp.asarray(student),
        jnp.asarray(targets),
        jnp.asarray(weights),
        teacher_logits=jnp.asarray(teacher),
    )
    assert int(metrics["nonfinite"]) >= 2  # seen by the CE and by the KL
    with pytest.raises(FloatingPointError, match="non-finite"):
        losses.check_finite(metrics)
    clean, _, _, _ = _inputs(seed=9)
    ok = losses.tagi_loss(
        config,
        jnp.asarray(clean),
        jnp.asarray(targets),
        jnp.asarray(weights),
        teacher_logits=jnp.asarray(teacher),
    )[1]
    losses.check_finite(ok)


def test_shape_errors_name_the_input():
    student, teacher, targets, weights = _inputs()
    with pytest.raises(ValueError, match="teacher logits"):
        losses.kl_divergence(
            jnp.asarray(student), jnp.asarray(teacher[:, :4]), jnp.asarray(weights)
        )
    with pytest.raises(ValueError, match="weights"):
        losses.cross_entropy(
            jnp.asarray(student), jnp.asarray(targets), jnp.asarray(weights[:, :2])
        )


def test_each_loss_compiles_once():
    student, teacher, targets, weights = _inputs(seed=10)
    gen, teach = _adapters(6), _adapters(7)
    calls = {
        "ce": (lambda s, t, y, w: losses.cross_entropy(s, y, w)[0]),
        "kl": (lambda s, t, y, w: losses.kl_divergence(s, t, w, temperature=3.0)[0]),
        "std": (lambda s, t, y, w: losses.standardized_kl(s, t, w, temperature=3.0)[0]),
        "total": (
            lambda s, t, y, w: losses.tagi_loss(
                losses.LossConfig(),
                s,
                y,
                w,
                teacher_logits=t,
                generated=gen,
                teacher_adapters=teach,
            )[0]
        ),
    }
    for name, fn in calls.items():
        traces = []

        def counted(*args, fn=fn, traces=traces):
            traces.append(1)
            return fn(*args)

        jitted = jax.jit(counted)
        for step in range(3):
            args = [
                jnp.asarray(x + step) if x.dtype != np.int32 else jnp.asarray(x)
                for x in (student, teacher, targets, weights)
            ]
            jitted(*args).block_until_ready()
        assert len(traces) == 1, f"{name} retraced"

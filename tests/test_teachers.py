"""The logit teacher and the instance-trained LoRA teachers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tagi_jax.convert import param_checkpoint
from tagi_jax.distill import lora_teachers, losses, teacher
from tagi_jax.models import lora, t5
from tagi_jax.testing.tiny_t5 import TINY_T5

CONFIG = lora_teachers.LoraTeacherConfig(rank=4, alpha=8.0, learning_rate=1e-2)


@pytest.fixture(scope="module")
def base():
    return t5.init_params(TINY_T5, jax.random.key(0))


def _task_batch(k, rows=2, seed=0):
    """A group of rows for teacher k: each teacher sees its own data."""
    rng = np.random.default_rng(seed * 100 + k)
    enc = rng.integers(2, TINY_T5.vocab_size, (rows, 8)).astype(np.int32)
    target = rng.integers(2, TINY_T5.vocab_size, (rows, 5)).astype(np.int32)
    dec = np.concatenate([np.zeros((rows, 1), np.int32), target[:, :-1]], axis=1)
    weights = np.ones((rows, 5), np.float32)
    weights[0, 4] = 0
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec,
        "decoder_target_tokens": target,
        "decoder_loss_weights": weights,
    }


def _grouped(count, seed):
    groups = [_task_batch(k, seed=seed) for k in range(count)]
    return {key: jnp.asarray(np.stack([g[key] for g in groups])) for key in groups[0]}


# --- logit teacher --------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_logits_are_the_frozen_models_and_gradient_free(tmp_path, base):
    param_checkpoint.save(str(tmp_path / "teacher"), TINY_T5.replace(dropout_rate=0.1), base)
    loaded = teacher.load_teacher(str(tmp_path / "teacher"))
    assert loaded.config.dropout_rate == 0.0
    batch = _task_batch(0)
    enc, dec = (
        jnp.asarray(batch["encoder_input_tokens"]),
        jnp.asarray(batch["decoder_input_tokens"]),
    )
    logits = teacher.teacher_logits(loaded, enc, dec)
    np.testing.assert_array_equal(
        np.asarray(logits), np.asarray(t5.forward(TINY_T5, base, enc, dec))
    )

    def through_teacher(params):
        t = teacher.LogitTeacher(TINY_T5, params)
        return jnp.sum(teacher.teacher_logits(t, enc, dec) ** 2)

    grads = jax.grad(through_teacher)(base)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_load_teacher_missing_path(tmp_path):
    from tagi_jax.convert.tensor_store import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        teacher.load_teacher(str(tmp_path / "tk-instruct"))


# --- LoRA teachers -------------------------------------------------------------------


@pytest.mark.slow
def test_vmapped_teachers_equal_separately_trained(base):
    count, steps = 3, 3
    step = lora_teachers.make_train_step(CONFIG, TINY_T5)
    teachers = lora_teachers.init_teachers(CONFIG, TINY_T5, count)
    opt_state = lora_teachers.init_optimizer_states(CONFIG, teachers)
    for i in range(steps):
        teachers, opt_state, metrics = step(teachers, opt_state, base, _grouped(count, seed=i))
        assert metrics["loss"].shape == (count,)
    teachers = jax.device_get(teachers)

    tx = optax.adamw(CONFIG.learning_rate, weight_decay=CONFIG.weight_decay)
    for k in range(count):
        alone = lora_teachers.init_teacher(
            CONFIG, TINY_T5, jax.random.fold_in(jax.random.key(CONFIG.seed), k)
        )
        state = tx.init(alone)
        grad_fn = jax.jit(
            jax.grad(lambda p, b: lora_teachers.teacher_loss(CONFIG, TINY_T5, base, p, b)[0])
        )
        for i in range(steps):
            batch = jax.tree.map(jnp.asarray, _task_batch(k, seed=i))
            updates, state = tx.update(grad_fn(alone, batch), state, alone)
            alone = optax.apply_updates(alone, updates)
        for side in ("a", "b"):
            for name in CONFIG.targets:
                np.testing.assert_allclose(
                    np.asarray(teachers[side][name][k]),
                    np.asarray(alone[side][name]),
                    atol=1e-5,
                    rtol=0,
                )
        # and training moved B away from its zero start
        assert float(jnp.abs(alone["b"]["enc_self.q"]).max()) > 0


@pytest.mark.slow
def test_training_lowers_each_teachers_loss_and_round_trips(tmp_path, base):
    names = ("task_a", "task_b")
    fixed = _grouped(2, seed=0)  # overfit one batch per teacher
    bank, history = lora_teachers.train_teachers(
        CONFIG, TINY_T5, base, names, iter([fixed] * 30), num_steps=30
    )
    assert (history[-1] < history[0] - 0.5).all(), (history[0], history[-1])
    path = str(tmp_path / "teachers.safetensors")
    bank.save(path)
    loaded = lora_teachers.TeacherBank.load(path)
    assert loaded.names == names and loaded.rank == 4 and loaded.alpha == 8.0
    assert loaded.targets == CONFIG.targets
    for name in CONFIG.targets:
        np.testing.assert_array_equal(loaded.a[name], np.asarray(bank.a[name]))

    # each example gets its own teacher's LoRA, and it reproduces that teacher's model
    adapters, keep = loaded.adapters_for(["task_b", "task_a", "task_b"])
    assert bool(keep.all()) and adapters.scale == 2.0
    np.testing.assert_array_equal(
        np.asarray(adapters.a["dec_cross.v"][:, 0]), np.asarray(bank.a["dec_cross.v"][1])
    )
    teacher_b = {
        "a": {k: v[1] for k, v in bank.a.items()},
        "b": {k: v[1] for k, v in bank.b.items()},
    }
    batch = jax.tree.map(lambda x: jnp.asarray(x[1]), fixed)
    direct = lora_teachers.teacher_loss(CONFIG, TINY_T5, base, teacher_b, batch)[0]
    rows = jnp.array([0, 0])
    via_bank = lora.take(loaded.adapters_for(["task_b", "task_b"])[0], rows)
    logits = t5.forward(
        TINY_T5,
        base,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        adapters=via_bank,
    )
    again = losses.cross_entropy(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    )[0]
    np.testing.assert_allclose(float(again), float(direct), rtol=1e-6)


def test_missing_teacher_is_named_or_masked(tmp_path):
    bank = lora_teachers.TeacherBank(
        names=("qa",),
        a={"enc_self.q": np.zeros((1, 2, 64, 4), np.float32)},
        b={"enc_self.q": np.zeros((1, 2, 4, 64), np.float32)},
        rank=4,
        alpha=8.0,
        group_by="category",
    )
    with pytest.raises(KeyError, match="category.*summarization"):
        bank.adapters_for(["qa", "summarization"])
    _, keep = bank.adapters_for(["qa", "summarization"], skip_missing=True)
    np.testing.assert_array_equal(np.asarray(keep), [True, False])


def test_bad_teacher_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora_teachers.TeacherBank.load(str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        lora_teachers.TeacherBank.load(str(tmp_path / "junk.safetensors"))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA teacher file"):
        lora_teachers.TeacherBank.load(str(tmp_path / "other.safetensors"))


def test_teacher_config_validation():
    with pytest.raises(ValueError, match="rank"):
        lora_teachers.LoraTeacherConfig(rank=0)
    with pytest.raises(ValueError, match="group_by"):
        lora_teachers.LoraTeacherConfig(group_by="dataset")
    with pytest.raises(ValueError, match="unknown"):
        lora_teachers.LoraTeacherConfig(targets=("enc_self.w",))

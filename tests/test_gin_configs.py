"""Every gin file parses, binds only known fields, and the model sizes are the released ones."""

import glob
import math
import os

import gin
import jax
import pytest

from tagi_jax import configurables
from tagi_jax.models import t5
from tagi_jax.training import loop

GIN_ROOT = os.path.join(os.path.dirname(__file__), "..", "gin_configs")
ALL_GIN = sorted(glob.glob(os.path.join(GIN_ROOT, "**", "*.gin"), recursive=True))

# Parameter counts of the released checkpoints (transformers' num_parameters()).
RELEASED_SIZES = {
    "t5_1_0_small": 60_506_624,
    "t5_1_0_base": 222_903_552,
    "t5_1_1_small": 76_961_152,
    "t5_1_1_base": 247_577_856,
    "t5_1_1_large": 783_150_080,
    "t5_1_1_xl": 2_849_757_184,
    "t5_1_1_xxl": 11_135_332_352,
}


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_there_are_gin_files():
    assert len(ALL_GIN) >= 8


@pytest.mark.parametrize("path", ALL_GIN, ids=lambda p: os.path.relpath(p, GIN_ROOT))
def test_gin_file_parses_and_resolves(path):
    gin.add_config_file_search_path(GIN_ROOT)
    gin.parse_config_files_and_bindings([path], ["MODEL_DIR = '/tmp/m'", "DATA_DIR = '/tmp/d'"])
    config = configurables.t5_config()
    assert config.d_model > 0
    if "train.model" in gin.config_str():
        # every configurable a run file references resolves to a valid config
        model = configurables.tagi_config()
        data = loop.DataConfig()
        assert model.t5.vocab_size > 0 and data.task


@pytest.mark.parametrize("name,count", sorted(RELEASED_SIZES.items()))
def test_model_sizes_match_released_checkpoints(name, count):
    gin.parse_config_file(os.path.join(GIN_ROOT, "models", f"{name}.gin"))
    config = configurables.t5_config()
    abstract = t5.abstract_params(config)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == count


def test_unknown_field_is_named():
    gin.parse_config("T5Config.d_modle = 3")
    with pytest.raises(ValueError, match="d_modle"):
        configurables.t5_config()


def test_malformed_gin_is_an_error():
    with pytest.raises((SyntaxError, ValueError)):
        gin.parse_config("T5Config.d_model = = 3")


def _parse(*files):
    for f in files:
        gin.parse_config_file(os.path.join(GIN_ROOT, f))


def test_paper_preset_is_the_default():
    from tagi_jax.models.tagi_config import TagiConfig

    _parse("models/t5_1_1_base.gin", "methods/paper.gin")
    config = configurables.tagi_config()
    default = TagiConfig(t5=config.t5)
    assert config == default
    assert config.hyper.generator == "per_layer" and config.hyper.init == "zero_b"


def test_authors_code_preset():
    _parse("models/t5_1_1_base.gin", "methods/authors_code.gin")
    config = configurables.tagi_config()
    assert config.hyper.generator == "shared_indexed"
    assert config.hyper.instruction_dim == 255 and config.hyper.hidden_dim == 8
    assert config.hyper.init == "authors" and config.hyper.divide_b_by_sqrt_rank
    assert config.hyper.pooling == "first_last_sum_unmasked"
    assert config.instruction_encoder_t5 == config.t5
    assert config.trainable == "authors_code"


@pytest.mark.parametrize("method", ["paper", "authors_code"])
def test_tiny_presets_build_and_run(method):
    import jax.numpy as jnp

    from tagi_jax.models import tagi, trainable

    _parse("models/t5_1_1_tiny.gin", f"methods/{method}.gin", "methods/tiny_hyper.gin")
    config = configurables.tagi_config()
    assert config.hyper.rank == 4
    params = tagi.init_params(config, jax.random.key(0))
    batch = {k: jnp.ones((2, 5), jnp.int32) for k in tagi.BATCH_KEYS}
    logits, aux = tagi.forward(config, params, batch)
    assert logits.shape == (2, 5, config.t5.vocab_size)
    n_train, n_total = trainable.count(params, trainable.trainable_mask(config, params))
    assert 0 < n_train < n_total


def test_hyper_unknown_field_is_named():
    gin.parse_config("HyperConfig.rnak = 3")
    with pytest.raises(ValueError, match="rnak"):
        configurables.hyper_config()


def test_loss_presets():
    from tagi_jax.distill.losses import LossConfig

    _parse("losses/authors_run.gin")
    assert configurables.loss_config() == LossConfig()
    gin.clear_config()
    _parse("losses/paper.gin")
    assert configurables.loss_config() == LossConfig.paper()
    gin.clear_config()
    _parse("losses/authors_run.gin", "losses/authors_exact.gin")
    exact = configurables.loss_config()
    assert exact.alignment_mode == "authors_swapped" and exact.kl_average_over_padding


def test_tensorflow_stays_inside_the_data_package():
    """Model, distillation, conversion and gin code import neither TensorFlow nor seqio."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tagi_jax.configurables, tagi_jax.models.tagi, tagi_jax.distill.losses\n"
        "import tagi_jax.distill.lora_teachers, tagi_jax.distill.teacher, tagi_jax.convert.hf_t5\n"
        "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

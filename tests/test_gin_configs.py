"""Every gin file parses, binds only known fields, and the model sizes are the released ones."""

import glob
import math
import os

import gin
import jax
import pytest

from tagi_jax import configurables
from tagi_jax.models import t5

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
    gin.parse_config_file(path)
    config = configurables.t5_config()
    assert config.d_model > 0


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

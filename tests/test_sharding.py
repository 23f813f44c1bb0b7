"""T5 on a data×model mesh of 8 fake CPU devices equals T5 on one device.

Every jitted call here is blocked on before the next (np.asarray), because queued CPU
collectives deadlock (../shared/docs/dependencies.md §3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tagi_jax.models import t5
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.parallel import partitioning
from tagi_jax.testing.tiny_t5 import TINY_T5

pytestmark = pytest.mark.multidevice

CONFIG = TINY_T5.replace(num_decoder_layers=2)


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return mesh_lib.make_mesh((4, -1), ("data", "model"))


def _batch(seed=0, rows=8):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, CONFIG.vocab_size, (rows, 24)).astype(np.int32)
    dec = rng.integers(2, CONFIG.vocab_size, (rows, 10)).astype(np.int32)
    for r in range(rows):
        enc[r, 24 - 2 * r :] = 0
        dec[r, 10 - r :] = 0
    dec[:, 0] = 0
    return enc, dec


def _sharded_forward(config, mesh, params, enc, dec):
    param_shardings = partitioning.logical_to_shardings(t5.param_logical_axes(config), mesh)
    data = partitioning.named_sharding(mesh, ("batch", "length"))
    out = partitioning.named_sharding(mesh, ("batch", "length", "vocab"))
    with partitioning.use_mesh(mesh):
        params = jax.device_put(params, param_shardings)
        enc, dec = jax.device_put(enc, data), jax.device_put(dec, data)
        fn = jax.jit(
            functools.partial(t5.forward, config),
            in_shardings=(param_shardings, data, data),
            out_shardings=out,
        )
        logits = fn(params, enc, dec)
        logits.block_until_ready()
    return params, logits


def test_mesh_shape_inference(mesh):
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="does not divide"):
        mesh_lib.make_mesh((3, -1))
    with pytest.raises(ValueError, match="more than one -1"):
        mesh_lib.make_mesh((-1, -1))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_forward_equals_single_device(mesh, scan_layers):
    config = CONFIG.replace(scan_layers=scan_layers)
    params = t5.init_params(config, jax.random.key(0))
    enc, dec = _batch()
    expected = np.asarray(t5.forward(config, params, jnp.asarray(enc), jnp.asarray(dec)))
    sharded_params, logits = _sharded_forward(config, mesh, params, enc, dec)
    assert logits.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)

    # parameters are really split as the rules say
    layer = sharded_params["encoder"]["layers" if scan_layers else "layers_0"]
    query = layer["attention"]["query"]["kernel"]
    wo = layer["mlp"]["wo"]["kernel"]
    lead = (None,) if scan_layers else ()
    assert query.sharding.spec == P(*lead, None, "model")
    assert wo.sharding.spec == P(*lead, "model", None)
    assert query.addressable_shards[0].data.shape[-1] == config.inner_dim // 2
    assert wo.addressable_shards[0].data.shape[-2] == config.d_ff // 2
    embedding = sharded_params["token_embedder"]["embedding"]
    assert embedding.sharding.spec == P("model", None)
    assert embedding.addressable_shards[0].data.shape == (config.vocab_size // 2, config.d_model)
    norm = layer["pre_mlp_layer_norm"]["scale"]
    assert norm.sharding.is_fully_replicated


def test_parameters_are_created_sharded(mesh):
    """eval_shape → shardings → jit(init, out_shardings): no host-side full copy."""
    shardings = partitioning.logical_to_shardings(t5.param_logical_axes(CONFIG), mesh)
    init = jax.jit(functools.partial(t5.init_params, CONFIG), out_shardings=shardings)
    with partitioning.use_mesh(mesh):
        params = init(jax.random.key(1))
    # Compared with the same computation compiled for one device: eager init differs from any
    # compiled one in the last bit (XLA fuses the scale into the sampler).
    expected = jax.jit(functools.partial(t5.init_params, CONFIG))(jax.random.key(1))
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, expected
    )
    logits_head = params["decoder"]["logits_dense"]["kernel"]
    assert logits_head.sharding.spec == P(None, "model")


def test_sharded_greedy_decode_equals_single_device(mesh):
    params = t5.init_params(CONFIG, jax.random.key(2))
    enc, _ = _batch(seed=3)
    expected = np.asarray(t5.greedy_decode(CONFIG, params, jnp.asarray(enc), max_decode_len=8))
    shardings = partitioning.logical_to_shardings(t5.param_logical_axes(CONFIG), mesh)
    with partitioning.use_mesh(mesh):
        sharded = jax.device_put(params, shardings)
        enc_s = jax.device_put(enc, partitioning.named_sharding(mesh, ("batch", "length")))
        got = np.asarray(t5.greedy_decode(CONFIG, sharded, enc_s, max_decode_len=8))
    np.testing.assert_array_equal(got, expected)


def test_hf_load_lands_sharded(mesh, tmp_path):
    pytest.importorskip("torch")
    from tagi_jax.convert import hf_t5
    from tagi_jax.testing import hf_t5_reference as hf_reference

    hf_reference.write_hf_t5(str(tmp_path), "v1_1", seed=11)
    _, plain = hf_t5.load(str(tmp_path))
    config, sharded = hf_t5.load(str(tmp_path), mesh=mesh, scan_layers=True)
    kernel = sharded["decoder"]["layers"]["encoder_decoder_attention"]["value"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "model")
    assert kernel.addressable_shards[0].data.shape == (3, 64, 32)
    for i in range(config.num_decoder_layers):
        want = plain["decoder"][f"layers_{i}"]["encoder_decoder_attention"]["value"]["kernel"]
        np.testing.assert_array_equal(np.asarray(kernel[i]), np.asarray(want))
    head = sharded["decoder"]["logits_dense"]["kernel"]
    assert head.sharding == NamedSharding(mesh, P(None, "model"))
    np.testing.assert_array_equal(
        np.asarray(head), np.asarray(plain["decoder"]["logits_dense"]["kernel"])
    )


@pytest.mark.parametrize("generator", ["per_layer", "slots"])
def test_sharded_tagi_forward_equals_single_device(mesh, generator):
    from tagi_jax.models import tagi
    from tagi_jax.models.tagi_config import HyperConfig, TagiConfig

    config = TagiConfig(
        t5=CONFIG.replace(instruction_cross_attention=True),
        hyper=HyperConfig(generator=generator, rank=4, instruction_dim=16),
        fusion=True,
    )
    params = tagi.init_params(config, jax.random.key(5))
    # make the zero-initialised generator outputs live so the adapters matter
    params = jax.tree.map(lambda x: x + 0.02, params)
    enc, dec = _batch(seed=6)
    hyp = np.asarray(enc[:, ::-1][:, :12])
    batch = {"encoder_input_tokens": enc, "hyper_input_tokens": hyp, "decoder_input_tokens": dec}
    expected, _ = tagi.forward(config, params, jax.tree.map(jnp.asarray, batch))

    shardings = partitioning.logical_to_shardings(tagi.param_logical_axes(config), mesh)
    data = partitioning.named_sharding(mesh, ("batch", "length"))
    batch_shardings = {k: data for k in batch}

    def run(p, b):
        logits, aux = tagi.forward(config, p, b)
        return logits, aux["adapters"]

    with partitioning.use_mesh(mesh):
        sharded = jax.device_put(params, shardings)
        fn = jax.jit(run, in_shardings=(shardings, batch_shardings))
        logits, adapters = fn(sharded, jax.device_put(batch, batch_shardings))
        logits.block_until_ready()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
    a, b = adapters.a["enc_self.q"], adapters.b["dec_cross.v"]
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", None, None)), a.ndim)
    assert b.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", None, "model")), b.ndim)

"""Our T5 against PyTorch transformers on random tiny checkpoints (fp32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

from tagi_jax.convert import hf_t5  # noqa: E402
from tagi_jax.models import layers, t5  # noqa: E402
from tagi_jax.testing import hf_t5_reference as hf_reference  # noqa: E402

pytestmark = pytest.mark.needs_torch


@pytest.fixture(scope="module", params=hf_reference.VARIANTS)
def checkpoint(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    model = hf_reference.write_hf_t5(directory, request.param)
    return request.param, directory, model


@pytest.mark.parametrize("scan_layers", [False, True])
def test_forward_matches_transformers(checkpoint, scan_layers):
    variant, directory, reference = checkpoint
    config, params = hf_t5.load(directory, scan_layers=scan_layers)
    assert config.is_gated_act == (variant == "v1_1")
    assert config.tie_word_embeddings == (variant == "v1_0")
    enc, dec = hf_reference.padded_batch(config.vocab_size)
    expected = hf_reference.reference_logits(reference, enc, dec)
    got = t5.forward(config, params, jnp.asarray(enc), jnp.asarray(dec))
    assert got.dtype == jnp.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_greedy_decode_matches_generate(checkpoint):
    _, directory, reference = checkpoint
    config, params = hf_t5.load(directory)
    enc, _ = hf_reference.padded_batch(config.vocab_size, seed=1)
    expected = hf_reference.reference_greedy(reference, enc, 16)
    got = np.asarray(t5.greedy_decode(config, params, jnp.asarray(enc), max_decode_len=16))
    # A degenerate reference (all padding, or every row alike) would make this vacuous.
    assert (expected != 0).any() and len(np.unique(expected)) >= 3
    np.testing.assert_array_equal(got, expected)


def test_greedy_decode_with_scanned_layers_matches_generate(checkpoint):
    _, directory, reference = checkpoint
    config, params = hf_t5.load(directory, scan_layers=True, remat_policy="full")
    enc, _ = hf_reference.padded_batch(config.vocab_size, seed=2)
    expected = hf_reference.reference_greedy(reference, enc, 16)
    got = np.asarray(t5.greedy_decode(config, params, jnp.asarray(enc), max_decode_len=16))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (32, 64)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = np.arange(-2000, 2001)
    expected = T5Attention._relative_position_bucket(
        torch.tensor(relative),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    ).numpy()
    got = layers.relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    np.testing.assert_array_equal(got, expected)


def test_transformers5_tied_unscaled_head(tmp_path):
    """transformers 5 builds T5Config(tie_word_embeddings=False) as a tied head without the
    output scale, and writes it so; we must read that file as the model it came from."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(3)
    hf_config = T5Config(
        **dict(hf_reference.TINY, feed_forward_proj="gated-gelu"), tie_word_embeddings=False
    )
    model = T5ForConditionalGeneration(hf_config).eval()
    assert not model.config.scale_decoder_outputs
    model.save_pretrained(str(tmp_path))
    config, params = hf_t5.load(str(tmp_path))
    assert config.tie_word_embeddings and not config.scale_decoder_outputs
    enc, dec = hf_reference.padded_batch(config.vocab_size)
    expected = hf_reference.reference_logits(model, enc, dec)
    got = t5.forward(config, params, jnp.asarray(enc), jnp.asarray(dec))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)

"""Beam search of the TAGI student: greedy at one beam, exact with a full beam, per-example
adapters, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.models import lora, tagi
from tagi_jax.models.beam_search import beam_search, length_penalty
from tagi_jax.models.tagi_config import HyperConfig, TagiConfig
from tagi_jax.testing.tiny_t5 import TINY_T5

EOS = TINY_T5.eos_token_id


def make_config(vocab_size, fusion=False, **t5_changes):
    # One encoder and two decoder blocks: the fewest that still stack the decoder's cache.
    t5_config = TINY_T5.replace(
        vocab_size=vocab_size, num_layers=1, num_decoder_layers=2, **t5_changes
    )
    return TagiConfig(t5=t5_config, hyper=HyperConfig(rank=4, instruction_dim=16), fusion=fusion)


def make_batch(vocab_size, rows, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, (rows, 7)).astype(np.int32)
    hyp = rng.integers(2, vocab_size, (rows, 5)).astype(np.int32)
    enc[0, 5:] = 0  # padding must stay masked once the memory is repeated per beam
    hyp[-1, 3:] = 0
    return {"encoder_input_tokens": enc, "hyper_input_tokens": hyp}


def random_params(config, seed):
    """Random parameters of every leaf, drawn with numpy (jax's initialisers would compile a
    kernel per shape, which costs more than the searches under test). Unlike a fresh student,
    whose B generator is zero, these make generated adapters matter."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):  # layer norms
            return 1.0 + 0.1 * x
        if name.endswith("['bias']"):
            return 0.1 * x
        if "embedding" in name:
            return x
        return x / np.sqrt(leaf.shape[-2])  # kernels: unit-variance outputs

    return jax.tree_util.tree_map_with_path(draw, tagi.abstract_params(config))


def random_adapters(config, rows, seed, scale=0.5):
    """Different, nonzero adapters for every row."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for name in config.hyper.targets:
        target = lora.TARGETS[name]
        d_in, d_out = target.dims(config.t5)
        layers = target.num_layers(config.t5)
        r = config.hyper.rank
        a[name] = (scale * rng.standard_normal((layers, rows, d_in, r))).astype(np.float32)
        b[name] = (scale * rng.standard_normal((layers, rows, r, d_out))).astype(np.float32)
    return lora.LoraAdapters(a=a, b=b)


def eos_padded(tokens):
    """Tokens with every position after the first EOS set to padding."""
    tokens = np.array(tokens)
    for row in tokens.reshape(-1, tokens.shape[-1]):
        ends = np.flatnonzero(row == EOS)
        if ends.size:
            row[ends[0] + 1 :] = 0
    return tokens


# --- one beam is greedy search ----------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-scan-task"])
def test_one_beam_is_greedy(fused):
    # A small vocabulary makes EOS likely, so some rows end early and some run to the end.
    config = make_config(8, fusion=fused, scan_layers=fused)
    params = random_params(config, seed=1)
    batch = make_batch(8, rows=6)
    kwargs = dict(max_decode_len=8, adapters=random_adapters(config, 6, seed=2))
    if fused:
        # One task's instruction, encoded once (tagi.encode_task's [1, length, width]) and
        # shared by rows that still carry different adapters.
        batch["hyper_input_tokens"] = np.tile(batch["hyper_input_tokens"][-1:], (6, 1))
        states = np.random.default_rng(3).standard_normal((1, 5, config.t5.d_model))
        kwargs["instruction_states"] = states.astype(np.float32)
    greedy = np.asarray(tagi.greedy_decode(config, params, batch, **kwargs))
    ended = (greedy == EOS).any(axis=1)
    assert ended.any() and not ended.all(), "the test should see both kinds of rows"
    # Any alpha: a large one would favour longer sequences, were a runner-up kept.
    alpha = 3.0 if fused else 0.6
    tokens, scores = beam_search(config, params, batch, beam_size=1, alpha=alpha, **kwargs)
    assert tokens.shape == (6, 1, 8) and tokens.dtype == jnp.int32
    assert scores.shape == (6, 1) and scores.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(tokens[:, 0]), eos_padded(greedy))


# --- a beam holding every sequence finds the best one -----------------------------------


def sequence_scores(config, params, batch, adapters, sequences, max_len, alpha):
    """Length-penalised log-probs of ``sequences`` (for one example), teacher-forced."""
    n = len(sequences)
    targets = np.zeros((n, max_len), np.int32)
    for i, seq in enumerate(sequences):
        targets[i, : len(seq)] = seq
    repeated = {
        "encoder_input_tokens": np.tile(batch["encoder_input_tokens"], (n, 1)),
        "hyper_input_tokens": np.tile(batch["hyper_input_tokens"], (n, 1)),
        # The start token, then the sequence shifted right.
        "decoder_input_tokens": np.concatenate([np.zeros((n, 1), np.int32), targets[:, :-1]], 1),
    }
    rows = lora.take(adapters, np.zeros(n, np.int32))
    logits, _ = tagi.forward(config, params, repeated, adapters=rows)
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    total = np.array(
        [sum(log_probs[i, t, tok] for t, tok in enumerate(seq)) for i, seq in enumerate(sequences)]
    )
    return total / np.array([float(length_penalty(alpha, len(seq))) for seq in sequences])


def strip(row):
    """A returned row up to and including its first EOS."""
    ends = np.flatnonzero(row == EOS)
    return tuple(int(t) for t in (row[: ends[0] + 1] if ends.size else row))


def never_predict_padding(params):
    """Makes id 0 all but impossible to generate (in place).

    Id 0 is the padding too, which teacher forcing masks as a key, so a sequence through it has
    no teacher-forced log-prob to check against. Every embedding gets a large feature that no
    decoder block writes to, so it stays large and positive through the final norm, and the
    head's column 0 reads it with a large negative weight.
    """
    params["t5"]["token_embedder"]["embedding"][:, 0] += 8.0

    def clear(path, leaf):
        if jax.tree_util.keystr(path).endswith(("['out']['kernel']", "['wo']['kernel']")):
            leaf[..., 0] = 0.0  # the blocks' writes to the residual stream

    jax.tree_util.tree_map_with_path(clear, params["t5"]["decoder"])
    params["t5"]["decoder"]["final_layer_norm"]["scale"][0] = 1.0
    params["t5"]["decoder"]["logits_dense"]["kernel"][0, 0] = -30.0


def test_full_beam_returns_the_best_sequences():
    vocab, max_len, alpha = 4, 3, 0.8
    # Scanned layers put the cache's batch axis second: several beams must reorder it there.
    config = make_config(vocab, fusion=True, scan_layers=True)
    params = random_params(config, seed=5)
    never_predict_padding(params)
    batch = make_batch(vocab, rows=1, seed=5)
    adapters = random_adapters(config, 1, seed=6)
    # Every sequence: EOS-terminated at any length, or truncated at max_len.
    words = [t for t in range(1, vocab) if t != EOS]
    sequences = [p + (EOS,) for n in range(max_len) for p in itertools.product(words, repeat=n)]
    sequences += list(itertools.product(words, repeat=max_len))
    brute = sequence_scores(config, params, batch, adapters, sequences, max_len, alpha)
    order = np.argsort(-brute, kind="stable")

    # With 0 out, a beam as large as the number of alive prefixes at the last step keeps every
    # sequence, so the search is exact: its beams are the best sequences, best first.
    beam = len(words) ** max_len
    tokens, scores = beam_search(
        config,
        params,
        batch,
        beam_size=beam,
        max_decode_len=max_len,
        alpha=alpha,
        adapters=adapters,
    )
    tokens, scores = np.asarray(tokens[0]), np.asarray(scores[0])
    returned = [strip(row) for row in tokens]
    assert not any(0 in seq for seq in returned), "id 0 was generated; the test model needs it out"
    assert returned[0] == sequences[order[0]]
    np.testing.assert_allclose(scores[0], brute[order[0]], atol=1e-4)
    assert np.all(np.diff(scores) <= 0), "beams must come best first"
    np.testing.assert_allclose(scores, brute[order[:beam]], atol=1e-4)
    assert returned == [sequences[i] for i in order[:beam]]
    # Positions after EOS hold padding.
    for row, seq in zip(tokens, returned, strict=True):
        assert np.all(row[len(seq) :] == 0)


# --- per-example adapters ---------------------------------------------------------------


def test_rows_decode_as_if_alone():
    config = make_config(8)
    params = random_params(config, seed=7)
    batch = make_batch(8, rows=2, seed=7)
    adapters = random_adapters(config, 2, seed=8)
    # With these seeds, row 0 alone stops early (no alive beam can beat its finished ones) while
    # row 1 runs to max_decode_len, so the batch runs row 0 past its own stop.
    kwargs = dict(beam_size=3, max_decode_len=8, alpha=0.6)
    tokens, scores = beam_search(config, params, batch, adapters=adapters, **kwargs)
    assert (np.asarray(tokens) == EOS).any(), "some beams should finish"
    for row in range(2):
        # Alone: a batch of copies of the row (the same shapes, so no second compilation).
        alone = {k: v[[row, row]] for k, v in batch.items()}
        t, s = beam_search(
            config, params, alone, adapters=lora.take(adapters, [row, row]), **kwargs
        )
        np.testing.assert_array_equal(np.asarray(t[0]), np.asarray(tokens[row]))
        np.testing.assert_allclose(np.asarray(s[0]), np.asarray(scores[row]), atol=1e-5)
    # The adapters matter: swapping the rows' adapters changes the beams.
    swapped, _ = beam_search(config, params, batch, adapters=lora.take(adapters, [1, 0]), **kwargs)
    assert not np.array_equal(np.asarray(swapped), np.asarray(tokens))


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [0, -2, 2.0, True, "4", None])
def test_bad_beam_size_is_named(beam_size):
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(make_config(8), {}, make_batch(8, 1), beam_size=beam_size, max_decode_len=4)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "0.6", None])
def test_bad_alpha_is_named(alpha):
    with pytest.raises(ValueError, match="alpha"):
        beam_search(
            make_config(8), {}, make_batch(8, 1), beam_size=2, max_decode_len=4, alpha=alpha
        )


def test_bad_instruction_states_are_named():
    with pytest.raises(ValueError, match="instruction_states"):
        beam_search(
            make_config(8, fusion=True),
            {},
            make_batch(8, 2),
            beam_size=2,
            max_decode_len=4,
            instruction_states=np.zeros((2, 5, TINY_T5.d_model), np.float32),
        )


def test_missing_batch_field_is_named():
    batch = make_batch(8, 1)
    del batch["hyper_input_tokens"]
    with pytest.raises(KeyError, match="hyper_input_tokens"):
        beam_search(make_config(8), {}, batch, beam_size=2, max_decode_len=4)

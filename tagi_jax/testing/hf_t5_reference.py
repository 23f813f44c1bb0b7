"""Random tiny Hugging Face T5 models, built offline, as the parity reference.

Used by the tests and by ``tagi_jax.demos.t5_parity``; needs torch (requirements-test.txt).

transformers 5 ties ``lm_head`` to ``shared`` whenever it builds a T5 from a config, so a v1.1
(untied) reference is made by writing a distinct ``lm_head.weight`` to the file ourselves and
letting ``from_pretrained`` untie it, exactly as it does for real v1.1 checkpoints.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from tagi_jax.testing.tiny_t5 import TINY_T5

# The reference's progress bars and its (expected) "will NOT tie them" notice are noise here.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

# transformers' names for the fields of TINY_T5 that do not depend on the variant.
TINY = {
    k: v
    for k, v in TINY_T5.to_hf_dict().items()
    if k not in ("architectures", "feed_forward_proj", "tie_word_embeddings")
}

VARIANTS = ("v1_0", "v1_1")


def write_hf_t5(
    directory: str, variant: str, seed: int = 0, **overrides
) -> T5ForConditionalGeneration:
    """Writes a random T5 of ``variant`` ("v1_0": ReLU, tied and scaled head; "v1_1": gated-GELU,
    untied head) to ``directory`` and returns it reloaded by transformers, in eval mode."""
    if variant not in VARIANTS:
        raise ValueError(variant)
    gated = variant == "v1_1"
    torch.manual_seed(seed)
    values = dict(TINY, feed_forward_proj="gated-gelu" if gated else "relu")
    values.update(overrides)
    config = T5Config(**values)
    model = T5ForConditionalGeneration(config)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        state.pop(alias, None)
    # Keep padding out of the argmax so greedy decoding produces real tokens to compare.
    state["shared.weight"][0] = 0.0
    if gated:
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"]) * 0.5
        state["lm_head.weight"][:, 0] = 0.0
        state["lm_head.weight"] = state["lm_head.weight"].contiguous()
    os.makedirs(directory, exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_dict()
    hf.pop("scale_decoder_outputs", None)
    hf["tie_word_embeddings"] = not gated
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    return load_reference(directory)


def load_reference(directory: str) -> T5ForConditionalGeneration:
    assert os.path.isdir(directory), directory  # a typo would otherwise be read as a hub id
    return T5ForConditionalGeneration.from_pretrained(directory).eval()


def padded_batch(vocab_size: int, seed: int = 0):
    """Encoder and decoder tokens whose rows carry different amounts of right padding."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, (3, 30))
    enc[0, 20:] = 0
    enc[1, 26:] = 0
    enc[0, 19] = 1
    dec = rng.integers(2, vocab_size, (3, 12))
    dec[:, 0] = 0
    dec[0, 7:] = 0
    dec[2, 10:] = 0
    return enc.astype(np.int32), dec.astype(np.int32)


def reference_logits(model, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    decoder_mask = dec != 0
    decoder_mask[:, 0] = True  # the start token shares id 0 with padding
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc != 0),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
            decoder_attention_mask=torch.tensor(decoder_mask),
        )
    return out.logits.numpy()


def reference_greedy(model, enc: np.ndarray, steps: int) -> np.ndarray:
    """transformers' greedy search, without the start token, padded to ``steps``."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc != 0),
            do_sample=False,
            num_beams=1,
            max_new_tokens=steps,
            min_new_tokens=0,
            # transformers 5.24 sizes its cache by the encoder depth; our tiny models have a
            # deeper decoder, so the reference recomputes instead of caching.
            use_cache=False,
        ).numpy()[:, 1:]
    return np.pad(out, ((0, 0), (0, steps - out.shape[1])))

"""Which TAGI parameters train: a boolean mask from path patterns (the trainer splits the
parameters by it, ``training.state.partition``).

Presets (``TagiConfig.trainable``):

* ``paper`` — the hypernetwork (pooler, projection, generators), the paper's new instruction
  cross-attention layers, and the instruction encoder only if
  ``HyperConfig.train_instruction_encoder`` (for the backbone encoder that means the backbone's
  embeddings and encoder).
* ``authors_code`` — also every T5 layer norm, the token embeddings and all FFN weights, as the
  authors' logged runs did (tagi_spec.md §4.6); attention projections, relative position biases
  and ``lm_head`` stay frozen.

``TagiConfig.trainable_patterns`` then add, and ``frozen_patterns`` remove, parameters whose
``/``-joined path matches (``re.search``).
"""

from __future__ import annotations

import re

import jax

from tagi_jax.models.tagi_config import TagiConfig


def path_string(keypath) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def flatten(tree) -> dict:
    """``{"/"-joined path: leaf}`` of a parameter tree (``training.state.merge`` inverts it)."""
    return {path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def preset_patterns(config: TagiConfig) -> tuple[str, ...]:
    patterns = [r"^hypernet/", r"^t5/.*/(pre_)?instruction_attention"]
    if config.hyper.train_instruction_encoder:
        if config.hyper.instruction_encoder == "separate":
            patterns.append(r"^instruction_encoder/")
        else:
            patterns += [r"^t5/token_embedder/", r"^t5/encoder/"]
    if config.trainable == "authors_code":
        patterns += [r"^t5/.*layer_norm/scale$", r"^t5/token_embedder/embedding$", r"^t5/.*/mlp/"]
    return tuple(patterns)


def trainable_mask(config: TagiConfig, params):
    """A tree of bools, True where the parameter trains."""
    keep = [re.compile(p) for p in (*preset_patterns(config), *config.trainable_patterns)]
    drop = [re.compile(p) for p in config.frozen_patterns]

    def decide(keypath, _):
        path = path_string(keypath)
        return any(p.search(path) for p in keep) and not any(p.search(path) for p in drop)

    return jax.tree_util.tree_map_with_path(decide, params)


def stop_frozen_gradients(params, mask):
    """``params`` with ``stop_gradient`` on every frozen leaf: their gradients are exactly 0."""
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)


def count(params, mask) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    sizes = jax.tree.map(lambda p: p.size, params)
    trainable = sum(
        s for s, t in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask), strict=True) if t
    )
    return trainable, sum(jax.tree.leaves(sizes))

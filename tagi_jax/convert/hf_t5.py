"""Hugging Face T5 checkpoints ⇄ tagi_jax parameters.

``load(path)`` reads a local Hugging Face directory (``config.json`` plus ``model.safetensors``,
sharded safetensors or ``pytorch_model.bin``) of T5, T5-LM-adapt, Flan-T5 or T0; ``save(config,
params, path)`` writes one that ``transformers.T5ForConditionalGeneration.from_pretrained``
loads. Nothing here touches the network: a path that does not exist is an error, never a hub id.

Conversion facts: PyTorch ``Linear`` weights are ``[out, in]`` and our kernels ``[in, out]``;
the relative-attention bias lives in block 0 of each stack and is shared by all its blocks;
v1.0 ties the head to ``shared`` and scales the decoder output, v1.1 has an ``lm_head``.

With a mesh, every parameter is built with ``jax.make_array_from_callback``: each device's shard
is read from the memory-mapped file on its own, so no host ever holds a full copy of XL weights
per device.

Command line: ``python -m tagi_jax.convert.hf_t5 --hf_dir DIR --out DIR`` writes an orbax
parameter checkpoint and the config (see ``tagi_jax.convert.param_checkpoint``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import struct
import sys
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from tagi_jax import paths
from tagi_jax.convert.tensor_store import CheckpointError, TensorStore
from tagi_jax.models import t5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.parallel.partitioning import DEFAULT_RULES, AxisRules, shardings_or_single_device

log = logging.getLogger(__name__)

_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one of our parameters comes from: one HF tensor per layer (or a single one)."""

    hf_names: tuple[str, ...]
    transpose: bool
    stacked: bool  # our leaf has a leading layers axis built from hf_names


def _layer_sources(config: T5Config, stack: str, i: int) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Our path inside one block → (HF name, transpose)."""
    block = f"{stack}.block.{i}.layer"
    out: dict[tuple[str, ...], tuple[str, bool]] = {}

    def attention(ours: str, theirs: str):
        for name, letter in _ATTENTION.items():
            out[(ours, name, "kernel")] = (f"{theirs}.{letter}.weight", True)

    def mlp(idx: int):
        names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
        for name in names:
            out[("mlp", name, "kernel")] = (f"{block}.{idx}.DenseReluDense.{name}.weight", True)
        out[("pre_mlp_layer_norm", "scale")] = (f"{block}.{idx}.layer_norm.weight", False)

    if stack == "encoder":
        attention("attention", f"{block}.0.SelfAttention")
        out[("pre_attention_layer_norm", "scale")] = (f"{block}.0.layer_norm.weight", False)
        mlp(1)
    else:
        attention("self_attention", f"{block}.0.SelfAttention")
        out[("pre_self_attention_layer_norm", "scale")] = (f"{block}.0.layer_norm.weight", False)
        attention("encoder_decoder_attention", f"{block}.1.EncDecAttention")
        out[("pre_cross_attention_layer_norm", "scale")] = (f"{block}.1.layer_norm.weight", False)
        mlp(2)
    return out


def parameter_sources(config: T5Config) -> dict[tuple[str, ...], _Source]:
    """Every leaf of our parameter tree (as a path) → the HF tensors it is made of."""
    sources: dict[tuple[str, ...], _Source] = {
        ("token_embedder", "embedding"): _Source(("shared.weight",), False, False),
    }
    for stack, num in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        sources[(stack, "relpos_bias", "rel_embedding")] = _Source((rel,), False, False)
        sources[(stack, "final_layer_norm", "scale")] = _Source(
            (f"{stack}.final_layer_norm.weight",), False, False
        )
        per_layer = [_layer_sources(config, stack, i) for i in range(num)]
        for local in per_layer[0]:
            transpose = per_layer[0][local][1]
            if config.scan_layers:
                names = tuple(layer[local][0] for layer in per_layer)
                sources[(stack, "layers", *local)] = _Source(names, transpose, True)
            else:
                for i, layer in enumerate(per_layer):
                    sources[(stack, f"layers_{i}", *local)] = _Source(
                        (layer[local][0],), transpose, False
                    )
    if not config.tie_word_embeddings:
        sources[("decoder", "logits_dense", "kernel")] = _Source(("lm_head.weight",), True, False)
    return sources


# --- loading ------------------------------------------------------------------------------


def read_config(path: str, **overrides: Any) -> T5Config:
    """The T5Config of a local HF directory; ``overrides`` set our execution fields."""
    paths.require_local(path, "a Hugging Face T5 directory")  # read memory-mapped
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory does not exist: {path}")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {config_path}: not a Hugging Face model directory") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    try:
        return T5Config.from_hf_dict(hf, **overrides)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e


def _resolve_head(config: T5Config, store: TensorStore) -> T5Config:
    """Decides tying from the weights, as transformers does.

    transformers 5 always writes ``tie_word_embeddings: true`` and unties when the file holds an
    ``lm_head.weight`` that differs from ``shared.weight``.
    """
    has_head = "lm_head.weight" in store
    if not config.tie_word_embeddings:
        if not has_head:
            raise CheckpointError(
                f"config.json in {store.directory} declares an untied head but tensor "
                "lm_head.weight is missing"
            )
        return config
    if has_head and "shared.weight" in store:
        head, shared = store.array("lm_head.weight"), store.array("shared.weight")
        if head.shape != shared.shape or not np.array_equal(head, shared):
            return config.replace(tie_word_embeddings=False)
    return config


def _check_shape(store: TensorStore, name: str, expected: tuple[int, ...], transpose: bool):
    got = tuple(store.array(name).shape)
    want = tuple(reversed(expected)) if transpose else tuple(expected)
    if got != want:
        raise CheckpointError(
            f"tensor {name} in {store.source_of(name)} has shape {got}, but the config needs {want}"
        )


def _reader(store: TensorStore, source: _Source, dtype):
    """A callback from an index of our array to that block of data, read from disk."""

    def read_one(name: str, index: tuple[slice, ...]):
        arr = store.array(name)
        if source.transpose:
            return np.asarray(arr[index[1], index[0]]).T
        return np.asarray(arr[index])

    def callback(index):
        index = tuple(index)
        if source.stacked:
            layer_ids = range(len(source.hf_names))[index[0]]
            block = np.stack([read_one(source.hf_names[i], index[1:]) for i in layer_ids])
        else:
            block = read_one(source.hf_names[0], index)
        return np.ascontiguousarray(block.astype(dtype))

    return callback


def _alias_shared(store: TensorStore) -> str:
    # Some writers drop `shared.weight` and keep only a tied alias.
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in store:
            return name
    raise CheckpointError(
        f"tensor shared.weight is missing from the checkpoint in {store.directory}"
    )


def load(
    path: str,
    *,
    mesh: Mesh | None = None,
    axis_rules: AxisRules = DEFAULT_RULES,
    **config_overrides: Any,
) -> tuple[T5Config, Any]:
    """Reads a local HF T5 directory into ``(config, params)``.

    Args:
      path: directory with ``config.json`` and the weight file(s).
      mesh: when given, parameters are created sharded over it by ``axis_rules``.
      axis_rules: logical→mesh axis table.
      **config_overrides: execution fields of T5Config (``dtype``, ``param_dtype``,
        ``scan_layers``, ``remat_policy``, ``dropout_rate``).
    """
    config = read_config(path, **config_overrides)
    store = TensorStore(path)
    config = _resolve_head(config, store)
    abstract = t5.abstract_params(config)
    shardings = shardings_or_single_device(t5.param_logical_axes(config), mesh, axis_rules)
    sources = parameter_sources(config)
    shared_name = _alias_shared(store)
    sources[("token_embedder", "embedding")] = _Source((shared_name,), False, False)

    flat_abstract = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_shardings = jax.tree.leaves(shardings)
    used = set()
    arrays = []
    for (keypath, leaf), sharding in zip(flat_abstract, flat_shardings, strict=True):
        key = tuple(k.key for k in keypath)
        source = sources.get(key)
        if source is None:  # a parameter we do not know how to fill: a bug, not bad input
            raise AssertionError(f"no Hugging Face source for parameter {'/'.join(key)}")
        per_tensor_shape = leaf.shape[1:] if source.stacked else leaf.shape
        for name in source.hf_names:
            if name not in store:
                raise CheckpointError(
                    f"tensor {name} is missing from the checkpoint in {path} "
                    f"(needed for {'/'.join(key)})"
                )
            _check_shape(store, name, per_tensor_shape, source.transpose)
            used.add(name)
        arrays.append(
            jax.make_array_from_callback(leaf.shape, sharding, _reader(store, source, leaf.dtype))
        )
    params = jax.tree.unflatten(jax.tree.structure(abstract), arrays)

    ignorable = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    ignorable |= {"shared.weight"}
    unused = sorted(set(store.names()) - used - ignorable)
    if unused:
        log.warning("ignored %d tensors of %s not used by T5: %s", len(unused), path, unused[:8])
    return config, params


# --- saving -------------------------------------------------------------------------------

_NUMPY_TO_SAFETENSORS = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}


def _hf_tensors(config: T5Config, params) -> list[tuple[str, Any, bool, int | None]]:
    """(HF name, our leaf, transpose, layer index or None) for everything ``save`` writes."""
    flat = {
        tuple(k.key for k in keypath): leaf
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    sources = parameter_sources(config)
    missing = sorted("/".join(k) for k in set(sources) - set(flat))
    if missing:
        raise ValueError(f"params do not match the config: missing {missing[:8]}")
    out = []
    for key, source in sources.items():
        for i, name in enumerate(source.hf_names):
            out.append((name, flat[key], source.transpose, i if source.stacked else None))
    if config.tie_word_embeddings and not config.scale_decoder_outputs:
        # transformers cannot express "tied but unscaled" in config.json: write the head out
        # (a copy of the embedding) and declare it untied, which transformers reads as unscaled.
        out.append(("lm_head.weight", flat[("token_embedder", "embedding")], False, None))
    return out


def save(config: T5Config, params, path: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` for ``transformers``.

    Tensors are fetched and written one at a time, so host memory holds one tensor, not the
    model. An existing ``model.safetensors`` is replaced atomically (written aside, then moved).
    """
    if config.instruction_cross_attention:
        raise ValueError(
            "T5Config.instruction_cross_attention layers have no Hugging Face T5 equivalent; "
            "save the backbone without them"
        )
    os.makedirs(path, exist_ok=True)
    entries = _hf_tensors(config, params)

    def host(leaf, transpose, layer):
        arr = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
        return arr.T if transpose else arr

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, leaf, transpose, layer in entries:
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        shape = tuple(reversed(shape)) if transpose else tuple(shape)
        dtype = np.dtype(leaf.dtype)
        if dtype not in _NUMPY_TO_SAFETENSORS:
            raise ValueError(f"cannot write {name} of dtype {dtype} to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _NUMPY_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align tensor data to 8 bytes, as the format recommends

    target = os.path.join(path, "model.safetensors")
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _name, leaf, transpose, layer in entries:
            f.write(np.ascontiguousarray(host(leaf, transpose, layer)).tobytes())
    os.replace(tmp, target)
    hf = config.to_hf_dict()
    if config.tie_word_embeddings and not config.scale_decoder_outputs:
        hf["tie_word_embeddings"] = False
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


# --- command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagi_jax.convert.hf_t5",
        description="Convert a local Hugging Face T5 directory to an orbax parameter checkpoint.",
    )
    parser.add_argument("--hf_dir", required=True, help="local HF model directory")
    parser.add_argument("--out", required=True, help="output directory (must not hold params)")
    parser.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--scan_layers", action="store_true", help="stack blocks for nn.scan")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tagi_jax.convert import param_checkpoint

    try:
        config, params = load(
            args.hf_dir, param_dtype=args.param_dtype, scan_layers=args.scan_layers
        )
        param_checkpoint.save(args.out, config, params)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"wrote {count:,} parameters of {args.hf_dir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

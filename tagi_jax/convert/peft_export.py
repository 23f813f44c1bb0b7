"""One instruction's generated adapters as a PEFT LoRA directory over a Hugging Face T5.

``write_peft(config, params, instruction_tokens, out, vocabulary=...)`` runs the hypernetwork on
one instruction and writes::

  out/
    adapter_config.json          LoRA over T5ForConditionalGeneration (task SEQ_2_SEQ_LM)
    adapter_model.safetensors    peft's key names: base_model.model.<module>.lora_{A,B}.weight
    instruction.json             the instruction's ids and text, targets, rank and scale
    tokenizer files              as in the base, so ``AutoTokenizer.from_pretrained(out)`` works
    base/                        the backbone (``hf_export.write_hf``), unless ``base_dir`` given
    instruction_states.safetensors   only with ``fused_states=True`` (see below)

Loading it (torch, transformers, peft)::

  base = transformers.T5ForConditionalGeneration.from_pretrained(f"{out}/base")
  model = peft.PeftModel.from_pretrained(base, out).eval()
  # or peft.AutoPeftModelForSeq2SeqLM.from_pretrained(out): base_model_name_or_path holds the
  # absolute path of the base.

Conventions. Our LoRA is ``y = x·W + scale·(x·A)·B`` with ``A [d_in, r]`` and ``B [r, d_out]``
(``lora.py``); peft's is ``y = x·Wᵀ + (alpha / r)·(x·lora_Aᵀ)·lora_Bᵀ`` with
``lora_A [r, d_in]`` and ``lora_B [d_out, r]``. So ``lora_A = Aᵀ``, ``lora_B = Bᵀ`` and
``lora_alpha = scale·r``. ``HyperConfig.divide_b_by_sqrt_rank`` is already in the generated B (the
hypernetwork applies it), so it adds nothing here. ``target_modules`` is a regular expression
that peft matches against whole module names, naming exactly the adapted projections.

A student that reads the instruction at run time is not a plain LoRA on T5:

- ``T5Config.instruction_cross_attention``: every encoder block also attends to the encoded
  instruction. Always refused.
- ``TagiConfig.fusion``: the decoder cross-attends to ``[instruction states ; input states]``.
  Refused, unless ``fused_states=True``: then ``instruction_states.safetensors`` holds the
  encoded instruction ``instruction_states [1, L, d_model]`` (float32) and its
  ``instruction_mask [1, L]`` (int64, 0 on padding), and the model runs as::

    import torch
    from safetensors.torch import load_file
    from transformers.modeling_outputs import BaseModelOutput

    fused = load_file(f"{out}/instruction_states.safetensors")
    enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = ids.shape[0]
    states = fused["instruction_states"].expand(rows, -1, -1).to(enc.dtype)
    memory = torch.cat([states, enc], dim=1)           # the instruction first, as in training
    memory_mask = torch.cat([fused["instruction_mask"].expand(rows, -1).to(mask.dtype), mask], 1)
    logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                   attention_mask=memory_mask, decoder_input_ids=dec_ids).logits
    # generate: model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
    #                          attention_mask=memory_mask, max_new_tokens=...)

  T5's cross-attention has no position bias, so padding inside the concatenation is harmless
  once masked. The instruction states come from the instruction encoder without adapters, which
  is why they are stored rather than recomputed by the PEFT model.

Nothing here imports torch, transformers or peft: the files are written with numpy.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from tagi_jax import paths
from tagi_jax.convert import hf_export, hf_t5
from tagi_jax.models import lora, tagi
from tagi_jax.models.tagi_config import TagiConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INSTRUCTION_RECORD = "instruction.json"
INSTRUCTION_STATES = "instruction_states.safetensors"
BASE_SUBDIR = "base"

# The architecture fields a given base directory must share with the student's backbone.
_BASE_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "feed_forward_proj",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
)


def instruction_row(instruction_tokens) -> np.ndarray:
    """``instruction_tokens`` as one int32 row ``[1, length]`` (a ``[length]`` vector is
    accepted); several rows are an error, since one export is one task."""
    tokens = np.asarray(instruction_tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ValueError(
            f"instruction_tokens must be one non-empty row [1, length], got shape {tokens.shape}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"instruction_tokens must be integer ids, got dtype {tokens.dtype}")
    if not tokens.any():
        raise ValueError("instruction_tokens are all padding (0): there is no instruction")
    return tokens.astype(np.int32)


def check_exportable(config: TagiConfig, *, fused_states: bool = False) -> None:
    """Raises ValueError when the student cannot be written as a PEFT LoRA (and why)."""
    if config.t5.instruction_cross_attention:
        raise ValueError(
            "cannot export this student as a PEFT LoRA: T5Config.instruction_cross_attention is "
            "on, so every encoder block also attends to the encoded instruction, which a LoRA on "
            "T5ForConditionalGeneration cannot express"
        )
    if config.fusion and not fused_states:
        raise ValueError(
            "cannot export this student as a plain PEFT LoRA: TagiConfig.fusion is on, so its "
            "decoder also cross-attends to the encoded instruction; pass fused_states=True to "
            f"also write {INSTRUCTION_STATES} and feed them at run time (see "
            "tagi_jax.convert.peft_export)"
        )
    if fused_states and not config.fusion:
        raise ValueError(
            "fused_states=True is for a fusion student, but TagiConfig.fusion is off: the "
            "decoder never reads the instruction states"
        )
    if not config.hyper.targets:
        raise ValueError(
            "HyperConfig.targets is empty: this student generates no adapters to export"
        )


def hf_module_names(config: TagiConfig, target: str) -> list[str]:
    """transformers' module names (one per block) of an adapter target, e.g. ``dec_cross.q`` ->
    ``decoder.block.<i>.layer.1.EncDecAttention.q``; from ``hf_t5``'s naming table."""
    t = lora.TARGETS[target]
    sources = hf_t5.parameter_sources(config.t5)
    if config.t5.scan_layers:
        names = list(sources[(t.stack, "layers", t.module, t.dense, "kernel")].hf_names)
    else:
        names = [
            sources[(t.stack, f"layers_{i}", t.module, t.dense, "kernel")].hf_names[0]
            for i in range(t.num_layers(config.t5))
        ]
    return [n.removesuffix(".weight") for n in names]


def target_modules_pattern(config: TagiConfig) -> str:
    """A regular expression peft fullmatches against module names: exactly the adapted ones."""
    names = [n for t in config.hyper.targets for n in hf_module_names(config, t)]
    # Every block of a stack is adapted, so the block index generalises to \d+; the check
    # below keeps the pattern honest about that.
    generic = sorted({re.sub(r"\.block\.\d+\.", ".block.<i>.", n) for n in names})
    pattern = "|".join(re.escape(n).replace("<i>", r"\d+") for n in generic)
    assert all(re.fullmatch(pattern, n) for n in names)
    return pattern


def peft_tensors(config: TagiConfig, adapters: lora.LoraAdapters) -> dict[str, np.ndarray]:
    """peft's state dict (float32, ``[r, d_in]`` / ``[d_out, r]``) of one row's adapters."""
    if adapters.batch_size != 1:
        raise ValueError(f"adapters hold {adapters.batch_size} rows; one task's are needed")
    adapters.check(config.t5)
    tensors = {}
    for target in adapters.targets:
        a = np.asarray(jax.device_get(adapters.a[target][:, 0]), np.float32)
        b = np.asarray(jax.device_get(adapters.b[target][:, 0]), np.float32)
        for layer, module in enumerate(hf_module_names(config, target)):
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    return tensors


def adapter_config(config: TagiConfig, adapters: lora.LoraAdapters, base: str) -> dict[str, Any]:
    """``adapter_config.json``: ``lora_alpha / r`` is our scale."""
    rank = int(next(iter(adapters.a.values())).shape[-1])
    alpha = float(adapters.scale) * rank
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules_pattern(config),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _check_base_dir(config: TagiConfig, base_dir: str) -> str:
    """The base is someone else's directory: its architecture must be the student's backbone
    (the weights are trusted to be the frozen backbone the student was trained on)."""
    paths.require_local(base_dir, "base_dir (a Hugging Face T5 directory)")
    given = hf_t5.read_config(base_dir).to_hf_dict()
    ours = config.t5.to_hf_dict()
    diff = {k: (given.get(k), ours.get(k)) for k in _BASE_FIELDS if given.get(k) != ours.get(k)}
    if diff:
        raise ValueError(
            f"base_dir {base_dir} is not this student's backbone: (base, student) differ in {diff}"
        )
    return paths.absolute(base_dir)


def write_peft(
    config: TagiConfig,
    params,
    instruction_tokens,
    out: str,
    *,
    vocabulary: str,
    base_dir: str | None = None,
    fused_states: bool = False,
    overwrite: bool = False,
) -> str:
    """Writes one instruction's adapters as a PEFT LoRA directory; returns its absolute path.

    Args:
      config, params: the TAGI student (``tagi.init_params`` / a trained export).
      instruction_tokens: the instruction's ids ``[1, length]`` (or ``[length]``), encoded with
        ``vocabulary``, padding 0 as in training.
      out: the directory to create.
      vocabulary: ``"byte"``, or a ``spiece.model`` (or a directory holding one).
      base_dir: an existing HF export of the backbone to point at instead of writing
        ``out/base`` (its architecture is checked, its weights are not).
      fused_states: for a fusion student, also write the encoded instruction (see the module
        docstring); refused for any other student.
      overwrite: replace an existing non-empty ``out``.
    """
    check_exportable(config, fused_states=fused_states)
    tokens = instruction_row(instruction_tokens)
    vocab_size = config.instruction_t5.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(
            f"instruction_tokens hold ids in [{tokens.min()}, {tokens.max()}], outside the "
            f"instruction encoder's vocabulary [0, {vocab_size})"
        )
    out = paths.absolute(out)
    if base_dir is None:
        base = paths.join(out, BASE_SUBDIR)
    else:
        base = _check_base_dir(config, base_dir)
        if paths.is_within(base, out):
            # overwriting `out` would delete the base the adapters point at
            raise ValueError(f"base_dir {base} must lie outside the export directory {out}")
    # Refuse before the (possibly long) adapter generation and weight writing.
    with hf_export.atomic_directory(out, kind="peft", overwrite=overwrite) as tmp:
        states, adapters = tagi.encode_task(config, params, tokens)
        if not adapters:
            raise ValueError("the hypernetwork generated no adapters for this student")
        if base_dir is None:
            base_tmp = paths.join(tmp, BASE_SUBDIR)
            paths.makedirs(base_tmp, exist_ok=False)
            hf_export.write_hf_into(config.t5, params["t5"], base_tmp, vocabulary=vocabulary)
        else:
            hf_export.check_vocabulary_fits(config.t5, vocabulary)
        from safetensors.numpy import save_file

        save_file(
            peft_tensors(config, adapters),
            paths.join(tmp, ADAPTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        hf_export.write_json(
            paths.join(tmp, ADAPTER_CONFIG), adapter_config(config, adapters, base)
        )
        hf_export.write_tokenizer(vocabulary, tmp)
        if fused_states:
            save_file(
                {
                    "instruction_states": np.asarray(jax.device_get(states), np.float32),
                    "instruction_mask": (tokens != 0).astype(np.int64),
                },
                paths.join(tmp, INSTRUCTION_STATES),
                metadata={"format": "pt"},
            )
        hf_export.write_json(
            paths.join(tmp, INSTRUCTION_RECORD),
            {
                "instruction": hf_export.decode_ids(vocabulary, tokens[0]),
                "instruction_ids": tokens[0].tolist(),
                "vocabulary": "byte" if vocabulary == "byte" else paths.absolute(vocabulary),
                "targets": list(adapters.targets),
                "rank": int(next(iter(adapters.a.values())).shape[-1]),
                "lora_scale": float(adapters.scale),
                "fusion": config.fusion,
                "fused_states": fused_states,
                "student": config.to_dict(),
            },
        )
    return out

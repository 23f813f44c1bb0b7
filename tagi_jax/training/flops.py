"""Model FLOPs of a TAGI train step, counted from the architecture (for MFU).

Why not XLA's cost analysis: on GPU it does not count matmuls that run as library calls
(cuBLAS), so the same T5-base step reported 7.6e11 FLOPs in float32 and 2.9e12 in bfloat16 on an
H200 while the matmuls alone are ~2e13. The count here is the usual one (PaLM appendix B):
2 FLOPs per multiply-add of every matmul, attention scores and context included, elementwise
work ignored; the backward pass costs one forward for the activation gradients plus one
forward for the weight gradients of the weights that train. The student's T5 is frozen in
TAGI, so its backward is ~1x forward (activation gradients only; LoRA and hypernetwork weight
gradients are negligible); a trained backbone (metatrain) counts 2x. A frozen instruction
encoder costs its forward only.
"""

from __future__ import annotations

from tagi_jax.models.t5_config import T5Config


def _ffn(config: T5Config) -> int:
    return (3 if config.is_gated_act else 2) * config.d_model * config.d_ff


def encoder_flops(config: T5Config, tokens: int, length: int, layers: int | None = None) -> int:
    """Forward FLOPs of ``tokens`` tokens through the encoder (sequences of ``length``)."""
    d, inner = config.d_model, config.inner_dim
    per_token = 4 * d * inner + 2 * length * inner + _ffn(config)  # q k v o, scores, context
    return 2 * tokens * per_token * (config.num_layers if layers is None else layers)


def decoder_flops(config: T5Config, tokens: int, length: int, memory: int, memory_tokens: int):
    """Forward FLOPs of the decoder and output layer: ``tokens`` target tokens in sequences of
    ``length``, cross-attending to ``memory``-long sequences (``memory_tokens`` in total)."""
    d, inner = config.d_model, config.inner_dim
    per_token = (
        4 * d * inner  # self-attention q k v o
        + 2 * length * inner  # self-attention scores and context
        + 2 * d * inner  # cross-attention q and o
        + 2 * memory * inner  # cross-attention scores and context
        + _ffn(config)
    )
    cross_kv = 2 * d * inner * memory_tokens  # k and v of the encoder states, once per layer
    layers = config.num_decoder_layers
    # The output head computes all vocab_size columns; logits_vocab_size cuts the logits after
    # the matmul (t5.Decoder), so it does not change the work.
    return 2 * (tokens * per_token + cross_kv) * layers + 2 * tokens * d * config.vocab_size


def train_step_flops(
    model,
    batch: int,
    input_length: int,
    instruction_length: int,
    target_length: int,
    *,
    backbone_trains: bool,
) -> int:
    """Model FLOPs of one step of ``training.state.train_step`` for a ``TagiConfig``."""
    t5 = model.t5
    uses_instruction = bool(model.hyper.targets) or model.fusion
    instruction = 0
    if uses_instruction:
        encoder_t5 = model.instruction_t5
        instruction = encoder_flops(encoder_t5, batch * instruction_length, instruction_length)
        if model.hyper.train_instruction_encoder:
            instruction *= 3
    memory = input_length + (instruction_length if model.fusion else 0)
    student = encoder_flops(t5, batch * input_length, input_length) + decoder_flops(
        t5, batch * target_length, target_length, memory, batch * memory
    )
    return instruction + student * (3 if backbone_trains else 2)


# Which tokens pass through an adapted projection, per layer: (site, projection) -> stream.
# Cross-attention keys and values read the memory; everything else the stack's own tokens.
def _adapter_stream(site: str, projection: str) -> str:
    if site.startswith("enc_"):
        return "input"
    if site == "dec_cross" and projection in ("k", "v"):
        return "memory"
    return "target"


def inference_example_flops(
    model,
    *,
    input_tokens: float,
    target_tokens: float,
    instruction_tokens: float = 0.0,
    examples_per_task: float = 1.0,
    hypernetwork_parameters: int = 0,
) -> dict[str, float]:
    """Model FLOPs of answering one example at inference, counted as ``train_step_flops``
    counts a forward pass, for a ``TagiConfig``: the student's encoder on ``input_tokens``,
    the decoder on ``target_tokens`` (the answer and EOS) cross-attending to the input (and,
    with fusion, the instruction), the LoRA products of the adapted projections, and, per
    task and so divided by ``examples_per_task``, the instruction's encoding and the
    hypernetwork (2 FLOPs per parameter: each weight multiplies one pooled instruction).

    A plain T5 (metatrain, the base) has no targets and no fusion: reading the Definition in
    every example is part of its ``input_tokens``. Returns the parts and their ``total``.
    """
    from tagi_jax.models import lora

    t5 = model.t5
    reads_instruction = model.fusion or t5.instruction_cross_attention
    generates = bool(model.hyper.targets)
    memory = input_tokens + (instruction_tokens if reads_instruction else 0.0)
    parts = {
        "encoder": encoder_flops(t5, input_tokens, input_tokens),
        "decoder": decoder_flops(t5, target_tokens, target_tokens, memory, memory),
        "adapters": 0.0,
        "instruction_per_task": 0.0,
    }
    if generates:
        tokens = {"input": input_tokens, "target": target_tokens, "memory": memory}
        for name in model.hyper.targets:
            target = lora.TARGETS[name]
            d_in, d_out = target.dims(t5)
            site, projection = name.split(".")
            per_token = 2 * model.hyper.rank * (d_in + d_out)
            parts["adapters"] += (
                per_token * tokens[_adapter_stream(site, projection)] * target.num_layers(t5)
            )
    if generates or reads_instruction:
        encoder = model.instruction_t5
        per_task = encoder_flops(encoder, instruction_tokens, instruction_tokens)
        per_task += 2 * hypernetwork_parameters
        parts["instruction_per_task"] = per_task / examples_per_task
    parts["total"] = sum(parts.values())
    return parts

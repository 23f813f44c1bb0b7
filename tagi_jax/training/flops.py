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

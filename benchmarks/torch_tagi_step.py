"""PyTorch rebuild of the TAGI authors' training step: the speed reference for the JAX step.

``benchmarks/train_step.py --method authors_code`` times our jitted JAX step; this script times
the same computation written the way the authors' released PyTorch code runs it, eagerly, with
``transformers`` T5 models and per-example LoRA forward hooks. PyTorch (and ``transformers``'
torch models) are a benchmark-only dependency: nothing in ``tagi_jax`` imports this file, and
the package neither needs nor installs torch.

One step (``build_torch_tagi_step``; ``gin_configs/methods/authors_code.gin`` in torch):

1. Models (random init, T5 v1.1 style: gated-GELU FFN, unscaled and untied ``lm_head`` (a
   separate weight is put in after construction, as transformers 5 ties it when building from a
   config), dropout 0 so both sides do the same deterministic compute): a student ``T5ForConditionalGeneration`` and a
   separate frozen instruction encoder ``T5EncoderModel`` of the same shape (eval mode,
   ``requires_grad=False``, run under ``torch.no_grad()``).
2. Instruction encoding: the frozen encoder reads the instruction tokens;
   ``pooled = mean over every position (padding included) of (last_hidden_state +
   hidden_states[1])`` (``hidden_states[1]`` is the first block's output; the authors'
   ``first_last_avg``), then ``f = tanh(Linear(d_model, 255)(pooled))``.
3. Hypernetwork (``shared_indexed`` generator): targets are q and v of encoder self-attention,
   decoder self-attention and decoder cross-attention. Per attention site one MLP pair shared
   by every block and both projections, fed ``concat(f, idx)`` with the raw float index
   ``idx = 2 * block + (0 for q, 1 for v)``: ``Linear(256, 8) -> ReLU -> Linear(8, d_model*r)``
   gives A ``[d_model, r]`` and a second ``Linear(256, 8) -> ReLU -> Linear(8, r*inner)`` gives
   B ``[r, inner]`` (``inner = num_heads * d_kv``). All ``2 * layers`` rows of a site run in one
   batched matmul over ``[layers*2, batch, 256]``. Every generator weight is N(0, 1e-7) with
   zero biases (the pooler keeps torch's default init); B is divided by ``sqrt(r)``.
4. Injection: forward hooks on the targeted q/v ``nn.Linear`` modules of the student add
   ``(x @ A_b) @ B_b`` per example (two ``bmm``), reading this step's adapters from a dict set
   before the forward (the authors' per-example LoRA hooks).
5. Fusion: the student encoder (with adapters) encodes the input; the decoder's memory is
   ``cat([instruction_states, encoder_states], 1)`` with mask ``cat([hyper_mask, input_mask])``
   (masks are ``tokens > 0``); the student then runs with ``encoder_outputs=(memory,)``,
   ``decoder_input_ids`` = targets shifted right (start id 0) and ``labels`` = targets, giving
   the token-mean cross-entropy.
6. Trainable set (``authors_code``): the hypernetwork (pooler + generators), every student layer
   norm weight, the shared token embedding and all FFN weights (``wi_0``, ``wi_1``, ``wo``);
   everything else in the student is frozen (attention projections, relative position biases,
   ``lm_head``). ``torch.optim.AdamW(lr=1e-4)`` over exactly those parameters; one step is
   ``zero_grad``, forward, ``backward``, ``optimizer.step()``.

Token batches are random ids in ``[2, vocab)`` (int64), built once and reused every step.
Example (T5 v1.1-small shape by default)::

  python benchmarks/torch_tagi_step.py --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import transformers
from torch import nn

INSTRUCTION_DIM = 255
HIDDEN_DIM = 8
GENERATOR_STD = 1e-7
SITES = ("enc_self", "dec_self", "dec_cross")
PROJECTIONS = ("q", "v")


class _GeneratorMLP(nn.Module):
    """``Linear(in, 8) -> ReLU -> Linear(8, out)``, every weight N(0, 1e-7), zero biases."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.hidden = nn.Linear(in_dim, HIDDEN_DIM)
        self.out = nn.Linear(HIDDEN_DIM, out_dim)
        for layer in (self.hidden, self.out):
            nn.init.normal_(layer.weight, std=GENERATOR_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, z):
        return self.out(torch.relu(self.hidden(z)))


class HyperNet(nn.Module):
    """Pooled instruction ``[batch, d_model]`` -> ``{(site, block, proj): (A, B)}``."""

    def __init__(self, *, d_model: int, inner: int, rank: int, num_layers: int):
        super().__init__()
        self.d_model, self.inner, self.rank, self.num_layers = d_model, inner, rank, num_layers
        self.pooler = nn.Linear(d_model, INSTRUCTION_DIM)  # torch default init, as the authors
        in_dim = INSTRUCTION_DIM + 1
        self.gen_a = nn.ModuleDict({s: _GeneratorMLP(in_dim, d_model * rank) for s in SITES})
        self.gen_b = nn.ModuleDict({s: _GeneratorMLP(in_dim, rank * inner) for s in SITES})
        idx = torch.arange(num_layers * len(PROJECTIONS), dtype=torch.float32)
        self.register_buffer("idx", idx, persistent=False)  # 2*block + (0 q, 1 v)

    def forward(self, pooled):
        f = torch.tanh(self.pooler(pooled))  # [batch, 255]
        batch, rows = f.shape[0], self.idx.shape[0]
        z = torch.cat(
            [
                f.unsqueeze(0).expand(rows, batch, f.shape[-1]),
                self.idx[:, None, None].expand(rows, batch, 1),
            ],
            dim=-1,
        )  # [layers*2, batch, 256]
        k = len(PROJECTIONS)
        adapters = {}
        for site in SITES:
            a = self.gen_a[site](z).view(self.num_layers, k, batch, self.d_model, self.rank)
            b = self.gen_b[site](z).view(self.num_layers, k, batch, self.rank, self.inner)
            b = b / math.sqrt(self.rank)
            for block in range(self.num_layers):
                for j, proj in enumerate(PROJECTIONS):
                    adapters[(site, block, proj)] = (a[block, j], b[block, j])
        return adapters


def _target_modules(student: transformers.T5ForConditionalGeneration):
    """``{(site, block, proj): nn.Linear}`` for every targeted q/v projection."""
    modules = {}
    for block, layer in enumerate(student.encoder.block):
        attn = layer.layer[0].SelfAttention
        for proj in PROJECTIONS:
            modules[("enc_self", block, proj)] = getattr(attn, proj)
    for block, layer in enumerate(student.decoder.block):
        self_attn, cross_attn = layer.layer[0].SelfAttention, layer.layer[1].EncDecAttention
        for proj in PROJECTIONS:
            modules[("dec_self", block, proj)] = getattr(self_attn, proj)
            modules[("dec_cross", block, proj)] = getattr(cross_attn, proj)
    return modules


def _lora_hook(adapters: dict, key):
    """A forward hook adding this example's ``(x @ A_b) @ B_b`` to the Linear's output."""

    def hook(module, inputs, output):
        if key not in adapters:
            return output
        a, b = adapters[key]  # [batch, d_in, r], [batch, r, d_out]
        return output + torch.bmm(torch.bmm(inputs[0], a), b)

    return hook


def _is_trainable(name: str) -> bool:
    """The student's ``authors_code`` set: layer norms, shared embedding, FFN weights."""
    return "layer_norm" in name or name == "shared.weight" or ".DenseReluDense." in name


def build_torch_tagi_step(
    *,
    d_model: int,
    d_kv: int,
    d_ff: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    rank: int,
    batch: int,
    hyper_len: int,
    input_len: int,
    target_len: int,
    seed: int = 0,
    threads: int | None = None,
):
    """``(step_fn, describe)``: ``step_fn()`` runs one authors' TAGI training step on fixed
    random batches and returns the float loss; ``describe`` names the shape and counts."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        use_cache=False,
    )
    student = transformers.T5ForConditionalGeneration(config).train()
    # transformers 5 always ties lm_head to the shared embedding when building a T5 from a
    # config (``tie_word_embeddings=False`` only turns off the v1.0 output scaling); v1.1 has
    # its own lm_head, so give it a separate (frozen) weight, N(0, 1/d_model) as our JAX T5
    # draws its untied head (logits of unit scale, so the first loss is near log(vocab)).
    student.lm_head.weight = nn.Parameter(torch.empty_like(student.shared.weight))
    nn.init.normal_(student.lm_head.weight, std=d_model**-0.5)
    assert student.lm_head.weight is not student.shared.weight
    instruction_encoder = transformers.T5EncoderModel(config).eval()
    instruction_encoder.requires_grad_(False)
    inner = num_heads * d_kv
    hypernet = HyperNet(d_model=d_model, inner=inner, rank=rank, num_layers=num_layers)

    trainable = list(hypernet.parameters())
    for name, param in student.named_parameters():  # deduplicated: shared.weight once
        param.requires_grad_(_is_trainable(name))
        if param.requires_grad:
            trainable.append(param)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    adapters: dict = {}
    targets = _target_modules(student)
    for key, module in targets.items():
        module.register_forward_hook(_lora_hook(adapters, key))

    gen = torch.Generator().manual_seed(seed)

    def tokens(length):
        return torch.randint(2, vocab_size, (batch, length), generator=gen, dtype=torch.int64)

    hyper_tokens = tokens(hyper_len)
    input_tokens = tokens(input_len)
    target_tokens = tokens(target_len)
    decoder_input = torch.cat([torch.zeros_like(target_tokens[:, :1]), target_tokens[:, :-1]], 1)
    hyper_mask, input_mask = (hyper_tokens > 0).long(), (input_tokens > 0).long()
    memory_mask = torch.cat([hyper_mask, input_mask], dim=1)

    def step_fn() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            out = instruction_encoder(
                input_ids=hyper_tokens, attention_mask=hyper_mask, output_hidden_states=True
            )
            states = out.last_hidden_state
            pooled = (states + out.hidden_states[1]).mean(dim=1)  # every position, padding too
        adapters.clear()
        adapters.update(hypernet(pooled))
        encoded = student.encoder(input_ids=input_tokens, attention_mask=input_mask)
        memory = torch.cat([states, encoded.last_hidden_state], dim=1)
        loss = student(
            encoder_outputs=(memory,),
            attention_mask=memory_mask,
            decoder_input_ids=decoder_input,
            labels=target_tokens,
            use_cache=False,
        ).loss
        loss.backward()
        optimizer.step()
        adapters.clear()
        return loss.item()

    n_trainable = sum(p.numel() for p in trainable)
    n_total = (
        sum(p.numel() for p in student.parameters())
        + sum(p.numel() for p in instruction_encoder.parameters())
        + sum(p.numel() for p in hypernet.parameters())
    )
    describe = (
        f"torch TAGI authors_code step: d_model={d_model} d_kv={d_kv} d_ff={d_ff} "
        f"layers={num_layers} heads={num_heads} vocab={vocab_size} rank={rank} batch={batch} "
        f"hyper_len={hyper_len} input_len={input_len} target_len={target_len}; "
        f"{len(targets)} LoRA hooks; trainable params {n_trainable:,} of {n_total:,} "
        f"(hypernet {sum(p.numel() for p in hypernet.parameters()):,})"
    )
    return step_fn, describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_kv", type=int, default=64)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--num_heads", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=32128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hyper_len", type=int, default=384)
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--target_len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    args = parser.parse_args()

    step_fn, describe = build_torch_tagi_step(
        d_model=args.d_model,
        d_kv=args.d_kv,
        d_ff=args.d_ff,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        rank=args.rank,
        batch=args.batch,
        hyper_len=args.hyper_len,
        input_len=args.input_len,
        target_len=args.target_len,
        seed=args.seed,
        threads=args.threads,
    )
    print(describe)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    start = time.perf_counter()
    loss = step_fn()
    print(f"warm-up step: {time.perf_counter() - start:.3f} s (loss {loss:.4f})")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step_fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = args.batch * (args.input_len + args.target_len)
    print(
        f"step time: median {median * 1e3:.1f} ms over {args.steps} steps "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); "
        f"{tokens / median:,.0f} student tokens/s; last loss {loss:.4f}"
    )


if __name__ == "__main__":
    main()

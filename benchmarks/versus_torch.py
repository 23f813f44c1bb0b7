"""tagi_jax against the PyTorch code it replaces, side by side in one process, same shapes.

Four comparisons, each printed as ``torch ms | tagi_jax ms | speed ratio (torch / jax)``:

1. T5 forward (teacher-forced logits) of Hugging Face ``T5ForConditionalGeneration`` and of
   ``tagi_jax.models.t5.forward``, on the SAME random weights (one HF checkpoint written to a
   temp dir and read by ``tagi_jax.convert.hf_t5``); the largest logit difference is printed
   as a check that both compute the same function.
2. T5 forward + backward: the gradient of ``mean(logsumexp(logits))`` for every parameter.
3. Greedy decoding: ``transformers`` ``generate`` (KV cache, EOS suppressed so every row makes
   ``--decode_steps`` tokens) against ``t5.greedy_decode`` (EOS id set out of range, same
   length); the share of identical tokens is printed.
4. A TAGI training step of the authors' method (CE only, AdamW): ``torch_tagi_step.py`` (HF
   T5 with per-example LoRA forward hooks, the authors' way) against ``train_step.py --method
   authors_code`` (the trainer's sharded, jitted step).

Defaults are the shapes of issue 11: T5 v1.1-small, fp32, batch 4 × (512 encoder + 128
decoder) tokens; TAGI batch 4, instruction 384, input 128, target 64, rank 32. torch and
transformers are benchmark/test dependencies only (``requirements-test.txt``).

Each side runs in its own child process, one after the other (torch first, which also writes
the shared checkpoint and its outputs for the checks): in one process, the idle thread pool of
one library competes with the other's work on a small machine (measured on 2 cores: JAX's T5
forward+backward 13% slower with torch loaded and used in the same process). Both libraries
use every core (the thread counts are printed). Example::

  python benchmarks/versus_torch.py                 # everything, ~5 min on 2 cores
  python benchmarks/versus_torch.py --only tagi --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# T5 v1.1-small (google/t5-small-lm-adapt) without the vocabulary, which is an option.
SMALL = dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6)
AIMS = {"forward+backward": 1.5, "greedy": 1.5, "tagi": 1.7}
LABELS = {
    "forward": "T5 forward",
    "forward+backward": "T5 forward + backward",
    "greedy": "greedy decode",
    "tagi": "TAGI train step (authors' method)",
}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and, for jax, compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _tokens(args):
    rng = np.random.default_rng(0)
    enc = rng.integers(2, args.vocab, (args.batch, args.enc_len)).astype(np.int32)
    dec = rng.integers(2, args.vocab, (args.batch, args.dec_len)).astype(np.int32)
    dec[:, 0] = 0
    return enc, dec


# --- the torch side -------------------------------------------------------------------------


def torch_side(args) -> dict:
    import torch
    import torch_tagi_step

    from tagi_jax.testing import hf_t5_reference

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    times = {}
    if args.only in ("all", "t5"):
        model = hf_t5_reference.write_hf_t5(args.checkpoint, "v1_1", vocab_size=args.vocab, **SMALL)
        enc, dec = (torch.tensor(a, dtype=torch.long) for a in _tokens(args))

        def forward():
            with torch.no_grad():
                return model(input_ids=enc, decoder_input_ids=dec).logits

        outputs = {"logits": forward().numpy()}
        if "forward" in args.parts:
            times["forward"] = _median_ms(forward, args.repeats)
        if "backward" in args.parts:
            model.train()  # dropout is 0; train mode, as a training step runs it

            def forward_backward():
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=enc, decoder_input_ids=dec).logits
                torch.logsumexp(logits, dim=-1).mean().backward()

            times["forward+backward"] = _median_ms(forward_backward, args.repeats)
            model.eval()
        if "greedy" in args.parts:

            def greedy():
                with torch.no_grad():
                    return model.generate(
                        input_ids=enc,
                        attention_mask=enc != 0,
                        do_sample=False,
                        num_beams=1,
                        max_new_tokens=args.decode_steps,
                        min_new_tokens=args.decode_steps,  # EOS suppressed: all rows full
                        use_cache=True,
                    )

            outputs["greedy"] = greedy().numpy()[:, 1:]
            times["greedy"] = _median_ms(greedy, args.repeats)
        np.savez(os.path.join(args.workdir, "torch_outputs.npz"), **outputs)
    if args.only in ("all", "tagi"):
        step, describe = torch_tagi_step.build_torch_tagi_step(
            **{k: SMALL[k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads")},
            vocab_size=args.vocab,
            rank=32,
            batch=args.tagi_batch,
            hyper_len=args.hyper_len,
            input_len=args.input_len,
            target_len=args.target_len,
        )
        print(describe, flush=True)
        times["tagi"] = _median_ms(step, args.repeats)
    return times


# --- the jax side ---------------------------------------------------------------------------


def jax_side(args) -> dict:
    import jax
    import jax.numpy as jnp
    import train_step

    from tagi_jax.convert import hf_t5
    from tagi_jax.models import t5

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind})", flush=True)
    times = {}
    if args.only in ("all", "t5"):
        config, params = hf_t5.load(args.checkpoint, dropout_rate=0.0)
        torch_outputs = np.load(os.path.join(args.workdir, "torch_outputs.npz"))
        enc, dec = (jnp.asarray(a) for a in _tokens(args))
        forward_fn = jax.jit(functools.partial(t5.forward, config))

        def forward():
            return jax.block_until_ready(forward_fn(params, enc, dec))

        difference = float(np.max(np.abs(torch_outputs["logits"] - np.asarray(forward()))))
        print(f"  forward: largest |logit difference| torch vs jax {difference:.2e}", flush=True)
        if "forward" in args.parts:
            times["forward"] = _median_ms(forward, args.repeats)
        if "backward" in args.parts:

            @jax.jit
            def grads(p, e, d):
                def loss(p):
                    return jnp.mean(jax.nn.logsumexp(t5.forward(config, p, e, d), axis=-1))

                return jax.grad(loss)(p)

            times["forward+backward"] = _median_ms(
                lambda: jax.block_until_ready(grads(params, enc, dec)), args.repeats
            )
        if "greedy" in args.parts:
            no_eos = config.replace(eos_token_id=-1)  # never finishes: every row full, as torch

            def greedy():
                return jax.block_until_ready(
                    t5.greedy_decode(no_eos, params, enc, max_decode_len=args.decode_steps)
                )

            same = np.mean(torch_outputs["greedy"] == np.asarray(greedy()))
            print(f"  greedy: {100 * same:.1f}% of tokens identical torch vs jax", flush=True)
            times["greedy"] = _median_ms(greedy, args.repeats)
    if args.only in ("all", "tagi"):
        step = train_step.JaxStep(
            model="t5_1_1_small",
            method="authors_code",
            batch=args.tagi_batch,
            enc_len=args.input_len,
            hyper_len=args.hyper_len,
            dec_len=args.target_len,
        )
        print(
            f"jax TAGI authors_code step: {step.n_train:,} trainable of {step.n_total:,} "
            "parameters",
            flush=True,
        )
        times["tagi"] = _median_ms(step.run, args.repeats)
    return times


# --- the parent -----------------------------------------------------------------------------


def _run_side(side: str, argv: list[str], workdir: str) -> dict:
    out = os.path.join(workdir, f"{side}.json")
    command = [sys.executable, os.path.abspath(__file__), *argv, "--side", side]
    command += ["--workdir", workdir]
    subprocess.run(command, check=True)
    with open(out) as f:
        return json.load(f)


def _table(args, torch_ms: dict, jax_ms: dict) -> str:
    lines = ["| work | torch ms | tagi_jax ms | speed vs torch | aim |", "|---|---|---|---|---|"]
    for key, label in LABELS.items():
        if key not in jax_ms:
            continue
        ratio = torch_ms[key] / jax_ms[key]
        aim = AIMS.get(key)
        verdict = "" if aim is None else f"{aim}x " + ("met" if ratio >= aim else "**NOT met**")
        if key == "greedy":
            tokens = args.batch * args.decode_steps
            label += (
                f", {args.decode_steps} tokens ({tokens / torch_ms[key] * 1e3:.0f} vs "
                f"{tokens / jax_ms[key] * 1e3:.0f} tokens/s)"
            )
        lines.append(
            f"| {label} | {torch_ms[key]:.0f} | {jax_ms[key]:.0f} | {ratio:.2f}x | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("all", "t5", "tagi"), default="all")
    parser.add_argument(
        "--parts", default="forward,backward,greedy", help="which T5 comparisons to run"
    )
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--enc_len", type=int, default=512)
    parser.add_argument("--dec_len", type=int, default=128)
    parser.add_argument("--decode_steps", type=int, default=64)
    parser.add_argument("--tagi_batch", type=int, default=4)
    parser.add_argument("--hyper_len", type=int, default=384)
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--target_len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument("--side", choices=("torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))

    if args.side:  # a child: time one library, write its numbers for the parent
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        args.checkpoint = os.path.join(args.workdir, "hf_t5")
        times = (torch_side if args.side == "torch" else jax_side)(args)
        with open(os.path.join(args.workdir, f"{args.side}.json"), "w") as f:
            json.dump(times, f)
        return

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, fp32, "
        f"median of {args.repeats} after a warm-up; each library in its own process",
        flush=True,
    )
    argv = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory() as workdir:
        torch_ms = _run_side("torch", argv, workdir)
        jax_ms = _run_side("jax", argv, workdir)
    print()
    print(_table(args, torch_ms, jax_ms))


if __name__ == "__main__":
    main()

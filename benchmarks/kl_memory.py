"""Peak memory of the chunked ``kl_divergence`` against the naive formula.

Compiles the loss alone and its value-and-gradient (with respect to the student logits, as in
training) for both implementations and prints XLA's compiled memory: arguments (the two logit
tensors), outputs, temporaries and the peak (arguments + outputs + temporaries - aliases).
Default shape: batch 8, target length 128, vocabulary 32128, float32 logits, temperature 3.

  python benchmarks/kl_memory.py [--batch 8 --length 128 --vocab 32128 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from tagi_jax.distill import losses


def naive_kl(student, teacher, weights, temperature):
    log_ps = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    per_position = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return jnp.sum(per_position * weights) / jnp.sum(weights)


def chunked_kl(student, teacher, weights, temperature):
    return losses.kl_divergence(student, teacher, weights, temperature=temperature)[0]


def _report(name, fn, args):
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    mib = 2**20
    print(
        f"  {name:24s} args {m.argument_size_in_bytes / mib:7.1f}  out {m.output_size_in_bytes / mib:7.1f}"
        f"  temp {m.temp_size_in_bytes / mib:7.1f}  peak {peak / mib:7.1f} MiB   {seconds * 1e3:7.1f} ms"
    )
    return peak, m.temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--temperature", type=float, default=3.0)
    args = parser.parse_args()
    key = jax.random.key(0)
    shape = (args.batch, args.length, args.vocab)
    student = (jax.random.normal(key, shape) * 3).astype(args.dtype)
    teacher = (jax.random.normal(jax.random.fold_in(key, 1), shape) * 3).astype(args.dtype)
    weights = jnp.ones(shape[:2], jnp.float32)
    tau = args.temperature
    print(
        f"KL(teacher||student), logits {shape} {args.dtype}, temperature {tau}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    a = float(naive_kl(student, teacher, weights, tau))
    b = float(chunked_kl(student, teacher, weights, tau))
    print(f"  values: naive {a:.7f}, chunked {b:.7f}, |diff| {abs(a - b):.2e}")
    results = {}
    for label, fn in (("naive", naive_kl), ("chunked", chunked_kl)):
        results[f"{label} loss"] = _report(
            f"{label} loss", lambda s, t, w, fn=fn: fn(s, t, w, tau), (student, teacher, weights)
        )
        results[f"{label} value+grad"] = _report(
            f"{label} value+grad",
            lambda s, t, w, fn=fn: jax.value_and_grad(lambda x: fn(x, t, w, tau))(s),
            (student, teacher, weights),
        )
    for what in ("loss", "value+grad"):
        naive_peak, naive_temp = results[f"naive {what}"]
        peak, temp = results[f"chunked {what}"]
        print(
            f"  {what}: chunked/naive peak {peak / naive_peak:.3f}, "
            f"temporaries {temp / 2**20:.1f} vs {naive_temp / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()

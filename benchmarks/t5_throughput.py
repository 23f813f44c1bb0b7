"""T5 backbone throughput: forward, forward+backward and greedy decoding, on random weights.

Prints compile time and steady-state tokens per second for one model size. Examples:

  python benchmarks/t5_throughput.py                                   # tiny, CPU-sized
  python benchmarks/t5_throughput.py --model t5_1_1_base --batch 32 --dtype bfloat16
  python benchmarks/t5_throughput.py --model t5_1_1_xl --scan_layers --remat full
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import gin
import jax
import jax.numpy as jnp

from tagi_jax import configurables, gin_configs
from tagi_jax.models import t5

GIN_MODELS = os.path.join(gin_configs.root(), "models")


def _time(fn, *args, repeats: int):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_1_1_tiny", help="a gin_configs/models/ name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--enc_len", type=int, default=256)
    parser.add_argument("--dec_len", type=int, default=64)
    parser.add_argument("--decode_steps", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    gin.parse_config_file(os.path.join(GIN_MODELS, f"{args.model}.gin"))
    config = configurables.t5_config().replace(
        dtype=args.dtype, dropout_rate=0.0, remat_policy=args.remat
    )
    if args.scan_layers:
        config = config.replace(scan_layers=True)
    params = jax.jit(functools.partial(t5.init_params, config))(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    key = jax.random.key(1)
    enc = jax.random.randint(key, (args.batch, args.enc_len), 2, config.vocab_size)
    dec = jax.random.randint(key, (args.batch, args.dec_len), 2, config.vocab_size).at[:, 0].set(0)

    forward = jax.jit(functools.partial(t5.forward, config))

    @jax.jit
    def forward_backward(p, e, d):
        def loss(p):
            logits = t5.forward(config, p, e, d)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

        return jax.grad(loss)(p)

    def decode(p, e):
        return t5.greedy_decode(config, p, e, max_decode_len=args.decode_steps)

    tokens = args.batch * (args.enc_len + args.dec_len)
    device = jax.devices()[0]
    print(
        f"{args.model}: {n_params:,} params, {args.dtype}, scan={config.scan_layers}, "
        f"remat={config.remat_policy}, batch={args.batch}, enc={args.enc_len}, dec={args.dec_len}, "
        f"device={device.device_kind} x{jax.device_count()}, jax {jax.__version__}"
    )
    for name, fn, fn_args, count in (
        ("forward", forward, (params, enc, dec), tokens),
        ("forward+backward", forward_backward, (params, enc, dec), tokens),
        ("greedy decode", decode, (params, enc), args.batch * args.decode_steps),
    ):
        compile_s, step_s = _time(fn, *fn_args, repeats=args.repeats)
        print(
            f"  {name:17s} compile+first {compile_s:7.2f}s  step {step_s * 1e3:9.2f} ms  "
            f"{count / step_s:12,.0f} tokens/s"
        )


if __name__ == "__main__":
    main()

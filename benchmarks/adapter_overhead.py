"""What generated adapters cost: TAGI's forward against the plain T5 forward, same batch.

For each model shape (random weights) it compiles and times three jitted functions:

* ``t5``        — ``t5.forward`` with no adapters (the base model);
* ``injected``  — ``t5.forward`` with per-example adapters given (the LoRA einsums alone);
* ``tagi``      — ``tagi.forward`` with the generated adapters given: adapted encoder and
                  decoder plus instruction encoding and fusion (how a task's adapters are
                  served once generated);
* ``tagi+gen``  — ``tagi.forward`` generating the adapters too: every parameter of the
                  hypernetwork is then an argument as well (a training step's forward);

and reports XLA's compiled peak memory (arguments + outputs + temporaries − aliases, from
``compiled.memory_analysis()``, the number that decides whether a step fits on a device) and the
median step time. A per-example copy of the adapted kernels would add
``batch x sum(d_in x d_out)`` floats (about 1.4 GB at batch 8 for the base shape); the ratios
show the einsum path adds a small fraction instead. Run:

  python benchmarks/adapter_overhead.py                 # small and base shapes
  python benchmarks/adapter_overhead.py --shapes base --batch 16
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import gin
import jax

from tagi_jax import configurables, gin_configs
from tagi_jax.models import lora, t5, tagi

GIN = gin_configs.root()


def _tagi_config(shape: str, scan_layers: bool):
    gin.clear_config()
    gin.parse_config_file(os.path.join(GIN, "models", f"t5_1_1_{shape}.gin"))
    gin.parse_config_file(os.path.join(GIN, "methods", "paper.gin"))
    config = configurables.tagi_config()
    return config.replace(t5=config.t5.replace(dropout_rate=0.0, scan_layers=scan_layers))


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _measure(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return _peak_bytes(compiled), statistics.median(times)


def run(shape, batch, enc_len, hyper_len, dec_len, repeats, scan_layers):
    config = _tagi_config(shape, scan_layers)
    params = jax.jit(functools.partial(tagi.init_params, config))(jax.random.key(0))
    # Live adapters (the B generators start at zero): the cost must not depend on values.
    params["hypernet"] = jax.tree.map(lambda x: x + 1e-3, params["hypernet"])
    key = jax.random.key(1)
    tokens = {
        "encoder_input_tokens": jax.random.randint(key, (batch, enc_len), 2, 32000),
        "hyper_input_tokens": jax.random.randint(key, (batch, hyper_len), 2, 32000),
        "decoder_input_tokens": jax.random.randint(key, (batch, dec_len), 2, 32000),
    }
    adapters = jax.jit(functools.partial(tagi.generate_adapters, config))(
        params, tokens["hyper_input_tokens"]
    )

    def base(p, enc, dec):
        return t5.forward(config.t5, p, enc, dec)

    def injected(p, enc, dec, adapters):
        return t5.forward(config.t5, p, enc, dec, adapters=adapters)

    def student(p, b, adapters):
        return tagi.forward(config, p, b, adapters=adapters)[0]

    def student_generating(p, b):
        return tagi.forward(config, p, b)[0]

    enc, dec = tokens["encoder_input_tokens"], tokens["decoder_input_tokens"]
    results = {
        "t5": _measure(base, (params["t5"], enc, dec), repeats),
        "injected": _measure(injected, (params["t5"], enc, dec, adapters), repeats),
        "tagi": _measure(student, (params, tokens, adapters), repeats),
        "tagi+gen": _measure(student_generating, (params, tokens), repeats),
    }
    n_t5 = sum(x.size for x in jax.tree.leaves(params["t5"]))
    n_hyper = sum(x.size for x in jax.tree.leaves(params["hypernet"]))
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
    copy_bytes = batch * sum(
        lora.TARGETS[n].num_layers(config.t5) * int.__mul__(*lora.TARGETS[n].dims(config.t5)) * 4
        for n in config.hyper.targets
    )
    print(
        f"\n{shape}: T5 {n_t5:,} params + hypernetwork {n_hyper:,}; batch {batch}, input "
        f"{enc_len}, instruction {hyper_len}, target {dec_len}; {len(config.hyper.targets)} "
        f"targets, rank {config.hyper.rank}; scan_layers={scan_layers}; "
        f"{jax.devices()[0].device_kind}"
    )
    print(
        f"  generated adapters: {adapter_bytes / 2**20:,.1f} MiB "
        f"(a per-example copy of the adapted kernels would be {copy_bytes / 2**20:,.1f} MiB)"
    )
    base_mem, base_time = results["t5"]
    for name, (mem, seconds) in results.items():
        print(
            f"  {name:9s} peak {mem / 2**20:9,.1f} MiB  x{mem / base_mem:5.3f}   "
            f"step {seconds * 1e3:8.1f} ms  x{seconds / base_time:5.2f}"
        )
    ratio = results["tagi"][0] / base_mem
    print(f"  peak-memory ratio tagi.forward (generated adapters) / t5.forward: {ratio:.3f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="small,base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--enc_len", type=int, default=512)
    parser.add_argument("--hyper_len", type=int, default=256)
    parser.add_argument("--dec_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    # Scanned blocks are how base and larger models run. With an unrolled loop, XLA:CPU keeps
    # every decoder block's cross-attention values alive at once when they carry LoRA terms
    # (about +180 MiB at base shape, batch 8); pass --no-scan_layers to see it.
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} device(s)")
    for shape in args.shapes.split(","):
        run(
            shape,
            args.batch,
            args.enc_len,
            args.hyper_len,
            args.dec_len,
            args.repeats,
            args.scan_layers,
        )


if __name__ == "__main__":
    main()

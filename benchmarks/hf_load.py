"""Hugging Face checkpoint loading: time and peak host memory, unsharded and on a mesh.

Writes a random checkpoint of the chosen size once (with ``hf_t5.save``), then loads it in
fresh processes: on one device, and over a mesh of fake CPU devices. The point of the sharded
path is that each device's shard is read from the memory-mapped file on its own: peak anonymous
memory should stay near one copy of the model however many devices there are, not one per
device. Example:

  python benchmarks/hf_load.py --model t5_1_1_base --devices 8 --mesh 2,4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from tagi_jax import gin_configs

GIN_MODELS = os.path.join(gin_configs.root(), "models")


def _config(model: str):
    import gin

    from tagi_jax import configurables

    gin.parse_config_file(os.path.join(GIN_MODELS, f"{model}.gin"))
    return configurables.t5_config()


def _write(model: str, directory: str) -> None:
    import functools

    import jax

    from tagi_jax.convert import hf_t5
    from tagi_jax.models import t5

    config = _config(model)
    params = jax.jit(functools.partial(t5.init_params, config))(jax.random.key(0))
    start = time.perf_counter()
    hf_t5.save(config, params, directory)
    size = os.path.getsize(os.path.join(directory, "model.safetensors"))
    print(f"wrote {size / 2**20:,.0f} MiB to {directory} in {time.perf_counter() - start:.1f}s")


def _load(directory: str, mesh_shape: str | None) -> dict:
    import jax

    from tagi_jax.convert import hf_t5
    from tagi_jax.parallel import mesh as mesh_lib

    mesh = None
    if mesh_shape:
        mesh = mesh_lib.make_mesh(tuple(int(s) for s in mesh_shape.split(",")))
    start = time.perf_counter()
    _, params = hf_t5.load(directory, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    per_device = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return {
        "seconds": round(seconds, 2),
        "devices": len(per_device),
        "max_bytes_per_device_MiB": round(max(per_device.values()) / 2**20),
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_1_1_small")
    parser.add_argument("--workdir", default="/tmp/tagi_jax_hf_load_bench")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices for the mesh run")
    parser.add_argument("--mesh", default="2,4", help="data,model shape for the mesh run")
    parser.add_argument("--phase", choices=("write", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--mesh_shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = os.path.join(args.workdir, args.model)

    if args.phase == "write":
        _write(args.model, directory)
        return
    if args.phase == "load":
        print(json.dumps(_load(directory, args.mesh_shape)))
        return

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    me = [
        sys.executable,
        os.path.abspath(__file__),
        "--model",
        args.model,
        "--workdir",
        args.workdir,
    ]
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        subprocess.run([*me, "--phase", "write"], check=True, env=env)
    runs = (
        ("1 device", dict(env, XLA_FLAGS=""), []),
        (
            f"{args.devices} devices, mesh {args.mesh}",
            dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}"),
            ["--mesh_shape", args.mesh],
        ),
    )
    for name, run_env, extra in runs:
        out = subprocess.run(
            [*me, "--phase", "load", *extra],
            check=True,
            env=run_env,
            capture_output=True,
            text=True,
        )
        print(f"{args.model} load, {name}: {out.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()

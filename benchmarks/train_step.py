"""TAGI train-step throughput and MFU: the loop's own sharded, jitted step on random data.

Builds the student exactly as ``training.loop.train`` does (sharded init, trainable partition,
optimizer state sharded like its parameters, ``jax.jit`` with explicit in/out shardings and a
donated state), feeds random batches and prints compile time, step time, tokens per second,
the step's model FLOPs (``training.flops``, counted from the architecture) and MFU against
``--peak_tflops`` per device; XLA's own cost analysis is printed beside it for reference (on GPU
it misses library matmuls). Examples:

  python benchmarks/train_step.py                                  # tiny, CPU-sized
  python benchmarks/train_step.py --model t5_1_1_base --batch 32 --enc_len 512 --hyper_len 512 \\
      --dec_len 128 --dtype bfloat16 --peak_tflops 989              # one H100 (dense bf16)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tagi_jax import configurables, gin_configs
from tagi_jax.data import tokens as tokens_lib
from tagi_jax.data.pipeline import MODEL_FEATURES
from tagi_jax.distill import losses
from tagi_jax.models import trainable
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.parallel import partitioning
from tagi_jax.training import inputs, model_setup, optim
from tagi_jax.training import state as state_lib
from tagi_jax.training.flops import train_step_flops
from tagi_jax.training.progress import xla_step_flops

GIN_ROOT = gin_configs.root()


def random_batch(
    rng, batch: int, enc: int, hyper: int, dec: int, vocab: int
) -> dict[str, np.ndarray]:
    def tokens(length):
        return rng.integers(2, vocab, size=(batch, length), dtype=np.int32)

    targets = tokens(dec)
    return {
        "encoder_input_tokens": tokens(enc),
        "hyper_input_tokens": tokens(hyper),
        "decoder_target_tokens": targets,
        "decoder_input_tokens": tokens_lib.shift_right(targets),
        "decoder_loss_weights": np.ones_like(targets),
    }


def configured_model(model: str, method: str, dtype: str = "float32"):
    """The ``TagiConfig`` of a ``gin_configs/models/`` and a ``methods/`` file, without dropout
    (benchmarks time deterministic compute)."""
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [
            os.path.join(GIN_ROOT, "models", f"{model}.gin"),
            os.path.join(GIN_ROOT, "methods", f"{method}.gin"),
        ],
        [],
    )
    config = configurables.tagi_config()
    return config.replace(t5=config.t5.replace(dtype=dtype, dropout_rate=0.0))


class JaxStep:
    """The trainer's compiled TAGI step on random batches, built as ``training.loop`` builds it
    (sharded init, trainable partition, sharded optimizer state, explicit shardings, donated
    state). ``run()`` does one step and blocks on its loss, as the loop does (and as CPU
    collectives need)."""

    def __init__(
        self,
        *,
        model: str,
        method: str,
        batch: int,
        enc_len: int,
        hyper_len: int,
        dec_len: int,
        dtype: str = "float32",
        optimizer: str = "adamw",
        mesh: str = "1,-1,1",
    ):
        self.model = configured_model(model, method, dtype=dtype)
        self.lengths = (batch, enc_len, hyper_len, dec_len)
        shape = tuple(int(s) for s in mesh.split(","))
        self.mesh = mesh_lib.make_mesh(shape, ("data", "fsdp", "model"))
        rules = self.rules = partitioning.DEFAULT_RULES
        scalar = NamedSharding(self.mesh, PartitionSpec())

        params, shardings = model_setup.sharded_params(
            self.model, self.mesh, rules, seed=0, base=None
        )
        mask = trainable.trainable_mask(self.model, params)
        structure = jax.tree.structure(params)
        train_params, self.frozen = state_lib.partition(params, mask)
        train_shardings, frozen_shardings = state_lib.partition(shardings, mask)
        self.n_train, self.n_total = trainable.count(params, mask)
        tx = optim.make_optimizer(
            optim.OptimizerConfig(name=optimizer, learning_rate=1e-4, schedule="constant")
        )
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_params)
        state_shardings = state_lib.state_shardings(tx, abstract, train_shardings, scalar)
        init = functools.partial(state_lib.init_state, optimizer=tx, seed=0)
        self.state = jax.jit(init, out_shardings=state_shardings)(train_params)
        loss = losses.LossConfig(ce_weight=1.0, kl_weight=0.0, alignment_weight=0.0)
        self._step = jax.jit(
            functools.partial(
                state_lib.train_step, state_lib.StepConfig(self.model, loss), tx, structure
            ),
            in_shardings=(state_shardings, frozen_shardings, None),
            out_shardings=(state_shardings, scalar),
            donate_argnums=(0,),
        )
        rng = np.random.default_rng(0)
        vocab = self.model.t5.logits_width  # target ids the head can predict
        self.batches = [
            inputs.to_global(
                random_batch(rng, *self.lengths, vocab), MODEL_FEATURES, self.mesh, rules
            )
            for _ in range(2)
        ]
        self._compiled = None
        self._calls = 0
        self.loss = float("nan")

    def compile(self) -> float:
        """Compiles the step; returns the seconds it took."""
        with partitioning.use_mesh(self.mesh, self.rules):
            start = time.perf_counter()
            self._compiled = self._step.lower(self.state, self.frozen, self.batches[0]).compile()
            return time.perf_counter() - start

    def run(self) -> float:
        """One step on the next batch (blocking); returns the loss."""
        if self._compiled is None:
            self.compile()
        with partitioning.use_mesh(self.mesh, self.rules):
            self.state, metrics = self._compiled(
                self.state, self.frozen, self.batches[self._calls % 2]
            )
            self._calls += 1
            self.loss = float(metrics["loss"])
        return self.loss

    def backbone_trains(self) -> bool:
        return any(k.startswith("t5/") for k in self.state.trainable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_1_1_tiny", help="a gin_configs/models/ name")
    parser.add_argument("--method", default="paper", help="a gin_configs/methods/ name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--enc_len", type=int, default=256)
    parser.add_argument("--hyper_len", type=int, default=256)
    parser.add_argument("--dec_len", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--optimizer", default="adamw", choices=optim.OPTIMIZERS)
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,model sizes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=None, help="per device, for MFU")
    args = parser.parse_args()

    step = JaxStep(
        model=args.model,
        method=args.method,
        batch=args.batch,
        enc_len=args.enc_len,
        hyper_len=args.hyper_len,
        dec_len=args.dec_len,
        dtype=args.dtype,
        optimizer=args.optimizer,
        mesh=args.mesh,
    )
    # Said before compiling, so a run stopped by a time limit still shows what it was.
    print(
        f"devices {jax.device_count()} ({jax.devices()[0].device_kind}), "
        f"mesh {dict(step.mesh.shape)}"
    )
    print(
        f"model {args.model} + {args.method}: {step.n_train:,} trainable of {step.n_total:,} "
        f"parameters, {args.dtype}, {args.optimizer}",
        flush=True,
    )
    print(f"compiled in {step.compile():.1f}s", flush=True)
    step.run()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    model_flops = train_step_flops(
        step.model,
        args.batch,
        args.enc_len,
        args.hyper_len,
        args.dec_len,
        backbone_trains=step.backbone_trains(),
    )
    xla_flops = xla_step_flops(step._compiled)
    tokens = args.batch * (args.enc_len + args.dec_len)
    devices = jax.device_count()
    print(
        f"batch {args.batch}, lengths enc {args.enc_len} / hyper {args.hyper_len} / "
        f"dec {args.dec_len}; loss {step.loss:.3f}"
    )
    print(f"step {1000 * step_s:.1f} ms (median of {args.steps})")
    print(f"tokens/s (encoder + decoder) {tokens / step_s:,.0f}")
    achieved = model_flops / step_s / devices
    print(f"model FLOPs per step {model_flops:.3e} -> {achieved / 1e12:.1f} TFLOP/s per device")
    if args.peak_tflops:
        print(f"MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}%")
    if xla_flops:
        print(f"(XLA cost analysis: {xla_flops:.3e} FLOPs per device per step)")


if __name__ == "__main__":
    main()

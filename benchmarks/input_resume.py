"""Resume cost of the training input: seconds until the first batch of a run resumed at global
batch K, replaying the stream (``pipeline.train_batches(skip=K)``, the sequential seqio stream)
against starting it by example index (``feature_converter.host_batches(start_batch=K)``, what
``inputs.TrainInput`` reads), on the built-in suite as ``runs/tiny_cpu.gin`` trains it (bytes,
Def + 2 Pos, feature lengths 256/256/320/40, batch 8). Also the per-host share: one of two
processes' rows.

  python benchmarks/input_resume.py [--suite DIR] [--resume_at 1000] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from tagi_jax.data import feature_converter, ni, pipeline, synthetic
from tagi_jax.data.config import DataConfig, make_vocabulary

LENGTHS = (("inputs", 256), ("hyper_inputs", 256), ("teacher_inputs", 320), ("targets", 40))


def _first_batch_seconds(make) -> float:
    start = time.perf_counter()
    batches = make()
    next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default=None, help="a written suite (default: write one)")
    parser.add_argument("--resume_at", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        suite = args.suite or tmp
        if args.suite is None:
            synthetic.write_suite(suite)
        data = DataConfig(
            task="tagi_suite_def_pos2", suite_dir=suite, feature_lengths=LENGTHS, ni=ni.NIConfig()
        )
        pipeline.register_data(data, make_vocabulary(data))
        k, b = args.resume_at, args.batch

        def indexed(start, rows):
            return lambda: feature_converter.host_batches(
                data.task,
                dict(LENGTHS),
                b,
                seed=0,
                with_teacher=True,
                rows=rows,
                start_batch=start,
            )

        results = {
            "replay, first batch": lambda: pipeline.train_batches(data, b, 0, 0, with_teacher=True),
            f"replay, resume at {k}": lambda: pipeline.train_batches(
                data, b, 0, k, with_teacher=True
            ),
            "index, first batch": indexed(0, np.arange(b)),
            f"index, resume at {k}": indexed(k, np.arange(b)),
            f"index, resume at {k}, 1 of 2 processes": indexed(k, np.arange(b // 2)),
        }
        _first_batch_seconds(indexed(0, np.arange(b)))  # warm-up: TensorFlow's first pipeline
        for name, make in results.items():
            print(f"{name:40s} {_first_batch_seconds(make):8.2f} s", flush=True)


if __name__ == "__main__":
    main()

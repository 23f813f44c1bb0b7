"""The T5 parity demo: our Flax T5 against PyTorch transformers on random tiny checkpoints.

For T5 v1.0 (ReLU, tied head) and v1.1 (gated-GELU, untied head) it builds a random tiny
Hugging Face checkpoint locally (no hub), loads it with ``tagi_jax.convert.hf_t5.load``, and
compares teacher-forced logits on a padded batch and 16 steps of greedy decoding; then it
converts the v1.1 model to an orbax parameter checkpoint and restores it. Exits non-zero if any
comparison fails. Run: ``python -m tagi_jax.demos.t5_parity [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax.convert import hf_t5, param_checkpoint
from tagi_jax.models import t5

LOGIT_TOLERANCE = 1e-4


def _check_variant(variant: str, directory: str, decode_steps: int) -> bool:
    from tagi_jax.testing import hf_t5_reference as ref

    start = time.perf_counter()
    reference = ref.write_hf_t5(directory, variant, seed=0)
    config, params = hf_t5.load(directory)
    enc, dec = ref.padded_batch(config.vocab_size)
    expected = ref.reference_logits(reference, enc, dec)
    got = np.asarray(t5.forward(config, params, jnp.asarray(enc), jnp.asarray(dec)))
    diff = float(np.abs(got - expected).max())
    want_tokens = ref.reference_greedy(reference, enc, decode_steps)
    got_tokens = np.asarray(
        t5.greedy_decode(config, params, jnp.asarray(enc), max_decode_len=decode_steps)
    )
    same = bool(np.array_equal(want_tokens, got_tokens))
    ok = diff <= LOGIT_TOLERANCE and same
    n = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"[{variant}] {n:,} params, ffn={'gated-' if config.is_gated_act else ''}"
        f"{config.dense_act_fn}, tied head={config.tie_word_embeddings}\n"
        f"  logits [{', '.join(map(str, got.shape))}]: max |ours - transformers| = {diff:.2e} "
        f"(tolerance {LOGIT_TOLERANCE:.0e})\n"
        f"  greedy decode, {decode_steps} steps x {enc.shape[0]} rows: "
        f"{'identical to' if same else 'DIFFERS from'} transformers.generate\n"
        f"  {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s"
    )
    if not same:
        print(f"  transformers: {want_tokens.tolist()}\n  tagi_jax:     {got_tokens.tolist()}")
    return ok


def _check_orbax(hf_dir: str, out_dir: str) -> bool:
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)  # the demo's own scratch output, rebuilt every run
    config, params = hf_t5.load(hf_dir)
    param_checkpoint.save(out_dir, config, params)
    config2, params2 = param_checkpoint.load(out_dir)
    same = config2 == config and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True)
    )
    print(f"[orbax] {out_dir}: restored parameters {'identical' if same else 'DIFFER'}")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tagi_jax.demos.t5_parity", description=__doc__)
    parser.add_argument("--workdir", default=os.path.join("runs", "t5_parity_demo"))
    parser.add_argument("--decode_steps", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: the parity demo needs torch: pip install -r requirements-test.txt")
        return 2

    print(f"tagi_jax T5 parity demo on {jax.devices()[0].platform} (jax {jax.__version__})")
    results = [
        _check_variant(variant, os.path.join(args.workdir, f"hf_{variant}"), args.decode_steps)
        for variant in ("v1_0", "v1_1")
    ]
    results.append(
        _check_orbax(
            os.path.join(args.workdir, "hf_v1_1"), os.path.join(args.workdir, "orbax_v1_1")
        )
    )
    ok = all(results)
    print(f"{'PASS' if ok else 'FAIL'}: outputs in {os.path.abspath(args.workdir)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

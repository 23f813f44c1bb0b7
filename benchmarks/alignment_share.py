"""How much gradient each term of the TAGI objective gives at the start of fine-tuning.

Builds a TAGI student (paper preset, random backbone, jitted sharded init as the loop does), a
random batch, random teacher logits and a random LoRA-teacher bank shaped like trained PEFT
teachers (A ~ U(±1/sqrt(d_in)) as PEFT's Kaiming init, B ~ N(0, --teacher_b_std), scale
alpha/r = 2), and prints, for three forms of the alignment, the gradient norm of every weighted
term (``training.state.term_gradients``, the function the trainer logs) and the alignment's
gradient relative to the weighted cross-entropy's:

* ``authors_exact``: σ(ℓ)·ℓ, ℓ = 1000·(MSE(A_gen, lora_B) + MSE(B_gen, lora_A)) (their code);
* ``delta_x1000``: the same scale and gate on MSE(ΔW) (this project's previous default);
* ``calibrated``: MSE(ΔW) with the weight the trainer calibrates on the first batch
  (``LossConfig.alignment_grad_ratio`` = 0.25: the default).

  python benchmarks/alignment_share.py --model t5_1_1_base     # T5-base shape (~1 min on CPU)
  python benchmarks/alignment_share.py --model t5_suite --enc_len 96 --hyper_len 128 --dec_len 40
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from train_step import (  # benchmarks/ is on sys.path when run as a script
    configured_model,
    random_batch,
)

from tagi_jax.distill import losses
from tagi_jax.models import tagi, trainable
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.parallel import partitioning
from tagi_jax.training import model_setup
from tagi_jax.training import state as state_lib


def _teacher_bank(rng, generated, rank: int, b_std: float):
    """Random teachers shaped like the generated adapters, PEFT-initialised A, trained-like B."""

    def a_like(x):
        bound = 1.0 / np.sqrt(x.shape[-2])
        return jnp.asarray(rng.uniform(-bound, bound, size=x.shape), jnp.float32)

    def b_like(x):
        return jnp.asarray(rng.normal(0.0, b_std, size=x.shape), jnp.float32)

    return generated.replace(
        a={k: a_like(v) for k, v in generated.a.items()},
        b={k: b_like(v) for k, v in generated.b.items()},
        scale=2.0,  # alpha = 2r, as the authors' teachers
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_1_1_base", help="a gin_configs/models/ name")
    parser.add_argument("--method", default="paper", help="a gin_configs/methods/ name")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--enc_len", type=int, default=128)
    parser.add_argument("--hyper_len", type=int, default=128)
    parser.add_argument("--dec_len", type=int, default=32)
    parser.add_argument("--teacher_b_std", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = configured_model(args.model, args.method)
    mesh = mesh_lib.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    rules = partitioning.DEFAULT_RULES
    print(
        f"model {args.model} + {args.method}, batch {args.batch}, lengths "
        f"{args.enc_len}/{args.hyper_len}/{args.dec_len}, teacher B std {args.teacher_b_std}",
        flush=True,
    )
    params, _ = model_setup.sharded_params(model, mesh, rules, seed=args.seed, base=None)
    mask = trainable.trainable_mask(model, params)
    structure = jax.tree.structure(params)
    train_params, frozen = state_lib.partition(params, mask)
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=train_params,
        opt_state=(),
        rng=jax.random.key_data(jax.random.key(args.seed)),
    )
    rng = np.random.default_rng(args.seed)
    # the logits' width (the tokenizer's size where the model restricts it)
    width = model.t5.logits_width
    lengths = (args.batch, args.enc_len, args.hyper_len, args.dec_len, width)
    batch = {k: jnp.asarray(v) for k, v in random_batch(rng, *lengths).items()}
    with partitioning.use_mesh(mesh, rules):
        logits, aux = jax.jit(functools.partial(tagi.forward, model))(params, batch)
    batch["teacher_logits"] = logits + jnp.asarray(
        rng.normal(0.0, 2.0, size=logits.shape), jnp.float32
    )
    batch["teacher_lora"] = _teacher_bank(
        rng, aux["adapters"], model.hyper.rank, args.teacher_b_std
    )
    batch["teacher_mask"] = jnp.ones((args.batch,), bool)

    default = losses.LossConfig()  # 0.6 CE + 0.4 KL + calibrated MSE(ΔW)
    forms = {
        "authors_exact": dataclasses.replace(
            default,
            alignment_mode="authors_swapped",
            alignment_scale=1000.0,
            alignment_gate="sigmoid",
            alignment_grad_ratio=None,
        ),
        "delta_x1000": dataclasses.replace(
            default, alignment_scale=1000.0, alignment_gate="sigmoid", alignment_grad_ratio=None
        ),
        "calibrated": default,
    }

    def norms(objective):
        config = state_lib.StepConfig(model, objective)
        fn = jax.jit(functools.partial(state_lib.term_gradients, config, structure))
        with partitioning.use_mesh(mesh, rules):
            return {k: float(v) for k, v in jax.device_get(fn(state, frozen, batch)).items()}

    print(
        f"{'form':<14} {'weight':>10} {'|g CE|':>10} {'|g KL|':>10} {'|g align|':>10} "
        f"{'align/CE':>10} {'align share':>12}"
    )
    for name, objective in forms.items():
        measured = norms(objective)
        if objective.alignment_grad_ratio is not None:
            # the trainer's rule (training.loop._calibrated_loss), then measured again
            ce, align = measured["grad_norm/cross_entropy"], measured["grad_norm/alignment"]
            weight = objective.alignment_weight * objective.alignment_grad_ratio * ce / align
            objective = dataclasses.replace(objective, alignment_weight=weight)
            measured = norms(objective)
        ce, kl = measured["grad_norm/cross_entropy"], measured["grad_norm/kl"]
        align = measured["grad_norm/alignment"]
        print(
            f"{name:<14} {objective.alignment_weight:>10.4g} {ce:>10.3e} {kl:>10.3e} "
            f"{align:>10.3e} {align / ce:>10.3g} {measured['grad_share/alignment']:>12.3g}",
            flush=True,
        )


if __name__ == "__main__":
    main()

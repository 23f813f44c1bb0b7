"""The ``lora_teachers`` stage: one instance-trained LoRA per task (or category) on the frozen
base, all groups trained at once (one vmapped jitted step), written as one bank file that the
``finetune`` stage aligns the generated adapters with (``train.teacher_lora_bank``).

The teachers read the full instruction (``teacher_inputs``: Definition + demonstrations +
input, the Tk-Instruct source), as in the authors' code, formatted by the run's one
``DataConfig.ni`` (the demonstrations of its task variant, Tk-Instruct's budget when set), as
training formats it. Each step draws ``rows_per_group`` examples of every group from that
group's own seeded, cycling order.
"""

from __future__ import annotations

import collections

import gin
import numpy as np

from tagi_jax import gin_check, paths
from tagi_jax.artifacts import backbone
from tagi_jax.distill import lora_teachers
from tagi_jax.distill.lora_teachers import LoraTeacherConfig
from tagi_jax.training import inputs

BANK_FILE = "lora_teachers.safetensors"


def group_examples(data: inputs.DataConfig, group_by: str, vocabulary):
    """``{group name: (teacher input ids [n, L_in], target ids [n, L_out])}`` of the train split
    (natural instructions: the Tk-Instruct source; P3 with ``DataConfig.p3_dir``: the prompt)."""
    from tagi_jax.data import ni
    from tagi_jax.evaluation.ni_eval import encode_padded

    lengths = dict(data.feature_lengths)
    grouped = collections.defaultdict(lambda: ([], []))
    if "_p3_" in data.task and data.p3_dir is not None:
        # P3: one teacher per training dataset (or task), reading the prompt (tagi_spec.md §5.2)
        from tagi_jax.data import p3_tasks

        for key, pairs in p3_tasks.training_texts(data.p3_dir, group_by).items():
            for prompt, target in pairs:
                grouped[key][0].append(prompt)
                grouped[key][1].append(target)
    else:
        directory = data.sni_dir or data.suite_dir
        if directory is None:
            raise ValueError(
                "the lora_teachers stage needs DataConfig.sni_dir, suite_dir or (with a "
                "tagi_p3_* task) p3_dir"
            )
        examples = ni.iter_examples(directory, "train", data.ni_for_task(), vocabulary=vocabulary)
        for example in examples:
            key = example["task_name"] if group_by == "task" else example["category"]
            grouped[key][0].append(example["teacher_inputs"])
            grouped[key][1].append(example["targets"])
    return {
        key: (
            encode_padded(vocabulary, sources, lengths["teacher_inputs"]),
            encode_padded(vocabulary, targets, lengths["targets"]),
        )
        for key, (sources, targets) in sorted(grouped.items())
    }


def group_batches(groups: dict, rows: int, seed: int):
    """Endless ``[K, rows, length]`` batches, group k drawing from its own shuffled cycle."""
    rng = np.random.default_rng(seed)
    orders = {k: rng.permutation(len(v[0])) for k, v in groups.items()}
    cursor = dict.fromkeys(groups, 0)
    while True:
        enc, tgt = [], []
        for name, (sources, targets) in groups.items():
            picked = []
            while len(picked) < rows:
                if cursor[name] == len(orders[name]):
                    orders[name], cursor[name] = rng.permutation(len(sources)), 0
                picked.append(orders[name][cursor[name]])
                cursor[name] += 1
            enc.append(sources[picked])
            tgt.append(targets[picked])
        targets = np.stack(tgt)
        yield {
            "encoder_input_tokens": np.stack(enc),
            "decoder_target_tokens": targets,
            # T5 shifts right with 0 (the decoder start id)
            "decoder_input_tokens": np.concatenate(
                [np.zeros_like(targets[..., :1]), targets[..., :-1]], axis=-1
            ),
            "decoder_loss_weights": (targets > 0).astype(np.float32),
        }


@gin.configurable("train_lora_teachers")
def train_lora_teachers(
    *,
    model_dir: str = gin.REQUIRED,
    base_checkpoint: str = gin.REQUIRED,
    data: inputs.DataConfig = gin.REQUIRED,
    config: LoraTeacherConfig | None = None,
    train_steps: int = 1000,
    rows_per_group: int = 8,
    seed: int = 0,
    log_every: int = 50,
) -> str:
    """Trains the bank and writes ``<model_dir>/lora_teachers.safetensors``; returns its path."""
    gin_check.check_bindings_used("train_lora_teachers")
    config = config or LoraTeacherConfig()
    if not paths.exists(base_checkpoint):
        raise FileNotFoundError(
            f"train_lora_teachers.base_checkpoint does not exist: {base_checkpoint}"
        )
    # The data is checked (files, splits, schema, one formatted example per task) before the
    # base model loads: a bad file is one line in seconds.
    inputs.preflight(data)
    paths.makedirs(model_dir)
    path = paths.join(model_dir, BANK_FILE)
    if paths.exists(path):
        raise FileExistsError(f"{path} exists: the teachers are trained; use another MODEL_DIR")
    t5_config, base = backbone.load_t5(base_checkpoint)
    vocabulary = inputs.make_vocabulary(data)
    groups = group_examples(data, config.group_by, vocabulary)
    sizes = [len(v[0]) for v in groups.values()]
    print(
        f"training {len(groups)} LoRA teachers (one per {config.group_by}, rank {config.rank}, "
        f"{min(sizes)}-{max(sizes)} examples each) for {train_steps} steps",
        flush=True,
    )
    bank, history = lora_teachers.train_teachers(
        config,
        t5_config,
        base,
        list(groups),
        group_batches(groups, rows_per_group, seed),
        train_steps,
        log_every=log_every,
    )
    bank.save(path)
    losses = np.stack(history)  # [steps, K]
    paths.write_json(
        paths.join(model_dir, "lora_teachers.json"),
        {
            "groups": list(groups),
            "first_loss": losses[0].tolist(),
            "last_loss": losses[-1].tolist(),
            # the training curve of the stage: the teachers' mean loss at every step
            "mean_loss": losses.mean(axis=1).tolist(),
            "train_steps": train_steps,
            "base_checkpoint": paths.absolute(base_checkpoint),
        },
    )
    print(
        f"mean teacher loss {losses[0].mean():.4f} -> {losses[-1].mean():.4f}; wrote {path}",
        flush=True,
    )
    return path

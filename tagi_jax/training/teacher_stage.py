"""The ``lora_teachers`` stage: one instance-trained LoRA per task (or category) on the frozen
base, all groups trained at once (one vmapped jitted step), written as one bank file that the
``finetune`` stage aligns the generated adapters with (``train.teacher_lora_bank``).

The teachers read the full instruction (``teacher_inputs``: Definition + demonstrations +
input, the Tk-Instruct source), as in the authors' code, formatted by the run's one
``DataConfig.ni`` (the demonstrations of its task variant, Tk-Instruct's budget when set), as
training formats it. Each step draws ``rows_per_group`` examples of every group from that
group's own seeded, cycling order. The groups and their batches come from the data
(``data.pipeline.group_examples`` / ``group_batches``); gin configures the stage as
``train_lora_teachers`` (``tagi_jax.configurables``).
"""

from __future__ import annotations

import numpy as np

from tagi_jax import paths
from tagi_jax.artifacts import backbone
from tagi_jax.data import pipeline
from tagi_jax.data.config import DataConfig, make_vocabulary
from tagi_jax.distill import lora_teachers
from tagi_jax.distill.lora_teachers import LoraTeacherConfig

BANK_FILE = "lora_teachers.safetensors"


def train_lora_teachers(
    *,
    model_dir: str,
    base_checkpoint: str,
    data: DataConfig,
    config: LoraTeacherConfig | None = None,
    train_steps: int = 1000,
    rows_per_group: int = 8,
    seed: int = 0,
    log_every: int = 50,
) -> str:
    """Trains the bank and writes ``<model_dir>/lora_teachers.safetensors``; returns its path."""
    config = config or LoraTeacherConfig()
    if not paths.exists(base_checkpoint):
        raise FileNotFoundError(
            f"train_lora_teachers.base_checkpoint does not exist: {base_checkpoint}"
        )
    # The data is checked (files, splits, schema, one formatted example per task) before the
    # base model loads: a bad file is one line in seconds.
    pipeline.preflight(data)
    paths.makedirs(model_dir)
    path = paths.join(model_dir, BANK_FILE)
    if paths.exists(path):
        raise FileExistsError(f"{path} exists: the teachers are trained; use another MODEL_DIR")
    t5_config, base = backbone.load_t5(base_checkpoint)
    vocabulary = make_vocabulary(data)
    groups = pipeline.group_examples(data, config.group_by, vocabulary)
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
        pipeline.group_batches(groups, rows_per_group, seed),
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

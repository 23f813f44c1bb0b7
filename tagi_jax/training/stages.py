"""Which stage ``python -m tagi_jax.train`` runs: ``run.stage`` in a run file.

* ``train`` (default): the gin-configured training loop (``training.loop.train``). The
  ``hyper_pretrain`` (C4), ``finetune`` (TAGI distillation on SNI/P3) and ``metatrain`` (the
  plain multi-task T5: baseline and logit teacher) run files are configurations of it.
* ``lora_teachers``: the instance-trained LoRA teachers (``training.teacher_stage``).
"""

from __future__ import annotations

import gin

STAGES = ("train", "lora_teachers")


@gin.configurable("run")
def run(stage: str = "train"):
    if stage not in STAGES:
        raise ValueError(f"run.stage={stage!r} is not one of {STAGES}")
    if stage == "lora_teachers":
        from tagi_jax.training import teacher_stage

        return teacher_stage.train_lora_teachers()
    from tagi_jax.training import loop

    return loop.train()

"""Where a frozen T5 comes from, for training, export, evaluation and prediction alike.

A backbone source is any of:

* a parameter checkpoint (``tagi_jax.convert.param_checkpoint``: ``params/`` +
  ``t5_config.json``), e.g. ``python -m tagi_jax.convert.hf_t5``'s output;
* a finished training run's ``MODEL_DIR`` (its ``export/t5``, the student's backbone);
* an export (``export_format``) that includes its backbone (its ``t5/``);
* a Hugging Face T5 directory (``config.json`` + safetensors or ``pytorch_model.bin``).

The first three may lie in cloud storage (``gs://...``: ``tagi_jax.paths``); a Hugging Face
directory must be local (it is read memory-mapped).

This module imports neither the trainer nor TensorFlow: a predictor reads backbones with it.
"""

from __future__ import annotations

import jax

from tagi_jax import paths

RUN_EXPORT_DIR = "export"  # <model_dir>/export: the export a finished run writes
BACKBONE_DIR = "t5"  # <export>/t5: an included backbone, as a parameter checkpoint


def resolve(path: str) -> str:
    """The parameter checkpoint ``path`` stands for (itself, a run's ``export/t5`` or an
    export's ``t5/``), or ``path`` unchanged (an HF directory)."""
    from tagi_jax.convert import param_checkpoint

    for candidate in (
        path,
        paths.join(path, RUN_EXPORT_DIR, BACKBONE_DIR),
        paths.join(path, BACKBONE_DIR),
    ):
        if paths.exists(paths.join(candidate, param_checkpoint.CONFIG_FILE)):
            return candidate
    return path


def load_t5(path: str, mesh=None, shardings=None):
    """``(T5Config, t5_params)`` of a backbone source (see the module docstring), sharded over
    ``mesh`` when one is given, placed by ``shardings`` (a tree matching the parameters), else
    on one device."""
    from tagi_jax.convert import hf_t5, param_checkpoint
    from tagi_jax.convert.tensor_store import CheckpointError

    if not paths.isdir(path):
        raise CheckpointError(f"backbone directory does not exist: {path}")
    resolved = resolve(path)
    if paths.exists(paths.join(resolved, param_checkpoint.CONFIG_FILE)):
        return param_checkpoint.load(resolved, mesh=mesh, shardings=shardings)
    try:
        paths.require_local(path, "a Hugging Face T5 directory")
    except ValueError as e:
        raise CheckpointError(
            f"{path} holds no {param_checkpoint.CONFIG_FILE} (not a parameter checkpoint, run or "
            f"export): {e}"
        ) from None
    config, params = hf_t5.load(path, mesh=mesh)
    if shardings is not None:
        params = jax.tree.map(jax.device_put, params, shardings)
    return config, params


# Bytes read from each end of each file for the fingerprint: enough to tell two bases apart
# (safetensors and orbax files start with their own tensors/headers), cheap at XXL scale.
_FINGERPRINT_BYTES = 1 << 20


def fingerprint(path: str) -> str:
    """A cheap fingerprint of a backbone source's files: every file's relative name and size
    and the SHA-256 of its first and last MiB. Reading the whole of an XXL base (45 GB) on each
    resume is not worth it; another base behind the same path (another size, another
    checkpoint, a re-conversion) changes names, sizes or those bytes. Copying or touching the
    same files does not change it (no mtimes)."""
    import hashlib

    digest = hashlib.sha256()
    root = resolve(path)
    for directory, _, files in sorted(paths.walk(root)):
        for name in sorted(files):
            file = paths.join(directory, name)
            size = paths.getsize(file)
            digest.update(f"{paths.relpath(file, root)}|{size}|".encode())
            with paths.open(file, "rb") as f:
                digest.update(f.read(_FINGERPRINT_BYTES))
                if size > _FINGERPRINT_BYTES:
                    f.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
                    digest.update(f.read())
    return digest.hexdigest()[:16]

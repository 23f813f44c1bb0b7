"""The gin files that ship with tagi_jax (package data, like t5x's configs).

Layers (WORKSPACE.md "Gin layering"): ``models/`` (T5 sizes), ``methods/`` (hypernetwork
presets), ``losses/``, ``schedules/``, ``mesh/`` (devices) and ``runs/`` (one file per stage,
including the ones above). ``python -m tagi_jax.train --gin_file=runs/tiny_cpu.gin`` finds a
name here; inside gin files, package files are included by their package path,
``include 'tagi_jax/gin_configs/models/t5_1_1_tiny.gin'``, which gin resolves through the
installed package from any working directory.
"""

from __future__ import annotations

import importlib.resources
import os

#: How an include names this directory from the Python path (gin's package lookup).
INCLUDE_PREFIX = "tagi_jax/gin_configs"


def root() -> str:
    """This directory on disk: the installed package's (wheel) or the checkout's (editable)."""
    files = importlib.resources.files(__name__)
    path = os.fspath(files) if isinstance(files, os.PathLike) else str(files)
    if not os.path.isdir(path):
        # A zipped install (zipimport) has no directory that gin could open files in.
        raise RuntimeError(f"tagi_jax's gin files are not a directory on disk ({files!r})")
    return path


def site_root() -> str:
    """The directory ``tagi_jax/gin_configs/...`` paths are relative to (the package's parent)."""
    return os.path.dirname(os.path.dirname(root()))


def path(name: str) -> str:
    """The packaged gin file ``name`` (``"runs/tiny_cpu.gin"``), as an absolute path."""
    full = os.path.join(root(), name)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"no packaged gin file {name!r} in {root()}")
    return full

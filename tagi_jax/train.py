"""``python -m tagi_jax.train --gin_file=runs/tiny_cpu.gin --gin.MODEL_DIR="'/tmp/run'"``.

Flags: ``--gin_file`` (repeatable; searched in ``gin_configs/`` and ``--gin_search_paths``),
``--gin_bindings`` (repeatable) and ``--gin.NAME=VALUE`` (rewritten to a binding, t5x style).
The parsed config goes to ``<MODEL_DIR>/config.gin`` before training and the operative config
(every value actually used) to ``<MODEL_DIR>/operative_config.gin`` after.

The run file's ``run.stage`` picks what runs: ``train`` (the training loop: the metatrain,
hyper_pretrain and finetune stages) or ``lora_teachers``. Stage run files live in
``gin_configs/runs/``; add a ``gin_configs/mesh/`` file for accelerators. Bad input (unknown
binding or file, bad data, a missing, corrupt or mismatched checkpoint, a non-finite loss or
update, a full disk, a second trainer on the same directory) ends with one ``error:`` line and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

import gin

GIN_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")


def parse_flags(
    argv: list[str], prog: str = "python -m tagi_jax.train", doc: str | None = __doc__
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="NAME=VALUE binding")
    parser.add_argument("--gin_search_paths", action="append", default=[], help="extra gin dirs")
    args, rest = parser.parse_known_args(argv)
    for flag in rest:
        if not flag.startswith("--gin.") or "=" not in flag:
            parser.error(f"unrecognized argument {flag!r} (use --gin.NAME=VALUE for bindings)")
        name, value = flag[len("--gin.") :].split("=", 1)
        args.gin_bindings.append(f"{name} = {value}")
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. runs/tiny_cpu.gin)")
    return args


def config_error(message: str):
    """One ``error:`` line and exit status 2, as for every other bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_gin_file(name: str, search: list[str]) -> str:
    """The first existing of ``name`` and ``<search path>/name``, as an absolute path."""
    for candidate in [name, *(os.path.join(p, name) for p in search)]:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    config_error(f"gin file not found: {name} (searched {', '.join(search)})")


def register_configurables() -> None:
    """Imports every module that declares a gin configurable (none reads data or devices)."""
    import tagi_jax.configurables  # noqa: F401
    import tagi_jax.evaluation.pipeline  # noqa: F401
    import tagi_jax.training.loop  # noqa: F401
    import tagi_jax.training.stages  # noqa: F401
    import tagi_jax.training.teacher_stage  # noqa: F401


def _tolerate_namespace_packages() -> None:
    """gin looks up an include like ``models/x.gin`` also as a resource of a Python package
    ``models``; a plain ``models/`` or ``runs/`` directory in the working directory is such a
    package without a file, and gin's lookup crashes with a TypeError instead of moving on to
    the search paths. Treat that as "not there"."""
    readers = getattr(gin.config, "_FILE_READERS", None)
    if readers is None:
        return

    def tolerant(check):
        if getattr(check, "_tagi_tolerant", False):
            return check

        def exists(path):
            try:
                return check(path)
            except TypeError:
                return False

        exists._tagi_tolerant = True
        return exists

    readers[:] = [(reader, tolerant(check)) for reader, check in readers]


def parse_gin(args: argparse.Namespace) -> None:
    """Parses files and bindings; any gin error becomes one message naming the culprit."""
    register_configurables()
    _tolerate_namespace_packages()
    search = [*args.gin_search_paths, GIN_ROOT]
    for path in search:
        gin.add_config_file_search_path(path)
    files = [resolve_gin_file(name, search) for name in args.gin_file]
    # gin logs a root-level ERROR for every search path an include is not found in before the
    # one it is found in; a real failure still raises below.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(files, args.gin_bindings)
    except (ValueError, SyntaxError, KeyError, ImportError, OSError) as e:
        config_error(f"bad gin configuration: {e}")
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def configured(flags: list[str]):
    """Runs the body under the gin configuration these CLI ``flags`` give, as the CLI parses
    them (stages run in-process: the main job, tests); gin is cleared before and after."""
    gin.clear_config()
    try:
        parse_gin(parse_flags(list(flags)))
        yield
    finally:
        gin.clear_config()


def quiet_tensorflow() -> None:
    """TensorFlow (imported by the data pipeline) prints hundreds of C++ log lines before an
    error of ours unless told otherwise, and reads this only at its import."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    parse_gin(args)
    from tagi_jax.training import checkpointing, stages

    try:
        stages.run()
    except (
        OSError,  # missing files, a full disk (CheckpointWriteError)
        FloatingPointError,  # a non-finite loss or update
        ValueError,  # bad settings and data, checkpoint mismatches, corrupt checkpoints
        checkpointing.RunLockedError,
    ) as e:
        # gin appends "  In call to configurable ..." lines: the first line names the culprit
        message = str(e).split("\n  In call to configurable", 1)[0]
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

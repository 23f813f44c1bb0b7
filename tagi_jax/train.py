"""``python -m tagi_jax.train --gin_file=runs/tiny_cpu.gin --gin.MODEL_DIR="'/tmp/run'"``.

Flags: ``--gin_file`` (repeatable; a path, or a name searched in ``--gin_search_paths`` and
the packaged ``tagi_jax/gin_configs/``), ``--gin_bindings`` (repeatable) and ``--gin.NAME=VALUE`` (rewritten to a binding, t5x style).
The parsed config goes to ``<MODEL_DIR>/config.gin`` before training and the operative config
(every value actually used) to ``<MODEL_DIR>/operative_config.gin`` after.

The run file's ``run.stage`` picks what runs: ``train`` (the training loop: the metatrain,
hyper_pretrain and finetune stages) or ``lora_teachers``. Stage run files live in
``tagi_jax/gin_configs/runs/``; add a ``mesh/`` file for accelerators. Bad input (unknown
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

from tagi_jax import gin_configs


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
    """Registers every gin configurable: all live in ``tagi_jax.configurables`` (importing it
    reads no data and touches no device)."""
    import tagi_jax.configurables  # noqa: F401


def _from_gin_package_lookup(error: BaseException) -> bool:
    """Whether ``error`` was raised inside gin's package-resource lookup of an include."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("gin", "resource_reader.py")):
            return True
        tb = tb.tb_next
    return False


def parse_gin(args: argparse.Namespace) -> None:
    """Parses files and bindings; any gin error becomes one message naming the culprit."""
    register_configurables()
    # Includes: a name in the user's search paths or the packaged gin files, or a package path
    # (`tagi_jax/gin_configs/...`, which gin itself resolves through the installed package).
    search = [*args.gin_search_paths, gin_configs.root()]
    for path in search:
        gin.add_config_file_search_path(path)
    files = [resolve_gin_file(name, [*search, gin_configs.site_root()]) for name in args.gin_file]
    # gin logs a root-level ERROR for every search path an include is not found in before the
    # one it is found in; a real failure still raises below.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(files, args.gin_bindings)
    except (ValueError, SyntaxError, KeyError, ImportError, OSError) as e:
        config_error(f"bad gin configuration: {e}")
    except TypeError as e:
        if not _from_gin_package_lookup(e):
            config_error(f"bad gin configuration: {e}")
        # gin-config looks an include `a/b.gin` up as a resource of a Python package `a` too;
        # a plain directory `a/` where Python looks (the working directory) is a namespace
        # package, and gin's lookup crashes on it (os.path.dirname(None)).
        shadows = sorted(
            name
            for name in os.listdir(".")
            if os.path.isdir(name) and not os.path.exists(os.path.join(name, "__init__.py"))
        )
        config_error(
            f"gin could not resolve an include ({e}): a directory in the working directory "
            f"({', '.join(shadows) or 'none found'}) has the name of the include's first "
            f"part; include packaged files by their package path "
            f"('{gin_configs.INCLUDE_PREFIX}/runs/...') or run from another directory"
        )
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
    from tagi_jax import configurables
    from tagi_jax.training import checkpointing

    try:
        configurables.run()
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

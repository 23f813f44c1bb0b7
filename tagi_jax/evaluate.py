"""``python -m tagi_jax.evaluate --gin_file=runs/evaluate_suite.gin --gin.EXPORT_DIR="'E'"
--gin.DATA_DIR="'D'" --gin.OUTPUT_DIR="'O'"``: score an export.

The job is the one the run file binds: ``evaluate_p3.*`` bindings (``runs/evaluate_p3.gin``)
run P3 rank classification (``tagi_jax.evaluation.p3_pipeline.evaluate_p3``); otherwise
``evaluate`` (``tagi_jax.evaluation.pipeline``) scores natural-instructions tasks. Both are
registered with gin in ``tagi_jax.configurables``.
Each says what it writes; flags are ``tagi_jax.train``'s (``--gin_file``, ``--gin_bindings``,
``--gin.NAME=VALUE``). Bad input (missing export or data directory, unknown split, an export
whose parameters hold NaN or Inf, ...) is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import sys

import gin

JOBS = ("evaluate", "evaluate_p3")


def bound_jobs(config_text: str) -> list[str]:
    """The evaluation jobs (``JOBS``) that a gin config string binds parameters of."""
    bound = set()
    for line in config_text.splitlines():
        name = line.split("=", 1)[0].strip().rsplit("/", 1)[-1]
        if "=" in line and not line[:1].isspace() and "." in name:
            bound.add(name.split(".", 1)[0])
    return [job for job in JOBS if job in bound]


def run_configured() -> dict:
    """Runs the job the parsed gin config binds (``evaluate`` when it binds neither, whose
    missing bindings then say what is needed); returns its ``results.json`` content."""
    jobs = bound_jobs(gin.config_str())
    if len(jobs) > 1:
        raise ValueError(f"the gin config binds both {' and '.join(jobs)}: evaluate one job")
    from tagi_jax import configurables

    if jobs == ["evaluate_p3"]:
        return configurables.evaluate_p3()
    return configurables.evaluate()


def main(argv: list[str] | None = None) -> int:
    from tagi_jax import train as cli

    cli.quiet_tensorflow()
    args = cli.parse_flags(
        sys.argv[1:] if argv is None else argv, prog="python -m tagi_jax.evaluate", doc=__doc__
    )
    cli.parse_gin(args)
    try:
        run_configured()
    except (OSError, ValueError, RuntimeError) as e:
        # ValueError covers NIDataError, CheckpointError, ExportError (NonFiniteParamsError
        # included) and gin's missing bindings.
        # gin appends "  In call to configurable ..." lines: the first line names the culprit
        message = str(e).split("\n  In call to configurable", 1)[0]
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

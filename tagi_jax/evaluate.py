"""``python -m tagi_jax.evaluate --gin_file=runs/evaluate_suite.gin --gin.EXPORT_DIR="'E'"
--gin.DATA_DIR="'D'" --gin.OUTPUT_DIR="'O'"``: score an export on natural-instructions tasks.

The configurable ``evaluate`` (``tagi_jax.evaluation.pipeline``) does the work and says what it
writes; flags are ``tagi_jax.train``'s (``--gin_file``, ``--gin_bindings``, ``--gin.NAME=VALUE``).
Bad input (missing export or data directory, unknown split, ...) is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from tagi_jax import train as cli
    from tagi_jax.evaluation import pipeline

    args = cli.parse_flags(
        sys.argv[1:] if argv is None else argv, prog="python -m tagi_jax.evaluate", doc=__doc__
    )
    cli.parse_gin(args)
    try:
        pipeline.evaluate()
    except (OSError, ValueError, RuntimeError) as e:
        # ValueError covers NIDataError, CheckpointError, ExportError and gin's missing bindings.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

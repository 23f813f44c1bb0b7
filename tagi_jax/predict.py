"""``python -m tagi_jax.predict --export E --input rows.jsonl --output preds.jsonl``.

Generates answers with a trained student (``tagi_jax.predictor.Predictor``) for rows of JSON
lines, each one of:

* ``{"instruction": "...", "input": "...", "id": ...}``: the hypernetwork reads the instruction
  and the student the input, verbatim (e.g. a P3 prompt as both);
* ``{"definition": "...", "input": "...", "positive_examples": [{"input", "output"}], "id"}``:
  a natural-instructions task, formatted as the student trained (the export's settings).

``id`` is optional (default: the row's line number). Each output line is the row's ``id``,
``prediction`` and, when ``--keep_fields``, the row's own fields. Rows of the same instruction
share one encoding of it and one set of adapters, in any order. Bad input (a missing file, a
malformed line, a row without its fields) is one ``error:`` line naming the line, exit code 2;
the output is written aside and renamed (in cloud storage: one object upload), so it is complete
or absent. ``--export``, ``--input`` and ``--output`` may be local or ``gs://...`` paths.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

from tagi_jax import paths


class RowError(ValueError):
    """A row that cannot be used; the message names the file and line."""


def read_rows(path: str) -> list[dict]:
    """The rows of ``path``, checked: each a JSON object with ``input`` and exactly one of
    ``instruction`` / ``definition``."""
    if not paths.isfile(path):
        raise FileNotFoundError(f"input file does not exist: {path}")
    rows = []
    with paths.open(path, "r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise RowError(f"{where}: a row is a JSON object, got {type(row).__name__}")
            kinds = [k for k in ("instruction", "definition") if k in row]
            if len(kinds) != 1:
                raise RowError(f"{where}: needs exactly one of 'instruction' or 'definition'")
            for key in (*kinds, "input"):
                if not isinstance(row.get(key), str):
                    raise RowError(f"{where}: needs a string {key!r}")
            demos = row.get("positive_examples", [])
            if not isinstance(demos, list) or not all(
                isinstance(d, dict) and isinstance(d.get("input"), str) for d in demos
            ):
                raise RowError(f"{where}: positive_examples is a list of {{input, output}}")
            row.setdefault("id", number)
            rows.append(row)
    if not rows:
        raise RowError(f"{path} has no rows")
    return rows


def predict_rows(predictor, rows: list[dict], **decoding) -> list[str]:
    """The prediction of every row, in order (``decoding``: ``generate``'s keywords)."""
    instructions, inputs = [], []
    for row in rows:
        if "definition" in row:
            instruction, text = predictor.format_ni(
                row["definition"], row["input"], row.get("positive_examples", ())
            )
        else:
            instruction, text = row["instruction"], row["input"]
        instructions.append(instruction)
        inputs.append(text)
    return predictor.generate(instructions, inputs, progress=True, **decoding)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagi_jax.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--export", required=True, help="an export directory")
    parser.add_argument("--input", required=True, help="rows as JSON lines")
    parser.add_argument("--output", required=True, help="where to write the predictions")
    parser.add_argument("--beam_size", type=int, default=1, help="1: greedy (default)")
    parser.add_argument("--alpha", type=float, default=0.6, help="t5x's length penalty")
    parser.add_argument("--max_decode_len", type=int, default=None, help="default: the export's")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--keep_fields", action="store_true", help="copy each row's fields")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        output = paths.absolute(args.output)
        if paths.exists(output) and not args.overwrite:
            raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
        rows = read_rows(args.input)
        from tagi_jax.predictor import Predictor

        start = time.time()
        predictor = Predictor.load(args.export, batch_size=args.batch_size)
        predictions = predict_rows(
            predictor,
            rows,
            beam_size=args.beam_size,
            alpha=args.alpha,
            max_decode_len=args.max_decode_len,
        )
        paths.makedirs(paths.dirname(output))
        text = io.StringIO()
        for row, prediction in zip(rows, predictions, strict=True):
            line = {**row} if args.keep_fields else {"id": row["id"]}
            line["prediction"] = prediction
            text.write(json.dumps(line, ensure_ascii=False) + "\n")
        paths.write_text(output, text.getvalue())  # atomic: complete or absent
    except (OSError, ValueError) as e:  # RowError, ExportError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(rows)} predictions to {output} in {time.time() - start:.1f}s "
        f"({predictor.encodings} instruction encodings for {len(rows)} rows)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

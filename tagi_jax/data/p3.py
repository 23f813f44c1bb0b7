"""P3 (bigscience/P3) data rebuilt from raw records and promptsource templates, without promptsource.

promptsource does not install on Python 3.11, so this module reads its ``templates.yaml`` files
directly and renders them with Jinja2 under the same rules as promptsource 0.2.3
``Template.apply`` (which T0 used to build P3):

* ``answer_choices`` is a Jinja template of its own, rendered with the record and split on
  ``|||``; the resulting list is visible to the main template as ``answer_choices``.
* The main template is split on ``|||`` into prompt and target; both are stripped.
* Every ``{{ ... }}`` output is passed through ``| string | truncate(2048)`` (promptsource's
  default ``truncate=True``), so very long fields are cut exactly as in P3.
* ``|||`` inside record strings is protected so it never splits the output.
* Record keys have ``-`` replaced by ``_`` (T0 applies promptsource's ``removeHyphen`` first).
* The environment offers promptsource's helpers: the ``choice`` filter, ``most_frequent`` and
  the ``zip`` global. ``choice`` (and Jinja's own ``random``) draw from a ``random.Random`` that
  the caller passes, so a rendering is reproducible, where promptsource used the global RNG.

A render whose prompt or target is empty gives ``None``: T0 drops those (e.g. COPA templates
written for the other question type).

A template that uses a field the record lacks renders it as empty text, as promptsource does
(Jinja's default), which makes every prompt of a mistyped field silently wrong. Such renders
are recorded (``_MissingField``): ``render_dataset`` warns once per template, naming it and the
fields, and reports how many renders used them (``RenderCounts.missing``); ``strict=True`` makes
the first one a ``MissingFieldError``. Testing an optional field (``{% if x %}``,
``x is defined``, ``x | default(...)``) is not a use: no promptsource template of the shared
data triggers it.

``render_dataset`` writes the P3 layout, one directory per (dataset, template) task holding
``<split>.jsonl`` or ``<split>.tfrecord`` with ``inputs_pretokenized``, ``targets_pretokenized``
and ``answer_choices``; the ``_score_eval`` variant holds one row per answer choice
(``idx``, ``is_correct``, ``weight``) for rank classification. ``read_jsonl`` and
``read_tfrecord`` read either back to the same dicts. Raw records, templates and the P3 layout
may be local or in cloud storage (``gs://``, through ``tagi_jax.paths``), read and written alike.

The dataset lists (T0 training datasets, held-out evaluation datasets, and where the held-out
raw files and templates live in the shared data folder) are package data under ``lists/``,
read with ``read_list`` and ``read_raw_map``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.resources
import json
import logging
import os
import random
import re
import struct
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib.resources.abc import Traversable
from typing import Any, Literal

import jinja2
import yaml

from tagi_jax import paths
from tagi_jax.data.errors import DataError, found

logger = logging.getLogger(__name__)

# promptsource's TEXT_VAR_LENGTH: every substituted value is truncated to this many characters.
TEXT_VAR_LENGTH = 2048
SEPARATOR = "|||"
SCORE_EVAL_SUFFIX = "_score_eval"
# Stands in for "|||" inside record strings while the output is split on the separator.
_PIPE_GUARD = "\x00tagi_jax.p3.pipe\x00"
# Render-context variable that carries the caller's RNG to the ``choice`` filter.
_RNG_VAR = "__tagi_jax_p3_rng__"

# How each known P3 field is stored in a TFRecord ``tf.train.Example``.
_FIELD_KINDS = {
    "inputs_pretokenized": "str",
    "targets_pretokenized": "str",
    "answer_choices": "str_list",
    "is_correct": "bool",
    "weight": "float",
    "idx": "int_list",
}

OnError = Literal["raise", "skip"]


class TemplateRenderError(ValueError):
    """A template failed on a record; the message names the template file, name, id and record."""


class MissingFieldError(TemplateRenderError):
    """(``strict``) A template used a field the record lacks; the message names the template,
    the dataset and the fields."""


class RenderCounts(dict):
    """``render_dataset``'s ``{task directory: rows written}``, plus ``missing``: for each task
    whose template used fields its records lack, ``{"template", "id", "path", "fields",
    "renders"}`` (``renders``: how many records rendered with empty text in their place)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.missing: dict[str, dict[str, Any]] = {}

    @property
    def missing_renders(self) -> int:
        return sum(entry["renders"] for entry in self.missing.values())

    def merge(self, other: RenderCounts) -> RenderCounts:
        self.update(other)
        self.missing.update(getattr(other, "missing", {}))
        return self


@dataclasses.dataclass(frozen=True)
class Template:
    """One promptsource template, as plain data.

    Attributes:
      id: the template's UUID.
      name: its human-readable name (P3 task names are built from it).
      jinja: ``prompt ||| target`` Jinja source.
      answer_choices: ``|||``-separated Jinja source of the choices, or None (open-ended).
      original_task: metadata; T0 evaluates held-out datasets on the ``True`` ones.
      choices_in_prompt: metadata; whether the prompt lists the choices.
      metrics: metadata; evaluation metrics named by the template author.
      dataset: promptsource dataset name (``super_glue``).
      subset: promptsource subset (``rte``), or None.
      path: the ``templates.yaml`` it came from, for error messages.
    """

    id: str
    name: str
    jinja: str
    answer_choices: str | None
    original_task: bool | None
    choices_in_prompt: bool | None
    metrics: tuple[str, ...]
    dataset: str
    subset: str | None
    path: str


# --------------------------------------------------------------------------------------------
# Template loading


class _TemplatesLoader(yaml.SafeLoader):
    """SafeLoader that reads promptsource's ``!Template``/``!TemplateMetadata`` tags as mappings,
    so no promptsource class (and no unsafe loader) is needed."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    return loader.construct_mapping(node, deep=True)


_TemplatesLoader.add_constructor("!Template", _construct_mapping)
_TemplatesLoader.add_constructor("!TemplateMetadata", _construct_mapping)


def _read_text(path: str | os.PathLike) -> str:
    """Reads a UTF-8 file (local or cloud), turning a decoding failure into a ValueError that
    names the file."""
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    data = paths.read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte offset {e.start})") from e


def load_templates(path: str | os.PathLike) -> list[Template]:
    """Parses a promptsource ``templates.yaml`` into Templates, in file order."""
    path = os.fspath(path)
    try:
        doc = yaml.load(_read_text(path), Loader=_TemplatesLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("templates"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'templates' mapping")
    dataset = str(doc.get("dataset", ""))
    subset = None if doc.get("subset") is None else str(doc["subset"])
    return [
        _template_from_entry(path, key, entry, dataset, subset)
        for key, entry in doc["templates"].items()
    ]


def _template_from_entry(
    path: str, key: str, entry: Any, dataset: str, subset: str | None
) -> Template:
    if not isinstance(entry, dict) or "jinja" not in entry or "name" not in entry:
        raise ValueError(f"{path}: template {key!r} lacks 'jinja' or 'name'")
    metadata = entry.get("metadata") or {}
    return Template(
        id=str(entry.get("id", key)),
        name=str(entry["name"]),
        jinja=str(entry["jinja"]),
        answer_choices=entry.get("answer_choices"),
        original_task=metadata.get("original_task"),
        choices_in_prompt=metadata.get("choices_in_prompt"),
        metrics=tuple(metadata.get("metrics") or ()),
        dataset=dataset,
        subset=subset,
        path=path,
    )


# --------------------------------------------------------------------------------------------
# Rendering


@jinja2.pass_context
def _choice(context: jinja2.runtime.Context, seq: Sequence[Any]) -> Any:
    """promptsource's ``choice`` filter, drawing from the caller's RNG instead of the global one."""
    return context[_RNG_VAR].choice(seq)


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
    """promptsource's ``most_frequent`` filter: every item tied for the highest count."""
    if not items:
        return None
    counts = Counter(items).most_common()
    return [item for item, count in counts if count == counts[0][1]]


# The names of the missing fields a render used (None outside a render).
_USED_MISSING: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "tagi_jax_p3_used_missing", default=None
)


class _MissingField(jinja2.Undefined):
    """Jinja's default undefined (prints as "", iterates as empty, is false), which also
    records its name when it is used as a value (printed, iterated, measured, compared). A
    truth test is not recorded: templates test optional fields with ``{% if x %}``."""

    __slots__ = ()

    def _used(self) -> None:
        used = _USED_MISSING.get()
        if used is not None:
            name = self._undefined_name or "?"
            if self._undefined_obj is not jinja2.utils.missing:
                name = f"{name} (of a {type(self._undefined_obj).__name__})"
            used.add(name)

    def __str__(self) -> str:
        self._used()
        return super().__str__()

    def __iter__(self):
        self._used()
        return super().__iter__()

    def __len__(self) -> int:
        self._used()
        return super().__len__()

    def __eq__(self, other: Any) -> bool:
        self._used()
        return super().__eq__(other)

    def __ne__(self, other: Any) -> bool:
        self._used()
        return super().__ne__(other)

    __hash__ = jinja2.Undefined.__hash__


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=_MissingField)
    env.globals["zip"] = zip
    env.filters["choice"] = _choice
    env.filters["random"] = _choice  # Jinja's built-in uses the global RNG
    env.filters["most_frequent"] = _most_frequent
    return env


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _truncating(jinja: str) -> str:
    """promptsource's ``truncate=True``: every ``}}`` gets ``| string | truncate(2048)`` first."""
    return jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")


def _protect(record: Mapping[str, Any]) -> dict[str, Any]:
    """Record as the templates see it: ``-`` in keys -> ``_``, ``|||`` in strings guarded."""
    return {
        key.replace("-", "_"): value.replace(SEPARATOR, _PIPE_GUARD)
        if isinstance(value, str)
        else value
        for key, value in record.items()
    }


def _split(rendered: str) -> list[str]:
    return [part.strip().replace(_PIPE_GUARD, SEPARATOR) for part in rendered.split(SEPARATOR)]


def _render_parts(
    template: Template, record: Mapping[str, Any], rng: random.Random
) -> tuple[list[str], list[str] | None, set[str]]:
    """``(parts, choices, missing)``: ``missing`` names the fields the record lacks that the
    template (or its answer choices) used."""
    if "answer_choices" in record:
        raise ValueError("the record has a field named 'answer_choices', which templates reserve")
    variables = _protect(record)
    variables[_RNG_VAR] = rng
    missing: set[str] = set()
    token = _USED_MISSING.set(missing)
    try:
        choices = None
        if template.answer_choices is not None:
            choices = _split(_compile(template.answer_choices).render(variables))
        jinja = _compile(_truncating(template.jinja))
        parts = _split(jinja.render(variables, answer_choices=choices))
    finally:
        _USED_MISSING.reset(token)
    return parts, choices, missing


def _describe(template: Template, index: int | None) -> str:
    where = "" if index is None else f" on record {index}"
    return f"{template.path}: template {template.name!r} (id {template.id}) failed{where}"


def _dataset(template: Template) -> str:
    return template.dataset + (f"/{template.subset}" if template.subset else "")


def _fields(missing: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in sorted(missing))


def _missing_error(
    template: Template, dataset: str, missing: set[str], index: int | None
) -> MissingFieldError:
    record = "the record" if index is None else f"record {index}"
    return MissingFieldError(
        f"{template.path}: template {template.name!r} (id {template.id}) of dataset {dataset} "
        f"uses field(s) {_fields(missing)} that {record} lacks (strict)"
    )


def _apply(
    template: Template, record: Mapping[str, Any], rng: random.Random, index: int | None
) -> tuple[dict[str, Any] | None, set[str]]:
    """``render``'s result and the missing fields the template used."""
    try:
        parts, choices, missing = _render_parts(template, record, rng)
    except Exception as e:
        raise TemplateRenderError(f"{_describe(template, index)}: {type(e).__name__}: {e}") from e
    if len(parts) > 2:
        raise TemplateRenderError(
            f"{_describe(template, index)}: rendered {len(parts) - 1} '{SEPARATOR}' separators"
        )
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None, missing
    prompt, target = parts
    choices = choices or []
    example = {
        "inputs_pretokenized": prompt,
        "targets_pretokenized": target,
        "answer_choices": choices,
        "target_index": choices.index(target) if target in choices else -1,
    }
    return example, missing


# (path, template id) of the templates ``render`` has warned about, so it warns once for each.
_WARNED: set[tuple[str, str]] = set()


def render(
    template: Template,
    record: Mapping[str, Any],
    *,
    rng: random.Random | None = None,
    index: int | None = None,
    strict: bool = False,
) -> dict[str, Any] | None:
    """Applies ``template`` to one raw record the way promptsource/T0 do.

    Args:
      template: from ``load_templates``.
      record: one raw dataset record (Hugging Face ``datasets`` schema).
      rng: source of the ``choice`` filter's draws; ``random.Random(0)`` when None.
      index: the record's position in its file, only used in error messages.
      strict: a template that uses a field the record lacks raises MissingFieldError; else it
        renders as promptsource does (empty text there) with one warning per template.

    Returns:
      ``{"inputs_pretokenized", "targets_pretokenized", "answer_choices", "target_index"}``
      (``answer_choices`` is ``[]`` for open-ended templates; ``target_index`` is the target's
      position among them, -1 when absent), or None when the prompt or target renders empty.

    Raises:
      TemplateRenderError: the template raised, or rendered more than one ``|||``.
      MissingFieldError: (``strict``) the template used a field the record lacks.
    """
    rng = random.Random(0) if rng is None else rng
    example, missing = _apply(template, record, rng, index)
    if missing:
        if strict:
            raise _missing_error(template, _dataset(template), missing, index)
        if (template.path, template.id) not in _WARNED:
            _WARNED.add((template.path, template.id))
            logger.warning(
                "%s: template %r (id %s) of dataset %s uses field(s) %s that a record lacks: "
                "rendered as empty text (strict=True makes this an error)",
                template.path,
                template.name,
                template.id,
                _dataset(template),
                _fields(missing),
            )
    return example


# --------------------------------------------------------------------------------------------
# Task names and rows


def task_name(dataset_name: str, template_name: str, suffix: str = "") -> str:
    """P3/T0 task name: runs of characters other than word characters and ``.`` become ``_``.

    ``task_name("super_glue_copa", "…What could happen next, C1 or C2?")`` is
    ``super_glue_copa__What_could_happen_next_C1_or_C2_``; ANLI rounds are a suffix (``_r1``).
    """
    return re.sub(r"[^\w.]+", "_", f"{dataset_name}_{template_name}{suffix}")


def _render_examples(
    template: Template,
    records: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    max_examples: int | None,
    on_error: OnError,
    failures: Counter[str],
    dataset: str,
    strict: bool,
) -> tuple[list[dict[str, Any]], int, set[str], int]:
    """Renders one task; returns (examples, number of empty renders, the missing fields the
    template used, the number of renders that used one). Failures are raised, or counted in
    ``failures`` under the template's description when ``on_error="skip"``. With ``strict`` a
    missing field raises even then: it is a template that does not fit the dataset, not one
    bad record."""
    rng = random.Random(seed)
    examples: list[dict[str, Any]] = []
    empty = 0
    missing_fields: set[str] = set()
    missing_renders = 0
    for index, record in enumerate(records):
        if max_examples is not None and len(examples) >= max_examples:
            break
        try:
            example, missing = _apply(template, record, rng, index)
        except TemplateRenderError:
            if on_error == "raise":
                raise
            failures[f"{template.path}: {template.name!r} ({template.id})"] += 1
            continue
        if missing:
            if strict:
                raise _missing_error(template, dataset, missing, index)
            missing_fields |= missing
            missing_renders += 1
        if example is None:
            empty += 1
        else:
            examples.append(example)
    return examples, empty, missing_fields, missing_renders


def _train_rows(examples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for example in examples:
        yield {
            "answer_choices": example["answer_choices"],
            "inputs_pretokenized": example["inputs_pretokenized"],
            "targets_pretokenized": example["targets_pretokenized"],
        }


def _score_eval_rows(examples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One row per answer choice, as t5's ``rank_classification`` lays out P3's score_eval."""
    for example_index, example in enumerate(examples):
        for choice_index, choice in enumerate(example["answer_choices"]):
            yield {
                "idx": [example_index, choice_index],
                "inputs_pretokenized": example["inputs_pretokenized"],
                "is_correct": choice == example["targets_pretokenized"],
                "targets_pretokenized": choice,
                "weight": 1.0,
            }


# --------------------------------------------------------------------------------------------
# Writing


def render_dataset(
    raw_jsonl_path: str | os.PathLike,
    templates_yaml_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "validation",
    dataset_name: str,
    task_suffix: str = "",
    fmt: Literal["jsonl", "tfrecord"] = "jsonl",
    score_eval: bool = False,
    max_examples: int | None = None,
    on_error: OnError = "raise",
    seed: int = 0,
    keep: Callable[[Template], bool] | None = None,
    strict: bool = False,
) -> RenderCounts:
    """Renders every template of a dataset over its raw records into the P3 layout.

    Writes ``out_dir/<task>[_score_eval]/<split>.<fmt>`` with ``<task> =
    task_name(dataset_name, template.name, task_suffix)``. With ``score_eval`` only templates
    that have answer choices are written (rank classification needs them). Empty renders are
    dropped as T0 does (logged at INFO level); each task's ``choice`` draws come from its own
    ``random.Random(seed)``.

    Args:
      raw_jsonl_path: one raw record per line.
      templates_yaml_path: the dataset's promptsource ``templates.yaml``.
      out_dir: root of the P3-style output.
      split: output file stem (P3 uses ``train``/``validation``/``test``).
      dataset_name: P3 task-name prefix, e.g. ``super_glue_rte`` or ``anli``.
      task_suffix: appended after the template name (``_r1`` for the ANLI rounds).
      fmt: ``jsonl`` or ``tfrecord``.
      score_eval: write the one-row-per-choice ``_score_eval`` variant.
      max_examples: at most this many examples per task (before the choice expansion).
      on_error: ``raise`` on the first failing render, or ``skip`` it and report every skipped
        render in one warning at the end.
      seed: seed of the per-task RNG.
      keep: renders only the templates it returns True for (e.g. T0's evaluation prompts:
        ``original_task``); None keeps all.
      strict: a template that uses a field a record lacks raises MissingFieldError (naming the
        template, ``dataset_name`` and the fields), whatever ``on_error``; else such renders
        keep promptsource's empty text, with one warning per template.

    Returns:
      ``{task directory name: rows written}`` (score_eval rows count one per choice), a
      ``RenderCounts`` whose ``missing`` reports the templates that used missing fields.
    """
    if fmt not in ("jsonl", "tfrecord"):
        raise ValueError(f"fmt must be 'jsonl' or 'tfrecord', got {fmt!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    records = list(read_jsonl(raw_jsonl_path))
    failures: Counter[str] = Counter()
    counts = RenderCounts()
    for template in load_templates(templates_yaml_path):
        if score_eval and template.answer_choices is None:
            continue
        if keep is not None and not keep(template):
            continue
        examples, empty, missing, missing_renders = _render_examples(
            template,
            records,
            seed=seed,
            max_examples=max_examples,
            on_error=on_error,
            failures=failures,
            dataset=dataset_name,
            strict=strict,
        )
        name = task_name(dataset_name, template.name, task_suffix)
        if score_eval:
            name += SCORE_EVAL_SUFFIX
        if missing:
            counts.missing[name] = {
                "template": template.name,
                "id": template.id,
                "path": template.path,
                "fields": sorted(missing),
                "renders": missing_renders,
            }
            logger.warning(
                "%s: template %r (id %s) of dataset %s uses field(s) %s that %d records lack: "
                "rendered as empty text there (strict=True / --strict makes this an error)",
                template.path,
                template.name,
                template.id,
                dataset_name,
                _fields(missing),
                missing_renders,
            )
        if empty:
            logger.info("%s: %d of %d records rendered empty (dropped)", name, empty, len(records))
        rows = list(_score_eval_rows(examples) if score_eval else _train_rows(examples))
        _write(paths.join(os.fspath(out_dir), name, f"{split}.{fmt}"), rows, fmt)
        counts[name] = len(rows)
    if failures:
        details = "; ".join(f"{where}: {n}" for where, n in failures.items())
        warnings.warn(
            f"skipped {sum(failures.values())} failing renders of {raw_jsonl_path} ({details})",
            stacklevel=2,
        )
    return counts


def _write(path: str, rows: list[dict[str, Any]], fmt: str) -> None:
    """Writes to a temporary name first so an interrupted run never leaves a truncated file.
    In cloud storage an object appears whole when its upload completes: JSONL is uploaded from
    memory, a TFRecord file written locally first and copied."""
    if paths.is_uri(path):
        if fmt == "jsonl":
            paths.write_text(path, "".join(_jsonl_line(row) for row in rows))
            return
        with tempfile.TemporaryDirectory(prefix="tagi-p3-") as local:
            tmp = os.path.join(local, paths.basename(path))
            _write_tfrecord(tmp, rows)
            paths.copyfile(tmp, path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    if fmt == "jsonl":
        _write_jsonl(tmp, rows)
    else:
        _write_tfrecord(tmp, rows)
    os.replace(tmp, path)


def _write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(_jsonl_line(row))


def _jsonl_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"


def _feature(key: str, value: Any):
    from tagi_jax.data.tf_setup import import_tensorflow

    tf = import_tensorflow()

    kind = _FIELD_KINDS.get(key)
    if kind is None:
        raise ValueError(f"no TFRecord encoding for field {key!r}")
    if kind == "str":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))
    if kind == "str_list":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in value]))
    if kind == "float":
        return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    ints = [int(value)] if kind == "bool" else [int(v) for v in value]
    return tf.train.Feature(int64_list=tf.train.Int64List(value=ints))


def _write_tfrecord(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    from tagi_jax.data.tf_setup import import_tensorflow

    tf = import_tensorflow()

    with tf.io.TFRecordWriter(path) as writer:
        for row in rows:
            features = {key: _feature(key, value) for key, value in row.items()}
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writer.write(example.SerializeToString())


# --------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields one dict per non-blank line (raw records or P3 rows).

    The file (local or cloud: ``tagi_jax.paths``; read streamed) is checked to exist at the
    call; a line that is not UTF-8 or not a JSON object raises ValueError naming the file and
    line while iterating.
    """
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return _iter_jsonl(path)


def _iter_jsonl(path: str) -> Iterator[dict[str, Any]]:
    from tagi_jax.data import example_index  # not module-level: a loop variable elsewhere here

    with contextlib.closing(example_index.binary_lines(path)) as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {line_number} is not valid UTF-8") from e
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_number} is not valid JSON: {e}") from e
            if not isinstance(value, dict):
                raise ValueError(f"{path}: line {line_number} is not a JSON object")
            yield value


def read_tfrecord(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields the rows of a P3 TFRecord file as the same dicts ``read_jsonl`` gives.

    Known P3 fields get their Python types (``str``, ``list[str]``, ``bool``, ``float``,
    ``list[int]``); other fields (e.g. P3's token ids) come back as lists. A local file is read
    by ``tf.data``; a cloud one through ``tagi_jax.paths`` (``_cloud_records``).
    """
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return _iter_tfrecord(path)


def _iter_tfrecord(path: str) -> Iterator[dict[str, Any]]:
    from tagi_jax.data.tf_setup import import_tensorflow

    tf = import_tensorflow()

    if paths.is_uri(path):
        for index, serialized in enumerate(_cloud_records(path)):
            try:
                example = tf.train.Example.FromString(serialized)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
                raise ValueError(f"{path}: unreadable TFRecord file: record {index}: {e}") from e
            yield _decode_example(path, index, example)
        return
    try:
        for index, serialized in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            example = tf.train.Example.FromString(serialized)
            yield _decode_example(path, index, example)
    except tf.errors.OpError as e:
        raise ValueError(f"{path}: unreadable TFRecord file: {e.message}") from e


def _cloud_records(path: str) -> Iterator[bytes]:
    """The serialized records of a TFRecord file in cloud storage, read streamed through
    ``tagi_jax.paths`` (gcsfs) rather than TensorFlow's own GCS client: one client, one set of
    credentials for every cloud read, and the emulator of the tests reaches it. Records are
    framed ``uint64 length, uint32 crc, data, uint32 crc``; the CRCs are not checked (as
    ``example_index.TFRecordIndex``), a truncated file is a ValueError."""
    with paths.open(path, "rb") as f:
        index, position = 0, 0
        while header := f.read(12):
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else 0
            data = f.read(length) if len(header) == 12 else b""
            if len(header) < 12 or len(data) != length or len(f.read(4)) != 4:
                raise ValueError(
                    f"{path}: unreadable TFRecord file: truncated record {index} at byte {position}"
                )
            yield data
            index += 1
            position += 12 + length + 4


def task_dirs(p3_dir: str) -> list[str]:
    """The sorted names of the directories in ``p3_dir`` (a P3 layout's tasks), local or in
    cloud storage; for a cloud one, one listing (not a query per name)."""
    if paths.is_local(p3_dir):
        return sorted(d for d in os.listdir(p3_dir) if os.path.isdir(os.path.join(p3_dir, d)))
    for _, dirs, _ in paths.walk(p3_dir):
        return sorted(dirs)  # the top level only: the walk goes no deeper
    return []


def _decode_example(path: str, index: int, example: Any) -> dict[str, Any]:
    row = {}
    for key in sorted(example.features.feature):
        feature = example.features.feature[key]
        stored = feature.WhichOneof("kind")
        values = [] if stored is None else list(getattr(feature, stored).value)
        if stored == "bytes_list":
            values = [v.decode("utf-8") for v in values]
        kind = _FIELD_KINDS.get(key)
        if kind in ("str", "bool", "float"):
            if len(values) != 1:
                raise ValueError(f"{path}: record {index} field {key!r} has {len(values)} values")
            row[key] = bool(values[0]) if kind == "bool" else values[0]
        else:
            row[key] = values
    return row


# --------------------------------------------------------------------------------------------
# Package data


def check_row(row: dict, where: str) -> None:
    """Raises ``DataError`` (``where``: the file and row) unless the P3 fields read here have
    their types: ``inputs_pretokenized``/``targets_pretokenized`` strings, ``is_correct`` a
    boolean, ``weight`` a number, ``idx`` integers (example, choice); the last three optional.
    Never coerced: ``bool("false")`` is True."""
    for key in ("inputs_pretokenized", "targets_pretokenized"):
        if not isinstance(row.get(key), str):
            value = f"found {found(row[key])}" if key in row else "it is missing"
            raise DataError(f'{where}: field "{key}" must be a string, {value}')
    if "is_correct" in row and not isinstance(row["is_correct"], bool):
        raise DataError(
            f'{where}: field "is_correct" must be a boolean, found {found(row["is_correct"])}'
        )
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise DataError(f'{where}: field "weight" must be a number, found {found(weight)}')
    idx = row.get("idx", [0, 0])
    if (
        not isinstance(idx, list)
        or len(idx) < 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
    ):
        raise DataError(
            f'{where}: field "idx" must be a list of integers (example, choice), found {found(idx)}'
        )


def _lists_dir() -> Traversable:
    return importlib.resources.files("tagi_jax.data") / "lists"


def read_list(name: str) -> list[str]:
    """Entries of ``lists/<name>.txt`` (blank lines and ``#`` comments dropped).

    ``t0_train_datasets``: the 36 T0 training datasets; ``t0_eval_datasets``: the held-out ones.
    Names are Hugging Face ``dataset[/subset]``.
    """
    resource = _lists_dir() / f"{name}.txt"
    if not resource.is_file():
        available = sorted(p.name for p in _lists_dir().iterdir() if p.name.endswith(".txt"))
        raise FileNotFoundError(f"no list {name!r} in tagi_jax/data/lists (have {available})")
    lines = (line.strip() for line in resource.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_raw_map() -> dict[str, dict[str, Any]]:
    """``lists/p3_raw_map.json``: for each held-out dataset (named as in ``t0_eval_datasets``),
    its raw file and templates relative to the shared P3 folder (``raw`` is null where no raw
    copy exists), and its P3 task-name prefix, suffix and split."""
    text = (_lists_dir() / "p3_raw_map.json").read_text(encoding="utf-8")
    return json.loads(text)["datasets"]

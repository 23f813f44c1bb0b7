"""The data readers on ``gs://`` read what they read from a local directory.

Each case puts the same data on local disk and in a fake bucket (``tagi_jax.testing.fake_gcs``:
an in-process GCS emulator that gcsfs, hence ``tagi_jax.paths``, talks to; no network) and
checks that the ``gs://`` copy gives the same files, examples, batches and one-line errors
(naming the ``gs://`` file) as the local one: the built-in suite (natural-instructions layout,
written by ``synthetic.write_suite`` straight to the bucket), P3 (raw records and templates
read from the bucket, the rendered JSONL/TFRecord layout written to and read from it, the
score-eval instances) and a C4 JSONL file. Skipped without the test dependencies
``gcp-storage-emulator`` / ``gcsfs``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tagi_jax import paths
from tagi_jax.data import example_index, ni, pipeline, vocab
from tagi_jax.data.config import DataConfig
from tagi_jax.data.errors import DataError

LENGTHS = (("inputs", 96), ("hyper_inputs", 96), ("teacher_inputs", 128), ("targets", 32))
BATCH = 4
BYTES = vocab.get_vocabulary("byte")


@pytest.fixture(scope="module")
def suite(bucket, tmp_path_factory):
    """The built-in suite written locally and to the bucket: ``(local, gs)``."""
    from tagi_jax.data import synthetic

    local = str(tmp_path_factory.mktemp("suite"))
    remote = f"{bucket}/suite"
    for out in (local, remote):
        synthetic.write_suite(out, instances_per_train_task=4, instances_per_test_task=2)
    return local, remote


def _files(root: str) -> dict[str, bytes]:
    found = {}
    for directory, _, names in paths.walk(root):
        for name in names:
            path = paths.join(directory, name)
            found[paths.relpath(path, root).replace(os.sep, "/")] = paths.read_bytes(path)
    return found


def _batches(task: str, n: int = 2, with_teacher: bool = True, lengths=LENGTHS) -> list:
    """The first ``n`` training batches of ``task`` (the per-host stream, every row)."""
    from tagi_jax.data import feature_converter

    if not with_teacher:
        lengths = tuple((k, v) for k, v in lengths if k != "teacher_inputs")
    stream = feature_converter.host_batches(
        task,
        dict(lengths),
        BATCH,
        seed=0,
        with_teacher=with_teacher,
        rows=np.arange(BATCH),
    )
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- natural-instructions layout (the built-in suite) -------------------------------------------


def test_suite_written_to_gs_is_the_local_suite(suite):
    from tagi_jax.data import synthetic

    local, remote = suite
    assert _files(remote) == _files(local)
    # written again with the same parameters: recognised from its gs:// manifest, kept
    again = synthetic.write_suite(remote, instances_per_train_task=4, instances_per_test_task=2)
    assert again == synthetic.write_suite(
        local, instances_per_train_task=4, instances_per_test_task=2
    )
    with pytest.raises(synthetic.SuiteExistsError, match=f"{remote} already holds"):
        synthetic.write_suite(remote, instances_per_train_task=5, instances_per_test_task=2)


def test_preflight_and_first_batches_on_gs_equal_local(suite):
    from tagi_jax.data import tasks

    local, remote = suite
    config = ni.NIConfig()
    data = DataConfig(
        task="tagi_suite_def_pos2", suite_dir=remote, feature_lengths=LENGTHS, ni=config
    )
    pipeline.preflight(data)  # every task file read from gs:// and checked
    assert ni.first_examples(remote, "train", config) == ni.first_examples(local, "train", config)
    tasks.register_tasks(vocabulary=BYTES, suite_dir=local, prefix="cloud_local")
    tasks.register_tasks(vocabulary=BYTES, suite_dir=remote, prefix="cloud_gs")
    _assert_same_batches(
        _batches("cloud_gs_suite_def_pos2"), _batches("cloud_local_suite_def_pos2")
    )


BAD_TASKS = {
    "malformed JSON": b'{"Definition": ["x"], ',
    "wrong type": json.dumps(
        {"Definition": ["x"], "Instances": [{"id": "a", "input": "i", "output": "o"}]}
    ).encode(),
    "not UTF-8": b'{"Definition": ["caf\xe9"]}',
}


@pytest.mark.parametrize("case", [*BAD_TASKS, "missing file"])
def test_bad_task_file_on_gs_is_the_local_one_line_error(bucket, tmp_path, case):
    messages = []
    for root in (str(tmp_path), f"{bucket}/bad_{case.replace(' ', '_')}"):
        paths.makedirs(paths.join(root, "splits", "default"))
        paths.write_text(paths.join(root, "splits", "default", "train_tasks.txt"), "task1\n")
        if case in BAD_TASKS:
            paths.makedirs(paths.join(root, "tasks"))
            paths.write_bytes(paths.join(root, "tasks", "task1.json"), BAD_TASKS[case])
        data = DataConfig(
            task="tagi_suite_def", suite_dir=root, feature_lengths=LENGTHS, ni=ni.NIConfig()
        )
        with pytest.raises(DataError) as error:
            pipeline.preflight(data)
        messages.append(str(error.value))
    local, remote = messages
    gs_file = f"{bucket}/bad_{case.replace(' ', '_')}/tasks/task1.json"
    assert "\n" not in remote and gs_file in remote
    assert remote == local.replace(str(tmp_path), paths.dirname(paths.dirname(gs_file)))


def test_missing_gs_directory_fails_check_paths(bucket):
    data = DataConfig(task="tagi_suite_def", suite_dir=f"{bucket}/nowhere", feature_lengths=LENGTHS)
    with pytest.raises(DataError, match=f"DataConfig.suite_dir: .* {bucket}/nowhere$"):
        pipeline.check_paths(data)


# --- P3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p3_layouts(bucket, shared_data_dir, tmp_path_factory):
    """rotten_tomatoes (a T0 training dataset) rendered from raw records and templates, local
    ones into a local layout and gs:// ones into a gs:// layout, as JSONL and as TFRecord:
    ``{fmt: (local, gs)}``."""
    from tagi_jax.data import p3

    shared = os.path.join(shared_data_dir, "p3")
    raw_rel = "raw/rotten_tomatoes/sample.jsonl"
    templates_rel = "templates/rotten_tomatoes/templates.yaml"
    for rel in (raw_rel, templates_rel):
        paths.copyfile(os.path.join(shared, rel), f"{bucket}/p3src/{rel}")
    layouts = {}
    for fmt in ("jsonl", "tfrecord"):
        out = {}
        for where, src, dst in (
            ("local", shared, str(tmp_path_factory.mktemp(f"p3_{fmt}"))),
            ("gs", f"{bucket}/p3src", f"{bucket}/p3_{fmt}"),
        ):
            counts = p3.render_dataset(
                paths.join(src, raw_rel),
                paths.join(src, templates_rel),
                dst,
                split="train",
                dataset_name="rotten_tomatoes",
                max_examples=6,
                fmt=fmt,
            )
            out[where] = (dst, counts)
        assert out["gs"][1] == out["local"][1] and len(out["gs"][1]) > 2
        layouts[fmt] = (out["local"][0], out["gs"][0])
    return layouts


@pytest.mark.parametrize("fmt", ["jsonl", "tfrecord"])
def test_p3_layout_on_gs_reads_as_local(p3_layouts, fmt):
    from tagi_jax.data import p3, p3_tasks, tasks

    local, remote = p3_layouts[fmt]
    names = p3.task_dirs(remote)
    assert names == sorted(os.listdir(local))
    read = p3.read_jsonl if fmt == "jsonl" else p3.read_tfrecord
    for name in names:
        path = f"{name}/train.{fmt}"
        assert list(read(paths.join(remote, path))) == list(read(os.path.join(local, path)))
        if fmt == "jsonl":  # written byte for byte as locally
            assert paths.read_bytes(paths.join(remote, path)) == paths.read_bytes(
                os.path.join(local, path)
            )
    rows = p3_tasks.IndexedRows(paths.join(remote, names[0]), "train", 0, 0)
    local_rows = p3_tasks.IndexedRows(os.path.join(local, names[0]), "train", 0, 0)
    assert [rows.example(r) for r in range(len(rows))] == [
        local_rows.example(r) for r in range(len(local_rows))
    ]
    vocabulary = BYTES
    mixture = "tagi_p3_t0_train"
    assert p3_tasks.preflight(remote, mixture, vocabulary) == [
        paths.join(remote, f"{name}/train.{fmt}") for name in names
    ]
    for where, root in (("local", local), ("gs", remote)):
        tasks.register_tasks(
            vocabulary=vocabulary,
            p3_dir=root,
            prefix=f"cloud_{fmt}_{where}",
            max_examples_per_task=4,
        )
    lengths = (("inputs", 256), ("hyper_inputs", 256), ("teacher_inputs", 256), ("targets", 16))
    _assert_same_batches(
        _batches(f"cloud_{fmt}_gs_p3_t0_train", lengths=lengths),
        _batches(f"cloud_{fmt}_local_p3_t0_train", lengths=lengths),
    )


def test_p3_bad_line_on_gs_names_the_gs_file(p3_layouts, bucket):
    from tagi_jax.data import p3_tasks

    local, remote = p3_layouts["jsonl"]
    name = sorted(os.listdir(local))[0]
    text = paths.read_text(os.path.join(local, name, "train.jsonl"))
    bad = f"{bucket}/p3_bad/{name}/train.jsonl"
    paths.write_text(bad, text + "{not json\n")
    rows = p3_tasks.IndexedRows(paths.dirname(bad), "train", 0, 0)
    line = text.count("\n") + 1
    with pytest.raises(DataError, match=f"^{bad}: line {line} is not valid JSON: "):
        rows.example(len(rows) - 1)
    with pytest.raises(DataError, match=f"^{bad}: line {line} is not valid JSON: "):
        list(p3_tasks._rows(bad))


def test_p3_score_eval_instances_on_gs(bucket, shared_data_dir, tmp_path):
    from tagi_jax.data import p3
    from tagi_jax.evaluation import p3_eval

    raw = os.path.join(shared_data_dir, "p3", "raw", "super_glue_copa", "validation.jsonl")
    templates = os.path.join(shared_data_dir, "p3", "templates", "super_glue", "copa")
    found = []
    for out in (str(tmp_path), f"{bucket}/copa"):
        p3.render_dataset(
            raw,
            os.path.join(templates, "templates.yaml"),
            out,
            dataset_name="super_glue_copa",
            score_eval=True,
            max_examples=3,
            keep=lambda t: bool(t.original_task),
        )
        dirs = p3_eval.score_eval_tasks(out, ["super_glue/copa"])["super_glue/copa"]
        found.append((dirs, p3_eval.load_instances(out, dirs, "validation")))
    assert found[0] == found[1] and found[1][1]
    with pytest.raises(FileNotFoundError, match=f"{bucket}/copa/{found[1][0][0]} has no test"):
        p3_eval.load_instances(f"{bucket}/copa", found[1][0][:1], "test")


# --- C4 ----------------------------------------------------------------------------------------


def test_c4_jsonl_on_gs_gives_the_local_batches(bucket, tmp_path):
    from tagi_jax.data import c4, tasks

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(8, 40)))) for _ in range(12)]
    local = tmp_path / "c4.jsonl"
    local.write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs))
    remote = f"{bucket}/c4/c4.jsonl"
    paths.copyfile(str(local), remote)
    assert list(c4.read_documents([remote])) == docs
    pipeline.preflight(
        DataConfig(task="tagi_c4_pretrain", c4_files=(remote,), feature_lengths=LENGTHS)
    )
    lengths = (("inputs", 128), ("hyper_inputs", 128), ("targets", 128))
    for where, path in (("local", str(local)), ("gs", remote)):
        tasks.register_tasks(vocabulary=BYTES, c4_files=[path], prefix=f"cloud_{where}")
    _assert_same_batches(
        _batches("cloud_gs_c4_pretrain", with_teacher=False, lengths=lengths),
        _batches("cloud_local_c4_pretrain", with_teacher=False, lengths=lengths),
    )


# --- example_index: objects held in memory, and read by range -----------------------------------


@pytest.mark.parametrize("in_memory", [True, False])
def test_indexes_of_gs_objects_read_as_local(p3_layouts, bucket, monkeypatch, in_memory):
    if not in_memory:  # every object too large to hold: scanned streamed, read by range
        monkeypatch.setattr(example_index, "IN_MEMORY_BYTES", 0)
    for fmt, index in (
        ("jsonl", example_index.LineIndex),
        ("tfrecord", example_index.TFRecordIndex),
    ):
        local, remote = p3_layouts[fmt]
        name = sorted(os.listdir(local))[0]
        a = index(os.path.join(local, name, f"train.{fmt}"), stride=4)
        b = index(paths.join(remote, name, f"train.{fmt}"), stride=4)
        assert (b._file._data is not None) == in_memory
        assert len(a) == len(b) > 4
        assert [b.read(r) for r in range(len(b))] == [a.read(r) for r in range(len(a))]
        if fmt == "jsonl":
            offset = b.read(len(b) - 1)[1]
            assert b.line_number(offset) == a.line_number(offset) > 1
    with pytest.raises(FileNotFoundError):
        example_index.LineIndex(f"{bucket}/nowhere.jsonl")

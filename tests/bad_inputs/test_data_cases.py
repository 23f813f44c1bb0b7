"""Bad training data is one ``DataError`` line naming the file and the problem, found before any
model work (``pipeline.preflight``), and, where only the input pipeline meets it, one line from
the batch stream too; ``python -m tagi_jax.train`` turns it into one ``error:`` line and exit 2.

Each case corrupts a copy of a small built-in suite (SNI format) or of a small P3 layout
rendered from the shared records."""

import json
import os
import shutil
import subprocess
import sys
import time

import gin
import pytest

from tagi_jax import train as train_cli
from tagi_jax.data import ni, pipeline
from tagi_jax.data.config import DataConfig
from tagi_jax.data.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENGTHS = (("inputs", 64), ("hyper_inputs", 64), ("teacher_inputs", 64), ("targets", 16))


@pytest.fixture(scope="module")
def suite_source(tmp_path_factory):
    from tagi_jax.data import synthetic

    out = str(tmp_path_factory.mktemp("suite"))
    synthetic.write_suite(out, instances_per_train_task=4, instances_per_test_task=2)
    return out


@pytest.fixture
def suite(tmp_path, suite_source):
    """A fresh copy (corrupted by the test) and the file of its first training task."""
    root = tmp_path / "suite"
    shutil.copytree(suite_source, root)
    name = (root / "splits" / "default" / "train_tasks.txt").read_text().split()[0]
    return root, root / "tasks" / f"{name}.json"


@pytest.fixture(scope="module")
def p3_source(tmp_path_factory, shared_data_dir):
    from tagi_jax.data import p3

    raw = os.path.join(shared_data_dir, "p3", "raw", "rotten_tomatoes", "sample.jsonl")
    templates = os.path.join(shared_data_dir, "p3", "templates", "rotten_tomatoes")
    out = str(tmp_path_factory.mktemp("p3"))
    counts = p3.render_dataset(
        raw,
        os.path.join(templates, "templates.yaml"),
        out,
        split="train",
        dataset_name="rotten_tomatoes",
        max_examples=6,
    )
    return out, sorted(counts)


@pytest.fixture
def p3_dir(tmp_path, p3_source):
    """A fresh copy, the name of its first task and that task's train file."""
    source, names = p3_source
    root = tmp_path / "p3"
    shutil.copytree(source, root)
    return root, names[0], root / names[0] / "train.jsonl"


def _config(**kwargs) -> DataConfig:
    return DataConfig(ni=ni.NIConfig(), feature_lengths=LENGTHS, **kwargs)


def _edit(change):
    def corrupt(path):
        task = json.loads(path.read_text())
        change(task)
        path.write_text(json.dumps(task))

    return corrupt


def _one_line(error: DataError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


# --- preflight: natural-instructions (SNI format) ---------------------------------------------

# id -> (corruption of the first training task's file, what the message must name, the index of
# the instance it names by its id too, if any)
NI_CASES = {
    "output_is_a_string": (
        _edit(lambda t: t["Instances"][2].update(output="positive")),
        ['"output"', "Instances[2]", "list of strings", "found a string ('positive')"],
        2,
    ),
    "output_is_a_list_of_numbers": (
        _edit(lambda t: t["Instances"][0].update(output=[1, 2])),
        ['"output"', "Instances[0]", "list of strings"],
        0,
    ),
    "output_is_empty": (
        _edit(lambda t: t["Instances"][1].update(output=[])),
        ['"output"', "Instances[1]", "empty list"],
        1,
    ),
    "definition_is_a_string": (
        _edit(lambda t: t.update(Definition="Do the task.")),
        ['"Definition"', "list of strings", "found a string"],
        None,
    ),
    "definition_missing": (_edit(lambda t: t.pop("Definition")), ["no Definition"], None),
    "instances_missing": (_edit(lambda t: t.pop("Instances")), ["no Instances"], None),
    "instances_not_a_list": (
        _edit(lambda t: t.update(Instances={"a": 1})),
        ['"Instances"', "found an object"],
        None,
    ),
    "instance_not_an_object": (
        _edit(lambda t: t["Instances"].__setitem__(1, "hello")),
        ["Instances[1]", "found a string ('hello')"],
        None,
    ),
    "instance_id_a_number": (
        _edit(lambda t: t["Instances"][3].update(id=7)),
        ["Instances[3]", '"id"', "found a number (7)"],
        None,
    ),
    "instance_input_missing": (
        _edit(lambda t: t["Instances"][1].pop("input")),
        ["Instances[1]", '"input"', "missing"],
        1,
    ),
    "categories_is_a_string": (
        _edit(lambda t: t.update(Categories="Sentiment")),
        ['"Categories"', "found a string ('Sentiment')"],
        None,
    ),
    "positive_example_output_a_list": (
        _edit(lambda t: t["Positive Examples"][0].update(output=["x"])),
        ['"Positive Examples"[0]', '"output"', "must be a string"],
        None,
    ),
    "negative_examples_not_a_list": (
        _edit(lambda t: t.update({"Negative Examples": "-"})),
        ['"Negative Examples"', "found a string"],
        None,
    ),
    "malformed_json": (lambda p: p.write_text('{"Definition": ['), ["is not valid JSON"], None),
    "not_utf8": (
        lambda p: p.write_bytes(b'{"Definition": ["caf\xe9"]}'),
        ["is not UTF-8"],
        None,
    ),
    "task_file_missing": (lambda p: p.unlink(), ["task file missing"], None),
}


@pytest.mark.parametrize("case", list(NI_CASES))
def test_preflight_names_the_ni_file_and_field(suite, case):
    root, path = suite
    corrupt, parts, named = NI_CASES[case]
    if named is not None:
        parts = [*parts, f"instance {json.loads(path.read_text())['Instances'][named]['id']} "]
    corrupt(path)
    with pytest.raises(DataError) as info:
        pipeline.preflight(_config(task="tagi_suite_def_pos2", suite_dir=str(root)))
    _one_line(info.value, str(path), *parts)


@pytest.mark.parametrize(
    "case,kwargs,parts",
    [
        pytest.param(case, kwargs, parts, id=case)
        for case, kwargs, parts in [
            ("empty_split_list", {}, ["train_tasks.txt", "lists no tasks"]),
            ("no_split_file", {}, ["no split file"]),
            ("missing_directory", {"suite_dir": "/nonexistent/suite"}, ["/nonexistent/suite"]),
            ("directory_not_set", {"suite_dir": None}, ["DataConfig.suite_dir", "not set"]),
            ("task_of_another_directory", {"task": "tagi_sni_def"}, ["DataConfig.sni_dir"]),
            ("unknown_task", {"task": "tagi_nothing"}, ["'tagi_nothing'", "names no task"]),
        ]
    ],
)
def test_preflight_names_the_split_or_setting(suite, case, kwargs, parts):
    root, _ = suite
    split_file = root / "splits" / "default" / "train_tasks.txt"
    if case == "empty_split_list":
        split_file.write_text("\n")
    if case == "no_split_file":
        split_file.unlink()
    config = {"task": "tagi_suite_def_pos2", "suite_dir": str(root), **kwargs}
    with pytest.raises(DataError) as info:
        pipeline.preflight(_config(**config))
    _one_line(info.value, *parts)


def test_skip_policy_skips_a_bad_file_but_never_coerces_it(suite):
    root, path = suite
    _edit(lambda t: t["Instances"][0].update(output="positive"))(path)
    tasks = ni.load_split(str(root), "train", ni.NIConfig(on_error="skip"))
    assert path.stem not in [name for name, _ in tasks]
    for example in ni.iter_examples(str(root), "train", ni.NIConfig(on_error="skip")):
        assert example["task_name"] != path.stem


def test_preflight_is_quick_on_the_shared_sni_and_the_suite(shared_data_dir, suite):
    root, _ = suite
    configs = [
        _config(task="tagi_sni_def_pos2", sni_dir=os.path.join(shared_data_dir, "sni")),
        _config(task="tagi_sni_def", sni_dir=os.path.join(shared_data_dir, "sni")),
        _config(task="tagi_suite_def_pos2", suite_dir=str(root)),
    ]
    pipeline.preflight(configs[0])  # imports the vocabulary's TensorFlow once
    for config in configs:
        start = time.perf_counter()
        pipeline.preflight(config)
        assert time.perf_counter() - start < 1.0


# --- preflight: P3 --------------------------------------------------------------------------


def _p3_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


P3_CASES = {
    "empty_split": (lambda path: path.write_text(""), ["train.jsonl", "is empty"]),
    "missing_train_split": (
        lambda path: path.rename(path.with_name("validation.jsonl")),
        ["has no train.jsonl or train.tfrecord"],
    ),
    "malformed_first_line": (
        lambda path: path.write_text("{oops\n" + path.read_text()),
        ["train.jsonl: line 1 is not valid JSON"],
    ),
    "target_is_a_list": (
        lambda path: _write_rows(
            path, [{**_p3_rows(path)[0], "targets_pretokenized": ["x"]}, *_p3_rows(path)[1:]]
        ),
        ["train.jsonl: row 1", '"targets_pretokenized"', "found a list"],
    ),
    "is_correct_is_a_string": (
        lambda path: _write_rows(path, [{**_p3_rows(path)[0], "is_correct": "false"}]),
        ["train.jsonl: row 1", '"is_correct"', "boolean"],
    ),
}


@pytest.mark.parametrize("task", ["tagi_p3_t0_train", "single"])
@pytest.mark.parametrize("case", list(P3_CASES))
def test_preflight_names_the_p3_file(p3_dir, case, task):
    root, name, path = p3_dir
    corrupt, parts = P3_CASES[case]
    corrupt(path)
    task = f"tagi_p3_{name}" if task == "single" else task
    with pytest.raises(DataError) as info:
        pipeline.preflight(_config(task=task, p3_dir=str(root)))
    _one_line(info.value, str(root / name), *parts)


def test_preflight_p3_settings(p3_dir, tmp_path):
    root, _, _ = p3_dir
    for task, p3, parts in [
        ("tagi_p3_no_such_task", str(root), ["'tagi_p3_no_such_task'", "is no P3 task"]),
        ("tagi_p3_t0_train", str(tmp_path / "none"), ["DataConfig.p3_dir", "does not exist"]),
        ("tagi_p3_t0_train", None, ["DataConfig.p3_dir", "not set"]),
    ]:
        with pytest.raises(DataError) as info:
            pipeline.preflight(_config(task=task, p3_dir=p3))
        _one_line(info.value, *parts)
    pipeline.preflight(_config(task="tagi_p3_t0_train", p3_dir=str(root)))  # the intact copy


# --- errors only the input pipeline meets ---------------------------------------------------


def _first_batch(config):
    return next(pipeline.train_batches(config, batch_size=4, seed=0, skip=0))


def _pipeline_error(config, *parts):
    with pytest.raises(DataError) as info:
        _first_batch(config)
    _one_line(info.value, *parts)
    # nothing (no TensorFlow traceback) is chained to it
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return info.value


@pytest.mark.parametrize("task", ["tagi_p3_t0_train", "single"])
def test_a_malformed_line_past_the_first_is_one_line_from_the_pipeline(p3_dir, task):
    # preflight reads one row per task, however large the files: line 4 is the pipeline's
    root, name, path = p3_dir
    lines = path.read_text().splitlines()
    lines[3] = "{oops"
    path.write_text("\n".join(lines) + "\n")
    config = _config(task=f"tagi_p3_{name}" if task == "single" else task, p3_dir=str(root))
    pipeline.preflight(config)
    _pipeline_error(config, str(path), "line 4 is not valid JSON")


def test_a_wrong_type_past_the_first_row_is_one_line_from_the_pipeline(p3_dir):
    root, name, path = p3_dir
    rows = _p3_rows(path)
    rows[2]["inputs_pretokenized"] = None
    _write_rows(path, rows)
    config = _config(task=f"tagi_p3_{name}", p3_dir=str(root))
    pipeline.preflight(config)
    _pipeline_error(config, str(path), "row 3", '"inputs_pretokenized"', "found null")


def test_an_empty_p3_task_is_a_data_error_not_stop_iteration(p3_dir):
    root, name, path = p3_dir
    path.write_text("")
    error = _pipeline_error(_config(task=f"tagi_p3_{name}", p3_dir=str(root)))
    _one_line(error, f"tagi_p3_{name}", str(root), "no training examples")


def test_a_file_broken_after_the_check_is_one_line_from_the_pipeline(suite):
    # the generator's NIDataError comes back through tf.data as its own message
    root, path = suite
    config = _config(task="tagi_suite_def_pos2", suite_dir=str(root))
    pipeline.preflight(config)
    _edit(lambda t: t["Instances"][3].update(output="abc"))(path)
    _pipeline_error(config, str(path), "Instances[3]", '"output"', "found a string ('abc')")


# --- the CLI: exit 2, one error line, before any model work ---------------------------------


def _main(flags):
    try:
        return train_cli.main(flags)
    finally:
        gin.clear_config()


@pytest.mark.parametrize(
    "run_file,case",
    [
        ("runs/tiny_cpu.gin", "output_is_a_string"),
        ("runs/tiny_cpu.gin", "malformed_json"),
        ("runs/tiny_cpu.gin", "definition_is_a_string"),
        ("runs/tiny_cpu_lora_teachers.gin", "output_is_a_string"),
    ],
    ids=["train-output_is_a_string", "train-malformed_json", "train-definition", "teachers-output"],
)
def test_cli_exits_2_with_one_error_line_before_the_model(suite, tmp_path, capsys, run_file, case):
    root, path = suite
    corrupt, parts, _ = NI_CASES[case]
    corrupt(path)
    model_dir = tmp_path / "run"
    flags = [
        f"--gin_file={run_file}",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{root}'",
    ]
    if "lora_teachers" in run_file:
        flags.append(f"--gin.BASE_CHECKPOINT='{tmp_path}'")  # exists; never loaded
    else:
        flags.append("--gin.train.mesh_shape=(1, 1)")
    start = time.perf_counter()
    assert _main(flags) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    _one_line(DataError(lines[0]), str(path), *parts)
    # nothing of the run was written: the model was never built
    assert not model_dir.exists() or not os.listdir(model_dir), os.listdir(model_dir)
    assert elapsed < 20, elapsed


@pytest.mark.slow
def test_cli_pipeline_error_exits_2_and_does_not_hang(p3_dir, tmp_path):
    # A subprocess: a failed tf.data iterator left for interpreter exit would print the error
    # and then hang forever (its generator threads cannot take the GIL any more).
    root, name, path = p3_dir
    lines = path.read_text().splitlines()
    lines[3] = "{oops"
    path.write_text("\n".join(lines) + "\n")
    flags = [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
        f"--gin.DATA_DIR='{root}'",
        f"--gin.DataConfig.task='tagi_p3_{name}'",
        f"--gin.DataConfig.p3_dir='{root}'",
        "--gin.TRAIN_STEPS=2",
    ]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "tagi_jax.train", *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # TensorFlow's own C++ start-up lines (I0000..., "WARNING: All log messages ...") aside
    ours = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith(("I0000", "WARNING: All log messages"))
    ]
    assert len(ours) == 1 and ours[0].startswith("error: "), result.stderr[-3000:]
    _one_line(DataError(ours[0]), str(path), "line 4 is not valid JSON")


def test_tensorflow_wrapping_is_stripped_even_for_an_unrecorded_generator():
    # a generator that nothing recorded: the original message is read from TensorFlow's own
    import tensorflow as tf

    from tagi_jax.data import errors

    def generate():
        yield "fine"
        raise KeyError("no field 'inputs' in row 2")

    ds = tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec([], tf.string))
    rows = ds.as_numpy_iterator()
    next(rows)
    with pytest.raises(tf.errors.OpError) as info:
        next(rows)
    assert "Traceback" in info.value.message  # what a user saw before
    error = errors.from_pipeline(info.value, "task 'x'")
    assert str(error) == "task 'x': \"no field 'inputs' in row 2\""


def test_the_error_type_imports_without_tensorflow():
    code = (
        "import sys; from tagi_jax.data.errors import DataError; import tagi_jax.data.ni; "
        "assert issubclass(DataError, ValueError); "
        "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

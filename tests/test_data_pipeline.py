"""SeqIO registration, the feature converter, C4 splitting and global batches."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from seqio import test_utils

from tagi_jax.data import c4, feature_converter, tasks, vocab
from tagi_jax.parallel import mesh as mesh_lib

BYTES = vocab.get_vocabulary("byte")


def test_feature_converter_pads_shifts_and_passes_ids():
    ds = tf.data.Dataset.from_tensors(
        {
            "inputs": [7, 8, 5, 1],
            "hyper_inputs": [3, 1],
            "teacher_inputs": [9, 9, 7, 8, 5, 1],
            "targets": [3, 9, 1],
            "task_id": 4,
            "category_id": 2,
        }
    )
    conv = feature_converter.TagiFeatureConverter()
    lengths = conv.task_feature_lengths(
        {"inputs": 5, "hyper_inputs": 4, "teacher_inputs": 7, "targets": 5}
    )
    converted = conv(ds, lengths)
    test_utils.assert_dataset(
        converted,
        {
            "encoder_input_tokens": [7, 8, 5, 1, 0],
            "hyper_input_tokens": [3, 1, 0, 0],
            "teacher_input_tokens": [9, 9, 7, 8, 5, 1, 0],
            "decoder_target_tokens": [3, 9, 1, 0, 0],
            "decoder_input_tokens": [0, 3, 9, 1, 0],
            "decoder_loss_weights": [1, 1, 1, 0, 0],
            "task_id": 4,
            "category_id": 2,
        },
    )
    with pytest.raises(ValueError, match="pack"):
        feature_converter.TagiFeatureConverter(pack=True)


def test_registration_is_lazy_and_idempotent(tmp_path):
    missing = str(tmp_path / "not_there")
    first = tasks.register_tasks(vocabulary=BYTES, sni_dir=missing, prefix="lazy")
    again = tasks.register_tasks(vocabulary=BYTES, sni_dir=missing, prefix="lazy")
    assert first == again == tasks.Registered(("lazy_sni_def_pos2", "lazy_sni_def"))
    task = seqio.get_mixture_or_task("lazy_sni_def")
    with pytest.raises(Exception, match="not_there"):
        next(iter(task.get_dataset(None, split="train", shuffle=False)))


def test_sni_task_with_a_sentencepiece_vocabulary(shared_data_dir, sentencepiece_dir):
    from tagi_jax.data import ni

    spm = vocab.get_vocabulary("sentencepiece", sentencepiece_dir, extra_ids=0)
    data_dir = os.path.join(shared_data_dir, "sni")
    tasks.register_tasks(vocabulary=spm, sni_dir=data_dir, prefix="spm")
    conv = feature_converter.TagiFeatureConverter()
    lengths = conv.task_feature_lengths(
        {"inputs": 1024, "hyper_inputs": 1024, "teacher_inputs": 1024, "targets": 128}
    )
    ds = seqio.get_dataset(
        "spm_sni_def_pos2",
        task_feature_lengths=lengths,
        dataset_split="test",
        shuffle=False,
        feature_converter=conv,
    )
    first = next(ds.as_numpy_iterator())
    expected = next(ni.iter_examples(data_dir, "test", ni.NIConfig()))
    tokens = [int(t) for t in first["teacher_input_tokens"] if t > 1]
    assert spm.decode(tokens) == spm.decode(spm.encode(expected["teacher_inputs"]))
    assert first["decoder_target_tokens"][first["decoder_loss_weights"].sum() - 1] == 1  # EOS


def _write_docs(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def _c4_examples(files, seed, prefix):
    tasks.register_tasks(vocabulary=BYTES, c4_files=files, seed=seed, prefix=prefix)
    task = seqio.get_mixture_or_task(f"{prefix}_c4_pretrain")
    ds = task.get_dataset(
        {"hyper_inputs": 2048, "inputs": 2048, "targets": 2048}, split="train", shuffle=False
    )
    return {ex["text_pretokenized"].decode(): ex for ex in ds.as_numpy_iterator()}


def test_c4_split_is_deterministic_and_partitions_the_document(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
    docs = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(5, 60, 20)]
    docs.append("tiny")  # too short for three segments: dropped
    path = str(tmp_path / "docs.jsonl")
    _write_docs(path, docs)
    first = _c4_examples([path], seed=1, prefix="c4a")
    assert "tiny" not in first and len(first) == 20
    again = _c4_examples([path], seed=1, prefix="c4b")
    _write_docs(path, docs[::-1])  # another order: every document still splits the same way
    reordered = _c4_examples([path], seed=1, prefix="c4c")
    other_seed = _c4_examples([path], seed=2, prefix="c4d")
    splits_differ = 0
    for text, ex in first.items():
        parts = [ex[k][:-1] for k in ("hyper_inputs", "inputs", "targets")]  # drop EOS
        assert all(len(p) >= c4.DEFAULT_MIN_SEGMENT for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), BYTES.encode(text)[:1024])
        for other in (again[text], reordered[text]):
            for k in ("hyper_inputs", "inputs", "targets"):
                np.testing.assert_array_equal(other[k], ex[k])
        splits_differ += len(other_seed[text]["inputs"]) != len(ex["inputs"])
    assert splits_differ > 0


def test_c4_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(c4.read_documents([str(tmp_path / "missing.jsonl")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(c4.read_documents([str(bad)]))


def test_to_global_shards_the_batch_axis():
    from tagi_jax.training import inputs

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = mesh_lib.make_mesh((4, 2))
    batch = {"encoder_input_tokens": np.arange(8 * 6).reshape(8, 6), "task_id": np.arange(8)}
    out = inputs.to_global(batch, ("encoder_input_tokens", "task_id"), mesh)
    assert out["encoder_input_tokens"].shape == (8, 6)
    assert out["encoder_input_tokens"].addressable_shards[0].data.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(out["task_id"]), np.arange(8))


def test_p3_tasks_and_mixtures(tmp_path, shared_data_dir):
    from tagi_jax.data import p3

    root = os.path.join(shared_data_dir, "p3")
    out = str(tmp_path / "p3")
    p3.render_dataset(
        os.path.join(root, "raw", "super_glue_copa", "validation.jsonl"),
        os.path.join(root, "templates", "super_glue", "copa", "templates.yaml"),
        out,
        dataset_name="super_glue_copa",
        score_eval=True,
        max_examples=6,
    )
    p3.render_dataset(
        os.path.join(root, "raw", "rotten_tomatoes", "sample.jsonl"),
        os.path.join(root, "templates", "rotten_tomatoes", "templates.yaml"),
        out,
        split="train",
        dataset_name="rotten_tomatoes",
        fmt="tfrecord",
        max_examples=5,
    )
    registered = tasks.register_tasks(vocabulary=BYTES, p3_dir=out, prefix="p3t")
    assert set(registered.mixtures) == {"p3t_p3_t0_train", "p3t_p3_t0_eval_score"}
    train = seqio.get_mixture_or_task("p3t_p3_t0_train")
    assert all("rotten_tomatoes" in t.name for t in train.tasks)
    assert {r for r in (train.get_rate(t) for t in train.tasks)} == {5.0}
    score = seqio.get_mixture_or_task("p3t_p3_t0_eval_score")
    assert score.tasks and all(t.name.endswith("_score_eval") for t in score.tasks)
    ds = score.tasks[0].get_dataset(None, split="validation", shuffle=False)
    rows = list(ds.as_numpy_iterator())
    assert sum(r["is_correct"] for r in rows) == len({tuple(r["idx"])[0] for r in rows})
    first = rows[0]
    assert first["inputs"][-1] == 1 and np.array_equal(first["inputs"], first["hyper_inputs"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.register_tasks(vocabulary=BYTES, p3_dir=str(tmp_path / "none"), prefix="p3x")


def test_builtin_suite_through_seqio(tmp_path):
    from tagi_jax.data import synthetic

    summary = synthetic.write_suite(
        str(tmp_path / "suite"), instances_per_train_task=4, instances_per_test_task=2
    )
    tasks.register_tasks(vocabulary=BYTES, suite_dir=str(tmp_path / "suite"), prefix="st")
    conv = feature_converter.TagiFeatureConverter()
    lengths = conv.task_feature_lengths(
        {"inputs": 256, "hyper_inputs": 256, "teacher_inputs": 384, "targets": 40}
    )
    ds = seqio.get_dataset(
        "st_suite_def_pos2",
        task_feature_lengths=lengths,
        dataset_split="test",
        shuffle=False,
        feature_converter=conv,
    )
    batch = next(feature_converter.numpy_batches(ds, 4))
    assert batch["encoder_input_tokens"].shape == (4, 256)
    count = sum(1 for _ in ds.as_numpy_iterator())
    assert count == 2 * len(summary.test_tasks)
    assert {int(t) for t in batch["task_id"]} <= set(range(len(summary.test_tasks)))


# --- Tk-Instruct's source budget through the SeqIO task ----------------------------------

DEFINITION = "Answer the question about the story with one word"
LONG_DEMOS = [
    (
        "The family went to the beach in the morning and the children built a large castle "
        "of sand near the water while their parents read books. Where did the family go?",
        "beach",
    ),
    (
        "The old man walked his dog through the quiet park every evening after dinner, and "
        "on the way home they stopped at the small shop for bread. What did they buy?",
        "bread",
    ),
]
QUESTION = "The girl ate an apple at school. What did she eat?"


def _one_task_dir(root) -> tuple[str, dict]:
    """A natural-instructions directory of one task with short inputs and long demonstrations;
    returns it and the task."""
    task = {
        "Definition": [DEFINITION],
        "Categories": ["Question Answering"],
        "Positive Examples": [{"input": i, "output": o, "explanation": ""} for i, o in LONG_DEMOS],
        "Negative Examples": [],
        "Instances": [{"id": "q-0", "input": QUESTION, "output": ["apple"]}],
    }
    os.makedirs(os.path.join(root, "tasks"))
    os.makedirs(os.path.join(root, "splits"))
    with open(os.path.join(root, "tasks", "qa_story.json"), "w") as f:
        json.dump(task, f)
    for split in ("train", "test"):
        with open(os.path.join(root, "splits", f"{split}_tasks.txt"), "w") as f:
            f.write("qa_story\n")
    return str(root), task


def _first_example(vocabulary, data_dir, config, prefix, length):
    """The first test example of ``{prefix}_sni_def_pos2``, with every source stream ``length``
    tokens long: decoded ``teacher_inputs``, ``inputs``, ``hyper_inputs`` and the raw ids."""
    tasks.register_tasks(vocabulary=vocabulary, sni_dir=data_dir, sni_config=config, prefix=prefix)
    conv = feature_converter.TagiFeatureConverter()
    lengths = conv.task_feature_lengths(
        {"inputs": length, "hyper_inputs": length, "teacher_inputs": length, "targets": 16}
    )
    ds = seqio.get_dataset(
        f"{prefix}_sni_def_pos2",
        task_feature_lengths=lengths,
        dataset_split="test",
        shuffle=False,
        feature_converter=conv,
    )
    row = next(ds.as_numpy_iterator())

    def text(key):
        return vocabulary.decode([int(t) for t in row[key] if t > 1])

    return {
        "teacher_inputs": text("teacher_input_tokens"),
        "inputs": text("encoder_input_tokens"),
        "hyper_inputs": text("hyper_input_tokens"),
        "teacher_ids": [int(t) for t in row["teacher_input_tokens"] if t > 0],
    }


def test_budget_drops_demonstrations_not_the_input_through_seqio(tmp_path, sentencepiece_dir):
    """Def + 2 Pos longer than max_source_length: the SeqIO task keeps the Definition and the
    `Now complete the following example - Input: ... Output:` tail and loses the
    demonstrations; with a budget it fits, both demonstrations stay."""
    from tagi_jax.data import ni

    spm = vocab.get_vocabulary("sentencepiece", sentencepiece_dir, extra_ids=0)
    data_dir, task = _one_task_dir(tmp_path / "sni")
    full = ni.format_instance(task, task["Instances"][0])  # Def + 2 Pos, no budget
    bare = ni.format_instance(task, task["Instances"][0], num_pos_examples=0)

    def count(text):
        return len(spm.encode(text)) + 1  # EOS included, as the budget counts

    def canonical(text):  # what the tokenizer makes of a text (whitespace normalised)
        return spm.decode(spm.encode(text))

    tail = "Now complete the following example -\nInput: " + QUESTION + "\nOutput: "
    assert bare["teacher_inputs"].endswith(tail)
    budget = count(bare["teacher_inputs"]) + 4  # room for Definition + input, not a demo
    assert count(full["teacher_inputs"]) > budget + 20

    dropped = _first_example(spm, data_dir, ni.NIConfig(max_source_length=budget), "bud", budget)
    assert dropped["teacher_inputs"] == canonical(bare["teacher_inputs"])
    assert dropped["teacher_inputs"].endswith(canonical(tail).strip())
    assert "Positive Example" not in dropped["teacher_inputs"]
    assert dropped["hyper_inputs"] == canonical(bare["hyper_inputs"])  # the Definition alone
    assert dropped["inputs"] == canonical(bare["inputs"])
    assert len(dropped["teacher_ids"]) <= budget and dropped["teacher_ids"][-1] == 1  # EOS
    # Without the budget the same feature length trims the end: the input is what goes.
    trimmed = _first_example(spm, data_dir, ni.NIConfig(), "nobud", budget)
    assert "Positive Example 1" in trimmed["teacher_inputs"]
    assert not trimmed["teacher_inputs"].endswith(canonical(tail).strip())

    # With one demonstration kept, Tk-Instruct's check for the second (" ".join of one) is
    # the whole Def + 2 Pos source: a budget of exactly its length keeps both.
    roomy = count(full["teacher_inputs"])
    kept = _first_example(spm, data_dir, ni.NIConfig(max_source_length=roomy), "fits", roomy)
    assert kept["teacher_inputs"] == canonical(full["teacher_inputs"])
    assert kept["hyper_inputs"] == canonical(full["hyper_inputs"])
    assert canonical(" Positive Example 2 -").strip() in kept["teacher_inputs"]


def test_a_source_over_budget_without_demonstrations_is_cut_through_seqio(tmp_path):
    """Tk-Instruct cuts a source the demonstrations' removal did not save to the budget (token
    ids, decoded back): the ids the model gets are the first budget - 1 of it and EOS, even
    with a longer feature length."""
    from tagi_jax.data import ni

    data_dir, task = _one_task_dir(tmp_path / "sni")
    bare = ni.format_instance(task, task["Instances"][0], num_pos_examples=0)
    budget = 50
    assert len(BYTES.encode(bare["teacher_inputs"])) + 1 > budget
    config = ni.NIConfig(max_source_length=budget)
    cut = _first_example(BYTES, data_dir, config, "cut", budget + 30)
    assert cut["teacher_ids"] == list(BYTES.encode(bare["teacher_inputs"]))[: budget - 1] + [1]


def test_an_niconfig_contradicting_the_task_variant_fails_when_read(tmp_path):
    from tagi_jax.data import ni

    data_dir, _ = _one_task_dir(tmp_path / "sni")
    config = ni.NIConfig(num_pos_examples=0)
    # Definition only agrees with the _def variant ...
    tasks.register_tasks(vocabulary=BYTES, sni_dir=data_dir, sni_config=config, prefix="var")
    task = seqio.get_mixture_or_task("var_sni_def")
    example = next(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
    assert b"Positive Example" not in example["teacher_inputs_pretokenized"]
    # ... and contradicts _def_pos2: reading it is an error naming both, not an override.
    with pytest.raises(ValueError, match="num_pos_examples=0 contradicts task 'var_sni_def_pos2'"):
        seqio.get_mixture_or_task("var_sni_def_pos2").get_dataset(None, split="test")


def test_one_gin_niconfig_reaches_training_the_teacher_stage_and_evaluation(tmp_path, monkeypatch):
    """`NIConfig.<field>` in a run reaches the DataConfig the `train` and `lora_teachers` stages
    receive (and through it their batches and teacher groups) and the config `evaluate`
    formats with: one NIConfig, nothing rebuilt or dropped on the way."""
    from tagi_jax import configurables
    from tagi_jax import train as train_cli
    from tagi_jax.data import ni, pipeline, synthetic

    suite = str(tmp_path / "suite")
    synthetic.write_suite(suite, instances_per_train_task=4, instances_per_test_task=2)
    budget = 250  # the suite's Def + 2 Pos sources are 217-355 bytes
    bindings = [
        f"--gin.NIConfig.max_source_length={budget}",
        "--gin.NIConfig.max_train_instances_per_task=3",
    ]
    expected = ni.NIConfig(max_source_length=budget, max_train_instances_per_task=3)

    class Reached(Exception):
        pass

    seen = {}

    def capture(name, position=0):
        def stop(*args, **kwargs):
            seen[name] = args[position]
            raise Reached(name)

        return stop

    def run(call, run_file, *flags):
        flags = [f"--gin_file={run_file}", f"--gin.DATA_DIR='{suite}'", *bindings, *flags]
        with train_cli.configured(flags), pytest.raises(Reached):
            call()

    monkeypatch.setattr(pipeline, "check_paths", capture("data"))  # the stages' first data use
    run(configurables.run, "runs/tiny_cpu.gin", f"--gin.MODEL_DIR='{tmp_path / 'train'}'")
    train_data = seen.pop("data")
    run(
        configurables.run,
        "runs/tiny_cpu_lora_teachers.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'teachers'}'",
        f"--gin.BASE_CHECKPOINT='{tmp_path}'",
    )
    teacher_data = seen.pop("data")
    # Evaluation formats with the export's NIConfig (what the student trained with) and the
    # run file's bindings on top: an export whose student read the input alone.
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "tagi_config.json").write_text("{}")  # read_data needs a complete export
    trained = dataclasses.asdict(ni.NIConfig(student_input="input_only", num_pos_examples=0))
    (export_dir / "data.json").write_text(json.dumps({"ni": trained}))
    (export_dir / "vocabulary.json").write_text(json.dumps({"kind": "byte"}))
    monkeypatch.setattr(ni, "iter_examples", capture("evaluate", 2))  # (dir, split, config)
    run(
        configurables.evaluate,
        "runs/evaluate_suite.gin",
        f"--gin.EXPORT_DIR='{export_dir}'",
        f"--gin.OUTPUT_DIR='{tmp_path / 'eval'}'",
    )
    monkeypatch.undo()
    assert train_data.ni == teacher_data.ni == expected
    assert seen["evaluate"] == dataclasses.replace(
        expected, student_input="input_only", num_pos_examples=0
    )

    # ... and it is what their data is made with: Tk-Instruct's budget on every teacher source
    # (the feature length, 320, would let longer ones through), 3 instances per task.
    batch = next(pipeline.train_batches(train_data, 16, seed=0, skip=0, with_teacher=True))
    assert (batch["teacher_input_tokens"] > 0).sum(axis=1).max() <= budget
    unbudgeted = dataclasses.replace(train_data, ni=ni.NIConfig())
    batch = next(pipeline.train_batches(unbudgeted, 16, seed=0, skip=0, with_teacher=True))
    assert (batch["teacher_input_tokens"] > 0).sum(axis=1).max() > budget
    groups = pipeline.group_examples(teacher_data, "task", BYTES)
    for sources, targets in groups.values():
        assert len(sources) == len(targets) == 3
        assert (sources > 0).sum(axis=1).max() <= budget

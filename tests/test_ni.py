"""Super-Natural Instructions: formatting (golden strings), reading, truncation, bad input."""

import json
import os
import shutil

import pytest

from tagi_jax.data import ni

TASK = {
    "Definition": ["Answer the question"],
    "Categories": ["Question Answering"],
    "Positive Examples": [
        {"input": "What is 2+2", "output": "4", "explanation": "Sum"},
        {"input": "Capital of France?", "output": "Paris", "explanation": "Geography."},
        {"input": "Third", "output": "3", "explanation": "never used"},
    ],
    "Negative Examples": [{"input": "Color of sky", "output": "green", "explanation": "Wrong"}],
    "Instances": [
        {"id": "t-0", "input": "  Who wrote Hamlet ", "output": ["Shakespeare", "W. S."]}
    ],
}


def test_golden_definition_and_two_positive_examples():
    ex = ni.format_instance(TASK, TASK["Instances"][0])
    definition = "Definition: Answer the question.\n\n"
    pos1 = " Positive Example 1 -\nInput: What is 2+2.\n Output: 4.\n\n"
    pos2 = " Positive Example 2 -\nInput: Capital of France?\n Output: Paris.\n\n"
    task_input = "Now complete the following example -\nInput: Who wrote Hamlet.\nOutput: "
    assert ex["teacher_inputs"] == definition + pos1 + pos2 + task_input
    assert ex["hyper_inputs"] == definition + pos1 + pos2
    assert ex["inputs"] == definition + task_input
    assert ex["references"] == ["Shakespeare", "W. S."]


def test_golden_variants():
    inst = TASK["Instances"][0]
    task_input = "Now complete the following example -\nInput: Who wrote Hamlet.\nOutput: "
    ex = ni.format_instance(
        TASK,
        inst,
        task_name="task007",
        num_pos_examples=1,
        num_neg_examples=1,
        add_explanation=True,
        student_input="teacher_source",
    )
    expected = (
        "task007. Definition: Answer the question.\n\n"
        " Positive Example 1 -\nInput: What is 2+2.\n Output: 4.\n Explanation: Sum.\n\n"
        " Negative Example 1 -\nInput: Color of sky.\n Output: green.\n Explanation: Wrong.\n\n"
        + task_input
    )
    assert ex["teacher_inputs"] == expected
    assert ex["inputs"] == expected
    bare = ni.format_instance(
        TASK, inst, num_pos_examples=0, add_definition=False, student_input="input_only"
    )
    assert (
        bare["teacher_inputs"] == task_input
        and bare["hyper_inputs"] == ""
        and bare["inputs"] == task_input
    )


def test_golden_real_task(shared_data_dir):
    path = os.path.join(
        shared_data_dir, "sni", "tasks", "task1393_superglue_copa_text_completion.json"
    )
    with open(path, encoding="utf-8") as f:
        task = json.load(f)
    ex = ni.format_instance(task, task["Instances"][0])
    definition = task["Definition"][0]
    assert definition.endswith('"B".')  # ends in punctuation: no "." added
    expected = (
        f"Definition: {definition}\n\n"
        " Positive Example 1 -\nInput: The animal species became endangered. (A) Their habitat was "
        "destroyed. (B) Their predators went extinct., Question: cause.\n Output: A.\n\n"
        " Positive Example 2 -\nInput: The bar closed. (A) It was crowded. (B) It was 3 AM., "
        "Question: cause.\n Output: B.\n\n"
        "Now complete the following example -\nInput: The man fell unconscious. (A) The assailant "
        "struck the man in the head. (B) The assailant took the man's wallet., Question: cause.\n"
        "Output: "
    )
    assert ex["teacher_inputs"] == expected
    assert ex["references"] == ["A"]


def test_truncation_rule_with_a_real_tokenizer(sentencepiece_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(sentencepiece_dir, "spiece.model"))

    def count(text):  # like the model's tokenizer: EOS included
        return len(sp.encode(text)) + 1

    inst = TASK["Instances"][0]
    full = ni.format_instance(TASK, inst)
    definition = "Definition: Answer the question.\n\n"
    pos1 = " Positive Example 1 -\nInput: What is 2+2.\n Output: 4.\n\n"
    pos2 = " Positive Example 2 -\nInput: Capital of France?\n Output: Paris.\n\n"
    task_input = "Now complete the following example -\nInput: Who wrote Hamlet.\nOutput: "
    one_fits = count(definition + pos1 + task_input)
    two_fit = count(definition + " ".join([pos1]) + pos2 + task_input)  # Tk-Instruct's " ".join
    assert two_fit > one_fits
    kw = dict(count_tokens=count)
    assert (
        ni.format_instance(TASK, inst, max_source_length=two_fit, **kw)["teacher_inputs"]
        == full["teacher_inputs"]
    )
    kept_one = ni.format_instance(TASK, inst, max_source_length=two_fit - 1, **kw)
    assert kept_one["teacher_inputs"] == definition + pos1 + task_input
    kept_one = ni.format_instance(TASK, inst, max_source_length=one_fits, **kw)
    assert kept_one["hyper_inputs"] == definition + pos1
    none = ni.format_instance(TASK, inst, max_source_length=one_fits - 1, **kw)
    assert none["teacher_inputs"] == definition + task_input


def test_every_shared_task_parses_and_formats(shared_data_dir):
    data_dir = os.path.join(shared_data_dir, "sni")
    for split, count in (("train", 24), ("test", 12)):
        tasks = ni.load_split(data_dir, split, ni.NIConfig())
        assert len(tasks) == count
        for _, task in tasks:
            for instance in task["Instances"]:
                for pos in (0, 2):
                    ex = ni.format_instance(task, instance, num_pos_examples=pos)
                    assert ex["teacher_inputs"].startswith("Definition: ")
                    assert ex["teacher_inputs"].endswith("\nOutput: ")
                    assert ex["references"]


def test_iter_examples_splits_and_determinism(shared_data_dir):
    data_dir = os.path.join(shared_data_dir, "sni")
    config = ni.NIConfig(max_train_instances_per_task=10)
    test = list(ni.iter_examples(data_dir, "test", config))
    assert len(test) == 12 * 64  # the sample keeps 64 of the 100 official instances
    assert all(ex["targets"] == ex["references"][0] for ex in test)
    first = list(ni.iter_examples(data_dir, "train", config, seed=3))
    again = list(ni.iter_examples(data_dir, "train", config, seed=3))
    other = list(ni.iter_examples(data_dir, "train", config, seed=4))
    assert len(first) == 24 * 10
    assert first == again
    assert [e["instance_id"] for e in first] != [e["instance_id"] for e in other]
    assert all(ex["targets"] in ex["references"] for ex in first)
    ids = {(ex["task_name"], ex["task_id"]) for ex in first}
    assert len(ids) == 24 and len({i for _, i in ids}) == 24
    assert {ex["category_id"] for ex in first} == set(range(len({ex["category"] for ex in first})))


# --- bad input ---------------------------------------------------------------------------


@pytest.fixture
def sample(tmp_path, shared_data_dir):
    src = os.path.join(shared_data_dir, "sni")
    shutil.copytree(os.path.join(src, "tasks"), tmp_path / "tasks")
    (tmp_path / "splits" / "default").mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(
            os.path.join(src, "splits", f"{split}_tasks.txt"), tmp_path / "splits" / "default"
        )
    return tmp_path


def _first_train_task(sample):
    name = (sample / "splits" / "default" / "train_tasks.txt").read_text().split()[0]
    return name, sample / "tasks" / f"{name}.json"


@pytest.mark.parametrize(
    "corruption,message",
    [
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_bytes(b'{"Definition": ["caf\xe9"]}'), "not UTF-8"),
        (
            lambda p: p.write_text(json.dumps({"Instances": [{"input": "x", "output": ["y"]}]})),
            "no Definition",
        ),
        (
            lambda p: p.write_text(json.dumps({"Definition": ["d"], "Instances": []})),
            "no Instances",
        ),
        (
            lambda p: p.write_text(
                json.dumps(
                    {"Definition": ["d"], "Instances": [{"id": "i-7", "input": "x", "output": []}]}
                )
            ),
            "instance i-7",
        ),
        (lambda p: p.unlink(), "task file missing"),
    ],
)
def test_bad_task_files_are_named(sample, corruption, message):
    name, path = _first_train_task(sample)
    corruption(path)
    with pytest.raises(ni.NIDataError, match=message) as info:
        ni.load_split(str(sample), "train", ni.NIConfig())
    assert name in str(info.value)


def test_skip_mode_warns_with_counts(sample, caplog):
    _, path = _first_train_task(sample)
    path.write_text("{not json")
    tasks = ni.load_split(str(sample), "train", ni.NIConfig(on_error="skip"))
    assert len(tasks) == 23
    assert "skipped 1 unusable SNI task files" in caplog.text


def test_missing_split_file(tmp_path):
    with pytest.raises(ni.NIDataError, match="no split file"):
        ni.read_split(str(tmp_path), "train")


# --- one NIConfig: task variants, the source budget --------------------------------------


def test_niconfig_rejects_impossible_values():
    for field, value in (
        ("max_source_length", 1),
        ("num_pos_examples", -1),
        ("eval_instances_per_task", 0),
    ):
        with pytest.raises(ValueError, match=f"NIConfig.{field}"):
            ni.NIConfig(**{field: value})
    assert ni.NIConfig().pos_examples == 2  # unset: Tk-Instruct's Def + 2 Pos
    assert ni.NIConfig(num_pos_examples=0).pos_examples == 0


def test_the_task_variant_picks_the_demonstrations_and_a_contradiction_is_an_error():
    assert ni.for_task(ni.NIConfig(), "tagi_sni_def").num_pos_examples == 0
    assert ni.for_task(ni.NIConfig(), "tagi_suite_def_pos2").num_pos_examples == 2
    agreeing = ni.NIConfig(num_pos_examples=0, max_source_length=64)
    assert ni.for_task(agreeing, "tagi_sni_def") == agreeing  # everything else is kept
    with pytest.raises(ValueError, match=r"num_pos_examples=2 contradicts task 'tagi_sni_def'"):
        ni.for_task(ni.NIConfig(num_pos_examples=2), "tagi_sni_def")
    with pytest.raises(ValueError, match="not a natural-instructions task"):
        ni.for_task(ni.NIConfig(), "tagi_p3_t0_train")


def test_a_budget_without_a_vocabulary_is_an_error(shared_data_dir):
    examples = ni.iter_examples(
        os.path.join(shared_data_dir, "sni"), "test", ni.NIConfig(max_source_length=1024)
    )
    with pytest.raises(ValueError, match="needs the vocabulary"):
        next(examples)


class _Bytes:
    """UTF-8 bytes as ids, like seqio.ByteVocabulary without the offset."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="ignore")


def test_a_source_still_over_budget_is_cut_to_it():
    """Tk-Instruct: with the demonstrations gone, a source still longer than the budget is
    tokenized, cut and decoded back; the text then holds budget - 1 ids (+ EOS = budget)."""
    inst = TASK["Instances"][0]
    definition = "Definition: Answer the question.\n\n"
    task_input = "Now complete the following example -\nInput: Who wrote Hamlet.\nOutput: "
    budget = 40
    assert len(definition + task_input) + 1 > budget
    count, cut = ni.token_budget(_Bytes(), budget)
    ex = ni.format_instance(
        TASK, inst, max_source_length=budget, count_tokens=count, cut_source=cut
    )
    assert ex["teacher_inputs"] == (definition + task_input)[: budget - 1]
    assert count(ex["teacher_inputs"]) == budget
    assert ex["inputs"] == ex["teacher_inputs"]  # definition + input: the same text, cut alike
    assert ex["hyper_inputs"] == definition  # no demonstration fits; the instruction is not cut
    roomy = ni.format_instance(
        TASK, inst, max_source_length=1000, count_tokens=count, cut_source=cut
    )
    assert roomy == ni.format_instance(TASK, inst)  # a source that fits is left alone

"""The built-in instruction suite: determinism, schema, rules (re-implemented here from the
Definition text alone), split hygiene, overwrite safety and sizes."""

from __future__ import annotations

import json
import os
import re

import pytest

from tagi_jax.data import ni, synthetic

REQUIRED_KEYS = [
    "Contributors",
    "Source",
    "URL",
    "Categories",
    "Reasoning",
    "Definition",
    "Input_language",
    "Output_language",
    "Instruction_language",
    "Domains",
    "Positive Examples",
    "Negative Examples",
    "Instances",
    "Instance License",
]


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _split(root: str, split: str) -> list[str]:
    with open(os.path.join(root, "splits", "default", f"{split}_tasks.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def _tasks(root: str, names: list[str]) -> dict[str, dict]:
    tasks = {}
    for name in names:
        with open(os.path.join(root, "tasks", f"{name}.json"), encoding="utf-8") as f:
            tasks[name] = json.load(f)
    return tasks


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("suite"))
    summary = synthetic.write_suite(root, seed=0)
    train = _tasks(root, _split(root, "train"))
    test = _tasks(root, _split(root, "test"))
    return root, summary, train, test


# --- independent rules: parameters come from the Definition text, not from the module --------


def _replace(definition: str, text: str) -> str | None:
    m = re.fullmatch(
        r"Replace every letter '(.)' in the input with the letter '(.)' .*", definition
    )
    if not m:
        return None
    old, new = m.groups()
    return "".join(new if ch == old else ch for ch in text)


def _delete(definition: str, text: str) -> str | None:
    m = re.fullmatch(r"Delete every letter '(.)' from the input .*", definition)
    return None if not m else "".join(ch for ch in text if ch != m.group(1))


def _count(definition: str, text: str) -> str | None:
    m = re.fullmatch(r"Count how many times the letter '(.)' appears in the input .*", definition)
    return None if not m else str(sum(ch == m.group(1) for ch in text))


def _reverse(definition: str, text: str) -> str | None:
    m = re.fullmatch(
        r"Reverse the order of the words in the input and join them with "
        r"(?:single spaces|the character '(.)' and no spaces)\.",
        definition,
    )
    if not m:
        return None
    words = text.split(" ")
    reversed_words = [words[len(words) - 1 - i] for i in range(len(words))]
    return (m.group(1) or " ").join(reversed_words)


def _select(definition: str, text: str) -> str | None:
    m = re.fullmatch(
        r"Output only the (\w+) word of the input( counting from the end)?\.", definition
    )
    if not m:
        return None
    k = ["first", "second", "third", "fourth", "fifth"].index(m.group(1))
    words = text.split(" ")
    return words[len(words) - 1 - k] if m.group(2) else words[k]


def _wrap(definition: str, text: str) -> str | None:
    m = re.fullmatch(r"Put the input into the template '(.*)\{input\}(.*)': .*", definition)
    return None if not m else m.group(1) + text + m.group(2)


def _substring(definition: str, text: str) -> str | None:
    m = re.fullmatch(
        r"Output only the (first|last) (?:letter|(\w+) letters) of the input word\.", definition
    )
    if not m:
        return None
    k = ["one", "two", "three", "four", "five"].index(m.group(2) or "one") + 1
    return text[:k] if m.group(1) == "first" else text[len(text) - k :]


INDEPENDENT_RULES = {
    "Letter Replacement": _replace,
    "Letter Deletion": _delete,
    "Letter Counting": _count,
    "Word Reversal": _reverse,
    "Word Selection": _select,
    "Template Wrapping": _wrap,
    "Substring Extraction": _substring,
}


# --- tests ------------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path, suite):
    root, *_ = suite
    again = str(tmp_path / "again")
    synthetic.write_suite(again, seed=0)
    first, second = _files(root), _files(again)
    assert sorted(first) == sorted(second)
    assert all(first[p] == second[p] for p in first)

    other = str(tmp_path / "other")
    synthetic.write_suite(other, seed=1)
    third = _files(other)
    assert sorted(third) == sorted(first)  # same tasks, same layout ...
    changed = [p for p in first if p.startswith("tasks") and first[p] != third[p]]
    assert len(changed) == len([p for p in first if p.startswith("tasks")])  # ... new instances


def test_default_size(suite):
    _, summary, train, test = suite
    assert 30 <= len(train) <= 60 and 10 <= len(test) <= 20
    assert summary.train_tasks == tuple(train) and summary.test_tasks == tuple(test)
    assert summary.train_instances == 64 * len(train)
    assert summary.test_instances == 32 * len(test)
    assert len(summary.categories) >= 6


def test_schema_and_format(suite):
    root, _, train, test = suite
    for name, task in {**train, **test}.items():
        with open(os.path.join(root, "tasks", f"{name}.json"), encoding="utf-8") as f:
            raw = f.read()
        assert raw == json.dumps(task, indent=4, ensure_ascii=False)  # upstream formatting
        assert list(task) == REQUIRED_KEYS
        assert all(isinstance(task[k], list) for k in REQUIRED_KEYS)
        definition = task["Definition"]
        assert len(definition) == 1 and isinstance(definition[0], str) and definition[0].strip()
        assert len(task["Categories"]) == 1
        assert len(task["Positive Examples"]) == 2 and len(task["Negative Examples"]) == 1
        for example in task["Positive Examples"] + task["Negative Examples"]:
            assert set(example) == {"input", "output", "explanation"}
            assert all(isinstance(v, str) and v for v in example.values())
        assert task["Instances"]
        for i, instance in enumerate(task["Instances"]):
            assert instance["id"] == f"{name}-{i}"
            assert isinstance(instance["output"], list) and len(instance["output"]) == 1
            assert isinstance(instance["output"][0], str) and instance["output"][0]


def test_outputs_follow_the_definition(suite):
    _, _, train, test = suite
    checked = set()
    for name, task in {**train, **test}.items():
        category = task["Categories"][0]
        rule = INDEPENDENT_RULES.get(category)
        if rule is None:
            continue
        definition = task["Definition"][0]
        assert rule(definition, "one two three four five") is not None, (
            f"{name}: Definition not understood"
        )
        for example in task["Positive Examples"]:
            assert example["output"] == rule(definition, example["input"]), name
        negative = task["Negative Examples"][0]
        assert negative["output"] != rule(definition, negative["input"]), name
        for instance in task["Instances"]:
            assert instance["output"] == [rule(definition, instance["input"])], instance["id"]
            assert instance["output"][0] != instance["input"], instance["id"]
        checked.add(category)
    assert checked == set(INDEPENDENT_RULES)


def test_letter_counts_are_single_digits_and_varied(suite):
    _, _, train, test = suite
    for name, task in {**train, **test}.items():
        if task["Categories"] == ["Letter Counting"]:
            answers = {instance["output"][0] for instance in task["Instances"]}
            assert all(len(a) == 1 and a.isdigit() for a in answers), name
            assert len(answers) >= 3, name  # not one dominant answer


def test_split_hygiene(suite):
    _, _, train, test = suite
    assert not set(train) & set(test)
    train_definitions = {task["Definition"][0] for task in train.values()}
    assert not {task["Definition"][0] for task in test.values()} & train_definitions
    assert len(train_definitions) == len(train)  # every train task has its own instruction
    families = {task["Categories"][0] for task in train.values()}
    assert families == {task["Categories"][0] for task in test.values()}
    assert len(families) >= 6


def test_test_instructions_recombine_parts_seen_in_training(suite):
    # Held-out tasks are new combinations: no test Definition uses a word or a quoted symbol
    # that no train Definition uses (what test accuracy measures is binding, not new symbols).
    _, _, train, test = suite

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z]+", text.lower()))

    def quoted_chars(text: str) -> set[str]:
        return set("".join(re.findall(r"'([^']*)'", text)))

    train_words = set().union(*(words(t["Definition"][0]) for t in train.values()))
    train_chars = set().union(*(quoted_chars(t["Definition"][0]) for t in train.values()))
    for name, task in test.items():
        assert words(task["Definition"][0]) <= train_words, name
        assert quoted_chars(task["Definition"][0]) <= train_chars, name


def test_inputs_and_outputs_are_short_ascii(suite):
    _, _, train, test = suite
    for name, task in {**train, **test}.items():
        pairs = [(e["input"], e["output"]) for e in task["Positive Examples"]]
        pairs += [(e["input"], e["output"]) for e in task["Negative Examples"]]
        pairs += [(i["input"], o) for i in task["Instances"] for o in i["output"]]
        for text, output in pairs:
            assert text.isascii() and output.isascii(), name
            assert len(text.encode()) <= 40 and len(output.encode()) <= 32, (name, text, output)
            assert text == text.strip() and output == output.strip(), name


def test_instance_counts_are_configurable_and_prefix_stable():
    train, test = synthetic.generate_tasks(3, instances_per_train_task=5, instances_per_test_task=2)
    full_train, full_test = synthetic.generate_tasks(3)
    assert all(len(task["Instances"]) == 5 for _, task in train)
    assert all(len(task["Instances"]) == 2 for _, task in test)
    assert train[0][1]["Instances"] == full_train[0][1]["Instances"][:5]
    assert [n for n, _ in test] == [n for n, _ in full_test]
    with pytest.raises(ValueError):
        synthetic.generate_tasks(0, instances_per_train_task=0)


def test_the_ni_reader_reads_what_generate_tasks_makes(suite):
    root, *_ = suite
    train, test = synthetic.generate_tasks(0)
    config = ni.NIConfig()
    assert ni.load_split(root, "train", config) == train
    assert ni.load_split(root, "test", config) == test


def test_same_parameters_return_the_existing_suite_without_rewriting(tmp_path):
    root = str(tmp_path / "s")
    first = synthetic.write_suite(
        root, seed=2, instances_per_train_task=4, instances_per_test_task=3
    )
    stamps = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in _files(root)}
    again = synthetic.write_suite(
        root, seed=2, instances_per_train_task=4, instances_per_test_task=3
    )
    assert again == first
    assert {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in _files(root)} == stamps


def test_refuses_to_replace_another_suite_unless_asked(tmp_path):
    root = str(tmp_path / "s")
    synthetic.write_suite(root, seed=0, instances_per_train_task=4, instances_per_test_task=3)
    (tmp_path / "s" / "notes.txt").write_text("keep me")
    before = _files(root)
    for kwargs in ({"seed": 1}, {"seed": 0, "instances_per_train_task": 5}):
        with pytest.raises(FileExistsError, match="overwrite=True"):
            synthetic.write_suite(root, **{"instances_per_test_task": 3, **kwargs})
    assert _files(root) == before

    # Bad arguments fail before anything is deleted.
    with pytest.raises(ValueError):
        synthetic.write_suite(root, seed=1, instances_per_train_task=0, overwrite=True)
    assert _files(root) == before

    synthetic.write_suite(
        root, seed=1, instances_per_train_task=4, instances_per_test_task=3, overwrite=True
    )
    fresh = str(tmp_path / "fresh")
    synthetic.write_suite(fresh, seed=1, instances_per_train_task=4, instances_per_test_task=3)
    after = _files(root)
    assert after.pop("notes.txt") == b"keep me"  # only the suite's own paths are replaced
    assert after == _files(fresh)


def test_refuses_foreign_data_and_an_incomplete_suite(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "tasks").mkdir(parents=True)
    (foreign / "tasks" / "task001_real.json").write_text("{}")
    with pytest.raises(FileExistsError, match="existing data"):
        synthetic.write_suite(str(foreign))
    assert (foreign / "tasks" / "task001_real.json").read_text() == "{}"

    root = tmp_path / "s"
    summary = synthetic.write_suite(
        str(root), instances_per_train_task=2, instances_per_test_task=2
    )
    (root / "tasks" / f"{summary.test_tasks[0]}.json").unlink()
    with pytest.raises(FileExistsError, match="lacks 1 task files"):
        synthetic.write_suite(str(root), instances_per_train_task=2, instances_per_test_task=2)


def test_an_empty_directory_is_written_into(tmp_path):
    summary = synthetic.write_suite(
        str(tmp_path), instances_per_train_task=2, instances_per_test_task=2
    )
    assert _split(str(tmp_path), "test") == list(summary.test_tasks)

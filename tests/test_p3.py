"""P3 rebuilt from the shared raw records and promptsource templates (tagi_jax.data.p3)."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections import Counter, defaultdict

import pytest

from tagi_jax.data import p3

SHARED = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "p3")
)
pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHARED), reason=f"shared P3 data not found at {SHARED}"
)

COPA_TEMPLATES = "templates/super_glue/copa/templates.yaml"
COPA_RAW = "raw/super_glue_copa/validation.jsonl"
RTE_RAW = "raw/super_glue_rte/validation.jsonl"
# The four COPA templates written for one question type (README "Check done").
COPA_ONE_SIDED = {
    "…What could happen next, C1 or C2?": "effect",
    "…As a result, C1 or C2?": "effect",
    "…which may be caused by": "cause",
    "…why? C1 or C2": "cause",
}


def shared(relative: str) -> str:
    return os.path.join(SHARED, relative)


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    with open(shared("manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def template_by_id(relative_yaml: str, template_id: str) -> p3.Template:
    (template,) = [t for t in p3.load_templates(shared(relative_yaml)) if t.id == template_id]
    return template


def first_record(relative_jsonl: str, **where) -> tuple[int, dict]:
    for index, record in enumerate(p3.read_jsonl(shared(relative_jsonl))):
        if all(record[k] == v for k, v in where.items()):
            return index, record
    raise AssertionError(f"no record with {where} in {relative_jsonl}")


# ---------------------------------------------------------------------------------------------
# Every shared template on every record


def test_every_template_renders_on_every_record(manifest):
    renders: Counter[str] = Counter()
    empty: dict[tuple[str, str], int] = defaultdict(int)
    for entry in manifest:
        records = list(p3.read_jsonl(shared(entry["file"])))
        assert len(records) == entry["n"], entry["file"]
        templates = p3.load_templates(shared(entry["templates"]))
        assert {t.dataset for t in templates} == {entry["promptsource_dataset"]}
        assert {t.subset for t in templates} == {entry["promptsource_subset"]}
        for template in templates:
            rng = random.Random(0)
            for index, record in enumerate(records):
                out = p3.render(template, record, rng=rng, index=index)
                renders[entry["name"]] += 1
                if out is None:
                    empty[entry["name"], template.name] += 1
                    assert COPA_ONE_SIDED.get(template.name) not in (None, record["question"])
                    continue
                assert out["inputs_pretokenized"] and out["targets_pretokenized"]
                if template.answer_choices is None:
                    assert out["answer_choices"] == [] and out["target_index"] == -1
                else:
                    choices, target = out["answer_choices"], out["targets_pretokenized"]
                    assert target in choices, (entry["name"], template.name, index)
                    assert choices[out["target_index"]] == target
    # README: only the four one-sided COPA templates render empty, 200 of 1,200 COPA renders.
    assert {name for _, name in empty} == set(COPA_ONE_SIDED)
    assert {dataset for dataset, _ in empty} == {"super_glue_copa"}
    assert renders["super_glue_copa"] == 1200
    assert sum(empty.values()) == 200


# ---------------------------------------------------------------------------------------------
# Golden strings, checked by hand against the template source and the record


def test_golden_copa_exercise():
    template = template_by_id(COPA_TEMPLATES, "0edd8660-f299-4819-a5ac-633c11177228")
    assert template.name == "exercise" and template.original_task is True
    assert template.metrics == ("Accuracy",) and template.choices_in_prompt is True
    _, record = first_record(COPA_RAW, idx=0)
    assert p3.render(template, record) == {
        # "{{ premise }} {% if ... %} because... {% else %} so... {% endif %}\n" keeps both spaces
        "inputs_pretokenized": "Exercise: choose the most plausible alternative.\n\n"
        "The man turned on the faucet.  so... \n"
        "- The toilet filled with water.\n"
        "- Water flowed from the spout.",
        "targets_pretokenized": "Water flowed from the spout.",
        "answer_choices": ["The toilet filled with water.", "Water flowed from the spout."],
        "target_index": 1,
    }


def test_golden_rte_mnli_crowdsource():
    template = template_by_id(
        "templates/super_glue/rte/templates.yaml", "2b52a83c-0021-41fe-b44c-5aaa076d71a2"
    )
    _, record = first_record(RTE_RAW, idx=0)
    assert p3.render(template, record) == {
        "inputs_pretokenized": "Dana Reeve, the widow of the actor Christopher Reeve, has died of "
        "lung cancer at age 44, according to the Christopher Reeve Foundation. Using only the "
        'above description and what you know about the world, is "Christopher Reeve had an '
        'accident." definitely correct? Yes or no?',
        "targets_pretokenized": "No",
        "answer_choices": ["Yes", "No"],
        "target_index": 1,
    }


def test_golden_winogrande_does_underscore_refer_to():
    template = template_by_id(
        "templates/winogrande/winogrande_xl/templates.yaml",
        "0f23f058-5b4d-42a3-92d4-5d60688aa90c",
    )
    _, record = first_record("raw/winogrande_xl/validation.jsonl")
    assert p3.render(template, record) == {
        # the template has two spaces in "or  {{ option2 }}"
        "inputs_pretokenized": "Sarah was a much better surgeon than Maria so _ always got the "
        "easier cases. In the previous sentence, does _ refer to Sarah or  Maria?",
        "targets_pretokenized": "Maria",
        "answer_choices": ["Sarah", "Maria"],
        "target_index": 1,
    }


def test_long_fields_truncated_like_promptsource():
    """promptsource truncates each substituted value to 2048 characters (Jinja ``truncate``:
    kept if within 5 of the limit, else cut at a word boundary before 2045 and ``...``)."""
    template = template_by_id(
        "templates/dream/templates.yaml", "8f962580-1611-4982-b567-05939c5012ff"
    )
    records = list(p3.read_jsonl(shared("raw/dream/validation.jsonl")))
    record = next(r for r in records if len("\n\n".join(r["dialogue"])) > 2053)
    dialogue = "\n\n".join(record["dialogue"])
    choices = record["choice"]
    out = p3.render(template, record)
    assert out["inputs_pretokenized"] == (
        f"Dialogue:\n\n{dialogue[:2045].rsplit(' ', 1)[0]}...\n\nQuestion: {record['question']} "
        f"\n\n- {choices[0]}\n\n- {choices[1]}\n\n- {choices[2]}"
    )
    assert out["targets_pretokenized"] == record["answer"]


def test_choice_filter_draws_from_the_given_rng():
    """HellaSwag's "Appropriate continuation" picks an ending with ``| choice``."""
    (template,) = [
        t
        for t in p3.load_templates(shared("templates/hellaswag/templates.yaml"))
        if t.name == "Appropriate continuation - Yes or No"
    ]
    record = {
        "ctx_a": "A man stands on a ladder.",
        "ctx_b": "he",
        "endings": ["paints the wall.", "eats a cake.", "flies away.", "sings loudly."],
        "label": "0",
    }
    outputs = [p3.render(template, record, rng=random.Random(seed)) for seed in range(20)]
    assert p3.render(template, record) == outputs[0]  # rng=None is random.Random(0)
    assert p3.render(template, record, rng=random.Random(0)) == outputs[0]
    prompts = {out["inputs_pretokenized"] for out in outputs}
    assert len(prompts) == 4  # all four endings get drawn
    for out in outputs:
        chose_gold = "he paints the wall." in out["inputs_pretokenized"]
        assert out["targets_pretokenized"] == ("Yes" if chose_gold else "No")


def test_pipes_in_records_do_not_split():
    template = template_by_id(
        "templates/super_glue/rte/templates.yaml", "2b52a83c-0021-41fe-b44c-5aaa076d71a2"
    )
    record = {"premise": "a ||| b", "hypothesis": "c", "label": 0, "idx": 0}
    out = p3.render(template, record)
    assert out["inputs_pretokenized"].startswith("a ||| b Using only")
    assert out["targets_pretokenized"] == "Yes"


# ---------------------------------------------------------------------------------------------
# Writing and reading the P3 layout


@pytest.mark.parametrize("score_eval", [False, True], ids=["train", "score_eval"])
def test_render_dataset_jsonl_and_tfrecord_agree(tmp_path, score_eval):
    kwargs = dict(dataset_name="super_glue_copa", score_eval=score_eval)
    by_fmt = {}
    for fmt in ("jsonl", "tfrecord"):
        out = tmp_path / fmt
        counts = p3.render_dataset(shared(COPA_RAW), shared(COPA_TEMPLATES), out, fmt=fmt, **kwargs)
        read = p3.read_jsonl if fmt == "jsonl" else p3.read_tfrecord
        by_fmt[fmt] = {task: list(read(out / task / f"validation.{fmt}")) for task in counts}
        assert {task: len(rows) for task, rows in by_fmt[fmt].items()} == counts
        assert sorted(os.listdir(out)) == sorted(counts)
    assert by_fmt["jsonl"] == by_fmt["tfrecord"]

    suffix = "_score_eval" if score_eval else ""
    tasks = by_fmt["jsonl"]
    assert len(tasks) == 12
    assert "super_glue_copa_exercise" + suffix in tasks
    one_sided = tasks["super_glue_copa__What_could_happen_next_C1_or_C2_" + suffix]
    # 48 effect questions; score_eval has one row per choice (2)
    assert len(one_sided) == (96 if score_eval else 48)
    assert len(tasks["super_glue_copa_exercise" + suffix]) == (200 if score_eval else 100)

    row = tasks["super_glue_copa_exercise" + suffix][0]
    if score_eval:
        assert row == {
            "idx": [0, 0],
            "inputs_pretokenized": "Exercise: choose the most plausible alternative.\n\n"
            "The man turned on the faucet.  so... \n"
            "- The toilet filled with water.\n"
            "- Water flowed from the spout.",
            "is_correct": False,
            "targets_pretokenized": "The toilet filled with water.",
            "weight": 1.0,
        }
        for rows in tasks.values():
            check_score_eval_rows(rows)
    else:
        assert row["answer_choices"] == [
            "The toilet filled with water.",
            "Water flowed from the spout.",
        ]
        assert row["targets_pretokenized"] == "Water flowed from the spout."
        assert set(row) == {"answer_choices", "inputs_pretokenized", "targets_pretokenized"}


def check_score_eval_rows(rows: list[dict]) -> None:
    """One row per choice, consecutive indices, exactly one correct choice per example."""
    by_example = defaultdict(list)
    for row in rows:
        assert type(row["is_correct"]) is bool and type(row["weight"]) is float
        assert row["weight"] == 1.0
        assert all(type(i) is int for i in row["idx"])
        by_example[row["idx"][0]].append(row)
    assert sorted(by_example) == list(range(len(by_example)))
    for example_rows in by_example.values():
        assert [r["idx"][1] for r in example_rows] == list(range(len(example_rows)))
        assert len({r["inputs_pretokenized"] for r in example_rows}) == 1
        assert sum(r["is_correct"] for r in example_rows) == 1


def test_open_ended_templates_round_trip_and_have_no_score_eval(tmp_path):
    """DREAM's generation templates have no answer choices: an empty list in both formats, and
    no ``_score_eval`` task."""
    raw, templates = shared("raw/dream/validation.jsonl"), shared("templates/dream/templates.yaml")
    rows = {}
    for fmt, read in (("jsonl", p3.read_jsonl), ("tfrecord", p3.read_tfrecord)):
        counts = p3.render_dataset(
            raw, templates, tmp_path / fmt, dataset_name="dream", fmt=fmt, max_examples=3
        )
        rows[fmt] = {t: list(read(tmp_path / fmt / t / f"validation.{fmt}")) for t in counts}
    assert rows["jsonl"] == rows["tfrecord"]
    assert rows["jsonl"]["dream_generate_first_utterance"][0]["answer_choices"] == []
    score = p3.render_dataset(raw, templates, tmp_path / "s", dataset_name="dream", score_eval=True)
    assert sorted(score) == [
        "dream_baseline_score_eval",
        "dream_read_the_following_conversation_and_answer_the_question_score_eval",
    ]


def test_render_dataset_matches_render_and_caps_examples(tmp_path):
    counts = p3.render_dataset(
        shared(RTE_RAW),
        shared("templates/super_glue/rte/templates.yaml"),
        tmp_path,
        dataset_name="super_glue_rte",
        split="validation",
        max_examples=7,
    )
    assert len(counts) == 10 and set(counts.values()) == {7}
    template = template_by_id(
        "templates/super_glue/rte/templates.yaml", "2b52a83c-0021-41fe-b44c-5aaa076d71a2"
    )
    records = list(p3.read_jsonl(shared(RTE_RAW)))[:7]
    expected = [p3.render(template, r) for r in records]
    rows = list(p3.read_jsonl(tmp_path / "super_glue_rte_MNLI_crowdsource" / "validation.jsonl"))
    assert rows == [{k: e[k] for k in rows[0]} for e in expected]


def test_task_names_follow_p3():
    assert p3.task_name("super_glue_wsc.fixed", "GPT-3 Style") == "super_glue_wsc.fixed_GPT_3_Style"
    assert p3.task_name("anli", "GPT-3 style", "_r1") == "anli_GPT_3_style_r1"
    assert (
        p3.task_name("super_glue_copa", "…What could happen next, C1 or C2?")
        == "super_glue_copa__What_could_happen_next_C1_or_C2_"
    )


# ---------------------------------------------------------------------------------------------
# Bad input


BROKEN_TEMPLATES = """\
dataset: super_glue
subset: rte
templates:
  good-id: !Template
    answer_choices: Yes ||| No
    id: good-id
    jinja: '{{premise}} ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics: [Accuracy]
      original_task: true
    name: good one
    reference: ''
  broken-id: !Template
    answer_choices: Yes ||| No
    id: broken-id
    jinja: '{{premise}} ||| {% if label == 1 %}{{ nothing.attribute }}{% endif %}Yes'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics: [Accuracy]
      original_task: true
    name: broken one
    reference: ''
"""


def test_failing_template_names_file_template_and_record(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(BROKEN_TEMPLATES, encoding="utf-8")
    first_bad, _ = first_record(RTE_RAW, label=1)
    message = re.escape(
        f"{path}: template 'broken one' (id broken-id) failed on record {first_bad}"
    )
    with pytest.raises(p3.TemplateRenderError, match=message + ".*UndefinedError"):
        p3.render_dataset(shared(RTE_RAW), path, tmp_path / "out", dataset_name="rte")


def test_skip_reports_failures_in_one_warning(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(BROKEN_TEMPLATES, encoding="utf-8")
    records = list(p3.read_jsonl(shared(RTE_RAW)))
    n_bad = sum(r["label"] == 1 for r in records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = p3.render_dataset(
            shared(RTE_RAW), path, tmp_path / "out", dataset_name="rte", on_error="skip"
        )
    assert counts == {"rte_good_one": len(records), "rte_broken_one": len(records) - n_bad}
    assert len(caught) == 1
    assert f"skipped {n_bad} failing renders" in str(caught[0].message)
    assert f"{path}: 'broken one' (broken-id): {n_bad}" in str(caught[0].message)


def test_extra_separator_is_an_error():
    template = p3.Template(
        id="x",
        name="three parts",
        jinja="{{ a }} ||| b ||| c",
        answer_choices=None,
        original_task=None,
        choices_in_prompt=None,
        metrics=(),
        dataset="d",
        subset=None,
        path="inline.yaml",
    )
    with pytest.raises(p3.TemplateRenderError, match=r"inline.yaml: .*record 3.*2 '\|\|\|'"):
        p3.render(template, {"a": "x"}, index=3)
    with pytest.raises(p3.TemplateRenderError, match="reserve"):
        p3.render(template, {"a": "x", "answer_choices": []})


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 3 is not valid JSON")):
        list(p3.read_jsonl(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 3")):
        p3.render_dataset(path, shared(COPA_TEMPLATES), tmp_path / "out", dataset_name="x")
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 is not a JSON object")):
        list(p3.read_jsonl(path))


def test_non_utf8_and_missing_files_name_the_file(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{latin}: line 1 is not valid UTF-8")):
        list(p3.read_jsonl(latin))
    yaml_latin = tmp_path / "templates.yaml"
    yaml_latin.write_bytes("dataset: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{yaml_latin}: not valid UTF-8")):
        p3.load_templates(yaml_latin)
    missing = tmp_path / "missing"
    for reader in (p3.read_jsonl, p3.read_tfrecord, p3.load_templates):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            reader(missing)
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("templates: [unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{broken_yaml}: malformed YAML")):
        p3.load_templates(broken_yaml)


def test_corrupt_tfrecord_names_the_file(tmp_path):
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(b"this is not a tfrecord file at all")
    with pytest.raises(ValueError, match=re.escape(f"{path}: unreadable TFRecord file")):
        list(p3.read_tfrecord(path))


# ---------------------------------------------------------------------------------------------
# Data lists


def test_read_list():
    train = p3.read_list("t0_train_datasets")
    assert len(train) == len(set(train)) == 36
    assert {"glue/mrpc", "cos_e/v1.11", "wiki_hop/original", "dbpedia_14"} <= set(train)
    assert p3.read_list("t0_eval_datasets") == [
        "super_glue/rte",
        "super_glue/cb",
        "super_glue/copa",
        "super_glue/wic",
        "super_glue/wsc.fixed",
        "anli/r1",
        "anli/r2",
        "anli/r3",
        "winogrande/winogrande_xl",
        "hellaswag",
        "story_cloze/2016",
    ]
    with pytest.raises(FileNotFoundError, match="t0_eval_datasets"):
        p3.read_list("nope")


def test_raw_map_points_into_the_shared_folder(manifest):
    raw_map = p3.read_raw_map()
    assert list(raw_map) == p3.read_list("t0_eval_datasets")
    heldout_files = {m["file"] for m in manifest if m["role"] == "heldout"}
    assert {v["raw"] for v in raw_map.values() if v["raw"]} == heldout_files
    for entry in raw_map.values():
        assert os.path.isfile(shared(entry["templates"]))
    assert [k for k, v in raw_map.items() if v["raw"] is None] == ["hellaswag", "story_cloze/2016"]

"""The training stages chained at test size, as the run files chain them at full size:
metatrain (the logit teacher) -> lora_teachers (the parameter teachers) -> finetune with the
full TAGI objective (CE + KL to the teacher + alignment to the teacher LoRAs), and the
pretrain -> finetune hand-off (``train.init_from``)."""

import json
import os

import numpy as np
import pytest

from tagi_jax import configurables
from tagi_jax import train as train_cli
from tagi_jax.distill import lora_teachers
from tagi_jax.training import teacher_stage

# 8 fake devices in the test process: data-parallel over all of them.
MESH = "--gin.train.mesh_shape=(-1, 1)"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from tagi_jax.data import synthetic

    out = str(tmp_path_factory.mktemp("suite"))
    synthetic.write_suite(out, instances_per_train_task=4, instances_per_test_task=2)
    return out


def _run(*flags):
    with train_cli.configured(list(flags)):
        return configurables.run()


def _tiny(model_dir, suite, *extra):
    return (
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{suite}'",
        "--gin.TRAIN_STEPS=2",
        "--gin.train.log_every=1",
        MESH,
        *extra,
    )


@pytest.fixture(scope="module")
def metatrain(tmp_path_factory, suite):
    """The plain tiny T5 trained on the full instruction (the metatrain stage's settings)."""
    model_dir = str(tmp_path_factory.mktemp("metatrain"))
    _run(
        *_tiny(
            model_dir,
            suite,
            "--gin.HyperConfig.targets=[]",
            "--gin.TagiConfig.fusion=False",
            "--gin.TagiConfig.trainable_patterns=['^t5/']",
            "--gin.NIConfig.student_input='teacher_source'",
        )
    )
    return model_dir


@pytest.mark.slow
def test_lora_teachers_stage_writes_a_bank_per_task(tmp_path, suite, metatrain):
    out = str(tmp_path / "teachers")
    path = _run(
        "--gin_file=runs/tiny_cpu_lora_teachers.gin",
        f"--gin.MODEL_DIR='{out}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.BASE_CHECKPOINT='{metatrain}'",
        "--gin.TRAIN_STEPS=6",
    )
    assert path == os.path.join(out, teacher_stage.BANK_FILE)
    bank = lora_teachers.TeacherBank.load(path)
    with open(os.path.join(suite, "splits", "default", "train_tasks.txt")) as f:
        train_tasks = sorted(line.strip() for line in f if line.strip())
    assert sorted(bank.names) == train_tasks and bank.rank == 4
    with open(os.path.join(out, "lora_teachers.json")) as f:
        summary = json.load(f)
    # every teacher learned its task (a few steps of lr 1e-2 on 4 examples each)
    assert np.mean(summary["last_loss"]) < np.mean(summary["first_loss"])
    # B starts at zero: trained teachers have moved away from it
    assert all(np.abs(b).max() > 0 for b in bank.b.values())
    with pytest.raises(FileExistsError, match="exists"):
        _run(
            "--gin_file=runs/tiny_cpu_lora_teachers.gin",
            f"--gin.MODEL_DIR='{out}'",
            f"--gin.DATA_DIR='{suite}'",
            f"--gin.BASE_CHECKPOINT='{metatrain}'",
        )


@pytest.mark.slow
def test_finetune_with_logit_and_lora_teachers(tmp_path, suite, metatrain):
    bank = _run(
        "--gin_file=runs/tiny_cpu_lora_teachers.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'teachers'}'",
        f"--gin.DATA_DIR='{suite}'",
        f"--gin.BASE_CHECKPOINT='{metatrain}'",
        "--gin.TRAIN_STEPS=2",
    )
    model_dir = str(tmp_path / "finetune")
    last = _run(
        *_tiny(
            model_dir,
            suite,
            "--gin_file=losses/authors_run.gin",
            "--gin.train.loss=@LossConfig()",
            "--gin.LossConfig.standardized_kl_weight=0.1",  # every term of the objective
            f"--gin.train.base_checkpoint='{metatrain}'",
            f"--gin.train.teacher_checkpoint='{metatrain}'",
            f"--gin.train.teacher_lora_bank='{bank}'",
            # the bank's rank-4 teachers against the tiny preset's rank-4 generated adapters
            "--gin.HyperConfig.rank=4",
        )
    )
    terms = ("cross_entropy", "kl", "standardized_kl", "alignment")
    for term in (*terms, "loss"):
        assert np.isfinite(last[term]) and last[term] > 0, term
    # the student starts as the base with zero B: its KL to the metatrain teacher is the
    # teacher's own disagreement with the base on the student's input, a positive number
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2
    for record in records:  # every term, its weighted contribution and its gradient share
        for term in terms:
            for key in (term, f"term/{term}", f"grad_norm/{term}", f"grad_share/{term}"):
                assert np.isfinite(record[key]), (record["step"], key)
            assert record[f"grad_norm/{term}"] > 0, term
        np.testing.assert_allclose(sum(record[f"term/{t}"] for t in terms), record["loss"], 1e-5)
        np.testing.assert_allclose(sum(record[f"grad_share/{t}"] for t in terms), 1.0, 1e-4)
    # the alignment weight was calibrated on the first batch to 0.25 x CE's gradient norm, and
    # step 1's logged norms (the same state and batch) show exactly that
    with open(os.path.join(model_dir, "alignment_calibration.json")) as f:
        calibration = json.load(f)
    assert calibration["alignment_grad_ratio"] == 0.25 and calibration["alignment_weight"] > 0
    first = records[0]
    assert first["step"] == 1
    ratio = first["grad_norm/alignment"] / first["grad_norm/cross_entropy"]
    np.testing.assert_allclose(ratio, 0.25, rtol=1e-3)
    # the uncalibrated measurement at weight 1 was far from it: that is why it is calibrated
    at_one = calibration["first_batch"]
    assert at_one["grad_norm/alignment"] != pytest.approx(first["grad_norm/alignment"])


@pytest.mark.slow
def test_authors_code_encodes_instructions_with_the_teachers_encoder(tmp_path, suite, metatrain):
    """methods/authors_code.gin: the separate frozen instruction encoder holds the logit
    teacher's encoder (by default, as the authors' collator), through the trainer, its
    checkpoints and the export, not a random initialisation."""

    from tagi_jax import export
    from tagi_jax.artifacts import backbone, export_format
    from tagi_jax.models import trainable
    from tagi_jax.training import loop

    authors = ("--gin_file=methods/authors_code.gin", "--gin_file=methods/tiny_hyper.gin")
    model_dir = str(tmp_path / "authors")
    # no base: the backbone is the seed's, so only the teacher can supply the encoder
    _run(*_tiny(model_dir, suite, *authors, f"--gin.train.teacher_checkpoint='{metatrain}'"))
    with open(os.path.join(model_dir, "run.json")) as f:
        run = json.load(f)
    assert run["instruction_encoder_checkpoint"] == os.path.abspath(metatrain)
    model = export.read_run(model_dir)["model"]
    assert model.hyper.instruction_encoder == "separate"
    _, teacher = backbone.load_t5(metatrain)
    expected = {
        f"instruction_encoder/{p}": v
        for p, v in trainable.flatten(
            {"token_embedder": teacher["token_embedder"], "encoder": teacher["encoder"]}
        ).items()
    }
    loop_export = trainable.flatten(
        export_format.load(os.path.join(model_dir, loop.EXPORT_DIR)).params
    )
    exported = trainable.flatten(
        export_format.load(export.export_run(model_dir, str(tmp_path / "e"))).params
    )
    for params in (loop_export, exported):
        encoder = {p: v for p, v in params.items() if p.startswith("instruction_encoder/")}
        assert set(encoder) == set(expected)
        for path, value in expected.items():
            np.testing.assert_array_equal(np.asarray(encoder[path]), np.asarray(value), path)
        # ... while the student's own backbone is the seed's: the two really differ
        query = "encoder/layers_0/attention/query/kernel"
        assert not np.allclose(params[f"t5/{query}"], expected[f"instruction_encoder/{query}"])
    # the preset with no teacher and no named encoder is one clear error, before any training
    with pytest.raises(ValueError, match="instruction_encoder_checkpoint"):
        _run(*_tiny(str(tmp_path / "none"), suite, *authors))
    assert not os.path.exists(os.path.join(tmp_path, "none", "checkpoints"))


def test_alignment_without_a_bank_is_one_clear_error(tmp_path, suite):
    with pytest.raises(ValueError, match="teacher_lora_bank"):
        _run(
            *_tiny(
                str(tmp_path / "run"),
                suite,
                "--gin_file=losses/authors_run.gin",
                "--gin.train.loss=@LossConfig()",
                "--gin.LossConfig.kl_weight=0.0",
            )
        )


@pytest.mark.slow
def test_pretrain_to_finetune_hand_off(tmp_path, suite):
    pretrain = str(tmp_path / "pretrain")
    _run(*_tiny(pretrain, suite))
    finetune = str(tmp_path / "finetune")
    _run(*_tiny(finetune, suite, f"--gin.train.init_from='{pretrain}'", "--gin.TRAIN_STEPS=1"))
    with open(os.path.join(pretrain, "metrics.jsonl")) as f:
        pretrain_losses = [json.loads(line)["loss"] for line in f]
    with open(os.path.join(finetune, "metrics.jsonl")) as f:
        first = json.loads(f.readline())["loss"]
    # starting from the pretrained student, not from scratch: the first loss is not the
    # from-scratch first loss (the same seed and data would reproduce it exactly)
    assert first != pytest.approx(pretrain_losses[0], abs=1e-6)


@pytest.mark.slow
def test_hyper_pretraining_on_local_c4(tmp_path, suite):
    """The hyper_pretrain stage's data path: C4 documents cut into (a, b, c) segments, a to
    the hypernetwork, b to the encoder, c as the target."""
    from tagi_jax.data import synthetic

    rng = np.random.default_rng(0)
    path = tmp_path / "c4.jsonl"
    with open(path, "w") as f:
        for _ in range(40):
            words = rng.choice(synthetic.WORDS, size=int(rng.integers(60, 200)))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    model_dir = str(tmp_path / "pretrain")
    last = _run(
        *_tiny(
            model_dir,
            suite,
            "--gin.DataConfig.task='tagi_c4_pretrain'",
            f"--gin.DataConfig.c4_files=['{path}']",
        )
    )
    assert np.isfinite(last["loss"]) and last["loss"] > 0
    assert 0.0 <= last["accuracy"] <= 1.0 and last["tokens"] > 0
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


@pytest.mark.slow
def test_finetune_on_super_natural_instructions(
    tmp_path, suite, shared_data_dir, sentencepiece_dir
):
    """The finetune stage's data path on the real SNI task files (../shared/data/sni) with a
    SentencePiece vocabulary (trained on the fly, T5's id layout, 512 pieces)."""
    sni = os.path.join(shared_data_dir, "sni")
    model_dir = str(tmp_path / "sni")
    last = _run(
        *_tiny(
            model_dir,
            suite,
            "--gin.DataConfig.task='tagi_sni_def_pos2'",
            f"--gin.DataConfig.sni_dir='{sni}'",
            f"--gin.DataConfig.vocabulary='{sentencepiece_dir}'",
            "--gin.T5Config.vocab_size=512",
        )
    )
    assert np.isfinite(last["loss"]) and last["loss"] > 0
    with open(os.path.join(model_dir, "run.json")) as f:
        run = json.load(f)
    assert run["data"]["sni_dir"] == sni and run["model"]["t5"]["vocab_size"] == 512

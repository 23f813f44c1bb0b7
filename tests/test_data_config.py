"""The data's configuration (``data/config.py``), the one host-side tokenize-and-pad and decoder
shift (``data/tokens.py``) against the SeqIO pipeline, and gin's one registration place."""

import subprocess
import sys

import gin
import numpy as np
import pytest

from tagi_jax.data import tokens
from tagi_jax.data.config import DataConfig, source


def _imported(code: str) -> list[str]:
    """The modules of (tensorflow, seqio, gin) that ``code`` leaves imported (a fresh Python)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys\n{code}\n"
            "print(sorted(m for m in ('tensorflow', 'seqio', 'gin') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list


def test_data_config_tokens_and_the_pipeline_module_import_no_tensorflow_and_parallel_no_gin():
    assert _imported("import tagi_jax.data.config, tagi_jax.data.tokens") == []
    # the trainer imports the front door at module level: TensorFlow only when data is read
    assert "tensorflow" not in _imported("import tagi_jax.data.pipeline, tagi_jax.training.loop")
    assert _imported("import tagi_jax.parallel.distributed, tagi_jax.parallel.mesh") == []


def test_data_config_source_names_the_field_a_task_reads():
    assert source(DataConfig(task="tagi_suite_def_pos2", suite_dir="/s")) == (
        "DataConfig.suite_dir=/s"
    )
    assert source(DataConfig(task="tagi_c4_pretrain", c4_files=("a", "b"))) == (
        "DataConfig.c4_files=a, b"
    )
    assert source(DataConfig(task="tagi_p3_t0_train")) == ""  # p3_dir not set


def test_tokens_give_the_seqio_pipelines_ids():
    """``encode_padded`` is tokenize + append_eos_after_trim + the converter's padding, and
    ``shift_right`` the converter's decoder inputs, id for id."""
    import seqio
    import tensorflow as tf

    from tagi_jax.data import feature_converter, vocab

    byte = vocab.get_vocabulary("byte")
    texts = ["Definition: reverse the word. Input: cat", "short", "é" * 30]
    targets = ["tac", "a longer answer than the length", "ü"]
    lengths = {"inputs": 16, "hyper_inputs": 8, "teacher_inputs": 64, "targets": 6}
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "inputs": texts,
            "hyper_inputs": texts,
            "teacher_inputs": texts,
            "targets": targets,
            "task_id": [0, 1, 2],
            "category_id": [0, 0, 1],
        }
    )
    features = {k: seqio.Feature(byte) for k in lengths}
    ds = seqio.preprocessors.tokenize(ds, features, copy_pretokenized=False)
    ds = seqio.preprocessors.append_eos_after_trim(
        ds, sequence_length=lengths, output_features=features
    )
    converter = feature_converter.TagiFeatureConverter()
    converted = converter(ds, converter.task_feature_lengths(lengths))
    batch = next(converted.batch(len(texts)).as_numpy_iterator())
    for feature, model_feature in (
        ("inputs", "encoder_input_tokens"),
        ("hyper_inputs", "hyper_input_tokens"),
        ("teacher_inputs", "teacher_input_tokens"),
    ):
        np.testing.assert_array_equal(
            batch[model_feature], tokens.encode_padded(byte, texts, lengths[feature])
        )
    np.testing.assert_array_equal(
        batch["decoder_target_tokens"], tokens.encode_padded(byte, targets, lengths["targets"])
    )
    np.testing.assert_array_equal(
        batch["decoder_input_tokens"], tokens.shift_right(batch["decoder_target_tokens"])
    )
    # grouped [K, rows, length] batches (the LoRA-teacher stage) shift along the last axis
    grouped = np.stack([batch["decoder_target_tokens"]] * 2)
    np.testing.assert_array_equal(
        tokens.shift_right(grouped), np.stack([batch["decoder_input_tokens"]] * 2)
    )


@pytest.fixture
def clean_gin():
    from tagi_jax import train

    train.register_configurables()
    gin.clear_config()
    yield
    gin.clear_config()


def test_entry_points_keep_their_gin_names_required_bindings_and_denylist(clean_gin):
    from tagi_jax import configurables

    # a missing required binding is gin's error naming it, before the stage does anything
    gin.parse_config("train.batch_size = 4")
    with pytest.raises(RuntimeError, match=r"Required bindings for `train` .*'model_dir'"):
        configurables.train()
    gin.clear_config()
    with pytest.raises(ValueError, match="stop_after"):
        gin.parse_config("train.stop_after = 3")  # tests' kill switch: never from a run file
    gin.clear_config()
    with pytest.raises(ValueError, match="batchsize"):
        gin.parse_config("train.batchsize = 3")  # a typo fails at parse time
    gin.clear_config()
    with pytest.raises(RuntimeError, match=r"Required bindings for `DataConfig` .*'task'"):
        configurables.data_config()
    # DataConfig's NIConfig is the run's: an NIConfig binding reaches the data
    gin.parse_config("DataConfig.task = 'tagi_sni_def'\nNIConfig.max_train_instances_per_task = 3")
    assert configurables.data_config().ni.max_train_instances_per_task == 3
    gin.clear_config()
    # every entry point keeps its name and parameters
    gin.parse_config(
        "evaluate.batch_size = 3\nevaluate_p3.score = 'sum'\ntrain_lora_teachers.seed = 1\n"
        "run.stage = 'lora_teachers'\nDistributedConfig.enabled = False"
    )
    assert gin.query_parameter("evaluate_p3.score") == "sum"

"""Every gin file parses, binds only known fields, and the model sizes are the released ones."""

import glob
import math
import os

import gin
import jax
import pytest

from tagi_jax import configurables
from tagi_jax.data.config import DataConfig
from tagi_jax.models import t5

GIN_ROOT = os.path.join(os.path.dirname(__file__), "..", "gin_configs")
ALL_GIN = sorted(glob.glob(os.path.join(GIN_ROOT, "**", "*.gin"), recursive=True))

# Parameter counts of the released checkpoints (transformers' num_parameters()).
RELEASED_SIZES = {
    "t5_1_0_small": 60_506_624,
    "t5_1_0_base": 222_903_552,
    "t5_1_1_small": 76_961_152,
    "t5_1_1_base": 247_577_856,
    "t5_1_1_large": 783_150_080,
    "t5_1_1_xl": 2_849_757_184,
    "t5_1_1_xxl": 11_135_332_352,
}


@pytest.fixture(autouse=True)
def clean_gin():
    from tagi_jax import train

    train.register_configurables()
    gin.clear_config()
    yield
    gin.clear_config()


def test_there_are_gin_files():
    assert len(ALL_GIN) >= 8


# Values for every macro a run file leaves %gin.REQUIRED (any string resolves here).
REQUIRED_MACROS = (
    "MODEL_DIR", "DATA_DIR", "VOCABULARY", "BASE_CHECKPOINT", "TEACHER", "LORA_TEACHERS",
    "C4_DIR", "P3_DIR", "EXPORT_DIR", "OUTPUT_DIR", "COORDINATOR",
)  # fmt: skip


def _resolve_everything_bound():
    """Builds every configurable the parsed files bind, so a bad field or value fails here."""
    builders = {
        "T5Config": configurables.t5_config,
        "HyperConfig": configurables.hyper_config,
        "TagiConfig": configurables.tagi_config,
        "LossConfig": configurables.loss_config,
        "OptimizerConfig": configurables.optimizer_config,
        "LoraTeacherConfig": configurables.lora_teacher_config,
        "NIConfig": configurables.ni_config,
        "DataConfig": configurables.data_config,
        "DistributedConfig": configurables.distributed_config,
    }
    text = gin.config_str()
    built = {name: build() for name, build in builders.items() if f"{name}." in text}
    for configurable in ("train", "train_lora_teachers", "evaluate", "run"):
        for line in text.splitlines():
            if line.startswith(f"{configurable}."):
                name = line.split("=")[0].strip()
                gin.query_parameter(name)  # raises for an unknown parameter or macro
    return built


@pytest.mark.parametrize("path", ALL_GIN, ids=lambda p: os.path.relpath(p, GIN_ROOT))
def test_gin_file_parses_and_resolves(path):
    gin.add_config_file_search_path(GIN_ROOT)
    bindings = [f"{m} = '/tmp/{m.lower()}'" for m in REQUIRED_MACROS]
    bindings += ["NUM_PROCESSES = 2", "PROCESS_ID = 0"]
    gin.parse_config_files_and_bindings([path], bindings)
    built = _resolve_everything_bound()
    assert configurables.t5_config().d_model > 0
    if "train.model" in gin.config_str():
        assert built["TagiConfig"].t5.vocab_size > 0 and built["DataConfig"].task


@pytest.mark.parametrize("name,count", sorted(RELEASED_SIZES.items()))
def test_model_sizes_match_released_checkpoints(name, count):
    gin.parse_config_file(os.path.join(GIN_ROOT, "models", f"{name}.gin"))
    config = configurables.t5_config()
    abstract = t5.abstract_params(config)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == count


def test_unknown_field_is_named():
    gin.parse_config("T5Config.d_modle = 3")
    with pytest.raises(ValueError, match="d_modle"):
        configurables.t5_config()


def test_malformed_gin_is_an_error():
    with pytest.raises((SyntaxError, ValueError)):
        gin.parse_config("T5Config.d_model = = 3")


def _parse(*files):
    for f in files:
        gin.parse_config_file(os.path.join(GIN_ROOT, f))


def test_paper_preset_is_the_default():
    from tagi_jax.models.tagi_config import TagiConfig

    _parse("models/t5_1_1_base.gin", "methods/paper.gin")
    config = configurables.tagi_config()
    default = TagiConfig(t5=config.t5)
    assert config == default
    assert config.hyper.generator == "per_layer" and config.hyper.init == "zero_b"


def test_authors_code_preset():
    _parse("models/t5_1_1_base.gin", "methods/authors_code.gin")
    config = configurables.tagi_config()
    assert config.hyper.generator == "shared_indexed"
    assert config.hyper.instruction_dim == 255 and config.hyper.hidden_dim == 8
    assert config.hyper.init == "authors" and config.hyper.divide_b_by_sqrt_rank
    assert config.hyper.pooling == "first_last_sum_unmasked"
    assert config.instruction_encoder_t5 == config.t5
    assert config.trainable == "authors_code"


@pytest.mark.parametrize("method", ["paper", "authors_code"])
def test_tiny_presets_build_and_run(method):
    import jax.numpy as jnp

    from tagi_jax.models import tagi, trainable

    _parse("models/t5_1_1_tiny.gin", f"methods/{method}.gin", "methods/tiny_hyper.gin")
    config = configurables.tagi_config()
    assert config.hyper.rank == 4
    params = tagi.init_params(config, jax.random.key(0))
    batch = {k: jnp.ones((2, 5), jnp.int32) for k in tagi.BATCH_KEYS}
    logits, aux = tagi.forward(config, params, batch)
    assert logits.shape == (2, 5, config.t5.vocab_size)
    n_train, n_total = trainable.count(params, trainable.trainable_mask(config, params))
    assert 0 < n_train < n_total


def test_hyper_unknown_field_is_named():
    gin.parse_config("HyperConfig.rnak = 3")
    with pytest.raises(ValueError, match="rnak"):
        configurables.hyper_config()


def test_loss_presets():
    from tagi_jax.distill.losses import LossConfig

    _parse("losses/authors_run.gin")
    assert configurables.loss_config() == LossConfig()
    gin.clear_config()
    _parse("losses/paper.gin")
    assert configurables.loss_config() == LossConfig.paper()
    gin.clear_config()
    _parse("losses/authors_run.gin", "losses/authors_exact.gin")
    exact = configurables.loss_config()
    assert exact.alignment_mode == "authors_swapped" and exact.kl_average_over_padding


def test_tensorflow_stays_inside_the_data_package():
    """Model, distillation, conversion and gin code import neither TensorFlow nor seqio."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tagi_jax.configurables, tagi_jax.models.tagi, tagi_jax.distill.losses\n"
        "import tagi_jax.distill.lora_teachers, tagi_jax.distill.teacher, tagi_jax.convert.hf_t5\n"
        "import tagi_jax.train, tagi_jax.export, tagi_jax.evaluate, tagi_jax.training.loop\n"
        "tagi_jax.train.register_configurables()\n"
        "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # nor anywhere else, even inside a function: only tagi_jax/data/ names them
    package = os.path.join(os.path.dirname(__file__), "..", "tagi_jax")
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        if os.sep + "data" + os.sep in os.path.relpath(path, os.path.dirname(package)):
            continue
        with open(path) as f:
            for number, line in enumerate(f, 1):
                words = line.split()
                if words[:1] in (["import"], ["from"]) and len(words) > 1:
                    module = words[1].split(".")[0]
                    assert module not in ("tensorflow", "seqio"), f"{path}:{number}: {line}"


def test_a_users_file_includes_packaged_files_from_any_directory(tmp_path, monkeypatch):
    """A user's own gin file, outside the package, includes packaged files by name (through the
    search path) or by package path (through gin's package lookup), from any directory."""
    from tagi_jax import train

    monkeypatch.chdir(tmp_path)
    for include in ("models/t5_suite.gin", "tagi_jax/gin_configs/models/t5_suite.gin"):
        gin.clear_config()
        (tmp_path / "mine.gin").write_text(f"include '{include}'\nT5Config.num_heads = 3\n")
        train.parse_gin(train.parse_flags(["--gin_file=mine.gin"]))
        config = configurables.t5_config()
        assert (config.d_model, config.num_heads) == (128, 3), include


def test_package_path_includes_resolve_beside_same_named_directories(tmp_path, monkeypatch, capsys):
    """A `models/` or `runs/` directory in the working directory (run outputs, say) is a
    namespace package to Python. Packaged files include each other by package path, which
    such a directory cannot shadow; a user's short include that it shadows is one clear error
    (gin-config's package lookup crashes on namespace packages) naming the way out."""
    from tagi_jax import train

    for name in ("models", "runs"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m` puts the working directory
    macros = [f"--gin.{m}='/{m}'" for m in ("EXPORT_DIR", "DATA_DIR", "OUTPUT_DIR")]
    # includes runs/evaluate_suite.gin (evaluate.split) and sets evaluate.compare_base
    train.parse_gin(train.parse_flags(["--gin_file=runs/evaluate_suite_main_job.gin", *macros]))
    assert gin.query_parameter("evaluate.split") == "test"
    assert gin.query_parameter("evaluate.compare_base") is True
    gin.clear_config()
    (tmp_path / "mine.gin").write_text("include 'tagi_jax/gin_configs/models/t5_suite.gin'\n")
    train.parse_gin(train.parse_flags(["--gin_file=mine.gin"]))
    assert configurables.t5_config().d_model == 128
    gin.clear_config()
    (tmp_path / "mine.gin").write_text("include 'models/t5_suite.gin'\n")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_gin(train.parse_flags(["--gin_file=mine.gin"]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "models, runs" in error and "'tagi_jax/gin_configs/runs/...'" in error, error


def test_packaged_gin_files_are_package_data():
    """The gin files live in the package (they ship in the wheel); the top-level `gin_configs`
    is a link to them, not a second copy; every include names a packaged file by package
    path."""
    from tagi_jax import gin_configs

    root = gin_configs.root()
    assert os.path.realpath(GIN_ROOT) == os.path.realpath(root)
    assert os.path.realpath(root).endswith(os.path.join("tagi_jax", "gin_configs"))
    for path in ALL_GIN:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.startswith("include "):
                    name = line.split("'")[1]
                    assert name.startswith(gin_configs.INCLUDE_PREFIX + "/"), f"{path}:{number}"
                    relative = name[len(gin_configs.INCLUDE_PREFIX) + 1 :]
                    assert os.path.isfile(gin_configs.path(relative)), f"{path}:{number}"


# --- one NIConfig; every binding used by the stage that runs ------------------------------

RUN_FILES = sorted(glob.glob(os.path.join(GIN_ROOT, "runs", "*.gin")))


class _Checked(Exception):
    """Raised right after a stage's binding check passed: nothing after it runs."""


def _stop_after_the_check(monkeypatch):
    from tagi_jax import gin_check

    check = gin_check.check_bindings_used

    def checked(stage):
        check(stage)
        raise _Checked(stage)

    monkeypatch.setattr(gin_check, "check_bindings_used", checked)


def _run_stage():
    """What `python -m tagi_jax.train` / `python -m tagi_jax.evaluate` run for the parsed file."""
    from tagi_jax import evaluate

    # evaluate.py runs the evaluation job (evaluate or evaluate_p3) a file binds
    return (
        evaluate.run_configured() if evaluate.bound_jobs(gin.config_str()) else configurables.run()
    )


@pytest.mark.parametrize("path", RUN_FILES, ids=os.path.basename)
def test_every_run_file_binding_is_used_by_its_stage(path, monkeypatch):
    """Each run file's stage reads every binding of the file and its includes: the stage's
    check passes (a binding it never reads would raise a ValueError naming it)."""
    from tagi_jax import train

    _stop_after_the_check(monkeypatch)
    flags = [f"--gin_file={path}", *(f"--gin.{m}='/tmp/{m.lower()}'" for m in REQUIRED_MACROS)]
    with train.configured(flags), pytest.raises(_Checked):
        _run_stage()


def test_sni_run_files_switch_on_tk_instructs_source_budget():
    from tagi_jax import train

    # (evaluate_sni.gin takes the budget from the export: the NIConfig the student trained with)
    for name in ("finetune_sni", "metatrain_sni", "lora_teachers_sni"):
        flags = [f"--gin_file=runs/{name}.gin"]
        flags += [f"--gin.{m}='/tmp/{m.lower()}'" for m in REQUIRED_MACROS]
        with train.configured(flags):
            assert configurables.ni_config().max_source_length == 1024, name
            assert configurables.data_config().ni.max_source_length == 1024, name


def test_an_unused_binding_is_one_clear_error(tmp_path, capsys):
    """A binding the stage never reads (LoraTeacherConfig in a `train` run, `train.*` in an
    evaluation) ends the CLI with exit 2 and an error naming it, before any work; without it
    the same command gets past the check (to the missing data directory)."""
    from tagi_jax import evaluate, train

    base = [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
        f"--gin.DATA_DIR='{tmp_path / 'no_data'}'",
    ]
    assert train.main([*base, "--gin.LoraTeacherConfig.rank=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gin bindings never used by this stage (train): ")
    assert "LoraTeacherConfig.rank" in err and "no_data" not in err
    gin.clear_config()
    assert train.main(base) == 2
    assert "never used" not in capsys.readouterr().err  # the data directory's error instead
    assert not os.path.exists(tmp_path / "run")
    gin.clear_config()
    flags = [
        "--gin_file=runs/evaluate_suite.gin",
        f"--gin.EXPORT_DIR='{tmp_path}'",
        f"--gin.DATA_DIR='{tmp_path}'",
        f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
        "--gin.train.batch_size=3",
    ]
    assert evaluate.main(flags) == 2
    err = capsys.readouterr().err
    assert "never used by this stage (evaluate): train.batch_size" in err


def test_binding_check_follows_gin_scopes_and_exempts_macros():
    from tagi_jax import gin_check

    assert gin_check.unused_bindings() == []  # no config: nothing to check
    gin.parse_config(
        """
        RATE = 0.5
        LossConfig.ce_weight = %RATE
        teacher/LossConfig.kl_weight = 0.1
        OptimizerConfig.learning_rate = 1e-3
        """
    )
    configurables.loss_config()
    assert gin_check.unused_bindings() == [
        "OptimizerConfig.learning_rate",
        "teacher/LossConfig.kl_weight",
    ]
    with gin.config_scope("teacher/inner"):  # a scoped binding applies in nested scopes
        configurables.loss_config()
    assert gin_check.unused_bindings() == ["OptimizerConfig.learning_rate"]
    with pytest.raises(ValueError, match=r"never used by this stage \(x\): OptimizerConfig"):
        gin_check.check_bindings_used("x")


def test_data_config_refuses_a_budget_its_lengths_would_undo():
    """The budget keeps the source's input by dropping demonstrations; a shorter feature
    length for a stream carrying that source would trim the input off after all. And the task
    name's demonstrations may not be contradicted by NIConfig."""
    from tagi_jax.data.ni import NIConfig

    lengths = (("inputs", 1024), ("hyper_inputs", 1024), ("teacher_inputs", 512), ("targets", 8))
    budget = NIConfig(max_source_length=1024)
    with pytest.raises(ValueError, match=r"\{'teacher_inputs': 512\}.*max_source_length=1024"):
        DataConfig(task="tagi_sni_def_pos2", feature_lengths=lengths, ni=budget)
    DataConfig(task="tagi_sni_def_pos2", feature_lengths=lengths, ni=NIConfig())
    DataConfig(task="tagi_c4_pretrain", feature_lengths=lengths, ni=budget)  # not NI data
    with pytest.raises(ValueError, match="num_pos_examples=0 contradicts task 'tagi_sni_def_pos2'"):
        DataConfig(task="tagi_sni_def_pos2", ni=NIConfig(num_pos_examples=0))

"""Test environment: 8 fake CPU devices, no network, quiet TensorFlow.

Everything here must run before jax initialises a backend, so it sits at the top of conftest.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake devices for the sharding tests; a stuck collective fails in seconds, not minutes
# (see ../shared/docs/dependencies.md §3).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
    _flags += (
        " --xla_cpu_collective_call_warn_stuck_timeout_seconds=5"
        " --xla_cpu_collective_call_terminate_timeout_seconds=10"
    )
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data_dir():
    """../shared/data next to the repository (never copied into it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.abspath(os.path.join(here, "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory, shared_data_dir):
    """A SentencePiece model with T5's id layout, trained on the fly on the shared SNI text,
    saved as ``spiece.model`` in a checkpoint-like directory."""
    from tagi_jax.testing import sentencepiece_model

    out = tmp_path_factory.mktemp("spm")
    lines = sentencepiece_model.sni_text(os.path.join(shared_data_dir, "sni"))
    return sentencepiece_model.train(lines, str(out), vocab_size=512)


@pytest.fixture(scope="module")
def bucket():
    """One fake ``gs://`` bucket per test module, on the local GCS emulator
    (``tagi_jax.testing.fake_gcs``, started once per process; no network)."""
    from tagi_jax.testing import fake_gcs

    if not fake_gcs.available():
        pytest.skip("gcp-storage-emulator / gcsfs not installed (requirements-test.txt)")
    with fake_gcs.fake_gcs() as root:
        yield root

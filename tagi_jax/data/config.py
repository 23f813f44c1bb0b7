"""What a run's data is: ``DataConfig``, the vocabulary it names and where each task reads from.

TensorFlow-free (the vocabulary module, which imports seqio, is imported only when a vocabulary
is built), and gin-free: gin builds a ``DataConfig`` in ``tagi_jax.configurables``
(``DataConfig.<field> = ...``), whose ``ni`` defaults to the run's gin-configured ``NIConfig``.
``tagi_jax.data.pipeline`` turns a ``DataConfig`` into batches.
"""

from __future__ import annotations

import dataclasses

from tagi_jax.data import ni as ni_lib
from tagi_jax.data.errors import DataError

# The natural-instructions tasks the pipeline registers: task-name prefix -> DataConfig field.
NI_DIRS = {"tagi_sni_": "sni_dir", "tagi_suite_": "suite_dir"}
C4_TASK = "tagi_c4_pretrain"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which SeqIO task to train on and where its data lives (registered on demand).

    Attributes:
      task: the SeqIO task or mixture name (``tagi_suite_def_pos2``, ``tagi_sni_def_pos2``,
        ``tagi_sni_def``, ``tagi_c4_pretrain``, ``tagi_p3_t0_train``, ...).
      feature_lengths: ``inputs``, ``hyper_inputs``, ``teacher_inputs``, ``targets`` lengths.
      sni_dir, suite_dir, p3_dir: natural-instructions / built-in suite / P3 directories,
        local or in cloud storage (``gs://...``).
      c4_files: C4 text/JSONL files for hyper-pretraining (local or cloud); or ``c4_tfds_dir``
        (TFDS c4/en).
      vocabulary: ``byte`` or a SentencePiece path (a checkpoint directory or spiece.model).
      ni: how natural-instructions data (SNI, the suite) becomes examples, for training and the
        LoRA-teacher stage alike (gin: the run's ``NIConfig``). The task name's variant
        (``_def``, ``_def_pos2``) picks the demonstrations; ``NIConfig`` may leave
        ``num_pos_examples`` unset or agree, never contradict it.
    """

    task: str
    feature_lengths: tuple[tuple[str, int], ...] = (
        ("inputs", 1024),
        ("hyper_inputs", 1024),
        ("teacher_inputs", 1024),
        ("targets", 128),
    )
    sni_dir: str | None = None
    suite_dir: str | None = None
    p3_dir: str | None = None
    c4_files: tuple[str, ...] | None = None
    c4_tfds_dir: str | None = None
    vocabulary: str = "byte"
    ni: ni_lib.NIConfig = dataclasses.field(default_factory=ni_lib.NIConfig)

    def __post_init__(self):
        if ni_lib.task_variant(self.task) is None:
            return  # P3 and C4 tasks: NIConfig does not apply
        ni_lib.for_task(self.ni, self.task)  # a contradicting num_pos_examples fails here
        short = self.ni.streams_shorter_than_budget(dict(self.feature_lengths))
        if short:
            raise ValueError(
                f"DataConfig.feature_lengths {short} are shorter than NIConfig.max_source_length="
                f"{self.ni.max_source_length}: the trim would cut the source's input off after "
                "the budget dropped demonstrations to keep it; make them at least the budget"
            )

    def ni_for_task(self) -> ni_lib.NIConfig:
        """``ni`` with the demonstrations of this natural-instructions task's variant."""
        return ni_lib.for_task(self.ni, self.task)


def make_vocabulary(data: DataConfig):
    """The vocabulary ``data.vocabulary`` names (``"byte"`` or a SentencePiece path)."""
    from tagi_jax.data import vocab  # seqio: imported only when a vocabulary is built

    return vocab.from_name(data.vocabulary)


def checked_vocabulary(data: DataConfig):
    """``make_vocabulary``, loaded now, with a vocabulary that does not load reported as bad
    data (``DataError`` naming ``DataConfig.vocabulary``)."""
    try:
        vocabulary = make_vocabulary(data)
        vocabulary.encode("a")  # SentencePiece loads its model lazily: load it now
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt model fails in protobuf, sentencepiece...
        raise DataError(
            f"DataConfig.vocabulary={data.vocabulary!r} does not load: {type(e).__name__}: {e}"
        ) from None
    return vocabulary


def ni_dir_field(task: str) -> str | None:
    """The ``DataConfig`` field of a natural-instructions task's directory (None: not one)."""
    if ni_lib.task_variant(task) is None:
        return None
    return next((field for prefix, field in NI_DIRS.items() if task.startswith(prefix)), None)


def source_field(data: DataConfig) -> str | None:
    """The ``DataConfig`` field ``data.task`` reads its data from (None: a task registered
    elsewhere, whose data is its own)."""
    field = ni_dir_field(data.task)
    if field is None and "_p3_" in data.task:
        field = "p3_dir"
    if field is None and data.task == C4_TASK:
        field = "c4_files" if data.c4_files else "c4_tfds_dir"
    return field


def source(data: DataConfig) -> str:
    """Where ``data.task`` reads from, for error messages (``DataConfig.<field>=<value>``)."""
    field = source_field(data)
    value = getattr(data, field) if field else None
    if isinstance(value, tuple):
        value = ", ".join(value)
    return f"DataConfig.{field}={value}" if value else ""

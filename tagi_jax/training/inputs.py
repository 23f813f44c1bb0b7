"""What the trainer feeds the model: the gin ``DataConfig``, the SeqIO batch stream and its
placement on the mesh as global arrays.

``TrainInput`` (what the loop reads): global batch ``b`` is examples ``[b * B, (b + 1) * B)``
of a stream that is a function of the seed and the example index alone
(``feature_converter.host_batches``), and each process reads, formats and tokenizes only the
rows its own devices hold (``local_rows``) and places them (``place_local``). So the global
batch, and with it the loss, does not depend on how many hosts or devices there are; a run
resumed on another topology continues the same data order; and a resume at batch ``k`` starts
the stream there by index instead of producing the ``k`` batches before it.

``train_batches`` is the older whole-batch stream (the sequential seqio pipeline, every host
reading every row, a resume replaying the batches before it), kept for tools and tests that
want whole global batches; ``to_global`` places such a batch.
TensorFlow and SeqIO stay inside ``tagi_jax.data``; they are imported here only inside functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import gin
import jax
import numpy as np

from tagi_jax import paths
from tagi_jax.data import ni as ni_lib
from tagi_jax.data.errors import DataError
from tagi_jax.parallel import partitioning

MODEL_FEATURES = (
    "encoder_input_tokens",
    "hyper_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)


def configured_ni() -> ni_lib.NIConfig:
    """The gin-configured ``NIConfig`` (``NIConfig.<field> = ...`` in a run file): the default of
    ``DataConfig.ni``, so such a binding always reaches the data, never silently ignored."""
    from tagi_jax import configurables  # registers NIConfig; imports the model configs

    return configurables.ni_config()


@gin.configurable("DataConfig")
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
        LoRA-teacher stage alike: the gin-configured ``NIConfig`` unless given. The task name's
        variant (``_def``, ``_def_pos2``) picks the demonstrations; ``NIConfig`` may leave
        ``num_pos_examples`` unset or agree, never contradict it.
    """

    task: str = gin.REQUIRED
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
    ni: ni_lib.NIConfig = dataclasses.field(default_factory=configured_ni)

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
    from tagi_jax.data import vocab

    return vocab.from_name(data.vocabulary)


def check_paths(data: DataConfig) -> None:
    """Fails (``DataError``) when a configured data path (local or cloud: ``tagi_jax.paths``)
    does not exist; ``preflight`` does this first, then checks the data in them."""
    for field in ("sni_dir", "suite_dir", "p3_dir", "c4_tfds_dir"):
        path = getattr(data, field)
        if path is not None and not paths.isdir(path):
            raise DataError(f"DataConfig.{field}: data directory does not exist: {path}")
    for path in data.c4_files or ():
        if not paths.isfile(path):
            raise DataError(f"DataConfig.c4_files: no such file: {path}")


# The natural-instructions tasks ``register_data`` registers: task-name prefix -> DataConfig field.
_NI_DIRS = {"tagi_sni_": "sni_dir", "tagi_suite_": "suite_dir"}
C4_TASK = "tagi_c4_pretrain"


def _ni_dir_field(task: str) -> str | None:
    """The ``DataConfig`` field of a natural-instructions task's directory (None: not one)."""
    if ni_lib.task_variant(task) is None:
        return None
    return next((field for prefix, field in _NI_DIRS.items() if task.startswith(prefix)), None)


def preflight(data: DataConfig) -> None:
    """Checks the training data before any model work; raises ``DataError``, one line naming
    the file (or setting) and the problem.

    The paths exist (``check_paths``) and the task's data is there and usable: for
    natural-instructions tasks every task file of the train split is read and its schema
    checked (``ni.load_task``), and the first example of each task is formatted
    (``ni.first_examples``, the code training formats with) and tokenized; for P3 every member
    task has a non-empty train split whose first row is formatted and tokenized
    (``p3_tasks.preflight``); for C4 the first document of each file. Also an unknown task name,
    or one whose data directory is not set, and a vocabulary that does not load.

    Costs about what reading the task files costs (well under a second on the shared SNI subset
    and the built-in suite, once TensorFlow is imported), no tf.data pipeline.
    """
    check_paths(data)
    task = data.task
    field = _ni_dir_field(task)
    if field is None and task.startswith(tuple(_NI_DIRS)):
        raise DataError(
            f"DataConfig.task={task!r} is no natural-instructions task: use one of "
            + ", ".join(f"{p}{v}" for p in _NI_DIRS for v in ni_lib.TASK_VARIANTS)
        )
    needs = field  # the DataConfig field the task reads its data from
    if needs is None and "_p3_" in task:
        needs = "p3_dir"
    elif needs is None and task == C4_TASK:
        needs = "c4_files" if data.c4_files else "c4_tfds_dir"
    if needs is not None and not getattr(data, needs):
        raise DataError(
            f"DataConfig.task={task!r} reads DataConfig.{needs}, which is not set"
            + (" (or c4_files)" if needs == "c4_tfds_dir" else "")
        )
    if needs is None:
        _check_registered(task)
        return  # a task registered elsewhere: its data is its own
    vocabulary = _vocabulary(data)
    if field is not None:
        from tagi_jax.data import tasks

        directory = getattr(data, field)
        for example in ni_lib.first_examples(
            directory, "train", data.ni_for_task(), vocabulary=vocabulary
        ):
            for key in tasks.TEXT_FEATURES:
                _tokenize(vocabulary, example[key], f"{directory}: task {example['task_name']}")
    elif needs == "p3_dir":
        from tagi_jax.data import p3_tasks

        p3_tasks.preflight(data.p3_dir, task, vocabulary)
    elif needs == "c4_files":
        from tagi_jax.data import c4

        for path in data.c4_files:
            try:
                first = next(iter(c4.read_documents([path])), None)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"DataConfig.c4_files: {e}") from None
            if first is None:
                raise DataError(f"DataConfig.c4_files: {path} holds no document")
            _tokenize(vocabulary, first, path)


def _check_registered(task: str) -> None:
    """A task name ``register_data`` does not give must be registered already (by the run's
    own imports), or training would fail after the model is built."""
    from tagi_jax.data import tasks

    if not tasks.is_registered(task):
        raise DataError(
            f"DataConfig.task={task!r} names no task: use tagi_sni_<variant> (sni_dir), "
            f"tagi_suite_<variant> (suite_dir), variants {sorted(ni_lib.TASK_VARIANTS)}, "
            f"tagi_p3_t0_train or tagi_p3_<task directory> (p3_dir), {C4_TASK} (c4_files)"
        )


def _vocabulary(data: DataConfig):
    """``make_vocabulary``, with a vocabulary that does not load reported as bad data."""
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


def _tokenize(vocabulary, text: str, where: str) -> None:
    try:
        vocabulary.encode(text)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is this file's problem
        raise DataError(f"{where}: cannot tokenize {text[:40]!r}: {e}") from None


def register_data(data: DataConfig, vocabulary) -> None:
    from tagi_jax.data import tasks

    check_paths(data)
    tasks.register_tasks(
        vocabulary=vocabulary,
        sni_dir=data.sni_dir,
        suite_dir=data.suite_dir,
        p3_dir=data.p3_dir,
        c4_files=list(data.c4_files) if data.c4_files else None,
        c4_tfds_dir=data.c4_tfds_dir,
        sni_config=data.ni,
    )


def train_batches(
    data: DataConfig, batch_size: int, seed: int, skip: int, *, with_teacher: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Endless global numpy batches of the training split in a seed-fixed order, after ``skip``
    (replayed: produced and dropped); the sequential seqio stream, whose order is not
    ``TrainInput``'s.

    ``with_teacher`` keeps the teacher's input stream (``teacher_input_tokens``) for the KL
    terms; without it that stream is not built at all.
    """
    from tagi_jax.data import feature_converter

    vocabulary = make_vocabulary(data)
    register_data(data, vocabulary)
    batches = feature_converter.training_batches(
        data.task,
        dict(data.feature_lengths),
        batch_size,
        seed=seed,
        with_teacher=with_teacher,
        source=_source(data),
    )
    for _ in range(skip):
        next(batches)
    yield from batches


def local_rows(mesh, batch_size: int, rules=partitioning.DEFAULT_RULES) -> np.ndarray:
    """The rows of a global batch this process's devices hold (sorted global row indices):
    what it reads. With the batch over the data-parallel axes, process ``p`` of ``n`` holding
    its devices in mesh order gets ``[p * B / n, (p + 1) * B / n)``; a process whose devices
    replicate rows (a model axis across processes) reads those rows too."""
    sharding = batch_sharding(mesh, 1, rules)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


def place_local(value, sharding, rows, batch_size: int, *, batch_axis: int = 0) -> jax.Array:
    """A global array from this process's ``rows`` (``value``'s ``batch_axis`` holds them, in
    ``rows``' order); the global array has ``batch_size`` there. Each device takes its slice
    of the rows this process read; asking for a row it did not read is an error."""
    value = np.asarray(value)
    rows = np.asarray(rows, np.int64)
    if value.shape[batch_axis] != len(rows):
        raise ValueError(
            f"axis {batch_axis} of a {value.shape} value holds {value.shape[batch_axis]} rows, "
            f"this process read {len(rows)}"
        )
    position = np.full(batch_size, -1, np.int64)
    position[rows] = np.arange(len(rows))
    shape = value.shape[:batch_axis] + (batch_size,) + value.shape[batch_axis + 1 :]

    def fetch(index):
        index = list(index)
        wanted = position[index[batch_axis]]
        if np.any(wanted < 0):
            raise ValueError(
                f"a device of this process holds rows {np.arange(batch_size)[index[batch_axis]]} "
                f"of the batch, this process read {rows}: the sharding does not split the "
                "batch as batch_sharding does"
            )
        if len(wanted) and np.all(np.diff(wanted) == 1):  # contiguous: a view, no copy
            wanted = slice(int(wanted[0]), int(wanted[-1]) + 1)
        index[batch_axis] = wanted
        return value[tuple(index)]

    return jax.make_array_from_callback(shape, sharding, fetch)


class TrainInput:
    """This process's share of the training stream, placed as global arrays.

    Each process reads, formats and tokenizes only the rows of each global batch its own
    devices hold (``local_rows``), and a run resumed at ``start_batch`` starts the stream
    there by example index, without producing the batches before it
    (``feature_converter.host_batches``; tasks that cannot be indexed, TFDS C4, fall back to
    the replayed whole-batch stream). The global batch, and the loss, do not depend on the
    number of processes.

    ``next()`` gives ``(local, arrays)``: ``local`` the numpy rows this process read (every
    feature, ``task_id``/``category_id`` included, ``len(self.rows)`` rows in ``self.rows``'
    order) and ``arrays`` the global ``jax.Array`` of each of ``keys`` (``MODEL_FEATURES``, and
    ``teacher_input_tokens`` with ``with_teacher``), rows over the data-parallel axes.
    ``position`` is the global batch the next ``next()`` gives (``start_batch`` + batches
    given): what a checkpoint records. Close it (``close()`` or ``with``) when done.
    """

    def __init__(
        self,
        data: DataConfig,
        batch_size: int,
        seed: int,
        mesh,
        rules=partitioning.DEFAULT_RULES,
        *,
        start_batch: int = 0,
        with_teacher: bool = False,
    ):
        from tagi_jax.data import feature_converter

        self.mesh, self.rules = mesh, rules
        self.batch_size = batch_size
        self.rows = local_rows(mesh, batch_size, rules)
        self.keys = MODEL_FEATURES + (("teacher_input_tokens",) if with_teacher else ())
        self.position = start_batch
        vocabulary = make_vocabulary(data)
        register_data(data, vocabulary)
        self._batches = feature_converter.host_batches(
            data.task,
            dict(data.feature_lengths),
            batch_size,
            seed=seed,
            with_teacher=with_teacher,
            rows=self.rows,
            start_batch=start_batch,
            source=_source(data),
        )

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, jax.Array]]:
        local = next(self._batches)
        self.position += 1
        arrays = {
            key: self.place_local(
                local[key], batch_sharding(self.mesh, local[key].ndim, self.rules)
            )
            for key in self.keys
        }
        return local, arrays

    def place_local(self, value, sharding, *, batch_axis: int = 0) -> jax.Array:
        """A global array from values of this process's rows (``place_local``): e.g. each
        local example's teacher LoRA, looked up by the local batch's ``task_id``."""
        return place_local(value, sharding, self.rows, self.batch_size, batch_axis=batch_axis)

    @property
    def tokens_scale(self) -> float:
        """Global batch rows per local row: ``local_tokens(...) * tokens_scale`` estimates the
        global batch's tokens (exact when every process's rows hold as many)."""
        return self.batch_size / len(self.rows)

    @staticmethod
    def local_tokens(local: Mapping[str, np.ndarray]) -> int:
        """Target (loss) plus non-padding encoder tokens of this process's rows."""
        return int(local["decoder_loss_weights"].sum()) + int(
            (local["encoder_input_tokens"] > 0).sum()
        )

    def close(self) -> None:
        """Ends the input pipeline now (not at interpreter exit, where a tf.data iterator
        finalised during shutdown can abort the process)."""
        self._batches.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _source(data: DataConfig) -> str:
    """Where ``data.task`` reads from, for error messages."""
    field = _ni_dir_field(data.task)
    if field is None:
        field = "p3_dir" if "_p3_" in data.task else None
    if field is None and data.task == C4_TASK:
        field = "c4_files" if data.c4_files else "c4_tfds_dir"
    value = getattr(data, field) if field else None
    if isinstance(value, tuple):
        value = ", ".join(value)
    return f"DataConfig.{field}={value}" if value else ""


def teacher_group_names(data: DataConfig, group_by: str) -> list[str]:
    """Names indexed by the batch's ``task_id`` (``group_by="task"``) or ``category_id``
    (``"category"``): how a LoRA-teacher bank row is found for each example."""
    if group_by not in ("task", "category"):
        raise ValueError(f"group_by={group_by!r} is not task/category")
    ni_dir = data.sni_dir or data.suite_dir
    if data.task.startswith(("tagi_sni", "tagi_suite")) and ni_dir is not None:
        # data.ni's on_error decides which tasks exist, as for the batches' task ids
        tasks = ni_lib.load_split(ni_dir, "train", data.ni)
        return [name for name, _ in tasks] if group_by == "task" else ni_lib.categories(tasks)
    if "_p3_" in data.task and data.p3_dir is not None:
        from tagi_jax.data import p3_tasks

        return p3_tasks.group_names(data.p3_dir, group_by)
    raise ValueError(
        f"LoRA-teacher alignment needs natural-instructions or P3 data; task {data.task!r} "
        "has neither (set DataConfig.sni_dir/suite_dir/p3_dir)"
    )


def batch_sharding(mesh, ndim: int, rules=partitioning.DEFAULT_RULES):
    """Rows over the data-parallel axes, everything else whole."""
    return partitioning.named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def place(value, sharding) -> jax.Array:
    """A global array from the whole (host-side) ``value``: each process copies only the
    slices its own devices hold."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_global(
    numpy_batch: Mapping[str, np.ndarray],
    keys: Sequence[str],
    mesh,
    rules=partitioning.DEFAULT_RULES,
) -> dict[str, jax.Array]:
    """Global arrays of ``keys``, rows over the data-parallel axes."""
    return {
        key: place(numpy_batch[key], batch_sharding(mesh, np.ndim(numpy_batch[key]), rules))
        for key in keys
    }

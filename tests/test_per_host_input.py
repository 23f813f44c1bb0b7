"""Per-host input (``inputs.TrainInput``, ``feature_converter.host_batches``): each process
reads only the rows of the global batch its devices hold, the global batch is the same however
many processes read it, and a resumed stream starts at batch k by index, without formatting,
reading or tokenizing batches 0..k-1; for the built-in suite (natural-instructions format),
P3 (JSONL, TFRecord, the capped T0 mixture) and local C4 files."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import seqio

from tagi_jax.data import c4, example_index, feature_converter, ni, p3_tasks, pipeline, tasks, vocab
from tagi_jax.data.config import DataConfig
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.training import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (("inputs", 128), ("hyper_inputs", 128), ("teacher_inputs", 160), ("targets", 32))
BATCH = 8
BYTES = vocab.get_vocabulary("byte")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from tagi_jax.data import synthetic

    out = str(tmp_path_factory.mktemp("suite"))
    # 7 instances per task: an epoch is not a whole number of batches of 8
    synthetic.write_suite(out, instances_per_train_task=7, instances_per_test_task=2)
    return out


def _data(suite) -> DataConfig:
    return DataConfig(
        task="tagi_suite_def_pos2", suite_dir=suite, feature_lengths=LENGTHS, ni=ni.NIConfig()
    )


def _stream(task, rows=range(BATCH), start=0, with_teacher=True, seed=0, lengths=LENGTHS):
    return feature_converter.host_batches(
        task,
        dict(lengths),
        BATCH,
        seed=seed,
        with_teacher=with_teacher,
        rows=np.asarray(list(rows)),
        start_batch=start,
    )


def _take(stream, n):
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class _Counter:
    """Counts the calls of a real function (module attribute) and calls it."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    def settle(self, quiet: float = 0.3, timeout: float = 30.0) -> "_Counter":
        """Waits until no call came for ``quiet`` seconds, then counts from zero: a stream
        closed before counting began may still finish its read-ahead on tf.data's threads
        (more of it when the machine is busy), and that is not the next stream's reading."""
        deadline = time.monotonic() + timeout
        last = -1
        while self.calls != last and time.monotonic() < deadline:
            last = self.calls
            time.sleep(quiet)
        self.calls = 0
        return self


# --- the order -----------------------------------------------------------------------------


def test_order_is_a_seeded_permutation_per_epoch_with_caps():
    order = example_index.Order([5, 3, 40], seed=1, cap=10)
    assert order.epoch_size == 18
    previous = None
    for epoch in range(3):
        members, rows = order.lookup(np.arange(epoch * 18, (epoch + 1) * 18))
        assert np.bincount(members, minlength=3).tolist() == [5, 3, 10]
        for m, size in enumerate([5, 3, 40]):
            chosen = rows[members == m]
            assert len(set(chosen)) == len(chosen) and chosen.max() < size
        if previous is not None:
            assert set(rows[members == 2]) != set(previous)  # another capped subset
        previous = rows[members == 2]
    again = example_index.Order([5, 3, 40], seed=1, cap=10)
    np.testing.assert_array_equal(again.lookup([40, 3, 17])[1], order.lookup([40, 3, 17])[1])
    other = example_index.Order([5, 3, 40], seed=2, cap=10)
    assert not np.array_equal(other.lookup(np.arange(18))[1], order.lookup(np.arange(18))[1])


# --- natural-instructions format -----------------------------------------------------------


def test_indexed_ni_examples_are_iter_examples(suite):
    config = ni.NIConfig(num_pos_examples=2, max_source_length=200)
    examples = ni.IndexedExamples(suite, "train", config, seed=3, vocabulary=BYTES)
    indexed = [examples.example(t, k) for t, size in enumerate(examples.sizes) for k in range(size)]
    assert indexed == list(ni.iter_examples(suite, "train", config, seed=3, vocabulary=BYTES))


def test_an_epoch_holds_what_the_seqio_task_gives(suite):
    data = _data(suite)
    pipeline.register_data(data, BYTES)
    size = sum(ni.IndexedExamples(suite, "train", data.ni_for_task()).sizes)
    batch = max(b for b in range(1, 64) if size % b == 0)  # batches that make one epoch
    stream = feature_converter.host_batches(
        data.task, dict(LENGTHS), batch, seed=0, with_teacher=True, rows=range(batch)
    )
    ours = _rows(_take(stream, size // batch))
    conv = feature_converter.TagiFeatureConverter()
    lengths = conv.task_feature_lengths(dict(LENGTHS))
    ds = seqio.get_mixture_or_task(data.task).get_dataset(lengths, split="train", shuffle=False)
    assert sorted(ours) == sorted(_rows(conv(ds, lengths).batch(1).as_numpy_iterator()))


def _rows(batches):
    """Each example of ``batches`` as a hashable tuple of its features."""
    out = []
    for batch in batches:
        keys = sorted(batch)
        for i in range(len(batch[keys[0]])):
            out.append(tuple(tuple(np.ravel(batch[k][i]).tolist()) for k in keys))
    return out


def test_halves_of_the_rows_make_the_global_batch(suite):
    data = _data(suite)
    pipeline.register_data(data, BYTES)
    whole = _take(_stream(data.task), 4)
    first = _take(_stream(data.task, rows=range(0, 4)), 4)
    second = _take(_stream(data.task, rows=range(4, 8)), 4)
    for w, a, b in zip(whole, first, second, strict=True):
        _assert_same(w, {k: np.concatenate([a[k], b[k]]) for k in w})
    # every row of the mesh's devices, placed: the global arrays are the global batch
    mesh = mesh_lib.make_mesh((4, 2))
    with inputs.TrainInput(data, BATCH, 0, mesh, start_batch=2, with_teacher=True) as train:
        local, arrays = next(train)
        assert train.position == 3 and sorted(arrays) == sorted(train.keys)
    for key in train.keys:
        np.testing.assert_array_equal(np.asarray(arrays[key]), whole[2][key])


def test_resume_starts_at_batch_k_without_formatting_batches_before(suite, monkeypatch):
    data = _data(suite)
    pipeline.register_data(data, BYTES)
    k = 46  # 54 tasks x 7 = 378 examples an epoch: batch 47 spans epochs 0 and 1
    straight = _take(_stream(data.task), k + 3)
    formatted = _Counter(monkeypatch, ni, "format_instance").settle()
    resumed = _take(_stream(data.task, start=k), 3)
    for a, b in zip(straight[k:], resumed, strict=True):
        _assert_same(a, b)
    # only what 3 batches and the pipeline's read-ahead need, never the k * 8 before: tf.data
    # autotunes its parallel maps, so the read-ahead grows when the CPU is contended (up to
    # ~5 batches seen with two test processes on two cores); a replay would be >= k * 8
    assert 0 < formatted.calls < k * BATCH // 4, formatted.calls
    # and one process of two formats only its rows
    formatted.settle()
    half = _take(_stream(data.task, rows=range(4), start=k), 3)
    for a, b in zip(straight[k:], half, strict=True):
        _assert_same({key: v[:4] for key, v in a.items()}, b)
    # 12 rows + read-ahead (<= 35 seen under contention); whole batches would be twice that
    assert 0 < formatted.calls < 6 * BATCH, formatted.calls


# --- two processes --------------------------------------------------------------------------

_WORKER = """
import os, sys
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from tagi_jax.data import ni
from tagi_jax.parallel import mesh as mesh_lib
from tagi_jax.data.config import DataConfig
from tagi_jax.training import inputs
data = DataConfig(task="tagi_suite_def_pos2", suite_dir=sys.argv[3],
                         feature_lengths={lengths!r}, ni=ni.NIConfig())
out = {{}}
for name, shape in (("data4", (4, 1)), ("data2_model2", (2, 2))):
    mesh = mesh_lib.make_mesh(shape)
    with inputs.TrainInput(data, {batch}, 0, mesh, start_batch=1, with_teacher=True) as train:
        out[name + "/rows"] = train.rows
        for b in range(2):
            local, arrays = next(train)
            for key, value in local.items():
                out[f"{{name}}/{{b}}/local/{{key}}"] = value
            for key, array in arrays.items():
                for i, shard in enumerate(array.addressable_shards):
                    rows = shard.index[0]
                    out[f"{{name}}/{{b}}/shard{{i}}/{{key}}"] = np.asarray(shard.data)
                    out[f"{{name}}/{{b}}/shard{{i}}/{{key}}/rows"] = np.arange({batch})[rows]
np.savez(sys.argv[4], **out)
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_only_their_rows_of_the_one_process_batches(suite, tmp_path):
    port = _free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    code = _WORKER.format(lengths=LENGTHS, batch=BATCH)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"localhost:{port}", str(p), suite, tmp_path / f"{p}.npz"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "of 2 devices 4" in out
    data = _data(suite)
    pipeline.register_data(data, BYTES)
    reference = _take(_stream(data.task, start=1), 2)  # one process, every row
    results = [np.load(tmp_path / f"{p}.npz") for p in range(2)]
    # data over 4 devices, 2 per process: each process reads its half, in process order
    assert [r["data4/rows"].tolist() for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for name in ("data4", "data2_model2"):
        for b in range(2):
            for r in results:
                rows = r[f"{name}/rows"]
                for key, value in reference[b].items():
                    np.testing.assert_array_equal(r[f"{name}/{b}/local/{key}"], value[rows])
                shards = [k for k in r.files if k.startswith(f"{name}/{b}/shard") and "/rows" in k]
                assert shards
                for key in shards:
                    feature = key.split("/")[3]
                    np.testing.assert_array_equal(
                        r[key[: -len("/rows")]], reference[b][feature][r[key]]
                    )
            if name == "data4":  # together, the halves are the one-process global batch
                for key, value in reference[b].items():
                    halves = [r[f"{name}/{b}/local/{key}"] for r in results]
                    np.testing.assert_array_equal(np.concatenate(halves), value)


# --- P3 and C4 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p3_dirs(tmp_path_factory, shared_data_dir):
    from tagi_jax.data import p3

    raw = os.path.join(shared_data_dir, "p3", "raw", "rotten_tomatoes", "sample.jsonl")
    templates = os.path.join(shared_data_dir, "p3", "templates", "rotten_tomatoes")
    dirs = {}
    for fmt in ("jsonl", "tfrecord"):
        out = str(tmp_path_factory.mktemp(f"p3_{fmt}"))
        p3.render_dataset(
            raw,
            os.path.join(templates, "templates.yaml"),
            out,
            split="train",
            dataset_name="rotten_tomatoes",
            max_examples=12,
            fmt=fmt,
        )
        dirs[fmt] = out
    return dirs


@pytest.mark.parametrize("fmt", ["jsonl", "tfrecord"])
def test_p3_rows_by_index_are_the_sequential_rows(p3_dirs, fmt):
    root = p3_dirs[fmt]
    name = sorted(os.listdir(root))[0]
    rows = p3_tasks.IndexedRows(os.path.join(root, name), "train", 3, 1)
    path = p3_tasks._split_file(os.path.join(root, name), "train")
    expected = [
        p3_tasks._example(row, f"{path}: row {n}", 3, 1)
        for n, row in enumerate(p3_tasks._rows(path), start=1)
    ]
    assert [rows.example(r) for r in range(len(rows))] == expected
    assert len(expected) > 1


@pytest.mark.parametrize("fmt", ["jsonl", "tfrecord"])
def test_p3_mixture_per_host_and_resumed(p3_dirs, fmt, monkeypatch):
    prefix = f"host_{fmt}"
    registered = tasks.register_tasks(
        vocabulary=BYTES, p3_dir=p3_dirs[fmt], prefix=prefix, max_examples_per_task=5
    )
    mixture = f"{prefix}_p3_t0_train"
    assert mixture in registered.mixtures
    source = tasks.indexed_source(mixture, 0)
    assert source.cap == 5 and len(source.sizes) > 3 and min(source.sizes) > 5
    lengths = (("inputs", 256), ("hyper_inputs", 256), ("teacher_inputs", 256), ("targets", 16))
    k = 24  # epochs in (5 rows of each task an epoch)
    straight = _take(_stream(mixture, lengths=lengths), k + 2)
    read = _Counter(monkeypatch, p3_tasks, "_example").settle()
    first = _take(_stream(mixture, rows=range(4), start=k, lengths=lengths), 2)
    second = _take(_stream(mixture, rows=range(4, 8), start=k, lengths=lengths), 2)
    for w, a, b in zip(straight[k:], first, second, strict=True):
        _assert_same(w, {key: np.concatenate([a[key], b[key]]) for key in w})
    # 2 x 2 half batches + read-ahead (autotuned: more under CPU contention), never the
    # k * 8 examples before (a replay reads all of them)
    assert 0 < read.calls < k * BATCH // 2, read.calls
    if fmt == "jsonl":  # the examples are the seqio task's (tokenization, EOS, ids)
        member = seqio.get_mixture_or_task(mixture).tasks[1]
        task_id = sorted(os.listdir(p3_dirs[fmt])).index(member.name[len(f"{prefix}_p3_") :])
        conv = feature_converter.TagiFeatureConverter()
        lengths = conv.task_feature_lengths(dict(lengths))
        ds = member.get_dataset(lengths, split="train", shuffle=False)
        theirs = set(_rows(conv(ds, lengths).batch(1).as_numpy_iterator()))
        ours = [
            {key: value[i : i + 1] for key, value in batch.items()}
            for batch in straight
            for i in np.flatnonzero(batch["task_id"] == task_id)
        ]
        assert ours and set(_rows(ours)) <= theirs


def test_local_c4_per_host_and_resumed(tmp_path, monkeypatch):
    files = []
    for f in range(2):
        path = tmp_path / f"c4_{f}.jsonl"
        docs = _c4_docs(30, seed=f)
        docs[3] = "tiny"  # too short for three 4-token segments: split shorter, not dropped
        path.write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs))
        files.append(str(path))
    tasks.register_tasks(vocabulary=BYTES, c4_files=files, prefix="host")
    task = "host_c4_pretrain"
    lengths = (("inputs", 256), ("hyper_inputs", 256), ("targets", 256))
    k = 20  # 60 documents an epoch
    straight = _take(_stream(task, with_teacher=False, lengths=lengths), k + 2)
    read = _Counter(monkeypatch, c4, "_document").settle()
    first = _take(_stream(task, rows=range(4), start=k, with_teacher=False, lengths=lengths), 2)
    second = _take(_stream(task, rows=range(4, 8), start=k, with_teacher=False, lengths=lengths), 2)
    for w, a, b in zip(straight[k:], first, second, strict=True):
        _assert_same(w, {key: np.concatenate([a[key], b[key]]) for key in w})
    # 2 x 2 half batches + read-ahead (autotuned: more under CPU contention), never the
    # k * 8 examples before (a replay reads all of them)
    assert 0 < read.calls < k * BATCH // 2, read.calls
    # a document long enough splits as the seqio task splits it; "tiny" too, shorter
    epoch = _rows(_take(_stream(task, with_teacher=False, lengths=lengths), 60 // BATCH))
    conv = feature_converter.TagiFeatureConverter(with_teacher=False)
    lengths = conv.task_feature_lengths(dict(lengths))
    ds = seqio.get_mixture_or_task(task).get_dataset(lengths, split="train", shuffle=False)
    theirs = set(_rows(conv(ds, lengths).batch(1).as_numpy_iterator()))
    assert len(theirs) == 58 and len(set(epoch) - theirs) <= 2  # the two "tiny"s


def _c4_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
    return [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(5, 60, n)]


@pytest.fixture(scope="module")
def tfds_c4(tmp_path_factory):
    """A tiny TFDS dataset shaped like c4/en (``text``, ``url``), prepared offline."""
    import tensorflow_datasets as tfds

    docs = _c4_docs(45, seed=1)

    class TagiPerHostFakeC4(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            features = tfds.features.FeaturesDict({"text": text, "url": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, doc in enumerate(docs):
                yield i, {"text": doc, "url": f"https://example.com/{i}"}

    out = str(tmp_path_factory.mktemp("tfds"))
    tfds.disable_progress_bar()
    TagiPerHostFakeC4(data_dir=out).download_and_prepare(download_dir=os.path.join(out, "dl"))
    return out, "tagi_per_host_fake_c4:1.0.0"


def test_tfds_c4_per_host_and_resumed_in_file_order(tfds_c4):
    data_dir, name = tfds_c4
    tasks.register_c4("host_tfds_c4", BYTES, tfds_data_dir=data_dir, tfds_name=name)
    assert tasks.indexed_source("host_tfds_c4", 0) is None
    assert tasks.sequential_source("host_tfds_c4") is not None
    lengths = (("inputs", 256), ("hyper_inputs", 256), ("teacher_inputs", 256), ("targets", 256))

    def stream(**kwargs):
        return _stream("host_tfds_c4", with_teacher=False, lengths=lengths, **kwargs)

    k = 4  # 45 documents: batch 5 spans the split's end and its start again
    straight = _take(stream(), k + 3)
    first = _take(stream(rows=range(4), start=k), 3)
    second = _take(stream(rows=range(4, 8), start=k), 3)
    for w, a, b in zip(straight[k:], first, second, strict=True):
        _assert_same(w, {key: np.concatenate([a[key], b[key]]) for key in w})
    # the split's start again after its end: the stream's example 45 is its example 0
    _assert_same(
        {key: v[5:6] for key, v in straight[5].items()},
        {key: v[0:1] for key, v in straight[0].items()},
    )


def test_bad_data_is_one_line_from_the_per_host_stream(p3_dirs, tmp_path):
    import shutil

    from tagi_jax.data.errors import DataError

    root = tmp_path / "p3"
    shutil.copytree(p3_dirs["jsonl"], root)
    name = sorted(os.listdir(root))[0]
    path = root / name / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = "{oops"
    path.write_text("\n".join(lines) + "\n")
    tasks.register_tasks(vocabulary=BYTES, p3_dir=str(root), prefix="bad")
    with pytest.raises(DataError) as info:
        _take(_stream(f"bad_p3_{name}"), 2)  # 12 rows: the first two batches read them all
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "line 4 is not valid JSON" in message
    path.write_text("")
    with pytest.raises(DataError, match="no training examples"):
        _stream(f"bad_p3_{name}")


def test_place_local_checks_rows():
    from tagi_jax.parallel import partitioning

    mesh = mesh_lib.make_mesh((8, 1))
    sharding = inputs.batch_sharding(mesh, 2)
    rows = inputs.local_rows(mesh, 16)
    assert rows.tolist() == list(range(16))
    value = np.arange(32).reshape(16, 2)
    np.testing.assert_array_equal(np.asarray(inputs.place_local(value, sharding, rows, 16)), value)
    # the batch on axis 1 (LoRA adapters are [layers, batch, ...])
    adapters = np.arange(48).reshape(3, 16)
    on_axis_1 = partitioning.named_sharding(mesh, (None, "batch"))
    placed = inputs.place_local(adapters, on_axis_1, rows, 16, batch_axis=1)
    np.testing.assert_array_equal(np.asarray(placed), adapters)
    with pytest.raises(ValueError, match="rows"):
        inputs.place_local(value[:8], sharding, rows, 16)
    # a process that read only rows 0..7 cannot place rows its devices do not hold
    with pytest.raises(ValueError, match="this process read"):
        inputs.place_local(value[:8], sharding, np.arange(8), 16)

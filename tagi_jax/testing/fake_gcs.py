"""A fake Google Cloud Storage on localhost, for tests of ``gs://`` paths without a network.

``fake_gcs()`` starts ``gcp-storage-emulator`` (a pure-Python GCS JSON-API server, in memory)
on ``127.0.0.1`` and points every client the project uses at it:

* ``gcsfs`` (what ``etils.epath``, hence ``tagi_jax.paths`` and orbax's own directory handling,
  use for ``gs://`` once ``EPATH_USE_TF=false``): ``STORAGE_EMULATOR_HOST``;
* TensorStore (what orbax writes array data with: its ``gcs`` kvstore):
  ``TENSORSTORE_GCS_HTTP_URL``, ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (a fixed bearer token instead
  of Application Default Credentials) and ``TENSORSTORE_GCS_HTTP_VERSION=1`` (plain HTTP/1.1);
* ``EPATH_USE_TF=false``: epath uses fsspec/gcsfs, never ``tf.io.gfile`` (TensorFlow stays
  inside ``tagi_jax.data``); ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs does not ask
  the storage-control API (unreachable here) what kind of bucket it talks to.

One server per process, started on first use and kept until the process exits: TensorStore reads
its endpoint once per process, so a second server on another port would not be seen. Each
``fake_gcs()`` creates a fresh bucket and yields ``"gs://<bucket>"``; the environment is
restored when the block ends.

    with fake_gcs() as root:          # "gs://tagi-test-1"
        paths.write_json(f"{root}/run/x.json", {...})
        ocp.StandardCheckpointer().save(f"{root}/run/ckpt", tree)

Needs the test dependencies ``gcp-storage-emulator`` and ``gcsfs`` (requirements-test.txt);
``available()`` says whether they are installed, for a ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import sys
import threading
from collections.abc import Iterator
from functools import partial

_TOKEN = "fake-token-for-the-emulator"
_lock = threading.Lock()
_server: dict = {}
_buckets = itertools.count(1)


def available() -> bool:
    """Whether the emulator and gcsfs are installed."""
    return all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs"))


def _start() -> dict:
    """Starts the one in-memory emulator of this process (a daemon thread)."""
    with _lock:
        if _server:
            return _server
        from http import server as http_server

        from gcp_storage_emulator.server import RequestHandler
        from gcp_storage_emulator.storage import Storage

        class _Server(http_server.HTTPServer):
            def handle_error(self, request, client_address):
                # A client that closes its connection early (TensorStore does after a
                # conditional read) is not an error of the test.
                if isinstance(sys.exc_info()[1], ConnectionError):
                    return
                super().handle_error(request, client_address)

        _serve_generations()
        storage = Storage(use_memory_fs=True)
        # Port 0: the kernel picks a free port, with no race between choosing and binding.
        httpd = _Server(("127.0.0.1", 0), partial(RequestHandler, storage))
        thread = threading.Thread(target=httpd.serve_forever, name="fake-gcs", daemon=True)
        thread.start()
        # expected 404s (orbax probing for files) are logged as errors
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        _server.update(
            url=f"http://127.0.0.1:{httpd.server_address[1]}", storage=storage, httpd=httpd
        )
        return _server


def _clear_client_caches() -> None:
    """Forgets cached gcsfs clients and epath's backend choice (both read the environment
    when first used)."""
    with contextlib.suppress(ImportError):
        from etils.epath import backend, gpath

        gpath._is_tf_installed.cache_clear()
        backend.fsspec_backend._get_filesystem.cache_clear()
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


def _serve_generations() -> None:
    """Makes the emulator's object downloads behave as GCS's do for a generation-aware client.

    GCS answers ``GET .../o/<object>?alt=media`` with the object's ``x-goog-generation`` and
    honours ``ifGenerationNotMatch`` (304) and ``ifGenerationMatch`` (412); the emulator does
    neither. TensorStore (orbax's OCDBT writes) re-reads a manifest it has just written with
    ``ifGenerationNotMatch=<its generation>`` and takes the generation of the answer as the
    condition of its next write: without the header that is no generation at all, and the write
    fails with "Malformed StorageGeneration" whenever the re-read happens (a race, 1 save in 10).
    """
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "_tagi_generations", False):
        return

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:
            generation = str(obj.get("generation"))
            response["x-goog-generation"] = generation
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            not_match = request.query.get("ifGenerationNotMatch")
            if not_match and not_match[0] == generation:
                response.status = HTTPStatus.NOT_MODIFIED
                return None
            match = request.query.get("ifGenerationMatch")
            if match and match[0] != generation:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return download(request, response, storage, *args, **kwargs)

    download_with_generation._tagi_generations = True
    # objects.get looks `download` up in its module at each call (the ?alt=media path)
    objects.download = download_with_generation


@contextlib.contextmanager
def fake_gcs(bucket: str | None = None) -> Iterator[str]:
    """Points gcsfs, epath and TensorStore at the in-process emulator; yields ``gs://<bucket>``
    (a new, empty bucket: ``bucket`` or ``tagi-test-<n>``)."""
    from gcp_storage_emulator.handlers import buckets

    server = _start()
    name = bucket or f"tagi-test-{next(_buckets)}"
    buckets.create_bucket(name, server["storage"])
    env = {
        "STORAGE_EMULATOR_HOST": server["url"],
        "TENSORSTORE_GCS_HTTP_URL": server["url"],
        "TENSORSTORE_GCS_HTTP_VERSION": "1",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": _TOKEN,
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import; imported earlier, it would ask
    # the unreachable storage-control API about every bucket and log a warning each time.
    gcsfs_logger = logging.getLogger("gcsfs")
    gcsfs_level = gcsfs_logger.level
    gcsfs_logger.setLevel(logging.ERROR)
    _clear_client_caches()
    try:
        yield f"gs://{name}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        gcsfs_logger.setLevel(gcsfs_level)
        _clear_client_caches()

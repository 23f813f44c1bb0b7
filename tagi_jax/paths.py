"""Every directory and file tagi_jax reads or writes, local or in cloud storage, by one helper.

A path is a ``str`` (``os.PathLike`` is accepted too): a local path, or a URI
``scheme://bucket/key`` (``gs://``; also ``s3://``, ``az://``, ``hf://``, what
``etils.epath`` supports). Orbax, TensorStore and the TensorBoard writer take the same strings,
so one value of ``MODEL_DIR`` reaches all of them unchanged.

* **Local paths** go through ``os`` / ``shutil`` exactly as before: no cloud library is imported
  for them, symbolic links keep their meaning, directory renames are atomic.
* **URIs** go through ``etils.epath``, which uses fsspec (``gcsfs`` for ``gs://``) or
  ``tf.io.gfile``. epath prefers ``tf.io.gfile`` whenever TensorFlow is installed; TensorFlow is
  imported only inside ``tagi_jax.data``, so importing this module sets ``EPATH_USE_TF=false``
  when ``gcsfs`` is installed and the variable is not set (set ``EPATH_USE_TF=true`` to keep
  gfile). Without gcsfs, epath falls back to ``tf.io.gfile`` (when TensorFlow is installed).
* **Never ``os.path.abspath`` a URI**: ``os.path.abspath("gs://b/x")`` is ``<cwd>/gs:/b/x``, a
  local directory on every worker. ``absolute`` leaves a URI alone (it only drops a trailing
  ``/`` and doubled ``/``) and makes a local path absolute; ``join``, ``dirname``,
  ``is_within`` keep the ``scheme://`` intact (``os.path`` functions collapse it).

Object stores are not file systems; what differs:

* No directories: a "directory" exists when an object lies under its prefix; ``makedirs`` makes
  nothing, so an "empty directory" does not exist. No symbolic links (``islink`` is False).
* One object write is atomic (the object appears whole when its upload completes), so
  ``write_text`` / ``write_bytes`` / ``write_json`` write it directly; a local file is written
  to a temporary file beside it and renamed.
* No appends: ``append_text`` rewrites the object (gcsfs's ``open(path, "a")`` overwrites).
* A directory rename is not atomic: ``move_dir`` and ``swap_dir`` copy every object (inside one
  store, a server-side copy when fsspec is the backend) and then delete the source. The files
  named in ``last`` (a directory's "complete" marker) are copied last and deleted first, so a
  reader never takes a half-copied or half-deleted directory for a complete one.
* Hugging Face directories are read memory-mapped: they must be local (``require_local``).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

PathLike = str | os.PathLike

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _configure_epath_backend() -> None:
    """epath reads ``gs://`` with ``tf.io.gfile`` when TensorFlow is installed, which imports
    TensorFlow (seconds, gigabytes) in the exporter and the predictor too. With gcsfs installed
    use fsspec instead, unless the environment says otherwise."""
    if "EPATH_USE_TF" in os.environ:
        return
    try:
        installed = importlib.util.find_spec("gcsfs") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return
    os.environ["EPATH_USE_TF"] = "false"
    with contextlib.suppress(ImportError, AttributeError):
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()  # epath caches the choice on first use


_configure_epath_backend()


def _read_umask() -> int:
    # os.umask can only be read by setting it: done once, at import, not while threads
    # (orbax's) create files
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


# --- names -------------------------------------------------------------------------------------


def fspath(path: PathLike) -> str:
    return os.fspath(path)


def scheme(path: PathLike) -> str | None:
    """``"gs"`` for ``gs://b/x``; None for a local path."""
    match = _URI.match(fspath(path))
    return match.group(1).lower() if match else None


def is_uri(path: PathLike) -> bool:
    """Whether ``path`` is a ``scheme://`` URI (cloud storage), not a local path."""
    return scheme(path) is not None


def is_local(path: PathLike) -> bool:
    return not is_uri(path)


def _split(uri: str) -> tuple[str, str]:
    """``("gs://bucket", "a/b")`` for ``gs://bucket/a/b``."""
    head, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    return f"{head}://{bucket}", key


def _clean_uri(uri: str) -> str:
    root, key = _split(uri)
    key = "/".join(part for part in key.split("/") if part not in ("", "."))
    return f"{root}/{key}" if key else root


def absolute(path: PathLike) -> str:
    """A URI unchanged (trailing and doubled ``/`` dropped); a local path made absolute."""
    path = fspath(path)
    return _clean_uri(path) if is_uri(path) else os.path.abspath(path)


def realpath(path: PathLike) -> str:
    """``absolute``, with a local path's symbolic links resolved (URIs have none)."""
    path = fspath(path)
    return _clean_uri(path) if is_uri(path) else os.path.realpath(path)


def join(path: PathLike, *parts: PathLike) -> str:
    """``os.path.join`` that keeps ``scheme://``: a URI part or an absolute local part
    replaces what comes before it, as ``os.path.join`` does with absolute parts."""
    result = fspath(path)
    for part in map(fspath, parts):
        if is_uri(part) or not is_uri(result):
            result = part if is_uri(part) else os.path.join(result, part)
        elif part.startswith("/"):
            result = part
        elif part:
            result = result.rstrip("/") + "/" + part
    return result


def dirname(path: PathLike) -> str:
    """The parent; a bucket (``gs://b``) is its own parent, as ``/`` is."""
    path = fspath(path)
    if not is_uri(path):
        return os.path.dirname(path)
    root, key = _split(_clean_uri(path))
    return f"{root}/{key.rsplit('/', 1)[0]}" if "/" in key else root


def basename(path: PathLike) -> str:
    path = fspath(path)
    if not is_uri(path):
        return os.path.basename(path)
    return _clean_uri(path).split("://", 1)[1].rsplit("/", 1)[-1]


def is_within(path: PathLike, parent: PathLike) -> bool:
    """Whether ``path`` is ``parent`` or lies below it (both absolute); a URI never lies in a
    local directory nor the other way round."""
    path, parent = fspath(path), fspath(parent)
    if is_uri(path) != is_uri(parent):
        return False
    if not is_uri(path):
        return os.path.commonpath([path, parent]) == parent
    path, parent = _clean_uri(path), _clean_uri(parent)
    return path == parent or path.startswith(parent + "/")


def relpath(path: PathLike, start: PathLike) -> str:
    """``path`` relative to ``start`` (for a URI: ``start`` must contain it)."""
    path, start = fspath(path), fspath(start)
    if not is_uri(path) and not is_uri(start):
        return os.path.relpath(path, start)
    path, start = _clean_uri(path), _clean_uri(start)
    if path == start:
        return "."
    if not is_within(path, start):
        raise ValueError(f"{path} does not lie in {start}")
    return path[len(start) + 1 :]


def require_local(path: PathLike, what: str) -> str:
    """``path`` when it is local; a ValueError saying why ``what`` must be local otherwise."""
    path = fspath(path)
    if is_uri(path):
        raise ValueError(
            f"{what} must be a local directory, got {path}: it is read memory-mapped from "
            "local files. Copy it to local disk first, or convert it once to a parameter "
            "checkpoint (python -m tagi_jax.convert.hf_t5 --hf_dir DIR --out OUT), which "
            "can live in cloud storage"
        )
    return path


def Path(path: PathLike):  # noqa: N802 (a constructor, as epath.Path)
    """``etils.epath.Path(path)``: for code that wants a path object (orbax takes both)."""
    from etils import epath

    return epath.Path(fspath(path))


def _cloud(path: str):
    from etils import epath

    return epath.Path(path)


def _fresh(path: str):
    """``_cloud(path)`` for a query: gcsfs caches listings and learns nothing of what
    TensorStore (orbax's array data) writes past it, so its cache is dropped first."""
    p = _cloud(path)
    with contextlib.suppress(ImportError):
        from etils.epath import backend

        if getattr(p, "_backend", None) is backend.fsspec_backend:
            backend.fsspec_backend.fs(path).invalidate_cache()
    return p


# --- queries -----------------------------------------------------------------------------------


def exists(path: PathLike) -> bool:
    path = fspath(path)
    return _fresh(path).exists() if is_uri(path) else os.path.exists(path)


def lexists(path: PathLike) -> bool:
    """``exists``, counting a broken local symbolic link."""
    path = fspath(path)
    return _fresh(path).exists() if is_uri(path) else os.path.lexists(path)


def isdir(path: PathLike) -> bool:
    path = fspath(path)
    return _fresh(path).is_dir() if is_uri(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
    path = fspath(path)
    if not is_uri(path):
        return os.path.isfile(path)
    p = _fresh(path)
    return p.exists() and not p.is_dir()


def islink(path: PathLike) -> bool:
    """A local symbolic link; cloud storage has none."""
    path = fspath(path)
    return False if is_uri(path) else os.path.islink(path)


def listdir(path: PathLike) -> list[str]:
    """The names in a directory (FileNotFoundError when there is none)."""
    path = fspath(path)
    if not is_uri(path):
        return os.listdir(path)
    p = _fresh(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no such directory: {path}")
    return [child.name for child in p.iterdir()]


def walk(top: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` (top-down, symbolic links not followed); for a URI, roots are URIs."""
    top = fspath(top)
    if not is_uri(top):
        yield from os.walk(top)
        return
    prefix = f"{scheme(top)}://"
    for root, dirs, files in _fresh(top).walk():
        root = fspath(root)
        # fsspec's walk yields "bucket/key", gfile's "gs://bucket/key"
        yield (root if is_uri(root) else prefix + root.lstrip("/")), list(dirs), list(files)


def getsize(path: PathLike) -> int:
    path = fspath(path)
    return int(_fresh(path).stat().length) if is_uri(path) else os.path.getsize(path)


# --- changes -----------------------------------------------------------------------------------


def makedirs(path: PathLike, exist_ok: bool = True) -> None:
    """``os.makedirs``; nothing to make in cloud storage (directories are key prefixes)."""
    path = fspath(path)
    if not is_uri(path):
        os.makedirs(path, exist_ok=exist_ok)
        return
    if not exist_ok and exists(path):
        raise FileExistsError(f"{path} already exists")
    with contextlib.suppress(FileExistsError):
        _cloud(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike, missing_ok: bool = False) -> None:
    path = fspath(path)
    try:
        if is_uri(path):
            _cloud(path).unlink()
        else:
            os.remove(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: PathLike, missing_ok: bool = False) -> None:
    path = fspath(path)
    if is_uri(path):
        if missing_ok and not exists(path):
            return
        _cloud(path).rmtree(missing_ok=missing_ok)
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def open(path: PathLike, mode: str = "r", encoding: str | None = None) -> IO:  # noqa: A001
    """``open`` for both; text is UTF-8 (cloud storage has no other)."""
    path = fspath(path)
    if not is_uri(path):
        if "b" in mode:
            return builtins.open(path, mode)
        return builtins.open(path, mode, encoding=encoding or "utf-8")
    return _cloud(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    with open(path, "r") as f:
        return f.read()


def read_json(path: PathLike) -> Any:
    """The JSON value in ``path`` (FileNotFoundError, OSError or json.JSONDecodeError)."""
    return json.loads(read_text(path))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``path`` whole or not at all: a local file through a temporary file beside it
    and a rename; a cloud object directly (an upload is atomic)."""
    path = fspath(path)
    if is_uri(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what a plain open() gives
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """``write_bytes`` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any, *, indent: int = 2, sort_keys: bool = True, **kw):
    """Atomic JSON write (``write_bytes``); ``kw`` are ``json.dumps``'s."""
    write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, **kw))


def append_text(path: PathLike, text: str) -> None:
    """Appends ``text`` to ``path`` (created when missing). Local: ``open(path, "a")``, flushed.
    Cloud storage has no append (gcsfs's mode "a" silently *overwrites*): the object is read and
    written back whole with ``text`` added, so the cost grows with the object and two writers
    would lose each other's lines; for logs written every so many steps by one process."""
    path = fspath(path)
    if not is_uri(path):
        with builtins.open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    previous = read_bytes(path) if isfile(path) else b""
    write_bytes(path, previous + text.encode("utf-8"))


def _server_side_copy(src: str, dst: str) -> bool:
    """Copies ``src`` to ``dst`` inside one store without the data passing through this
    machine, when fsspec is epath's backend for them; False when it is not."""
    if scheme(src) != scheme(dst) or scheme(src) is None:
        return False
    try:
        from etils.epath import backend
    except ImportError:
        return False
    if getattr(_cloud(src), "_backend", None) is not backend.fsspec_backend:
        return False
    backend.fsspec_backend.fs(src).copy(src, dst)
    return True


def copyfile(src: PathLike, dst: PathLike) -> None:
    """Copies one file, between any two of local disk and cloud storage; replaces ``dst``."""
    src, dst = fspath(src), fspath(dst)
    if not is_uri(src) and not is_uri(dst):
        shutil.copyfile(src, dst)
    elif not _server_side_copy(src, dst):
        _cloud(src).copy(dst, overwrite=True)


def _files(top: str) -> list[str]:
    """Every file below ``top``, relative to it, "/"-separated, sorted."""
    found = []
    for root, _, files in walk(top):
        rel = relpath(root, top)
        for name in files:
            found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(found)


def copytree(src: PathLike, dst: PathLike, *, last: Iterable[str] = ()) -> None:
    """Copies every file below ``src`` to the same place below ``dst`` (any two of local disk
    and cloud storage); the files named in ``last`` (relative paths) are copied last, in that
    order. Existing files of ``dst`` are replaced, others kept."""
    src, dst = fspath(src), fspath(dst)
    last = list(last)
    files = _files(src)
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    made: set[str] = set()
    for rel in ordered:
        target = join(dst, rel)
        parent = dirname(target)
        if parent not in made:
            makedirs(parent)
            made.add(parent)
        copyfile(join(src, rel), target)


def _delete_tree(path: str, last: Iterable[str]) -> None:
    """``rmtree``, removing the ``last`` files (a complete-marker) first."""
    for rel in last:
        remove(join(path, rel), missing_ok=True)
    rmtree(path, missing_ok=True)


def move_dir(src: PathLike, dst: PathLike, *, last: Iterable[str] = ()) -> None:
    """Moves the directory ``src`` to ``dst`` (which must not exist). Two local paths: one
    atomic ``os.replace`` (same file system). Otherwise NOT atomic: every file is copied
    (``last`` last) and then ``src`` deleted (``last`` first)."""
    src, dst = fspath(src), fspath(dst)
    if not is_uri(src) and not is_uri(dst):
        os.replace(src, dst)
        return
    if not exists(src):
        raise FileNotFoundError(f"cannot move {src}: it does not exist")
    if exists(dst):
        raise FileExistsError(f"cannot move {src} to {dst}: it exists")
    copytree(src, dst, last=last)
    _delete_tree(src, last)


def swap_dir(tmp: PathLike, out: PathLike, *, last: Iterable[str] = ()) -> None:
    """Puts the complete directory ``tmp`` at ``out``; a previous ``out`` is moved aside first
    and deleted only once the new one is in place (put back if the move fails).

    Local (``tmp`` beside ``out``): renames, so ``out`` is always the old or the new directory
    whole. Cloud storage: copies (``move_dir``), so while it runs ``out`` is absent or partly
    copied, never holding the ``last`` marker files until everything else is there; the aside
    copy is ``<out>.old-<random>`` beside it."""
    tmp, out = fspath(tmp), fspath(out)
    last = list(last)
    local = not is_uri(tmp) and not is_uri(out)
    if not lexists(out):
        move_dir(tmp, out, last=last)
        return
    if local:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        aside = os.path.join(old, os.path.basename(out))
    else:
        old = aside = f"{absolute(out)}.old-{uuid.uuid4().hex[:8]}"
    move_dir(out, aside, last=last)
    try:
        move_dir(tmp, out, last=last)
    except BaseException:
        if not local:
            _delete_tree(out, last)  # what was copied of the new one
        move_dir(aside, out, last=last)
        if local:
            os.rmdir(old)
        raise
    if local:
        shutil.rmtree(old, ignore_errors=True)
    else:
        _delete_tree(aside, last)


def local_dir_for(out: PathLike, prefix: str) -> str:
    """A fresh directory to write ``out``'s content into before ``swap_dir``: beside ``out``
    when it is local (so the final rename is atomic), in the local temporary directory when
    ``out`` is in cloud storage (for writers that need local files: safetensors, tokenizers)."""
    out = fspath(out)
    if is_uri(out):
        return tempfile.mkdtemp(prefix=f"{prefix}{basename(out)}-")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out)}{prefix}", dir=parent)

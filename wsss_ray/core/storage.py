"""One storage layer over local paths and ``s3://bucket/prefix`` URIs, built on ``pyarrow.fs``.

Every writer is atomic: a reader sees the previous object or the complete new one, never a prefix of it.
Locally that is a temp file in the same directory plus ``os.replace``; on S3 the object appears only when
the upload completes, so the payload is fully built in memory *before* the upload starts (pyarrow's output
stream completes the upload on ``close()``, including the ``close()`` that a ``with`` block runs on an
exception, which would publish a truncated object).

S3 settings come from the standard AWS environment variables (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``/``AWS_REGION``).
Credentials never appear in logs, reprs or exception messages produced here.

S3 requests that fail on the network (endpoint unreachable, connection reset, 5xx, throttling) are retried
with exponential backoff, ``WSSS_S3_RETRIES`` attempts in all (default 10: waits of 50 ms doubling, about 25 s
in total; 8 attempts wait about 6 s, 12 about 100 s). Past that budget the call raises :class:`StorageError`
naming the URI; per-item stages then stop (``core.items.guarded`` re-raises it) rather than record the item
as bad, and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import threading
import uuid
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from wsss_ray.core.s3_retry import RETRIES_VAR, RetryingS3FileSystem, s3_retries
from wsss_ray.core.s3_settings import s3_kwargs

__all__ = [
    "RETRIES_VAR", "StorageError", "copy_to_local", "delete", "exists", "is_s3", "join", "list_files",
    "local_path_or_none", "makedirs", "read_bytes", "read_json", "read_parquet", "read_text", "resolve",
    "s3_retries", "train_storage", "upload_dir",
    "write_bytes", "write_json", "write_parquet", "write_text",
]

_S3_SCHEME = "s3://"
_FILE_SCHEME = "file://"
# Temp files of in-flight local writes: hidden, and filtered out of listings so they never look like outputs.
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_COPY_CHUNK = 8 * 1024 * 1024
_KEEP_KINDS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

_LOCAL_FS = pafs.LocalFileSystem()
_S3_CACHE: dict[tuple[str, ...], pafs.S3FileSystem] = {}
_S3_LOCK = threading.Lock()
# Per-process random key: the cache key holds only an HMAC of the secrets, useless outside this process.
_KEY_SALT = secrets.token_bytes(32)


class StorageError(OSError):
    """The store failed (unreachable past the retry budget, a server error): no fault of the item at the URI.

    Missing files, permissions and the like keep their builtin kinds (FileNotFoundError, PermissionError ...).
    """


# ----------------------------------------------------------------------------------------------------------
# URIs and filesystems
# ----------------------------------------------------------------------------------------------------------

def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri[:5].lower() == _S3_SCHEME


def _is_file_uri(uri: str) -> bool:
    return uri[:7].lower() == _FILE_SCHEME


def _check_scheme(uri: str) -> None:
    # Anything with another scheme (gs://, hdfs://) would otherwise be taken for a relative local path.
    if "://" in uri and not (is_s3(uri) or _is_file_uri(uri)):
        raise ValueError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")


def _local_path(uri: str) -> str:
    """Absolute local path of a plain path or ``file://`` URI."""
    if _is_file_uri(uri):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri}: file:// URIs must not name a remote host")
        return os.path.abspath(unquote(parsed.path))
    return os.path.abspath(os.path.expanduser(uri))


def absolute_uri(uri: str | None) -> str | None:
    """``uri`` with a relative local path made absolute against this process's working directory (object
    store and ``file://`` URIs are already absolute). Rows built on the driver keep their meaning in Ray
    workers, which run in other directories (Ray Train's workers do)."""
    if uri is None or is_s3(uri) or _is_file_uri(uri) or os.path.isabs(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _s3_path(uri: str) -> str:
    """``bucket/key`` of an ``s3://`` URI (no leading or trailing slash)."""
    path = uri[len(_S3_SCHEME):].strip("/")
    if not path or path.split("/", 1)[0] == "":
        raise ValueError(f"{uri}: S3 URI has no bucket")
    return path


def _uri_error(uri: str, action: str, exc: OSError) -> OSError:
    """An error of the same builtin kind that names the URI (pyarrow's own message names only the path)."""
    kind = type(exc) if type(exc) in _KEEP_KINDS else StorageError
    return kind(f"{uri}: {action} ({exc})")


def _secret_digest(value: str | None) -> str:
    if value is None:
        return "-"
    return hmac.new(_KEY_SALT, value.encode(), hashlib.sha256).hexdigest()


def _s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current AWS environment, cached per distinct setting."""
    settings = s3_kwargs()
    attempts = s3_retries()
    key = (settings.get("endpoint_override", "-"), settings["scheme"], settings["region"], str(attempts),
           settings.get("access_key") or "-", _secret_digest(settings.get("secret_key")),
           _secret_digest(settings.get("session_token")))
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            fs = RetryingS3FileSystem(attempts, **settings)
            _S3_CACHE[key] = fs
        return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path to use with it (``bucket/key`` for S3, an absolute path locally)."""
    _check_scheme(uri)
    if is_s3(uri):
        return _s3_filesystem(), _s3_path(uri)
    return _LOCAL_FS, _local_path(uri)


def _to_uri(like: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as ``like``."""
    if is_s3(like):
        return _S3_SCHEME + path
    if _is_file_uri(like):
        return _FILE_SCHEME + path
    return path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (a part's own leading/trailing slashes are dropped)."""
    out = uri
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out if out.endswith("/") else out + "/"
        out += part
    return out


def local_path_or_none(uri: str) -> str | None:
    """Absolute local path for local URIs, None for remote ones."""
    _check_scheme(uri)
    return None if is_s3(uri) else _local_path(uri)


def train_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train/Tune's ``RunConfig``.

    With an explicit filesystem Ray wants ``bucket/prefix`` (an ``s3://`` URI there fails with ArrowInvalid).
    """
    fs, path = resolve(uri)
    return (path, fs) if is_s3(uri) else (path, None)


# ----------------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------------

def _info(uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = resolve(uri)
    try:
        return fs, path, fs.get_file_info(path)
    except OSError as exc:
        raise _uri_error(uri, "cannot stat", exc) from exc


def exists(uri: str) -> bool:
    """True if a file or a (possibly implicit, on S3) directory exists at ``uri``."""
    return _info(uri)[2].type != pafs.FileType.NotFound


def list_files(prefix_uri: str, suffix: str | None = None) -> list[str]:
    """Sorted URIs of all files under ``prefix_uri`` (recursive); ``[]`` if it does not exist.

    ``prefix_uri`` is a directory (``s3://b/x`` does not match ``s3://b/xy/...``); a file lists as itself.
    """
    fs, path, info = _info(prefix_uri)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        try:
            infos = fs.get_file_info(selector)
        except OSError as exc:
            raise _uri_error(prefix_uri, "cannot list", exc) from exc
    out = []
    for item in infos:
        if item.type != pafs.FileType.File or _TMP_RE.match(item.base_name):
            continue
        if suffix is not None and not item.path.endswith(suffix):
            continue
        out.append(_to_uri(prefix_uri, item.path))
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.readall()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: no such file") from exc
    except IsADirectoryError as exc:
        raise IsADirectoryError(f"{uri}: is a directory, not a file") from exc
    except OSError as exc:
        raise _uri_error(uri, "cannot read", exc) from exc


def read_text(uri: str) -> str:
    """UTF-8 text at ``uri``."""
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    """JSON document at ``uri``."""
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: invalid JSON ({exc})") from exc


def read_parquet(uri: str) -> pa.Table:
    """Parquet file at ``uri`` as a table."""
    data = read_bytes(uri)
    try:
        return pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:
        raise ValueError(f"{uri}: invalid parquet ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# Writing (atomic)
# ----------------------------------------------------------------------------------------------------------

def _tmp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")


def _write_local_atomic(path: str, data: bytes | bytearray | memoryview | pa.Buffer) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(memoryview(data))
            handle.flush()
            # fsync so that a crash right after the rename cannot leave a complete-looking empty file.
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_s3_once(fs: pafs.FileSystem, path: str, data: bytes | bytearray | memoryview | pa.Buffer) -> None:
    # The payload is complete before the stream opens; one write then close() completes the upload. No
    # ``with`` block: its close() on an exception would complete the upload with whatever was written.
    stream = fs.open_output_stream(path)
    try:
        stream.write(data)
    except BaseException:
        # write() failed inside pyarrow (a failed part upload): the stream holds that error, so close()
        # fails rather than completing; close explicitly so it does not run later in a destructor.
        with contextlib.suppress(Exception):
            stream.close()
        raise
    stream.close()


def write_bytes(uri: str, data: bytes | bytearray | memoryview | pa.Buffer) -> None:
    """Atomically write ``data`` to ``uri`` (creating local parent directories)."""
    fs, path = resolve(uri)
    try:
        if is_s3(uri):
            _write_s3_once(fs, path, data)
        else:
            _write_local_atomic(path, data)
    except OSError as exc:
        raise _uri_error(uri, "cannot write", exc) from exc


def write_text(uri: str, text: str) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    """Atomically write JSON (indent 2, sorted keys); serialisation fails before anything is written."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(uri: str, table: pa.Table) -> None:
    """Atomically write a table as parquet (serialised to memory first: a failure leaves nothing)."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"{uri}: write_parquet needs a pyarrow.Table, got {type(table).__name__}")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue())


def makedirs(uri: str) -> None:
    """Create a directory (and parents); on S3 this writes a directory marker."""
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise _uri_error(uri, "cannot create directory", exc) from exc


def delete(uri: str) -> None:
    """Delete a file or a whole directory tree; a missing ``uri`` is not an error."""
    fs, path, info = _info(uri)
    try:
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            if is_s3(uri) and "/" not in path:
                fs.delete_dir_contents(path)  # never delete the bucket itself
            else:
                fs.delete_dir(path)
    except FileNotFoundError:
        pass  # deleted concurrently: the outcome is the same
    except OSError as exc:
        raise _uri_error(uri, "cannot delete", exc) from exc


# ----------------------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------------------

def _relative(root_uri: str, file_uri: str) -> str:
    root = resolve(root_uri)[1].rstrip("/")
    path = resolve(file_uri)[1]
    return path[len(root):].lstrip("/")


def _download_to(uri: str, dest: str) -> None:
    """Stream one object to a local file, atomically (checkpoints can be large)."""
    fs, path = resolve(uri)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = _tmp_name(dest)
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.replace(tmp, dest)
    except FileNotFoundError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FileNotFoundError(f"{uri}: no such file") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_to_local(uri: str, local_dir: str) -> str:
    """Copy a file or a directory tree into ``local_dir``; returns the local file, or ``local_dir``."""
    local_dir = os.path.abspath(local_dir)
    info = _info(uri)[2]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        dest = os.path.join(local_dir, info.base_name)
        _download_to(uri, dest)
        return dest
    os.makedirs(local_dir, exist_ok=True)
    for file_uri in list_files(uri):
        _download_to(file_uri, os.path.join(local_dir, *_relative(uri, file_uri).split("/")))
    return local_dir


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree under ``uri``, each file written atomically."""
    if not os.path.isdir(local_dir):
        raise NotADirectoryError(f"{local_dir}: not a directory")
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            if _TMP_RE.match(name):
                continue
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as handle:
                write_bytes(join(uri, rel), handle.read())


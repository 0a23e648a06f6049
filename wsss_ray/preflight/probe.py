"""Looking at a path or URI quickly: S3 through a filesystem with short timeouts and two attempts, so a wrong
endpoint costs seconds, not the storage layer's full retry budget (``WSSS_S3_RETRIES``, ~25 s per request)."""

from __future__ import annotations

import os
import re

import pyarrow.fs as pafs

from wsss_ray.core import storage
from wsss_ray.core.s3_settings import ENDPOINT_VARS, env_endpoint, probe_filesystem

# Short enough for a person at a console, long enough for a slow link to a real endpoint.
CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, ATTEMPTS = 2.0, 10.0, 2
_CREDENTIAL_ERRORS = ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "ACCESSDENIED",
                      "INVALIDACCESSKEYID", "EXPIRED_TOKEN", "INVALID_TOKEN", "MISSING_AUTHENTICATION_TOKEN",
                      "HTTP response code 403")


class Unreachable(Exception):
    """The store could not answer: ``what`` went wrong and ``fix`` says what to do."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


def _s3(uri: str) -> tuple[pafs.FileSystem, str]:
    path = uri[len("s3://"):].strip("/")
    return probe_filesystem(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, ATTEMPTS), path


def endpoint_name() -> str:
    """The S3 endpoint in words, naming the variable it came from (never the credentials)."""
    endpoint, scheme = env_endpoint()
    if endpoint is None:
        return "AWS S3 (no AWS_ENDPOINT_URL set)"
    var = next(name for name in ENDPOINT_VARS if os.environ.get(name))
    return f"{scheme}://{endpoint} ({var})"


def explain_s3_error(error: OSError) -> Unreachable:
    """pyarrow's S3 error as what went wrong and what to do, in words a person acts on."""
    text = str(error)
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    detail = re.sub(r"\s*\(Request ID: [^)]*\)", "", text.split(" operation: ", 1)[-1]).strip()
    if code and code.group(1) == "NETWORK_CONNECTION":
        detail = detail.split("Details: ", 1)[-1]
        return Unreachable(f"cannot reach the S3 endpoint {endpoint_name()}: {detail}",
                           "check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network; "
                           "`wsss-ray config check --offline` skips the S3 checks")
    if detail == "No response body." and code:  # a HEAD request's error carries only its code
        detail = f"{code.group(1)} ({text.split(' during ', 1)[-1].split(' operation', 1)[0]})"
    if any(name in text.upper() for name in _CREDENTIAL_ERRORS):
        return Unreachable(f"the S3 endpoint {endpoint_name()} refused the credentials: {detail}",
                           "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                           "keys) to keys allowed to list and write there")
    if code and code.group(1) == "NO_SUCH_BUCKET":
        return Unreachable(f"the bucket does not exist at {endpoint_name()}",
                           "create the bucket, or fix the bucket name")
    return Unreachable(f"S3 error at {endpoint_name()}: {detail}", "check the URI, the endpoint and the credentials")


def info(uri: str) -> pafs.FileInfo:
    """The file info of ``uri``; :class:`Unreachable` when S3 cannot answer."""
    if not storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return fs.get_file_info(path)
    fs, path = _s3(uri)
    try:
        return fs.get_file_info(path)
    except OSError as error:
        raise explain_s3_error(error) from None


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    """The object at ``uri`` (FileNotFoundError when it is not there, :class:`Unreachable` when S3 cannot answer)."""
    if not storage.is_s3(uri):
        return storage.read_bytes(uri)
    fs, path = _s3(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.readall()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None
    except OSError as error:
        raise explain_s3_error(error) from None


def probe_write(uri: str) -> None:
    """On S3: list ``uri``, write a small test object below it and delete it (:class:`Unreachable` on failure)."""
    fs, path = _s3(uri)
    bucket = path.split("/", 1)[0]
    probe = f"{path}/.wsss-preflight-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        # Listing first: its errors carry the server's reason (a bucket HEAD's 403 has no body).
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise Unreachable(f"bucket {bucket!r} does not exist at {endpoint_name()}",
                              "create the bucket, or fix the bucket name in the URI")
        stream = fs.open_output_stream(probe)
        stream.write(b"wsss-ray pre-flight write test\n")
        stream.close()
        fs.delete_file(probe)
    except OSError as error:
        raise explain_s3_error(error) from None

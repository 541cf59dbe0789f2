"""Where shards live and how they are streamed: a directory, ``http(s)://``, ``s3://`` or a ``pipe:CMD`` template.

A *location* is the prefix under which a split's manifest (``train.json``) and its shards sit.
WebDataset opens every shard: local paths as files, ``http(s)://`` through its ``curl`` pipe,
``pipe:CMD`` runs CMD with ``{}`` replaced by the file name, and ``s3://`` streams each object's
body with boto3 (an opener added to WebDataset's ``gopen`` table; credentials, profiles, roles and
``AWS_ENDPOINT_URL`` for S3-compatible stores work as for the AWS CLI). Shards are streamed, never
copied to local disk. A shard that fails in transit is opened again with backoff and the samples
already delivered are skipped, so a retry changes nothing downstream; one that keeps failing is an
error naming its URL. A server that stops sending (stalled, not dead) fails the attempt after
``ADN_SHARD_STALL_S`` seconds without a byte (default 60), as a broken connection would.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from .errors import DataError

log = logging.getLogger(__name__)

RETRIES = 3  # attempts after the first, with backoff 1, 2, 4 s
MANIFEST_TIMEOUT_S = 120


def stall_timeout_s() -> float:
    """Seconds a shard's transfer may deliver nothing before the attempt fails (``ADN_SHARD_STALL_S``)."""
    value = os.environ.get("ADN_SHARD_STALL_S", "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise DataError(f"ADN_SHARD_STALL_S must be a number of seconds above 0, got {value!r}.")
    return seconds


class ShardReadError(DataError):
    """A shard could not be read after every retry; names its URL."""


_CLIENTS: dict[int, Any] = {}


def _s3_client() -> Any:
    """One boto3 S3 client per process (clients are not fork-safe; DataLoader workers are forks)."""
    if os.getpid() not in _CLIENTS:
        import boto3
        from botocore.config import Config

        # A read that gets nothing for the stall timeout fails, as a stalled curl transfer does.
        config = Config(connect_timeout=10, read_timeout=stall_timeout_s())
        _CLIENTS[os.getpid()] = boto3.session.Session().client("s3", config=config)
    return _CLIENTS[os.getpid()]


class _S3Body:
    """A readable S3 object body whose failures are OSErrors, as a pipe's or a file's are."""

    def __init__(self, url: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        bucket, _, key = url.removeprefix("s3://").partition("/")
        try:
            self.body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except self._errors as err:
            raise OSError(f"S3 GET {url}: {err}") from None

    def read(self, size: int = -1) -> bytes:
        try:
            return self.body.read(size if size >= 0 else None)
        except self._errors as err:
            raise OSError(f"S3 read: {err}") from None

    def close(self) -> None:
        self.body.close()


def open_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> _S3Body:
    """WebDataset opener for ``s3://bucket/key`` (reading only)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3:// shards are read here; upload them with the AWS CLI (see the README).")
    return _S3Body(url)


def open_http(url: str, mode: str = "rb", bufsize: int = 8192) -> Any:
    """WebDataset opener for ``http(s)://``: its curl pipe, failing when a transfer stalls (our retries follow)."""
    from webdataset.gopen import Pipe

    if mode[0] != "r":
        raise ValueError(f"{url}: http(s) shards are read here.")
    stall = max(1, round(stall_timeout_s()))
    return Pipe(["curl", "-f", "-s", "-L", "--connect-timeout", "10", "--speed-limit", "1", "--speed-time",
                 str(stall), url], mode=mode, bufsize=bufsize, ignore_status=[141, 23])


def open_url(url: str) -> Any:
    """A byte stream of a shard at ``url`` (a path, http(s)://, s3:// or pipe:), through WebDataset's ``gopen``."""
    from webdataset.gopen import gopen, gopen_schemes

    gopen_schemes.update(s3=open_s3, http=open_http, https=open_http)
    return gopen(url)


@dataclass(frozen=True)
class Location:
    """A shard location: ``kind`` is local, http, s3 or pipe; ``prefix`` the directory, URL prefix or command."""

    kind: str
    prefix: str

    def __str__(self) -> str:
        return self.prefix if self.kind != "pipe" else f"pipe:{self.prefix}"

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def absolute(self) -> str:
        """The location as every node can use it: local directories made absolute, URLs as they are."""
        return str(Path(self.prefix).resolve()) if self.is_local else str(self)

    def path(self, name: str) -> Path:
        """The local file ``name`` (local locations only)."""
        return Path(self.prefix) / name

    def url(self, name: str) -> str:
        """What WebDataset opens to stream file ``name``."""
        if self.kind == "local":
            return str(self.path(name))
        if self.kind in ("http", "s3"):
            return f"{self.prefix}/{quote(name)}"
        return "pipe:" + self.prefix.replace("{}", shlex.quote(name))

    def display(self, name: str) -> str:
        """The address of ``name`` as a user would type it (for messages)."""
        if self.kind == "pipe":
            return self.prefix.replace("{}", name)
        return str(self.path(name)) if self.is_local else f"{self.prefix}/{name}"

    def read(self, name: str) -> bytes:
        """The whole (small) file ``name``, e.g. a manifest; raises OSError with the storage's reason."""
        if self.kind == "local":
            return self.path(name).read_bytes()
        if self.kind == "s3":
            body = open_s3(self.url(name))
            try:
                return body.read()
            finally:
                body.close()
        if self.kind == "http":
            cmd = ["curl", "-f", "-s", "-S", "-L", "--connect-timeout", "10", "--retry", "3", "--retry-delay", "1",
                   "--max-time", str(MANIFEST_TIMEOUT_S), self.url(name)]
            shell = False
        else:
            cmd, shell = self.url(name).removeprefix("pipe:"), True
        try:
            done = subprocess.run(cmd, shell=shell, capture_output=True, timeout=MANIFEST_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired as err:
            raise OSError(f"no answer within {MANIFEST_TIMEOUT_S} s") from err
        if done.returncode != 0:
            reason = done.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(reason[-1] if reason else f"exit status {done.returncode}")
        return done.stdout


def parse_location(data: str | os.PathLike[str] | Location) -> Location:
    """Classify ``--data``; checks that what streams it (curl, boto3) is installed."""
    if isinstance(data, Location):
        return data
    text = os.fspath(data)
    scheme = urlparse(text).scheme.lower() if "://" in text else ""
    if text.startswith("pipe:"):
        command = text[5:].strip()
        if "{}" not in command:
            raise DataError(f"the pipe location {text!r} has no '{{}}' where the file name goes "
                            "(e.g. 'pipe:gsutil cat gs://bucket/shards/{}').")
        location = Location("pipe", command)
    elif scheme in ("http", "https"):
        location = Location("http", text.rstrip("/"))
    elif scheme == "s3":
        location = Location("s3", text.rstrip("/"))
    elif scheme in ("", "file"):
        location = Location("local", text.removeprefix("file://") if scheme else text)
    else:
        raise DataError(f"--data {text!r}: unsupported scheme {scheme!r}; use a directory, http(s)://, s3:// "
                        "or pipe:CMD with {} for the file name.")
    if location.kind == "http" and shutil.which("curl") is None:
        raise DataError(f"WebDataset streams http(s) shards through curl, but 'curl' is not on PATH; install it "
                        f"(apt-get install curl) to read {text!r}.")
    if location.kind == "s3" and importlib.util.find_spec("boto3") is None:
        raise DataError(f"s3:// shards are streamed with boto3, which is not installed; pip install "
                        f"'adaptive-depth[s3]' (or boto3) to read {text!r}.")
    return location


# What curl's exit statuses mean (man curl, EXIT CODES), for messages a user can act on.
_CURL_EXIT = {6: "could not resolve the host", 7: "could not connect to the server",
              18: "the transfer ended early", 22: "the server answered with an HTTP error such as 404",
              28: "the transfer stalled or timed out", 35: "the TLS handshake failed",
              52: "the server sent nothing", 56: "the connection failed while receiving data"}


def _transport_failed(stream: Any) -> OSError | None:
    """The error of a pipe (curl, a user's command) that exited badly, or None."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=5)  # at a short read its writer has closed: it is exiting now
    except subprocess.TimeoutExpired:
        return None  # still streaming: the bytes themselves are bad
    if status in stream.ignore_status:
        return None
    program = proc.args.split()[0] if isinstance(proc.args, str) else proc.args[0]
    reason = _CURL_EXIT.get(status, "") if program == "curl" else ""
    return OSError(f"{program} exited with status {status}" + (f": {reason}" if reason else ""))


def _read_shard(url: str, on_bad_member: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """WebDataset's tar expansion of one shard; transport errors are raised, damaged members handed on."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_url(url)
    complete = False

    def handler(exn: Exception) -> bool:
        failed = _transport_failed(stream)
        if failed is not None:
            raise failed from None
        if isinstance(exn, OSError):
            raise OSError(str(exn.args[0]) if exn.args else str(exn)) from None
        return on_bad_member(exn)

    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)
        complete = True
    finally:
        proc = getattr(stream, "proc", None)
        if not complete and proc is not None and proc.poll() is None:
            proc.kill()  # an abandoned read (a retry, a stop): closing would wait for a stalled transfer to end
        try:
            stream.close()  # a pipe raises here when its command failed after the last byte
        except OSError as err:
            if complete:
                raise (_transport_failed(stream) or err) from None


def shard_samples(url: str, on_bad_member: Callable[[Exception], bool], retries: int = RETRIES,
                  backoff_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order, each exactly once, whatever the transport does on the way."""
    delivered = 0
    for attempt in range(retries + 1):
        try:
            for index, sample in enumerate(_read_shard(url, on_bad_member)):
                if index >= delivered:
                    delivered += 1
                    yield sample
            return
        except OSError as err:
            where = url.removeprefix("pipe:")
            if attempt == retries:
                raise ShardReadError(f"shard {where} could not be read ({attempt + 1} attempts, last: {err}); "
                                     "check that it exists and the storage is reachable.") from None
            log.warning("reading shard %s failed (%s); retrying in %.0f s", where, err, backoff_s * 2**attempt)
            time.sleep(backoff_s * 2**attempt)


def stream_samples(on_bad_member: Callable[[Exception], bool]) -> Callable[[Iterable[dict[str, str]]], Iterator]:
    """A WebDataset pipeline stage: ``{"url": ...}`` items in, the samples of each shard out (with retries)."""

    def stage(sources: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            yield from shard_samples(source["url"], on_bad_member)

    return stage

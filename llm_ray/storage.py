"""Run storage on a local path or an S3-compatible bucket, through ``pyarrow.fs``.

Ray Train persists checkpoints through the same pyarrow filesystem, so one resolver serves both
Ray's ``RunConfig(storage_filesystem=...)`` and our own files (summary, metrics, markers).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Optional

import pyarrow.fs as pafs


class StorageError(OSError):
    """Storage unreachable, credentials refused, or nothing where a path should be."""


@dataclass(frozen=True)
class Storage:
    fs: pafs.FileSystem
    root: str  # path inside ``fs`` (bucket/prefix for S3, absolute path locally)
    uri: str  # what users see: /abs/path or s3://bucket/prefix

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> "Storage":
        return Storage(self.fs, posixpath.join(self.root, *parts), posixpath.join(self.uri, *parts))

    def exists(self, *parts: str) -> bool:
        info = self.fs.get_file_info(posixpath.join(self.root, *parts))
        return info.type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(posixpath.join(self.root, *parts)) as f:
            return f.read().decode()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file: S3 PUTs are atomic; locally write a temp file and rename it."""
        path = posixpath.join(self.root, name)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def listdir(self) -> list[str]:
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(selector))

    def upload_dir(self, local_dir: str, name: str) -> None:
        pafs.copy_files(local_dir, posixpath.join(self.root, name), destination_filesystem=self.fs)

    def download_dir(self, name: str, local_dir: str) -> None:
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(posixpath.join(self.root, name), local_dir, source_filesystem=self.fs)


def s3_filesystem(endpoint: Optional[str] = None) -> pafs.S3FileSystem:
    """S3 with credentials from the standard AWS environment/config; endpoint for S3-compatible stores."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Short timeouts: an unreachable endpoint should fail in seconds, not minutes.
    kwargs: dict = {"connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve_storage(storage_path: str, s3_endpoint: Optional[str] = None) -> Storage:
    if storage_path.startswith("s3://"):
        root = storage_path[len("s3://") :].rstrip("/")
        return Storage(s3_filesystem(s3_endpoint), root, "s3://" + root)
    if "://" in storage_path:
        raise ValueError(f"run.storage_path: unsupported scheme in {storage_path!r} (use a local path or s3://)")
    root = os.path.abspath(os.path.expanduser(storage_path))
    return Storage(pafs.LocalFileSystem(), root, root)


def _describe(uri: str) -> str:
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return f"bucket {bucket!r}, key {key or '/'!r}"
    return f"path {uri!r}"


def list_files(uri: str, s3_endpoint: Optional[str] = None) -> list[dict]:
    """Files at or under ``uri`` (sorted), each {"uri", "size", "mtime"}.

    Fails fast with the bucket and key named when storage is unreachable, credentials are
    refused or nothing is there, instead of letting a pipeline start on an empty input.
    """
    store = resolve_storage(uri.rstrip("/"), s3_endpoint)
    try:
        info = store.fs.get_file_info(store.root)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.Directory or not store.is_local:
            infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True))
        else:
            infos = []
    except OSError as e:
        raise StorageError(f"cannot list {uri} ({_describe(uri)}): {e}") from None
    scheme = "s3://" if not store.is_local else ""
    files = [
        {"uri": scheme + i.path, "size": i.size, "mtime": i.mtime_ns}
        for i in infos
        if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith(".")
    ]
    if not files:
        raise StorageError(f"no input files at {uri} ({_describe(uri)})")
    return sorted(files, key=lambda f: f["uri"])

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

    def write_text(self, name: str, text: str) -> None:
        """Write a whole file: S3 PUTs are atomic; locally write a temp file and rename it."""
        path = posixpath.join(self.root, name)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(text.encode())

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
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
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

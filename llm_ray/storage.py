"""Run storage on a local path or an S3-compatible bucket, through ``pyarrow.fs``.

Ray Train persists checkpoints through the same pyarrow filesystem, so one resolver serves both
Ray's ``RunConfig(storage_filesystem=...)`` and our own files (summary, metrics, markers).

Server-side encryption (``run.s3_sse``): pyarrow's S3 filesystem sends no
``x-amz-server-side-encryption`` header (its ``default_metadata`` keeps only ACL, Cache-Control,
Content-Type, Content-Language and Expires and drops other keys silently; checked on pyarrow 26
against moto). With SSE asked for, the filesystem is therefore a ``PyFileSystem`` whose every
object-creating call (PUT, multipart upload, copy, move, directory marker) goes through boto3
with the SSE arguments; reads and listings stay native. Ray Train's checkpoint uploads use the
same filesystem, so they are covered too.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import threading
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


SSE_ALGORITHMS = ("AES256", "aws:kms")  # SSE-S3, SSE-KMS: what S3's PUT header accepts


@dataclass(frozen=True)
class ServerSideEncryption:
    """What S3 is asked to do with every object written: encrypt it under S3's keys (``AES256``)
    or under a KMS key (``aws:kms``, the account's default key unless ``kms_key_id``)."""

    algorithm: str
    kms_key_id: Optional[str] = None

    def extra_args(self) -> dict:
        """boto3's arguments for PutObject, CreateMultipartUpload and CopyObject."""
        args = {"ServerSideEncryption": self.algorithm}
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args


def sse_of(run) -> Optional[ServerSideEncryption]:
    """The server-side encryption a recipe's ``run`` section asks for (None: the bucket's default)."""
    return ServerSideEncryption(run.s3_sse, run.s3_sse_kms_key_id) if run.s3_sse else None


def _endpoint(endpoint: Optional[str]) -> Optional[str]:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(endpoint: Optional[str] = None, sse: Optional[ServerSideEncryption] = None) -> pafs.FileSystem:
    """S3 with credentials from the standard AWS environment/config; endpoint for S3-compatible
    stores; ``sse``: every object written asks for server-side encryption (module docstring)."""
    native = _native_s3(endpoint)
    return pafs.PyFileSystem(_SSEHandler(native, _endpoint(endpoint), sse)) if sse else native


def _native_s3(endpoint: Optional[str]) -> pafs.S3FileSystem:
    endpoint = _endpoint(endpoint)
    # Short timeouts: an unreachable endpoint should fail in seconds, not minutes.
    kwargs: dict = {"connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve_storage(storage_path: str, s3_endpoint: Optional[str] = None,
                    sse: Optional[ServerSideEncryption] = None) -> Storage:
    """``sse`` applies to objects written on S3 (a local path ignores it)."""
    if storage_path.startswith("s3://"):
        root = storage_path[len("s3://") :].rstrip("/")
        return Storage(s3_filesystem(s3_endpoint, sse), root, "s3://" + root)
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


# --- server-side encryption: object-creating calls through boto3 (module docstring) ---

MULTIPART_PART = 8 << 20  # boto3's default part size; S3 wants >= 5 MiB for every part but the last


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.strip("/").partition("/")
    return bucket, key


def _s3_error(action: str, bucket: str, key: str, error: Exception) -> StorageError:
    return StorageError(f"cannot {action} s3://{bucket}/{key} (bucket {bucket!r}, key {key!r}): {error}")


class _SSEHandler(pafs.FileSystemHandler):
    """pyarrow's S3 filesystem, except that every object it creates carries ``sse``: reads,
    listings and info stay native; PUTs, multipart uploads, copies, moves and directory markers
    go through boto3. Deletes go through boto3 too: pyarrow's own re-create the parent
    directory's marker with a PUT of its own (``EnsureParentExists``), which a bucket policy
    that denies unencrypted PUTs would refuse. Picklable (Ray ships it to every worker): the
    boto3 client is made again in each process."""

    def __init__(self, native: pafs.S3FileSystem, endpoint: Optional[str], sse: ServerSideEncryption):
        self.native, self.endpoint, self.sse = native, endpoint, sse
        self._client, self._lock = None, threading.Lock()

    def __getstate__(self):
        return {"native": self.native, "endpoint": self.endpoint, "sse": self.sse}

    def __setstate__(self, state):
        self.__init__(state["native"], state["endpoint"], state["sse"])

    def __eq__(self, other):
        return isinstance(other, _SSEHandler) and (self.native, self.endpoint, self.sse) == (other.native, other.endpoint, other.sse)

    def __ne__(self, other):
        return not self == other

    @property
    def client(self):
        with self._lock:  # copy_files uploads from several threads; boto3 clients are thread-safe once made
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.client("s3", endpoint_url=self.endpoint, config=Config(
                    connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 3}))
            return self._client

    def get_type_name(self):
        return "s3"  # what Ray and our code report; the objects are plain S3 objects

    def normalize_path(self, path):
        return self.native.normalize_path(path)

    def get_file_info(self, paths):
        return self.native.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.native.get_file_info(selector)

    def open_input_stream(self, path):
        return self.native.open_input_stream(path)

    def open_input_file(self, path):
        return self.native.open_input_file(path)

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        return pa.PythonFile(_SSEUpload(self.client, *_split(path), self.sse.extra_args()), mode="w")

    def open_append_stream(self, path, metadata):
        return self.native.open_append_stream(path, metadata)  # S3 has no appends: pyarrow's own refusal

    def create_dir(self, path, recursive):
        bucket, key = _split(path)
        if key:  # the marker pyarrow would PUT, with the SSE arguments
            self._call("create", bucket, key + "/", "put_object", Body=b"", **self.sse.extra_args())

    def copy_file(self, src, dest):
        (sb, sk), (db, dk) = _split(src), _split(dest)
        try:  # managed copy: multipart beyond 5 GB, the SSE arguments on the new object
            self.client.copy({"Bucket": sb, "Key": sk}, db, dk, ExtraArgs=self.sse.extra_args())
        except Exception as e:
            raise _s3_error("copy to", db, dk, e) from None

    def move(self, src, dest):
        self.copy_file(src, dest)
        self.delete_file(src)

    def delete_file(self, path):
        bucket, key = _split(path)
        if self.native.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"s3://{path}: no such file")
        self._call("delete", bucket, key, "delete_object")

    def delete_dir(self, path):
        bucket, key = _split(path)
        self._delete_prefix(bucket, key + "/" if key else "", keep_marker=False)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        bucket, key = _split(path)
        if not missing_dir_ok and self.native.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"s3://{path}: no such directory")
        self._delete_prefix(bucket, key + "/" if key else "", keep_marker=True)

    def delete_root_dir_contents(self):
        raise PermissionError("refusing to delete every bucket's contents")

    def _delete_prefix(self, bucket: str, prefix: str, keep_marker: bool) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        try:
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if not (keep_marker and o["Key"] == prefix)]
                if keys:  # at most 1000 per page: DeleteObjects' own limit
                    self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        except Exception as e:
            raise _s3_error("delete", bucket, prefix, e) from None

    def _call(self, action: str, bucket: str, key: str, method: str, **kwargs):
        try:
            return getattr(self.client, method)(Bucket=bucket, Key=key, **kwargs)
        except Exception as e:
            raise _s3_error(action, bucket, key, e) from None


class _SSEUpload:
    """A writable object: one PutObject for what fits in a part (atomic: the object appears
    whole or not at all), else a multipart upload that appears only when completed and is
    aborted on failure. Both carry the SSE arguments."""

    def __init__(self, client, bucket: str, key: str, extra: dict):
        self.client, self.bucket, self.key, self.extra = client, bucket, key, extra
        self.buf, self.parts, self.upload_id, self.pos, self.closed = bytearray(), [], None, 0, False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def write(self, data) -> int:
        self.buf += data
        self.pos += len(data)
        while len(self.buf) >= MULTIPART_PART:
            self._part(bytes(self.buf[:MULTIPART_PART]))
            del self.buf[:MULTIPART_PART]
        return len(data)

    def _part(self, chunk: bytes) -> None:
        try:
            if self.upload_id is None:
                self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.extra)["UploadId"]
            n = len(self.parts) + 1
            etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=chunk)["ETag"]
            self.parts.append({"ETag": etag, "PartNumber": n})
        except Exception as e:
            self._abort()
            raise _s3_error("write", self.bucket, self.key, e) from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.upload_id is None:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf), **self.extra)
            except Exception as e:
                raise _s3_error("write", self.bucket, self.key, e) from None
            return
        if self.buf:
            self._part(bytes(self.buf))
        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
        except Exception as e:
            self._abort()
            raise _s3_error("write", self.bucket, self.key, e) from None

    def _abort(self) -> None:
        if self.upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:
                pass  # the write's own error is the one to report; a lifecycle rule reaps leftovers
            self.upload_id = None

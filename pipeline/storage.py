"""Filesystems (local or s3:// through fsspec), input listing and image references.

Credentials are passed explicitly to every worker (Ray workers do not see environment variables set
after the cluster started) and are never part of a repr, a log line, a summary or file metadata.
"""

from __future__ import annotations

import glob as globlib
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "hf")


class StorageError(ValueError):
    """An input or output location cannot be used."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Secrets are excluded from repr and `describe()`."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, key: str | None = None, secret: str | None = None,
                 region: str | None = None) -> StorageOptions:
        """Flags win over the standard AWS variables, which are read here, on the driver, once."""
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            key=key or os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=secret or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )

    def describe(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "region": self.region, "credentials": "set" if self.key else "default"}

    def filesystem(self, uri: str) -> fsspec.AbstractFileSystem:
        protocol = scheme_of(uri) or "file"
        if protocol in ("s3", "s3a"):
            kwargs: dict[str, Any] = {}
            if self.key:
                kwargs.update(key=self.key, secret=self.secret)
            client_kwargs = {}
            if self.endpoint_url:
                client_kwargs["endpoint_url"] = self.endpoint_url
            if self.region:
                client_kwargs["region_name"] = self.region
            if client_kwargs:
                kwargs["client_kwargs"] = client_kwargs
            # A fresh instance per options set: fsspec caches instances, and a cached one from another
            # endpoint must never be reused.
            return fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
        return fsspec.filesystem(protocol)


def scheme_of(uri: str) -> str | None:
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return None


def is_remote(uri: str) -> bool:
    return scheme_of(uri) in REMOTE_SCHEMES


def strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def fs_path(uri: str) -> str:
    """The path `StorageOptions.filesystem(uri)` takes: bucket/key for a remote URI, absolute locally."""
    return strip_scheme(uri) if is_remote(uri) else os.path.abspath(uri)


def write_whole_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes, remote: bool) -> None:
    """Write a file that no reader ever sees half written.

    An object-store upload becomes visible only when it completes, so it is written in place; a local
    file is written under a temporary name in its folder and renamed.
    """
    if remote:
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def with_scheme(uri_like: str, scheme: str | None) -> str:
    return f"{scheme}://{uri_like}" if scheme and scheme != "file" else uri_like


def list_parquet_inputs(inputs: list[str], storage: StorageOptions) -> list[str]:
    """Expand files, directories and globs into a sorted, de-duplicated list of Parquet files."""
    found: list[str] = []
    for item in inputs:
        scheme = scheme_of(item)
        fs = storage.filesystem(item)
        path = strip_scheme(item) if scheme else os.path.abspath(os.path.expanduser(item))
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path)) if scheme else sorted(globlib.glob(path, recursive=True))
            matches = [m for m in matches if m.endswith(".parquet") and not fs.isdir(m)]
            if not matches:
                raise StorageError(f"--input {item}: the pattern matches no .parquet file")
            found.extend(with_scheme(m, scheme) for m in matches)
            continue
        if not fs.exists(path):
            raise StorageError(f"--input {item}: no such file or directory")
        if fs.isdir(path):
            files = sorted(
                p for p in fs.find(path)
                if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
            )
            if not files:
                raise StorageError(f"--input {item}: the directory holds no .parquet file")
            found.extend(with_scheme(p, scheme) for p in files)
        else:
            found.append(with_scheme(path, scheme))
    seen: set[str] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


class ImageSourceError(ValueError):
    """An image reference in a row cannot be read (missing file, forbidden path, bad type)."""


@dataclass(frozen=True)
class ImageResolver:
    """Turns an image-column value (bytes, path/URI, {bytes, path} struct, or a list) into encoded bytes.

    Relative paths resolve against the folder of the Parquet file the row came from. When that file is
    remote, local paths (absolute or file://) are refused unless `allow_local_paths`, so a dataset
    cannot make workers read files such as /etc/passwd.
    """

    storage: StorageOptions
    allow_local_paths: bool = False
    max_bytes: int = 64 * 1024 * 1024

    def images(self, value: Any, source_file: str) -> list[bytes]:
        if value is None:
            return []
        if isinstance(value, (bytes, bytearray, memoryview, str, dict)):
            return [self.one(value, source_file)]
        if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            return [self.one(v, source_file) for v in value]
        raise ImageSourceError(f"unsupported image value of type {type(value).__name__}")

    def one(self, value: Any, source_file: str) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, dict):  # Hugging Face datasets Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return bytes(value["bytes"])
            if value.get("path"):
                return self.read_path(str(value["path"]), source_file)
            raise ImageSourceError("image struct has neither bytes nor path")
        if isinstance(value, str):
            return self.read_path(value, source_file)
        if value is None:
            raise ImageSourceError("image is null")
        raise ImageSourceError(f"unsupported image value of type {type(value).__name__}")

    def resolve(self, path: str, source_file: str) -> str:
        if not path:
            raise ImageSourceError("image path is empty")
        source_remote = is_remote(source_file)
        scheme = scheme_of(path)
        if scheme == "file" or (scheme is None and os.path.isabs(path)):
            if source_remote and not self.allow_local_paths:
                raise ImageSourceError(
                    f"local image path {path!r} refused for a remote input (pass --allow-local-paths to permit)"
                )
            return strip_scheme(path)
        if scheme is not None:
            return path
        base_scheme = scheme_of(source_file)
        folder = posixpath.dirname(strip_scheme(source_file)) if base_scheme else os.path.dirname(source_file)
        joined = posixpath.normpath(posixpath.join(folder, path)) if base_scheme else os.path.normpath(
            os.path.join(folder, path))
        if base_scheme:
            bucket = strip_scheme(source_file).split("/", 1)[0]
            if not joined.startswith(bucket + "/"):
                raise ImageSourceError(f"relative image path {path!r} escapes the input bucket")
        return with_scheme(joined, base_scheme)

    def read_path(self, path: str, source_file: str) -> bytes:
        target = self.resolve(path, source_file)
        fs = self.storage.filesystem(target)
        local = strip_scheme(target) if scheme_of(target) in (None, "file") else target
        try:
            size = fs.size(local)
            if size is not None and size > self.max_bytes:
                raise ImageSourceError(f"image file {path!r} has {size} bytes, above the limit of {self.max_bytes}")
            with fs.open(local, "rb") as f:
                return f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ImageSourceError(f"image file {path!r} not found") from None
        except (PermissionError, IsADirectoryError, OSError) as exc:
            if isinstance(exc, ImageSourceError):
                raise
            raise ImageSourceError(f"image file {path!r} cannot be read ({type(exc).__name__}: {exc})") from None

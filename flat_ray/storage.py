"""Where runs keep their Ray state (checkpoints, Ray's own records, flat-ray's run state file): a local folder, a
shared mount, or cloud storage (``s3://bucket/prefix``, ``gs://...``).

:class:`Place` is one folder there, with the few operations flat-ray needs, through pyarrow's filesystems (the
ones Ray Train and Tune use for the same paths). Cloud credentials and endpoints come from the environment the
way pyarrow and the cloud SDKs read them (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO, or moto in the tests).
"""

from __future__ import annotations

import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flat_ray.errors import FlatRayError
from flat_ray.fileio import atomic_write_text

CLOUD = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "hdfs://")


def is_cloud(path: str | None) -> bool:
    return bool(path) and str(path).startswith(CLOUD)


@dataclass(frozen=True)
class Place:
    """A folder of run state: ``uri`` is what Ray is given (an absolute local path or a cloud URI)."""

    uri: str

    @classmethod
    def of(cls, path: str | Path) -> Place:
        text = str(path)
        return cls(text.rstrip("/") if is_cloud(text) else str(Path(text).expanduser().resolve()))

    # ---- naming
    def __truediv__(self, name: str) -> Place:
        return Place(posixpath.join(self.uri, name))

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri)

    @property
    def parent(self) -> Place:
        return Place(posixpath.dirname(self.uri))

    @property
    def cloud(self) -> bool:
        return is_cloud(self.uri)

    @property
    def local(self) -> Path | None:
        """The local folder, or None in cloud storage."""
        return None if self.cloud else Path(self.uri)

    def _fs(self) -> tuple[Any, str]:
        if not self.cloud:
            from pyarrow import fs

            return fs.LocalFileSystem(), self.uri
        from pyarrow import fs

        try:
            return fs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # ArrowInvalid, OSError: a bad URI, no credentials, an unreachable endpoint
            raise FlatRayError(f"cannot open storage {self.uri}: {str(exc).splitlines()[0][:200]}") from None

    # ---- reading
    def _info(self):
        fsys, path = self._fs()
        return fsys.get_file_info(path)

    def is_file(self) -> bool:
        from pyarrow import fs

        return self._info().type == fs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs

        return self._info().type == fs.FileType.Directory

    def exists(self) -> bool:
        from pyarrow import fs

        return self._info().type != fs.FileType.NotFound

    def read_text(self) -> str:
        if self.local:
            return self.local.read_text()
        fsys, path = self._fs()
        with fsys.open_input_stream(path) as fh:
            return fh.read().decode()

    def dirs(self, prefix: str = "") -> list[Place]:
        """The folders directly in this one whose names start with ``prefix``, by name."""
        from pyarrow import fs

        if not self.is_dir():
            return []
        fsys, path = self._fs()
        found = fsys.get_file_info(fs.FileSelector(path, recursive=False))
        names = sorted(posixpath.basename(i.path) for i in found if i.type == fs.FileType.Directory)
        return [self / n for n in names if n.startswith(prefix)]

    def files(self) -> dict[str, int]:
        """Every file under this folder: its path relative to it, and its size."""
        from pyarrow import fs

        fsys, path = self._fs()
        found = fsys.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
        root = path.rstrip("/") + "/"
        return {i.path.removeprefix(root): i.size for i in found if i.type == fs.FileType.File}

    # ---- writing
    def write_text(self, text: str) -> None:
        """Whole or not at all: a local file is written aside and renamed; an object store's PUT is atomic."""
        if self.local:
            atomic_write_text(self.local, text)
            return
        fsys, path = self._fs()
        with fsys.open_output_stream(path) as fh:
            fh.write(text.encode())

    def mkdir(self) -> None:
        fsys, path = self._fs()
        fsys.create_dir(path, recursive=True)

    def rmtree(self) -> None:
        if self.local:
            shutil.rmtree(self.local, ignore_errors=True)
            return
        fsys, path = self._fs()
        try:
            fsys.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass

    def download(self, dst: Path) -> Path:
        """A local copy of this folder at ``dst`` (this folder itself when it is local)."""
        if self.local:
            return self.local
        from pyarrow import fs

        fsys, path = self._fs()
        dst.mkdir(parents=True, exist_ok=True)
        fs.copy_files(path, str(dst), source_filesystem=fsys, destination_filesystem=fs.LocalFileSystem())
        return dst

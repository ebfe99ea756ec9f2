"""File contents on disk: `<data_dir>/files/<uuid>`, written atomically.

A blob is written to a temporary file in the same directory, fsynced, then renamed to
its final name, so a reader sees the whole blob or none of it, and a crash mid-write
leaves only a `.tmp-*` file that the next start removes. Names are UUIDs the server
chose; no client value ever becomes part of a path.

Identical bytes are stored once: a blob may be a hard link to another (`link`), so
deleting one name never touches the bytes another name still holds, and the bytes go
when the last name does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
_TMP_PREFIX = ".tmp-"


class BlobTooLarge(Exception):
    """The blob being written grew past the size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than the {limit}-byte limit")
        self.limit = limit


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """One blob being written: `write` chunks, then `commit` (or `abort`)."""

    def __init__(self, store: BlobStore, max_size: int | None) -> None:
        self.store = store
        self.max_size = max_size
        self.size = 0
        self.sha256 = hashlib.sha256()
        self._tmp = store.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        self._file = open(self._tmp, "xb")  # noqa: SIM115 - closed by commit/abort

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_size is not None and self.size > self.max_size:
            raise BlobTooLarge(self.max_size)
        self.sha256.update(data)
        self._file.write(data)

    def flush(self) -> None:
        """Push buffered bytes to the temporary file, so `temp_path` can be read."""
        self._file.flush()

    @property
    def temp_path(self) -> Path:
        """Where the bytes are until `commit` (to inspect them before naming the blob)."""
        return self._tmp

    def commit(self, blob_id: uuid.UUID) -> Path:
        """Make the blob visible under its id: flush, fsync, rename, fsync the directory."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self.store.path(blob_id)
        os.replace(self._tmp, path)
        _fsync_dir(self.store.root)
        return path

    def abort(self) -> None:
        """Forget the bytes written so far."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class BlobStore:
    """Blobs named by UUID in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def remove_partial_writes(self) -> int:
        """Delete temporary files a crash left behind; returns how many."""
        count = 0
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            count += 1
        if count:
            log.info("removed %d partial upload(s) from %s", count, self.root)
        return count

    def path(self, blob_id: uuid.UUID) -> Path:
        """The blob's path; `blob_id` must be a UUID, so it can never escape the root."""
        if not isinstance(blob_id, uuid.UUID):
            raise TypeError("blob ids are UUIDs")
        return self.root / str(blob_id)

    def writer(self, max_size: int | None = None) -> BlobWriter:
        return BlobWriter(self, max_size)

    def link(self, source_id: uuid.UUID, blob_id: uuid.UUID) -> bool:
        """Make `blob_id` a second name of `source_id`'s bytes; False if that cannot be done
        (the source is gone, or the file system has no hard links): then write a copy."""
        try:
            os.link(self.path(source_id), self.path(blob_id))
        except OSError:
            return False
        _fsync_dir(self.root)
        return True

    def exists(self, blob_id: uuid.UUID) -> bool:
        return self.path(blob_id).is_file()

    def read_chunks(self, blob_id: uuid.UUID, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with open(self.path(blob_id), "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def delete(self, blob_id: uuid.UUID) -> None:
        self.path(blob_id).unlink(missing_ok=True)

"""Uploaded files: metadata rows plus blobs, and the signed URLs that download them.

`FileStore` is the one place that knows a file is a row in `files` and a blob named
after its id. It knows nothing of HTTP: the API streams the upload into a `BlobWriter`
and hands it over with `add`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mimetypes
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePath

from sqlalchemy import delete, func, or_, select

from sirocco.storage.blobs import BlobStore, BlobWriter
from sirocco.storage.database import Database
from sirocco.storage.tables import FileRecord

#: How much of a file is read to tell its sample type.
_SNIFF_LINES = 1


@dataclass(slots=True)
class ContentInfo:
    """What the bytes say about themselves."""

    num_lines: int | None
    sample_type: str


def clean_filename(name: str | None) -> str:
    """The last path component of a client's file name (metadata only, never a path)."""
    base = PurePath((name or "").replace("\\", "/")).name.strip()
    return base[:255] or "file"


def guess_mimetype(filename: str, declared: str | None) -> str:
    if filename.lower().endswith(".jsonl"):
        return "application/jsonl"
    guessed, _ = mimetypes.guess_type(filename)
    if guessed:
        return guessed
    if declared and declared != "application/octet-stream":
        return declared
    return "application/octet-stream"


def inspect_content(path: Path, filename: str, purpose: str) -> ContentInfo:
    """Line count and sample type of a JSONL file (`messages` -> instruct, `text` -> pretrain).

    Batch input is `batch_request` whatever it holds; a file that is not JSONL has no
    line count.
    """
    lines = 0
    first: object = None
    jsonl = filename.lower().endswith((".jsonl", ".json"))
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            lines += 1
            if lines <= _SNIFF_LINES:
                try:
                    first = json.loads(raw)
                    jsonl = True
                except (ValueError, UnicodeDecodeError):
                    first = None
    if purpose == "batch":
        sample_type = "batch_request"
    elif isinstance(first, dict) and ("text" in first or "content" in first) \
            and "messages" not in first:
        sample_type = "pretrain"
    else:
        sample_type = "instruct"
    return ContentInfo(num_lines=lines if jsonl else None, sample_type=sample_type)


def _load_or_create_secret(path: Path) -> bytes:
    """The server's URL-signing key, made once and kept beside the database."""
    if path.is_file():
        return path.read_bytes()
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails if another process made it first: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


class FileStore:
    """Files: rows in the database, bytes in the blob store."""

    def __init__(self, database: Database, data_dir: Path) -> None:
        self.db = database
        self.blobs = BlobStore(Path(data_dir) / "files")
        self._secret = _load_or_create_secret(Path(data_dir) / "secret.key")

    # -- lifecycle -------------------------------------------------------------------

    def recover(self) -> None:
        """After a crash: drop partial uploads, blobs without a row, and expired files."""
        self.blobs.remove_partial_writes()
        with self.db.session() as s:
            known = set(s.scalars(select(FileRecord.id)))
        for path in self.blobs.root.iterdir():
            try:
                blob_id = uuid.UUID(path.name)
            except ValueError:
                continue
            if str(blob_id) not in known:
                self.blobs.delete(blob_id)
        self.delete_expired()

    def delete_expired(self) -> int:
        now = int(time.time())
        with self.db.session() as s:
            ids = list(s.scalars(select(FileRecord.id).where(
                FileRecord.expires_at.is_not(None), FileRecord.expires_at <= now)))
            if ids:
                s.execute(delete(FileRecord).where(FileRecord.id.in_(ids)))
        for file_id in ids:
            self.blobs.delete(uuid.UUID(file_id))
        return len(ids)

    # -- writes ----------------------------------------------------------------------

    def add(self, writer: BlobWriter, filename: str, purpose: str, visibility: str,
            declared_mimetype: str | None, expiry_hours: int | None) -> FileRecord:
        """Store what `writer` holds as a new file with its own id and metadata; bytes
        that are already stored are shared with the file that holds them, not written twice."""
        filename = clean_filename(filename)
        digest = writer.sha256.hexdigest()
        try:
            writer.flush()
            info = inspect_content(writer.temp_path, filename, purpose)
            with self.db.session() as s:
                twin = s.scalars(select(FileRecord.id).where(
                    FileRecord.sha256 == digest, FileRecord.bytes == writer.size).limit(1)).first()
        except BaseException:
            writer.abort()
            raise
        file_id = uuid.uuid4()
        now_exact = time.time()
        now = int(now_exact)
        record = FileRecord(
            id=str(file_id), filename=filename, bytes=writer.size, purpose=purpose,
            sample_type=info.sample_type, source="upload", num_lines=info.num_lines,
            mimetype=guess_mimetype(filename, declared_mimetype), sha256=digest,
            visibility=visibility, created_at=now, created_time=now_exact,
            expires_at=now + expiry_hours * 3600 if expiry_hours else None,
        )
        # The twin may be deleted meanwhile: then the link fails and the bytes are written.
        if twin is not None and self.blobs.link(uuid.UUID(twin), file_id):
            writer.abort()
        else:
            writer.commit(file_id)
        try:
            with self.db.session() as s:
                s.add(record)
        except BaseException:
            self.blobs.delete(file_id)
            raise
        return record

    def delete(self, file_id: uuid.UUID) -> bool:
        with self.db.session() as s:
            deleted = s.execute(delete(FileRecord).where(FileRecord.id == str(file_id))).rowcount
        self.blobs.delete(file_id)
        return bool(deleted)

    # -- reads -----------------------------------------------------------------------

    def get(self, file_id: uuid.UUID) -> FileRecord | None:
        with self.db.session() as s:
            record = s.get(FileRecord, str(file_id))
        if record is None or (record.expires_at is not None
                              and record.expires_at <= int(time.time())):
            return None
        return record

    def list(self, *, page: int = 0, page_size: int = 100, sample_types: list[str] | None = None,
             sources: list[str] | None = None, search: str | None = None,
             purpose: str | None = None, mimetypes: list[str] | None = None,
             ) -> tuple[list[FileRecord], int]:
        """One page of files, newest first, and how many match in all."""
        query = select(FileRecord).where(or_(FileRecord.expires_at.is_(None),
                                             FileRecord.expires_at > int(time.time())))
        if sample_types:
            query = query.where(FileRecord.sample_type.in_(sample_types))
        if sources:
            query = query.where(FileRecord.source.in_(sources))
        if search:
            query = query.where(func.lower(FileRecord.filename).contains(search.lower(),
                                                                         autoescape=True))
        if purpose:
            query = query.where(FileRecord.purpose == purpose)
        if mimetypes:
            query = query.where(FileRecord.mimetype.in_(mimetypes))
        with self.db.session() as s:
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = list(s.scalars(query.order_by(FileRecord.created_time.desc())
                                  .offset(page * page_size).limit(page_size)))
        return rows, total

    def path(self, file_id: uuid.UUID) -> Path:
        return self.blobs.path(file_id)

    # -- signed URLs -----------------------------------------------------------------

    def sign(self, file_id: uuid.UUID, expires: int) -> str:
        message = f"{file_id}:{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def verify(self, file_id: uuid.UUID, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self.sign(file_id, expires), signature)

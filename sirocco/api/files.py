"""`/v1/files`: upload, list, retrieve, delete, download, and signed download URLs.

Uploads are parsed from the request stream as they arrive: the file part goes chunk by
chunk into a blob being written, and the size limit (`--max-upload-size`) is enforced
while streaming, so an upload is never held in memory and an oversized one never lands.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from sirocco.api.errors import APIError, not_found
from sirocco.api.state import ServerState, get_state
from sirocco.protocol.files import (
    FILE_PURPOSES,
    FILE_VISIBILITIES,
    CreateFileResponse,
    DeleteFileResponse,
    FilePurpose,
    FileSchema,
    GetFileResponse,
    GetSignedUrlResponse,
    ListFilesResponse,
    SampleType,
    Source,
)
from sirocco.protocol.limits import (
    INT64_MAX,
    PAGE_MAX,
    PAGE_SIZE_MAX,
    SIGNED_URL_EXPIRY_MAX_HOURS,
    UPLOAD_EXPIRY_MAX_HOURS,
)
from sirocco.storage.blobs import BlobTooLarge, BlobWriter
from sirocco.storage.files import FileStore
from sirocco.storage.tables import FileRecord

router = APIRouter(tags=["files"])
#: The signed download route: no API key, the signature is the credential.
signed_router = APIRouter(tags=["files"])

#: Room for the multipart envelope and the small form fields around the file part.
ENVELOPE_ALLOWANCE = 64 * 1024
_MAX_FIELD_SIZE = 4096
_FORM_FIELDS = ("purpose", "visibility", "expiry")


def get_file_store(request: Request) -> FileStore:
    """FastAPI dependency: the file store."""
    store = request.app.state.sirocco.extras.get("files")
    if store is None:
        raise APIError(503, "file storage is not available on this server", type="unavailable")
    return store


def file_schema(record: FileRecord) -> dict:
    return dict(
        id=record.id, bytes=record.bytes, created_at=record.created_at,
        filename=record.filename, purpose=record.purpose, sample_type=record.sample_type,
        source=record.source, num_lines=record.num_lines, mimetype=record.mimetype,
        signature=record.sha256[:16], expires_at=record.expires_at,
        visibility=record.visibility,
    )


def upload_too_large(limit: int) -> APIError:
    return APIError(413, f"the file is larger than this server's upload limit of {limit} bytes "
                    "(sirocco serve --max-upload-size)", type="invalid_request_error",
                    param="file", code="file_too_large")


def _invalid(loc: list, msg: str, type: str = "value_error", input=None) -> RequestValidationError:
    return RequestValidationError([{"type": type, "loc": tuple(loc), "msg": msg,
                                    "input": input}])


@dataclass
class _Upload:
    """What the multipart stream held: form fields, and the file part's blob."""

    store: FileStore
    max_size: int
    fields: dict[str, str] = field(default_factory=dict)
    writer: BlobWriter | None = None
    filename: str | None = None
    content_type: str | None = None
    extra_fields: list[str] = field(default_factory=list)
    # state of the part being parsed
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _field: bytes = b""
    _value: bytearray = field(default_factory=bytearray)
    _name: str | None = None
    _is_file: bool = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", bytearray()
        self._name, self._is_file = None, False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        key = self._field.lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _header_end(self) -> None:
        self._field = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file" and self.writer is None:
            self._is_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or None
            ctype = self._headers.get(b"content-type")
            self.content_type = ctype.decode("latin-1").strip() if ctype else None
            self.writer = self.store.blobs.writer(self.max_size)
        elif self._name not in _FORM_FIELDS:
            self.extra_fields.append(self._name)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            assert self.writer is not None
            self.writer.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > _MAX_FIELD_SIZE:
                raise _invalid(["body", self._name or "?"], "form field is too long")

    def _part_end(self) -> None:
        if not self._is_file and self._name in _FORM_FIELDS:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


async def _drain(request_stream, budget: int) -> None:
    """Read and drop what the client still sends, so it sees our answer, not a reset."""
    try:
        async for chunk in request_stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except ClientDisconnect:
        return


def _form_values(upload: _Upload) -> tuple[str, str, int | None]:
    if upload.extra_fields:
        name = upload.extra_fields[0]
        raise _invalid(["body", name], "Extra inputs are not permitted", "extra_forbidden")
    if upload.writer is None:
        raise _invalid(["body", "file"], "Field required", "missing")
    purpose = upload.fields.get("purpose") or "fine-tune"
    if purpose not in FILE_PURPOSES:
        raise _invalid(["body", "purpose"], "Input should be 'fine-tune', 'batch' or 'ocr'",
                       "enum", purpose)
    visibility = upload.fields.get("visibility") or "workspace"
    if visibility not in FILE_VISIBILITIES:
        raise _invalid(["body", "visibility"], "Input should be 'workspace' or 'user'", "enum",
                       visibility)
    raw_expiry = upload.fields.get("expiry", "").strip()
    expiry = None
    if raw_expiry and raw_expiry != "null":
        try:
            expiry = int(raw_expiry)
        except ValueError:
            raise _invalid(["body", "expiry"], "Input should be a valid integer (hours)",
                           "int_parsing", raw_expiry) from None
        if expiry < 1:
            raise _invalid(["body", "expiry"], "expiry is in hours and must be at least 1",
                           "greater_than_equal", expiry)
        if expiry > UPLOAD_EXPIRY_MAX_HOURS:
            raise _invalid(["body", "expiry"], f"expiry is in hours and must be at most "
                           f"{UPLOAD_EXPIRY_MAX_HOURS} (leave it out for no expiry)",
                           "less_than_equal", expiry)
    return purpose, visibility, expiry


@router.post("/v1/files", response_model=CreateFileResponse, summary="Upload a file",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": {
                     "type": "object", "required": ["file"], "properties": {
                         "file": {"type": "string", "format": "binary"},
                         "purpose": {"type": "string", "enum": list(FILE_PURPOSES)},
                         "visibility": {"type": "string", "enum": list(FILE_VISIBILITIES)},
                         "expiry": {"type": "integer", "description": "hours to keep it"}}}}}}})
async def upload_file(request: Request,
                      state: ServerState = Depends(get_state)) -> CreateFileResponse:
    """Store a file (multipart: `file`, `purpose`, `visibility`, `expiry` in hours)."""
    store = get_file_store(request)
    limit = state.settings.max_upload_size
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise APIError(400, "upload the file as multipart/form-data with a `file` part",
                       param="file")
    upload = _Upload(store=store, max_size=limit)
    parser = MultipartParser(boundary, upload.callbacks())
    stream = request.stream()
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
        purpose, visibility, expiry = _form_values(upload)
    except BlobTooLarge:
        upload.abort()
        await _drain(stream, limit + ENVELOPE_ALLOWANCE)
        raise upload_too_large(limit) from None
    except ClientDisconnect:
        upload.abort()  # a killed upload leaves nothing behind
        raise APIError(400, "the upload was interrupted before it ended", param="file") from None
    except RequestValidationError:
        upload.abort()
        raise
    except Exception as exc:
        upload.abort()
        if isinstance(exc, APIError):
            raise
        raise APIError(400, f"malformed multipart body: {exc}", param="file") from None
    assert upload.writer is not None
    record = await run_in_threadpool(store.add, upload.writer, upload.filename or "file",
                                     purpose, visibility, upload.content_type, expiry)
    return CreateFileResponse(**file_schema(record))


@router.get("/v1/files", response_model=ListFilesResponse, summary="List files")
def list_files(
    request: Request,
    page: Annotated[int, Query(ge=0, le=PAGE_MAX)] = 0,
    page_size: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX)] = 100,
    include_total: bool = True,
    sample_type: Annotated[list[SampleType] | None, Query()] = None,
    source: Annotated[list[Source] | None, Query()] = None,
    search: str | None = None,
    purpose: FilePurpose | None = None,
    mimetypes: Annotated[list[str] | None, Query()] = None,
) -> ListFilesResponse:
    """Files, newest first; list filters take repeated keys (`?source=a&source=b`)."""
    rows, total = get_file_store(request).list(
        page=page, page_size=page_size, sample_types=sample_type, sources=source,
        search=search, purpose=purpose, mimetypes=mimetypes)
    return ListFilesResponse(data=[FileSchema(**file_schema(r)) for r in rows],
                             total=total if include_total else None)


def _existing(store: FileStore, file_id: uuid.UUID) -> FileRecord:
    record = store.get(file_id)
    if record is None:
        raise not_found("file", str(file_id))
    return record


@router.get("/v1/files/{file_id}", response_model=GetFileResponse, summary="Retrieve a file")
def retrieve_file(file_id: uuid.UUID, request: Request) -> GetFileResponse:
    return GetFileResponse(**file_schema(_existing(get_file_store(request), file_id)))


@router.delete("/v1/files/{file_id}", response_model=DeleteFileResponse, summary="Delete a file")
def delete_file(file_id: uuid.UUID, request: Request) -> DeleteFileResponse:
    if not get_file_store(request).delete(file_id):
        raise not_found("file", str(file_id))
    return DeleteFileResponse(id=str(file_id))


def _download(store: FileStore, record: FileRecord) -> StreamingResponse:
    file_id = uuid.UUID(record.id)
    try:
        handle = open(store.path(file_id), "rb")  # noqa: SIM115 - closed by the generator
    except FileNotFoundError:
        raise not_found("file", record.id) from None

    def chunks():
        with handle:
            while chunk := handle.read(1024 * 1024):
                yield chunk

    disposition = f"attachment; filename*=UTF-8''{_quote(record.filename)}"
    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Length": str(record.bytes),
                                      "Content-Disposition": disposition})


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


@router.get("/v1/files/{file_id}/content", summary="Download a file",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def download_file(file_id: uuid.UUID, request: Request) -> StreamingResponse:
    store = get_file_store(request)
    return _download(store, _existing(store, file_id))


@router.get("/v1/files/{file_id}/url", response_model=GetSignedUrlResponse,
            summary="A signed, expiring download URL")
def get_signed_url(
    file_id: uuid.UUID,
    request: Request,
    expiry: Annotated[int, Query(ge=1, le=SIGNED_URL_EXPIRY_MAX_HOURS,
                                 description="hours, 1 to 168")] = 24,
    state: ServerState = Depends(get_state),
) -> GetSignedUrlResponse:
    """A URL that downloads the file without the API key until it expires."""
    store = get_file_store(request)
    _existing(store, file_id)
    expires = int(time.time()) + expiry * 3600
    # from the configured base URL: a request's Host header must not choose the link's host
    path = request.app.url_path_for("download_signed_file", file_id=str(file_id))
    query = urlencode({"expires": expires, "signature": store.sign(file_id, expires)})
    return GetSignedUrlResponse(url=f"{state.settings.base_url}{path}?{query}")


@signed_router.get("/signed/files/{file_id}", summary="Download a file by signed URL",
                   response_class=StreamingResponse, name="download_signed_file",
                   responses={200: {"content": {"application/octet-stream": {}}}})
def download_signed_file(file_id: uuid.UUID,
                         expires: Annotated[int, Query(ge=0, le=INT64_MAX)],
                         signature: Annotated[str, Query(pattern=r"^[0-9a-f]{1,128}$")],
                         request: Request) -> StreamingResponse:
    store = get_file_store(request)
    if not store.verify(file_id, expires, signature):
        raise APIError(403, "this download link is invalid or has expired; ask "
                       "GET /v1/files/{file_id}/url for a new one", type="forbidden")
    return _download(store, _existing(store, file_id))

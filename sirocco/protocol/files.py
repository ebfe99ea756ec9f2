"""Wire shapes of the files API (`/v1/files`), as `mistral-openapi.yaml` defines them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

FilePurpose = Literal["fine-tune", "batch", "ocr"]
FileVisibility = Literal["workspace", "user"]
SampleType = Literal["pretrain", "instruct", "batch_request", "batch_result", "batch_error"]
Source = Literal["upload", "repository", "mistral"]

FILE_PURPOSES: tuple[str, ...] = ("fine-tune", "batch", "ocr")
FILE_VISIBILITIES: tuple[str, ...] = ("workspace", "user")


class FileSchema(BaseModel):
    """A stored file; `bytes` is always an integer (the SDK rejects null)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    sample_type: SampleType
    source: Source = "upload"
    num_lines: int | None = None
    mimetype: str | None = None
    signature: str | None = None
    expires_at: int | None = None
    visibility: FileVisibility | None = "workspace"


class CreateFileResponse(FileSchema):
    """Answer to an upload (or the existing file, when the same name and bytes exist)."""


class GetFileResponse(FileSchema):
    deleted: bool = False


class ListFilesResponse(BaseModel):
    data: list[FileSchema]
    object: Literal["list"] = "list"
    total: int | None = None


class DeleteFileResponse(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class GetSignedUrlResponse(BaseModel):
    url: str

"""`/v1/files`: the SDK's upload / list / retrieve / download / delete / signed URL round
trip against a real server, and the errors a client can cause."""

# ruff: noqa: F811 - pytest fixtures imported from conftest_platform are parameters here

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from tests.conftest import Server
from tests.conftest_platform import (  # noqa: F401 - fixtures
    API_KEY,
    api,
    assert_schema,
    chat_jsonl,
    platform_server,
    upload,
)


@pytest.fixture()
def sdk(platform_server: Server) -> Mistral:
    return Mistral(api_key=API_KEY, server_url=platform_server.url)


def test_sdk_round_trip(sdk: Mistral, platform_server: Server) -> None:
    content = chat_jsonl(20, tag="sdk")
    created = sdk.files.upload(file={"file_name": "sdk-train.jsonl", "content": content},
                               purpose="fine-tune")
    assert uuid.UUID(created.id)
    assert created.size_bytes == len(content)
    assert created.num_lines == 20
    assert created.sample_type == "instruct"
    assert created.purpose == "fine-tune" and created.source == "upload"
    assert created.filename == "sdk-train.jsonl"

    listed = sdk.files.list()
    assert created.id in [f.id for f in listed.data]
    assert listed.total is not None and listed.total >= 1

    got = sdk.files.retrieve(file_id=created.id)
    assert got.id == created.id and got.deleted is False and got.size_bytes == len(content)

    assert sdk.files.download(file_id=created.id).read() == content

    signed = sdk.files.get_signed_url(file_id=created.id, expiry=1)
    r = httpx.get(signed.url)  # no API key: the signature is the credential
    assert r.status_code == 200 and r.content == content
    assert r.headers["content-type"] == "application/octet-stream"
    tampered = signed.url.replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 403
    expires = dict(p.split("=") for p in urlsplit(signed.url).query.split("&"))["expires"]
    longer = signed.url.replace(f"expires={expires}", f"expires={int(expires) + 3600}")
    assert httpx.get(longer).status_code == 403  # the expiry is signed too

    deleted = sdk.files.delete(file_id=created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(SDKError) as err:
        sdk.files.retrieve(file_id=created.id)
    assert err.value.status_code == 404
    assert httpx.get(signed.url).status_code == 404


def test_responses_match_the_spec(api: httpx.Client) -> None:
    created = assert_schema("files", "CreateFileResponse", upload(api, chat_jsonl(3, "spec")))
    file_id = created["id"]
    assert_schema("files", "GetFileResponse", api.get(f"/v1/files/{file_id}").json())
    assert_schema("files", "ListFilesResponse", api.get("/v1/files").json())
    assert_schema("files", "GetSignedUrlResponse", api.get(f"/v1/files/{file_id}/url").json())
    assert_schema("files", "DeleteFileResponse", api.delete(f"/v1/files/{file_id}").json())


def test_each_upload_is_its_own_file_and_identical_bytes_are_stored_once(
        api: httpx.Client, platform_server: Server) -> None:
    content = chat_jsonl(2, uuid.uuid4().hex)
    blobs = platform_server.data_dir / "files"

    def post(name: str, **form: str) -> dict:
        r = api.post("/v1/files", files={"file": (name, content)}, data=form)
        assert r.status_code == 200, r.text
        return r.json()

    first = post("twin.jsonl", expiry="2")
    second = post("twin.jsonl", expiry="5", purpose="batch")
    renamed = post("other-name.jsonl")
    assert len({first["id"], second["id"], renamed["id"]}) == 3
    assert first["expires_at"] == first["created_at"] + 2 * 3600
    assert second["expires_at"] == second["created_at"] + 5 * 3600
    assert renamed["expires_at"] is None
    assert (first["purpose"], first["sample_type"]) == ("fine-tune", "instruct")
    assert (second["purpose"], second["sample_type"]) == ("batch", "batch_request")
    for made in (first, second, renamed):
        got = api.get(f"/v1/files/{made['id']}").json()
        assert {k: got[k] for k in made} == made

    # One copy of the bytes on disk: three names of one inode.
    paths = [blobs / f["id"] for f in (first, second, renamed)]
    inodes = {p.stat().st_ino for p in paths}
    assert len(inodes) == 1 and paths[0].stat().st_nlink == 3
    assert sum(p.stat().st_ino in inodes for p in blobs.iterdir()) == 3

    assert api.delete(f"/v1/files/{first['id']}").json()["deleted"] is True
    assert api.get(f"/v1/files/{first['id']}").status_code == 404
    assert api.get(f"/v1/files/{second['id']}/content").content == content
    assert api.get(f"/v1/files/{renamed['id']}/content").content == content
    assert paths[1].stat().st_nlink == 2
    assert upload(api, content + b"\n", "twin.jsonl")["id"] not in {p.name for p in paths}

    api.delete(f"/v1/files/{second['id']}")
    assert api.get(f"/v1/files/{renamed['id']}/content").content == content
    api.delete(f"/v1/files/{renamed['id']}")
    assert not any(p.exists() for p in paths)
    assert all(p.read_bytes() != content for p in blobs.iterdir() if p.is_file())


def test_sample_types_and_line_counts(api: httpx.Client) -> None:
    pretrain = upload(api, b'{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}', "pre.jsonl")
    assert (pretrain["sample_type"], pretrain["num_lines"]) == ("pretrain", 3)
    batch = upload(api, b'{"custom_id": "0", "body": {}}\n', "batch.jsonl", purpose="batch")
    assert (batch["sample_type"], batch["purpose"]) == ("batch_request", "batch")
    assert batch["mimetype"] == "application/jsonl"
    binary = upload(api, bytes(range(256)) * 4, "scan.pdf", purpose="ocr")
    assert binary["bytes"] == 1024 and binary["num_lines"] is None
    assert binary["mimetype"] == "application/pdf"
    assert api.get(f"/v1/files/{binary['id']}/content").content == bytes(range(256)) * 4


def test_list_filters_and_pages(api: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"{tag}-{i}.jsonl" for i in range(3)]
    for i, name in enumerate(names):
        upload(api, b'{"text": "x%d"}\n' % i, name)
    upload(api, b'{"custom_id": "1", "body": {}}\n', f"{tag}-batch.jsonl", purpose="batch")

    found = api.get("/v1/files", params={"search": tag}).json()
    assert found["total"] == 4 and len(found["data"]) == 4
    assert [f["filename"] for f in found["data"]][-3:] == names[::-1]  # newest first
    page = api.get("/v1/files", params={"search": tag, "page": 1, "page_size": 3}).json()
    assert len(page["data"]) == 1 and page["total"] == 4
    only = api.get("/v1/files", params=[("search", tag), ("sample_type", "batch_request"),
                                        ("sample_type", "instruct")]).json()
    assert [f["filename"] for f in only["data"]] == [f"{tag}-batch.jsonl"]
    by_purpose = api.get("/v1/files", params={"search": tag.upper(), "purpose": "fine-tune"})
    assert by_purpose.json()["total"] == 3  # search ignores case
    no_total = api.get("/v1/files", params={"search": tag, "include_total": "false"}).json()
    assert no_total["total"] is None
    assert api.get("/v1/files", params={"source": "mistral", "search": tag}).json()["total"] == 0
    assert api.get("/v1/files", params={"sample_type": "nope"}).status_code == 422


@pytest.mark.parametrize("path", ["/v1/files/not-a-uuid", "/v1/files/not-a-uuid/content",
                                  "/v1/files/not-a-uuid/url"])
def test_malformed_file_id_is_422(api: httpx.Client, path: str) -> None:
    r = api.get(path)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["path", "file_id"]
    assert "UUID" in r.json()["detail"][0]["msg"]


def test_path_tricks_never_reach_the_disk(api: httpx.Client) -> None:
    for path in ["/v1/files/..%2F..%2Fsecret.key", "/v1/files/..%2Fsecret.key/content",
                 "/v1/files/%2E%2E/content"]:
        r = api.get(path)
        assert r.status_code in (404, 422), (path, r.text)
        assert r.headers["content-type"].startswith("application/json")


def test_unknown_file_id_is_404(api: httpx.Client) -> None:
    missing = uuid.uuid4()
    for method, path in [("GET", f"/v1/files/{missing}"), ("DELETE", f"/v1/files/{missing}"),
                         ("GET", f"/v1/files/{missing}/content"),
                         ("GET", f"/v1/files/{missing}/url")]:
        r = api.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert str(missing) in r.json()["message"]


def test_bad_form_fields_are_422(api: httpx.Client) -> None:
    def post(data: dict, files: dict | None = None) -> httpx.Response:
        return api.post("/v1/files", data=data,
                        files=files if files is not None else {"file": ("a.jsonl", b"{}")})

    extra = post({"purpose": "fine-tune", "color": "blue"})
    assert extra.status_code == 422
    assert extra.json()["detail"][0]["type"] == "extra_forbidden"
    assert extra.json()["detail"][0]["loc"] == ["body", "color"]
    assert post({"purpose": "train"}).json()["detail"][0]["loc"] == ["body", "purpose"]
    assert post({"visibility": "public"}).status_code == 422
    assert post({"expiry": "soon"}).status_code == 422
    missing = api.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"other": ("a", b"x")})
    assert missing.status_code == 422
    assert api.post("/v1/files", json={"file": "x"}).status_code == 400
    assert api.get("/v1/files/" + str(uuid.uuid4()) + "/url",
                   params={"expiry": 169}).status_code == 422
    assert api.get("/v1/files/" + str(uuid.uuid4()) + "/url",
                   params={"expiry": 0}).status_code == 422


def test_expiry_is_reported(api: httpx.Client) -> None:
    r = api.post("/v1/files", data={"expiry": "2"}, files={"file": ("exp.txt", b"hello")})
    body = r.json()
    assert body["expires_at"] - body["created_at"] == 2 * 3600


def _blob_dir_entries(server: Server) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "files").iterdir())


def test_upload_over_the_limit_is_413_and_leaves_nothing(api: httpx.Client,
                                                         platform_server: Server) -> None:
    before = _blob_dir_entries(platform_server)
    limit = 64 * 1024
    # just over the limit: caught while streaming
    r = api.post("/v1/files", files={"file": ("big.jsonl", b"x" * (limit + 1))})
    assert r.status_code == 413, r.text
    assert "64" in r.json()["message"] or str(limit) in r.json()["message"]
    assert "--max-upload-size" in r.json()["message"]
    # far over: refused from Content-Length before reading the body
    r = api.post("/v1/files", files={"file": ("huge.jsonl", b"x" * (limit * 8))})
    assert r.status_code == 413
    # exactly the limit is fine
    ok = upload(api, b"y" * limit, "exact.bin")
    assert ok["bytes"] == limit
    assert api.get("/v1/files", params={"search": "big.jsonl"}).json()["total"] == 0
    after = _blob_dir_entries(platform_server)
    assert sorted(set(after) - set(before)) == [ok["id"]]


def test_killed_upload_leaves_no_file(api: httpx.Client, platform_server: Server) -> None:
    before = _blob_dir_entries(platform_server)
    boundary = "killedboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"killed.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n")
    body_len = len(head) + 40000 + len(f"\r\n--{boundary}--\r\n")
    host, port = urlsplit(platform_server.url).hostname, urlsplit(platform_server.url).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {API_KEY}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {body_len}\r\n\r\n").encode())
        sock.sendall(head.encode() + b'{"text": "half"}\n' * 1000)  # ~17 KB of 40 KB
        time.sleep(0.5)
    time.sleep(0.5)
    assert api.get("/v1/files", params={"search": "killed"}).json()["total"] == 0
    assert _blob_dir_entries(platform_server) == before  # no blob, no temporary file


def test_signed_route_needs_a_signature(platform_server: Server) -> None:
    r = httpx.get(f"{platform_server.url}/signed/files/{uuid.uuid4()}")
    assert r.status_code == 422  # expires and signature are required
    assert httpx.get(f"{platform_server.url}/v1/files").status_code == 401


def test_files_json_never_has_null_bytes(api: httpx.Client) -> None:
    upload(api, b"", "empty.jsonl")
    for f in api.get("/v1/files").json()["data"]:
        assert isinstance(f["bytes"], int)
        json.dumps(f)

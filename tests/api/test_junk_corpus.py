"""The junk corpus through the API: every malformed archive, header, config and upload body gets a 4xx naming
what is wrong, and leaves nothing behind (no stored object, no temporary, no row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "adapters"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
BOUNDARY = "junk"


@pytest.fixture
def junk_api(api_with):
    return api_with(MAX_UPLOAD_BYTES=str(MANIFEST["max_bytes"]), MAX_LORA_RANK=str(MANIFEST["max_rank"]))


def _leftovers(api) -> list[Path]:
    from core.settings import get_settings

    data = get_settings().data_dir.resolve()
    return sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file() and not p.name.startswith("patchbay.")
                  and p.suffix not in (".sqlite", ".sqlite-wal", ".sqlite-shm") and "sqlite" not in p.name)


def test_every_corpus_archive_is_refused_for_its_reason_and_leaves_nothing(junk_api):
    api = junk_api
    before = _leftovers(api)
    for case in MANIFEST["cases"]:
        response = api.client.post("/v1/adapters/import", headers=api.headers(),
                                   data={"name": "junk", "base_model": "tiny-llama"},
                                   files={"file": (case["file"], (CORPUS / case["file"]).read_bytes())})
        assert 400 <= response.status_code < 500, (case, response.text)
        error = response.json()["error"]
        expected = "invalid_archive" if case["kind"] == "archive" else f"adapter_{case['kind']}"
        assert error["code"] == expected and case["word"] in error["message"], (case, error)
        assert error["param"] == "file"
    assert _leftovers(api) == before
    assert api.client.get("/v1/adapters", headers=api.headers()).json()["data"] == []


def _multipart(*parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


PURPOSE = b'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune'
DATA = b'{"text": "hello"}\n'


def _file(name: bytes = b"a.jsonl", data: bytes = DATA) -> bytes:
    return b'Content-Disposition: form-data; name="file"; filename="' + name + b'"\r\n\r\n' + data


UPLOAD_JUNK = [
    ("no boundary", {"content-type": "multipart/form-data"}, _multipart(PURPOSE, _file())),
    ("not multipart", {"content-type": "application/json"}, b'{"purpose": "fine-tune"}'),
    ("two file parts", None, _multipart(PURPOSE, _file(), _file())),
    ("no file part", None, _multipart(PURPOSE)),
    ("no purpose", None, _multipart(_file())),
    ("unknown purpose", None, _multipart(b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch', _file())),
    ("purpose with NUL", None, _multipart(b'Content-Disposition: form-data; name="purpose"\r\n\r\nfine\x00tune',
                                          _file())),
    ("field too long", None, _multipart(b'Content-Disposition: form-data; name="purpose"\r\n\r\n' + b"x" * 5000,
                                        _file())),
    ("too many fields", None, _multipart(*[b'Content-Disposition: form-data; name="f%d"\r\n\r\nx' % i
                                           for i in range(20)], PURPOSE, _file())),
    ("4000-character file name", None, _multipart(PURPOSE, _file(b"x" * 4000))),
    ("NUL in the file name", None, _multipart(PURPOSE, _file(b"a\x00.jsonl"))),
    ("control characters in the file name", None, _multipart(PURPOSE, _file(b"a\x07b.jsonl"))),
    ("invalid UTF-8 file name", None, _multipart(PURPOSE, _file(b"\xff\xfe.jsonl"))),
    ("broken part headers", None, b"--junk\r\nContent-Disposition form-data\r\n\r\n\r\n--junk--\r\n"),
    ("file over the limit", None, _multipart(PURPOSE, _file(data=b'{"text": "' + b"x" * (9 * 1024 * 1024) + b'"}'))),
]


@pytest.mark.parametrize("about, headers, body", UPLOAD_JUNK, ids=[case[0] for case in UPLOAD_JUNK])
def test_junk_upload_bodies_get_4xx_and_leave_nothing(junk_api, about, headers, body):
    api = junk_api
    before = _leftovers(api)
    response = api.client.post("/v1/files", content=body, headers={
        **api.headers(), **(headers or {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})})
    assert 400 <= response.status_code < 500, (about, response.status_code, response.text)
    assert response.json()["error"]["message"]
    assert _leftovers(api) == before
    assert api.client.get("/v1/files", headers=api.headers()).json()["data"] == []

"""`/v1/adapters`: import checks, download, versions, aliases and team isolation."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest

from tests.support.adapters import save_peft_lora, tar_gz


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory):
    return save_peft_lora(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "a")


def import_archive(api, data: bytes, *, name="support-bot", base="tiny-llama", key=None, filename="a.tar.gz"):
    return api.client.post("/v1/adapters/import", headers=api.headers(key), data={"name": name, "base_model": base},
                           files={"file": (filename, data, "application/gzip")})


def test_import_download_and_versions(api, peft_adapter):
    first = import_archive(api, tar_gz(peft_adapter))
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["name"] == "support-bot" and body["version"] == 1 and body["source"] == "import"
    assert body["rank"] == 8 and body["target_modules"] == ["q_proj", "v_proj"]
    # 2 layers x (q_proj: 8x64 + 64x8, v_proj: 8x64 + 32x8)
    assert body["trainable_params"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))
    second = import_archive(api, tar_gz(peft_adapter)).json()
    assert second["version"] == 2

    download = api.client.get(f"/v1/adapters/{body['id']}/download", headers=api.headers())
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tf:
        names = sorted(tf.getnames())
    assert names == ["support-bot-v1/README.md", "support-bot-v1/adapter_config.json",
                     "support-bot-v1/adapter_model.safetensors", "support-bot-v1/patchbay.json"]

    listed = api.client.get("/v1/adapters", headers=api.headers()).json()["data"]
    assert [a["version"] for a in listed] == [2, 1]
    assert api.client.get("/v1/adapters/support-bot@1", headers=api.headers()).json()["id"] == body["id"]


def test_import_accepts_zip(api, peft_adapter):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in peft_adapter.iterdir():
            zf.write(path, arcname=path.name)
    response = import_archive(api, buffer.getvalue(), filename="a.zip")
    assert response.status_code == 200, response.text


def test_import_refusals_say_why(api, peft_adapter, tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other_base = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other_base)
    wrong_shapes = save_peft_lora(other_base, tmp_path / "wrong-shapes")
    too_big = save_peft_lora(tiny_model_dir, tmp_path / "rank-128", r=128)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import load_file, save_file

    tensors = load_file(peft_adapter / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "qkv_fused"): v for k, v in tensors.items()},
              renamed / "adapter_model.safetensors")
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps(config))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(config))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")

    cases = [
        (tar_gz(wrong_shapes), "adapter_shapes", "shape"),
        (tar_gz(renamed), "adapter_target_modules", "qkv_fused"),
        (tar_gz(too_big), "adapter_rank", "r=128"),
        (tar_gz(pickled), "adapter_format", "pickle"),
        (tar_gz(peft_adapter, extra={"../escape.txt": b"x"}), "invalid_archive", "escapes"),
        (b"definitely not an archive", "invalid_archive", "neither"),
    ]
    for data, code, words in cases:
        response = import_archive(api, data)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == code and words in error["message"], error


def test_symlink_members_are_refused(api, peft_adapter):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for path in peft_adapter.iterdir():
            tf.add(path, arcname=path.name)
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    response = import_archive(api, buffer.getvalue())
    assert response.status_code == 400 and "link" in response.json()["error"]["message"]


def test_import_needs_name_and_known_base(api, peft_adapter):
    assert import_archive(api, tar_gz(peft_adapter), name="").json()["error"]["param"] == "name"
    assert import_archive(api, tar_gz(peft_adapter), base="nope").json()["error"]["param"] == "base_model"


def test_aliases_move_with_history_and_show_in_models(api, peft_adapter):
    v1 = import_archive(api, tar_gz(peft_adapter), name="x").json()
    v2 = import_archive(api, tar_gz(peft_adapter), name="x").json()
    moved = api.client.post("/v1/adapters/x/aliases", headers=api.headers(), json={"alias": "prod", "version": 1})
    assert moved.status_code == 200 and moved.json()["aliases"] == ["prod"]
    assert api.client.get("/v1/adapters/x:prod", headers=api.headers()).json()["id"] == v1["id"]
    api.client.post("/v1/adapters/x/aliases", headers=api.headers(), json={"alias": "prod", "version": 2})
    assert api.client.get("/v1/adapters/x:prod", headers=api.headers()).json()["id"] == v2["id"]
    history = api.client.get("/v1/adapters/x/aliases", headers=api.headers()).json()["data"]
    assert [(h["adapter_id"], h["previous_adapter_id"]) for h in history] == [(v2["id"], v1["id"]), (v1["id"], None)]
    models = {m["id"]: m for m in api.client.get("/v1/models", headers=api.headers()).json()["data"]}
    assert models["x:prod"]["parent"] == "tiny-llama" and models["x@1"]["parent"] == "tiny-llama"
    missing = api.client.post("/v1/adapters/x/aliases", headers=api.headers(), json={"alias": "prod", "version": 9})
    assert missing.status_code == 404


def test_delete_adapter_and_model(api, peft_adapter):
    row = import_archive(api, tar_gz(peft_adapter), name="gone").json()
    assert api.client.delete(f"/v1/adapters/{row['id']}", headers=api.headers()).json()["deleted"] is True
    assert api.client.get(f"/v1/adapters/{row['id']}", headers=api.headers()).status_code == 404
    row = import_archive(api, tar_gz(peft_adapter), name="gone").json()
    assert api.client.delete("/v1/models/gone@2", headers=api.headers()).status_code == 200


def test_other_team_cannot_see_download_alias_or_delete(api, peft_adapter):
    row = import_archive(api, tar_gz(peft_adapter), name="private").json()
    theirs = api.headers(api.other_key)
    assert api.client.get("/v1/adapters", headers=theirs).json()["data"] == []
    for method, path, body in [
        ("GET", f"/v1/adapters/{row['id']}", None), ("GET", f"/v1/adapters/{row['id']}/download", None),
        ("DELETE", f"/v1/adapters/{row['id']}", None), ("DELETE", "/v1/models/private@1", None),
        ("POST", "/v1/adapters/private/aliases", {"alias": "prod", "version": 1}),
        ("GET", "/v1/adapters/private/aliases", None),
    ]:
        assert api.client.request(method, path, headers=theirs, json=body).status_code == 404, path
    assert all(not m["id"].startswith("private") for m in
               api.client.get("/v1/models", headers=theirs).json()["data"])

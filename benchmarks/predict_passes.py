"""Predicted share of copy bandwidth for every GPU pass, without a GPU.

Compiles every Triton pass variant (fastzo.backends.triton_backend.compile_pass) and every CUDA
kernel instantiation (nvcc, where it exists) for sm_90 (H100, H200) and sm_87 (Jetson Orin),
runs the static SASS model (benchmarks/sass_model.py) on the machine code and writes one CSV row
per backend × pass: registers, spill bytes, access width, instructions per element and the
predicted percentage of copy bandwidth per GPU. Also prints the table as Markdown
(docs/performance.md holds the committed one).

These are predictions of a static model (perfect issue, assumed pipe throughputs and clocks; see
sass_model.py), not measurements. benchmarks/gpu_check.sh measures the same passes on a GPU and
writes predicted against measured.

    python benchmarks/predict_passes.py --out benchmarks/results/predicted_passes.csv
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import sass_model  # noqa: E402

from fastzo.backends import triton_backend as tb  # noqa: E402
from fastzo.benchmark import write_stamped_csv  # noqa: E402

GPUS = {"H100-SXM": 90, "H200": 90, "Orin-AGX": 87}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUDA_STORAGE = {"Float32Bits": "float32", "BFloat16Format": "bfloat16", "Float16Format": "float16"}
NVCC_FLAGS = ["-O3", "--fmad=false"]  # as setup.py builds fastzo._C
# Takes the address of every kernel instantiation a launch can pick (tests/test_gpu_compile.py
# compiles the same).
INSTANTIATE = """
#include "cuda_pass_kernel.cuh"
using namespace fastzo::gpu;
void instantiate_every_pass() {
  for (int storage = 0; storage < 3; ++storage)
    for (int bits = 0; bits < 32; ++bits) {
      volatile KernelFunction k = pick_kernel(storage, bits & 1, bits & 2, bits & 4, bits & 8,
                                              bits & 16);
      volatile KernelFunction e = pick_exact_kernel(storage, bits & 1, bits & 2, bits & 4, bits & 8);
      (void)k; (void)e;
    }
}
"""
# storage, then kGaussian, kUpdate, kStochastic, kNext, kExact, kFastMath
CUDA_KERNEL = re.compile(r"_zo_pass_kernelI\S*?(Float32Bits|BFloat16Format|Float16Format)\S*?"
                         r"ELb([01])ELb([01])ELb([01])ELb([01])ELb([01])ELb([01])E")


def variants(exact: bool):
    """triton_backend.pass_variants with the dtype by name (the CSV's)."""
    return [dict(v, dtype=str(v["dtype"]).removeprefix("torch."))
            for v in tb.pass_variants(exact)]


def pass_name(v) -> str:
    name = "restore+update" if v["update"] else "perturb"
    if v["stochastic_rounding"]:
        name += " SR"
    if v["fused_next"]:
        name += " +next"
    if v["exact"]:
        name = "exact " + name
    return name


def analyse(cubin: bytes, elem_bytes: int, elems: int, select=None):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return sass_model.analyse(f.name, select, elem_bytes, elems)


def row_for(backend, v, res, cc, threads, stack):
    elem_bytes = 4 if v["dtype"] == "float32" else 2
    mod = sass_model.model(res, elem_bytes, threads)
    widths = sorted({int(k.split(".")[1]) for k in res["mem"]})
    row = dict(backend=backend, cc=cc, **v, registers=res["regs"][0] if res["regs"] else "",
               spill_bytes=stack, access_bits="/".join(map(str, widths)),
               instr_per_elem=round(mod["total_per_elem"], 1))
    for gpu, gcc in GPUS.items():
        if gcc == cc:
            row[f"{gpu}_pct"] = round(100 * mod[gpu]["frac"], 1)
            row[f"{gpu}_warps"] = mod[gpu]["warps"]
            row[f"{gpu}_bound"] = mod[gpu]["bound"]
    return row


def triton_rows(cc, exact, fast_math):
    """fast_math None: the backend's default (rows labelled "triton"); False: the polynomial
    sine and cosine (rows "triton-polynomial", Gaussian passes only)."""
    vs = [v for v in variants(exact) if fast_math is None or v["distribution"] == "gaussian"]
    compiled = tb.compile_passes(cc, [dict(v, dtype=DTYPES[v["dtype"]], fast_math=fast_math)
                                      for v in vs])
    rows = []
    for v, c in zip(vs, compiled):
        elem_bytes = 4 if v["dtype"] == "float32" else 2
        (res,) = analyse(c.cubin, elem_bytes, c.block // (32 * c.num_warps)).values()
        stack = c.resource_usage()["stack"]
        rows.append(row_for("triton" if fast_math is None else "triton-polynomial", v, res, cc,
                            32 * c.num_warps, stack))
    return rows


def nvcc_path():
    found = shutil.which("nvcc")
    if found:
        return found
    for p in sorted(pathlib.Path("/usr/local").glob("cuda*/bin/nvcc")):
        return str(p)
    return None


def cuda_rows(cc, exact, polynomial):
    """Rows "cuda" (the default: fast math for Gaussian passes) and, with `polynomial`,
    "cuda-polynomial" (the Gaussian passes without fast math)."""
    nvcc = nvcc_path()
    if nvcc is None:
        print("nvcc not found: no CUDA rows", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "passes.cu"
        src.write_text(INSTANTIATE)
        out = pathlib.Path(tmp) / "passes.cubin"
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{cc}", *NVCC_FLAGS, "-I",
                        str(HERE.parent / "csrc"), str(src), "-o", str(out)], check=True)
        cubin = out.read_bytes()
    usage = tb._nvidia_tool("cuobjdump", "--dump-resource-usage", cubin)
    stacks = {name: int(stack) for name, stack in
              re.findall(r"Function (\S+):\s*REG:\d+ STACK:(\d+)", usage)}
    rows = []
    for dtype in DTYPES:
        elem_bytes = 4 if dtype == "float32" else 2
        vector = 16 // elem_bytes
        results = analyse(cubin, elem_bytes, vector,
                          select=lambda n, d=dtype: CUDA_STORAGE[CUDA_KERNEL.search(n).group(1)] == d)
        for name, res in results.items():
            m = CUDA_KERNEL.search(name)
            gaussian, update, sr, nx, ex, fast = (g == "1" for g in m.groups()[1:])
            if ex and not exact:
                continue
            if gaussian and not ex and not fast:  # the polynomial sine and cosine
                if not polynomial:
                    continue
                backend = "cuda-polynomial"
            else:
                backend = "cuda"
            v = dict(dtype=dtype, distribution="gaussian" if gaussian else "rademacher",
                     update=update, stochastic_rounding=sr, fused_next=nx, exact=ex)
            rows.append(row_for(backend, v, res, cc, 256, stacks.get(name, "")))
    return rows


def markdown(rows):
    """One line per pass: Triton and CUDA side by side, H100 / H200 / Orin."""
    key = lambda r: (r["dtype"], r["distribution"], r["update"], r["stochastic_rounding"],
                     r["fused_next"], r["exact"])
    by = {}
    for r in rows:
        by.setdefault(key(r), {}).setdefault(r["backend"], {}).update(
            {k: v for k, v in r.items() if v != "" and k not in ("backend",)})
    backends = sorted({r["backend"] for r in rows},  # triton, cuda, then without fast math
                      key=lambda b: (b.endswith("-polynomial"), not b.startswith("triton")))
    head = "| dtype | z | pass | " + " | ".join(
        f"{b}: regs, bits, instr/elem, % H100 / H200 / Orin" for b in backends) + " |"
    lines = [head, "|" + " --- |" * (3 + len(backends))]
    for k in sorted(by, key=lambda k: (k[5], list(DTYPES).index(k[0]), k[1], k[2], k[3], k[4])):
        cells = []
        for b in backends:
            r = by[k].get(b)
            if not r:
                cells.append("")
                continue
            spill = f" (spills {r['spill_bytes']} B)" if str(r.get("spill_bytes")) not in ("", "0") else ""
            pct = lambda gpu: f"{float(r[gpu]):g}" if r.get(gpu) not in (None, "") else "–"  # noqa: E731
            cells.append(f"{r['registers']}{spill}, {r['access_bits']}, {r['instr_per_elem']}, "
                         f"{pct('H100-SXM_pct')} / {pct('H200_pct')} / {pct('Orin-AGX_pct')}")
        v = dict(zip(("dtype", "distribution", "update", "stochastic_rounding", "fused_next",
                      "exact"), k))
        lines.append(f"| {k[0]} | {k[1]} | {pass_name(v)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/predicted_passes.csv")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--no-exact", action="store_true", help="leave out exact mode's passes")
    ap.add_argument("--polynomial", action="store_true",
                    help="also the Gaussian passes without fast math (polynomial sin/cos)")
    ap.add_argument("--markdown", help="also write the Markdown table to this file")
    ap.add_argument("--from-csv", help="only print the Markdown table of an existing CSV")
    args = ap.parse_args()
    if args.from_csv:
        with open(args.from_csv) as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k in ("update", "stochastic_rounding", "fused_next", "exact"):
                r[k] = r[k] == "True"
        print(markdown(rows))
        return
    exact = not args.no_exact
    rows = []
    for cc in sorted(set(GPUS.values()), reverse=True):
        with_exact = exact and cc == 90  # exact mode (no target) for sm_90 only: slow to compile
        if "triton" in args.backends:
            rows += triton_rows(cc, with_exact, None)
            if args.polynomial and tb.FAST_MATH:
                rows += [r for r in triton_rows(cc, with_exact, False) if not r["exact"]]
        if "cuda" in args.backends:
            rows += cuda_rows(cc, with_exact, args.polynomial)
    # one row per backend × pass: the sm_90 row takes the Orin columns of the sm_87 one
    merged = {}
    for r in rows:
        k = (r["backend"], r["dtype"], r["distribution"], r["update"], r["stochastic_rounding"],
             r["fused_next"], r["exact"])
        if k in merged:
            merged[k].update({f: r[f] for f in r if f.startswith("Orin")})
        else:
            merged[k] = r
    rows = list(merged.values())
    import triton

    write_stamped_csv(args.out, rows, kind="predicted (static SASS model, sm_90 for H100/H200, sm_87 for Orin)",
                      triton=triton.__version__, torch=torch.__version__)
    table = markdown(rows)
    print(table)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

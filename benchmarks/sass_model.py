"""Static SASS throughput model for elementwise pass kernels (fastzo's development tool; not
part of the installed package). benchmarks/predict_passes.py and tests/test_gpu_compile.py use it.

For each kernel in a cubin: disassemble (nvdisasm -c), build the CFG, find the hot loop (the
smallest natural loop that contains the weight stores), drop the cold regions (justified below),
count instructions per ELEMENT by class, and turn the counts into a compute-limited rate per SM
per clock with a simple pipe model. Compare with the memory-limited rate.

MEASURED from the SASS: instruction counts per class on the hot path, registers (cuobjdump
-res-usage), global access widths, elements per loop iteration (bytes stored / element size).
ASSUMED (see PIPES / MACHINES below): pipe throughputs, clocks, SM counts, achievable bandwidth,
and that every hot-path instruction issues once per iteration (no replay, perfect issue).

Cold regions (excluded from the hot path, each reported):
  * nested loops inside the hot loop and blocks with FP64 / local-memory / LDG.CONSTANT
    instructions: libdevice sinf/cosf's Payne-Hanek reduction, taken only for |x| > 105615;
    our arguments are 2*pi*u < 2*pi, so never taken;
  * when the loop has a 128-bit (or 64-bit) STG, the region that holds the narrow STGs: the
    element-by-element edge path of partial / misaligned vectors (CUDA kernel; Triton fixes).
  A branch region is cold if it contains a cold seed and the other side does not; regions are
  delimited by the branch block's immediate post-dominator inside the loop.

usage: python sass_model.py CUBIN [CUBIN...] [--csv out.csv] [--elems N] [--label L]
       (the build script calls analyse() directly)
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import subprocess
import sys

def _triton_bin() -> str:
    """nvdisasm and cuobjdump ship inside Triton's wheel (triton/backends/nvidia/bin)."""
    override = os.environ.get("SASS_TOOLS_BIN")
    if override:
        return override
    import importlib.util
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("sass_model: triton is not installed here; set SASS_TOOLS_BIN to a folder with nvdisasm")
    return os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")


TRITON_BIN = _triton_bin()
NVDISASM = os.path.join(TRITON_BIN, "nvdisasm")
CUOBJDUMP = os.path.join(TRITON_BIN, "cuobjdump")

# ----------------------------------------------------------------------------------------------
# Machines (ASSUMPTIONS). Pipe throughputs are thread-operations per SM per clock.
#   Hopper GH100 (sm_90): 4 SMSPs x 1 warp-instruction/clk issue = 128 thread-instr/clk;
#     FP32 128/clk (fmaheavy 64 + fmalite 64), IMAD only on fmaheavy (64/clk, shares it with
#     FP32); ALU (IADD3/LOP3/SHF/ISETP/SEL/FSETP/FSEL/FMNMX, I2FP, F2FP) 64/clk, separate
#     INT32 units; XU (MUFU, I2F/F2I/F2F/FRND, POPC/FLO/BREV) 16/clk; LSU 32/clk.
#   Ampere GA10B (sm_87, Orin): same issue/FP32/XU, but INT32 shares a datapath with half of the
#     FP32 lanes (16 FP32 + 16 "FP32 or INT32" per SMSP), so IMAD + ALU <= 64/clk and
#     FP32 + IMAD + ALU <= 128/clk.
# IMAD.WIDE / IMAD.HI: counted as WIDE_PASSES passes of fmaheavy (assumption: 2; set to 1 for
# the optimistic bound).
WIDE_PASSES = 2
VERBOSE = False

MACHINES = {
    # name: (cc, SMs, clock GHz, peak GB/s, achievable copy GB/s, max warps/SM, pipe model)
    "H100-SXM": (90, 132, 1.98, 3350.0, 3000.0, 64, "hopper"),
    "H200": (90, 132, 1.98, 4800.0, 4300.0, 64, "hopper"),   # achievable ~0.9 x peak (assumption)
    "Orin-AGX": (87, 16, 1.30, 204.8, 180.0, 48, "ga10x"),   # achievable ~0.88 x peak (assumption)
    # optimistic bound for Orin: INT32 units not shared with FP32 (Hopper-style pipes)
    "Orin-AGX-opt": (87, 16, 1.30, 204.8, 180.0, 48, "hopper"),
}

# ----------------------------------------------------------------------------------------------
# Instruction classes

FP32_ARITH = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I"}
FP32_OTHER = {"FSETP", "FSEL", "FMNMX", "FSET", "FCHK", "FSWZADD"}
FP16 = {"HADD2", "HFMA2", "HMUL2", "HSETP2", "HMNMX2", "HADD2_32I", "HFMA2_32I", "HMUL2_32I"}
IMAD = {"IMAD", "IMUL", "IMAD32I", "IMUL32I", "IDP", "IMADSP"}
INT_ALU = {"IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP",
           "ICMP", "IMNMX", "VIADD", "VIADDMNMX", "VIMNMX", "VIMNMX3", "LEA", "SEL", "IABS",
           "PRMT", "BMSK", "SGXT", "MOV", "MOV32I", "PLOP3", "P2R", "R2P", "ISCADD", "BFE", "BFI",
           "I2IP", "IMNMX3", "VABSDIFF", "VABSDIFF4", "CS2R"}
XU_INT = {"POPC", "FLO", "BREV"}
CONV_XU = {"F2F", "I2F", "F2I", "FRND", "I2I"}
CONV_ALU = {"F2FP", "I2FP", "F2IP"}  # sm_80+/sm_89+ packed / fast conversions on the ALU pipe
MUFU = {"MUFU"}
FP64 = {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET"}
GLOBAL_MEM = {"LDG", "STG", "LD", "ST", "ATOMG", "REDG", "RED", "ATOM", "LDGSTS"}
SHARED_MEM = {"LDS", "STS", "LDSM", "ATOMS", "STSM"}
LOCAL_MEM = {"LDL", "STL"}
CONST_MEM = {"LDC"}
BARRIER = {"BAR", "MEMBAR", "ERRBAR", "DEPBAR", "CCTL", "SYNCS", "FENCE", "ARRIVES"}
CONTROL = {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "NOP", "YIELD",
           "WARPSYNC", "BMOV", "KILL", "BPT", "NANOSLEEP", "ACQBULK", "ELECT", "ENDCOLLECTIVE"}
OTHER = {"S2R", "SHFL", "VOTE", "MATCH", "REDUX", "B2R", "R2B", "CCTL"}


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base.startswith("U") or base in ("S2UR", "R2UR"):
        return "uniform"
    if base in FP32_ARITH:
        return "fp32"
    if base in FP32_OTHER:
        return "fp32_cmp"
    if base in FP16:
        return "fp32"  # fma pipe
    if base in IMAD:
        if ".WIDE" in op or ".HI" in op:
            return "imad_wide"
        return "imad"
    if base in INT_ALU:
        return "int_alu"
    if base in XU_INT:
        return "xu_int"
    if base in CONV_XU:
        return "conv_xu"
    if base in CONV_ALU:
        return "conv_alu"
    if base in MUFU:
        return "mufu"
    if base in FP64:
        return "fp64"
    if base in GLOBAL_MEM:
        return "gmem"
    if base in SHARED_MEM:
        return "smem"
    if base in LOCAL_MEM:
        return "lmem"
    if base in CONST_MEM:
        return "cmem"
    if base in BARRIER:
        return "barrier"
    if base in CONTROL:
        return "control"
    if base in OTHER:
        return "other"
    return "unknown"


# pipe usage per class (thread-op units); the model divides by the machine's pipe throughput
def pipe_usage(counts: dict, pipes_model: str) -> dict:
    fp = counts.get("fp32", 0)
    imad = counts.get("imad", 0) + WIDE_PASSES * counts.get("imad_wide", 0)
    alu = counts.get("int_alu", 0) + counts.get("fp32_cmp", 0) + counts.get("conv_alu", 0)
    xu = counts.get("mufu", 0) + counts.get("conv_xu", 0) + counts.get("xu_int", 0)
    lsu = counts.get("gmem", 0) + counts.get("smem", 0) + counts.get("lmem", 0) + counts.get("cmem", 0)
    issue = sum(v for k, v in counts.items())
    if pipes_model == "hopper":
        return {"issue": issue / 128, "fma": (fp + imad) / 128, "fmaheavy": imad / 64,
                "alu": alu / 64, "xu": xu / 16, "lsu": lsu / 32}
    return {"issue": issue / 128, "fma+int": (fp + imad + alu) / 128, "int": (imad + alu) / 64,
            "xu": xu / 16, "lsu": lsu / 32}


# ----------------------------------------------------------------------------------------------
# Disassembly and CFG

INS_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*(.*?)\s*;?\s*$")
LABEL_RE = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
TARGET_RE = re.compile(r"`\((\.L_\w+)\)")


class Ins:
    __slots__ = ("addr", "pred", "op", "args", "text")

    def __init__(self, addr, pred, op, args, text):
        self.addr, self.pred, self.op, self.args, self.text = addr, pred, op, args, text

    @property
    def cls(self):
        return classify(self.op)


def disassemble(cubin: str) -> dict[str, list]:
    out = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list] = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"^\s*\.section\s+\.text\.([^,]+),", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        if cur is None:
            continue
        m = LABEL_RE.match(line.strip())
        if m:
            funcs[cur].append(("label", m.group(1)))
            continue
        m = INS_RE.match(line)
        if m:
            pred = (m.group(2) or "").strip()
            funcs[cur].append(("ins", Ins(int(m.group(1), 16), pred, m.group(3), m.group(4), line.strip())))
    return funcs


def registers(cubin: str) -> dict[str, int]:
    out = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    regs, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+).*SHARED:(\d+).*LOCAL:(\d+)", line)
        if m and name:
            regs[name] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return regs


def local_call(ins):
    """sm_8x ptxas emits loop exits as CALL.REL.NOINC to a local label: a jump, no return."""
    return ins.op.startswith("CALL") and "`(.L_" in ins.args


def is_branch(ins):
    return ins.op.split(".")[0] in ("BRA", "BRX", "JMP", "JMX") or local_call(ins)


def is_terminator(ins):
    b = ins.op.split(".")[0]
    return b in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET") or local_call(ins)


def unconditional(ins):
    return ins.pred in ("", "@PT")


class CFG:
    def __init__(self, items):
        # split into blocks
        self.blocks = []  # list of lists of Ins
        self.labels = {}  # label -> block index
        cur, pending = [], []
        for kind, x in items:
            if kind == "label":
                if cur:
                    self.blocks.append(cur)
                    cur = []
                pending.append(x)
                continue
            if not cur:
                for lab in pending:
                    self.labels[lab] = len(self.blocks)
                pending = []
            cur.append(x)
            if is_terminator(x):
                self.blocks.append(cur)
                cur = []
        if cur:
            self.blocks.append(cur)
        n = len(self.blocks)
        self.succ = [[] for _ in range(n)]
        for i, blk in enumerate(self.blocks):
            last = blk[-1]
            fall = True
            if is_terminator(last):
                if is_branch(last):
                    m = TARGET_RE.search(last.args)
                    if m and m.group(1) in self.labels:
                        self.succ[i].append(self.labels[m.group(1)])
                if unconditional(last):
                    fall = False
            if fall and i + 1 < n:
                if i + 1 not in self.succ[i]:
                    self.succ[i].append(i + 1)
        self.pred = [[] for _ in range(n)]
        for i, ss in enumerate(self.succ):
            for s in ss:
                self.pred[s].append(i)
        self.dom = self._dominators()

    def _dominators(self):
        n = len(self.blocks)
        full = set(range(n))
        dom = [set(full) for _ in range(n)]
        dom[0] = {0}
        changed = True
        while changed:
            changed = False
            for i in range(1, n):
                ps = [dom[p] for p in self.pred[i]]
                new = set.intersection(*ps) if ps else set()
                new = new | {i}
                if new != dom[i]:
                    dom[i] = new
                    changed = True
        return dom

    def natural_loops(self):
        loops = {}
        for u in range(len(self.blocks)):
            for v in self.succ[u]:
                if v in self.dom[u]:  # back edge u -> v
                    body = {v, u}
                    stack = [u] if u != v else []  # a self loop: the header alone
                    while stack:
                        x = stack.pop()
                        for p in self.pred[x]:
                            if p not in body:
                                body.add(p)
                                stack.append(p)
                    loops.setdefault(v, set()).update(body)
        return loops  # header -> body


def is_store(ins):
    return ins.op.split(".")[0] in ("STG", "ST")


def is_load(ins):
    return ins.op.split(".")[0] in ("LDG", "LD")


def store_width(ins) -> int:
    """bytes per thread of a global store/load instruction."""
    op = ins.op
    if ".128" in op:
        return 16
    if ".64" in op:
        return 8
    if ".U16" in op or ".S16" in op or ".16" in op:
        return 2
    if ".U8" in op or ".S8" in op:
        return 1
    return 4


def postdominators(nodes, succ, exit_node):
    full = set(nodes) | {exit_node}
    pdom = {x: set(full) for x in full}
    pdom[exit_node] = {exit_node}
    changed = True
    while changed:
        changed = False
        for x in nodes:
            ss = [pdom[s] for s in succ[x]]
            new = (set.intersection(*ss) if ss else set()) | {x}
            if new != pdom[x]:
                pdom[x] = new
                changed = True
    return pdom


def hot_path(cfg: CFG, verbose=False):
    loops = cfg.natural_loops()
    # the hot loop: smallest loop containing a global store
    stg_blocks = {i for i, b in enumerate(cfg.blocks) if any(is_store(x) for x in b)}
    cand = [(len(body), h, body) for h, body in loops.items() if body & stg_blocks]
    if not cand:
        raise RuntimeError("no loop with STG")
    _, header, body = min(cand)
    notes = []
    # nested loops inside the hot loop
    nested = set()
    for h, b in loops.items():
        if h != header and h in body and b < body:
            nested |= b
    slow = set(nested)  # slow-path seeds
    edge = set()        # edge-path seeds (narrow stores when a wide-store path exists)
    wide_store = any(store_width(x) >= 8 for i in body for x in cfg.blocks[i] if is_store(x))
    for i in body:
        for x in cfg.blocks[i]:
            c = x.cls
            if c in ("fp64", "lmem") or (x.op.startswith("LDG") and "CONSTANT" in x.op) \
                    or (x.op.startswith("CALL") and not local_call(x)):
                slow.add(i)
            if wide_store and is_store(x) and store_width(x) < 8:
                edge.add(i)
    # loop subgraph with virtual exit
    X = -1
    succ = {}
    for i in body:
        ss = []
        for s in cfg.succ[i]:
            if s == header or s not in body:
                ss.append(X)
            else:
                ss.append(s)
        succ[i] = sorted(set(ss))
    pdom = postdominators(body, succ, X)

    def ipdom(b):
        cands = pdom[b] - {b}
        # the immediate post-dominator is the one post-dominated by all others
        for c in cands:
            if all(c == d or d in pdom.get(c, {X}) for d in cands):
                return c
        return X

    def region(s, p):
        if s == p or s == X:
            return set()
        r, st = {s}, [s]
        while st:
            y = st.pop()
            for t in succ[y]:
                if t != p and t != X and t not in r:
                    r.add(t)
                    st.append(t)
        return r

    cold = set()
    # phase 1: slow paths (innermost first, to a fixpoint); phase 2: edge paths
    for seeds in (slow, edge):
        changed = True
        while changed:
            changed = False
            for b in sorted(body):
                ss = succ[b]
                if len(ss) < 2 or b in cold:
                    continue
                p = ipdom(b)
                regs = [region(s, p) - cold for s in ss]
                hot_sides = [r for r in regs if not (r & seeds)]
                cold_sides = [r for r in regs if r & seeds]
                if hot_sides and cold_sides:
                    hot_union = set().union(*hot_sides)
                    for r in cold_sides:
                        new = r - hot_union
                        if not new <= cold:
                            cold |= new
                            changed = True
    for b in sorted((slow | edge) - cold):
        notes.append(f"cold-looking block at 0x{cfg.blocks[b][0].addr:04x} is on the hot path (kept)")
    hot = body - cold
    # sanity: hot branch regions that are conditional with an unknown frequency
    for b in sorted(hot):
        ss = succ[b]
        if len(ss) < 2:
            continue
        p = ipdom(b)
        regs = [region(s, p) for s in ss]
        hot_regs = [r for r in regs if r and not (r & cold)]
        empty = [r for r in regs if not r]
        if hot_regs and (len(hot_regs) >= 2 or empty):
            n = sum(len(cfg.blocks[y]) for r in hot_regs for y in r)
            notes.append(f"branch at 0x{cfg.blocks[b][-1].addr:04x}: hot conditional region(s) "
                         f"of {n} ins counted as always executed")
    return header, body, hot, cold, notes


def analyse_function(name, items, elem_bytes, regs=None, expect_elems=None):
    cfg = CFG(items)
    header, body, hot, cold, notes = hot_path(cfg)
    counts = collections.Counter()
    ops = collections.Counter()
    mem = collections.Counter()
    st_bytes = 0
    ld_bytes = 0
    for b in hot:
        for x in cfg.blocks[b]:
            c = x.cls
            counts[c] += 1
            ops[x.op] += 1
            if c == "gmem":
                w = store_width(x)
                kind = "LD" if is_load(x) else "ST"
                mem[f"{kind}.{8 * w}"] += 1
                if kind == "ST":
                    st_bytes += w
                else:
                    ld_bytes += w
    elems = st_bytes // elem_bytes if st_bytes else 0
    if expect_elems and elems != expect_elems:
        notes.append(f"elements/iteration from stores = {elems}, expected {expect_elems}")
    elems = expect_elems or elems
    n_hot = sum(len(cfg.blocks[b]) for b in hot)
    n_body = sum(len(cfg.blocks[b]) for b in body)
    return dict(name=name, counts=counts, ops=ops, mem=mem, elems=elems, n_hot=n_hot, n_body=n_body,
                ld_bytes=ld_bytes, st_bytes=st_bytes, notes=notes, regs=regs,
                loop_addr=cfg.blocks[header][0].addr)


def occupancy(regs, threads_per_block, max_warps, shared=0):
    r = int(math.ceil(regs / 8.0) * 8)
    warps_per_block = threads_per_block // 32
    by_regs = 65536 // (r * 32)  # warps (register allocation granularity 256/warp ~ r*32)
    blocks = by_regs // warps_per_block
    # both backends launch at most 8 blocks (programs) per SM: cuda kBlocksPerSm, triton sms * 8
    blocks = min(blocks, max_warps // warps_per_block, 8)
    return blocks * warps_per_block


def model(res, elem_bytes, threads_per_block):
    """per-element counts and predicted rates on each machine"""
    per = {k: v / res["elems"] for k, v in res["counts"].items()}
    out = {"per_elem": per, "total_per_elem": sum(per.values())}
    for mname, (cc, sms, ghz, peak, achievable, max_warps, pm) in MACHINES.items():
        pipes = pipe_usage(per, pm)  # clocks per element per SM
        bound = max(pipes, key=pipes.get)
        clk_per_elem = pipes[bound]
        compute = sms * ghz * 1e9 / clk_per_elem  # elements/s
        memory = achievable * 1e9 / (2 * elem_bytes)
        warps = occupancy(res["regs"][0], threads_per_block, max_warps) if res.get("regs") else None
        out[mname] = dict(bound=bound, compute_Gelem=compute / 1e9, memory_Gelem=memory / 1e9,
                          frac=min(1.0, compute / memory), warps=warps,
                          pipes={k: round(v * 128, 1) for k, v in pipes.items()})
    return out


CLASS_ORDER = ["fp32", "fp32_cmp", "imad", "imad_wide", "int_alu", "conv_xu", "conv_alu", "mufu",
               "xu_int", "gmem", "smem", "barrier", "cmem", "lmem", "fp64", "control", "uniform",
               "other", "unknown"]


def summarize(label, res, mod, elem_bytes):
    per = mod["per_elem"]
    parts = " ".join(f"{k}={per[k]:.2f}" for k in CLASS_ORDER if per.get(k))
    mem = " ".join(f"{k}x{v}" for k, v in sorted(res["mem"].items()))
    lines = [f"== {label}  [{res['name'][:60]}]",
             f"   regs={res['regs'][0] if res['regs'] else '?'} smem={res['regs'][1] if res['regs'] else '?'}"
             f" loop@0x{res['loop_addr']:04x} hot={res['n_hot']} ins of {res['n_body']} in loop;"
             f" elems/thread/iter={res['elems']}; global per iter: {mem}",
             f"   per element: total={mod['total_per_elem']:.2f}  {parts}"]
    for m in MACHINES:
        d = mod[m]
        lines.append(f"   {m:9s} warps/SM={d['warps']} bound={d['bound']:8s} compute={d['compute_Gelem']:7.1f} G/s"
                     f"  memory={d['memory_Gelem']:7.1f} G/s  -> {100 * d['frac']:5.1f}% of copy BW"
                     f"   (pipe thread-ops/elem/128: {d['pipes']})")
    if VERBOSE:
        top = ", ".join(f"{k}:{v / res['elems']:.2f}" for k, v in res["ops"].most_common(40))
        lines.append(f"   opcodes/elem: {top}")
    for n in res["notes"][:6]:
        lines.append(f"   note: {n}")
    if len(res["notes"]) > 6:
        lines.append(f"   note: ... {len(res['notes']) - 6} more")
    return "\n".join(lines)


def analyse(cubin, select=None, elem_bytes=4, expect_elems=None):
    funcs = disassemble(cubin)
    regs = registers(cubin)
    out = {}
    for name, items in funcs.items():
        if select and not select(name):
            continue
        out[name] = analyse_function(name, items, elem_bytes, regs.get(name), expect_elems)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cubins", nargs="+")
    ap.add_argument("--elem-bytes", type=int, default=4)
    ap.add_argument("--elems", type=int, default=None)
    ap.add_argument("--threads", type=int, default=256)
    ap.add_argument("--filter", default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    VERBOSE = a.verbose
    for c in a.cubins:
        for name, res in analyse(c, (lambda n: a.filter in n) if a.filter else None, a.elem_bytes,
                                 a.elems).items():
            print(summarize(os.path.basename(c), res, model(res, a.elem_bytes, a.threads), a.elem_bytes))


def dump_regions(cubin, select=None):
    """Print the hot loop's blocks with hot/cold marks (for auditing the hot-path choice)."""
    for name, items in disassemble(cubin).items():
        if select and select not in name:
            continue
        cfg = CFG(items)
        header, body, hot, cold, notes = hot_path(cfg)
        print(f"== {name}: loop header 0x{cfg.blocks[header][0].addr:04x}")
        runs = []
        for b in sorted(body):
            mark = "HOT " if b in hot else "cold"
            blk = cfg.blocks[b]
            ops = collections.Counter(x.op.split(".")[0] for x in blk)
            why = [k for k in ("DMUL", "DADD", "DFMA", "LDL", "STL", "CALL") if ops.get(k)]
            if any(x.op.startswith("LDG") and "CONSTANT" in x.op for x in blk):
                why.append("LDG.CONSTANT")
            if any(is_store(x) for x in blk):
                why.append("stores:" + ",".join(f"{x.op}" for x in blk if is_store(x))[:60])
            runs.append(f"  {mark} 0x{blk[0].addr:04x}-0x{blk[-1].addr:04x} {len(blk):4d} ins {' '.join(why)}")
        print("\n".join(runs))

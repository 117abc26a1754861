"""Communication and step time of data-parallel MeZO against a DDP (backprop) step.

For 1, 2 and 4 CPU ranks (gloo) on a GPT-2 built from a config (~10 M parameters, random
weights, offline), with a fixed global batch split over the ranks:

- MeZO (``fastzo.MeZO(..., process_group=...)``): bytes this rank hands to collectives per step
  (counted by the optimizer: one all-gather of a 56-byte row), the same on the wire for a ring
  all-gather ((W−1)·56 bytes sent per rank), time per step and time inside the exchange;
- DDP (``DistributedDataParallel`` + SGD): bytes all-reduced per step, counted by a comm hook
  around the default all-reduce (= the bytes of all parameters), the ring all-reduce's wire
  estimate 2(W−1)/W of that, and time per step;
- the ratio DDP bytes / MeZO bytes.

    flock /tmp/fastzo-bench.lock python benchmarks/bench_distributed.py
    flock /tmp/fastzo-bench.lock python benchmarks/bench_distributed.py --quick   # tiny model

Writes benchmarks/results/distributed.csv (benchmark, backend, dtype, size, metric, unit,
median, p20, p80, device, versions, timestamp) and prints a table. Timing notes: every rank
runs one intra-op thread (--threads), so on a 2-core machine 1 and 2 ranks fit and 4 ranks
oversubscribe it 2×; MeZO's z is Gaussian when a native kernel backend is built, Rademacher when
only the oracle backend ("torch", ~0.8 s per 10^6 Gaussian elements) is available; the bytes
communicated do not depend on it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastzo.benchmark import cpu_name  # noqa: E402
from fastzo.distributed import CollectiveMeter  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "distributed.csv"
COLUMNS = ["benchmark", "backend", "dtype", "size", "metric", "unit", "median", "p20", "p80",
           "device", "versions", "timestamp"]
ROW_BYTES = 56  # fastzo.distributed.ROW float64 values per rank per exchange

CONFIGS = {  # GPT-2 from a config, dropout 0: ~9.6 M and ~0.2 M parameters
    "gpt2-9.6M": dict(n_embd=256, n_layer=6, n_head=4, vocab_size=16384, n_positions=128),
    "gpt2-tiny": dict(n_embd=64, n_layer=2, n_head=2, vocab_size=1024, n_positions=64),
}


def build_model(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**CONFIGS[name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)  # identical initial weights on every rank
    model = GPT2LMHeadModel(config)
    return model, config


def _batch(config, global_batch, seq, rank, world, step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, config.vocab_size, (global_batch, seq), generator=g)
    return ids.chunk(world)[rank]


def worker(rank, world, port, args, out_path):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    import fastzo

    model, config = build_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps, warmup = args.steps, args.warmup
    result = dict(params=n_params, param_bytes=param_bytes, threads=torch.get_num_threads())

    # ---- MeZO, data parallel
    model.eval()
    opt = fastzo.MeZO(model.parameters(), lr=1e-5, eps=1e-3, seed=0, backend=args.backend,
                      distribution=args.distribution, process_group=dist.group.WORLD)
    coordinator = opt._dist
    exchange_time = [0.0]
    gather = coordinator._all_gather

    def timed_gather(row):
        start = time.perf_counter()
        try:
            return gather(row)
        finally:
            exchange_time[0] += time.perf_counter() - start
    coordinator._all_gather = timed_gather
    times, exchange, sent, received = [], [], [], []
    for t in range(warmup + steps):
        ids = _batch(config, args.batch, args.seq, rank, world, t)
        exchange_time[0] = 0.0
        dist.barrier()
        start = time.perf_counter()
        with CollectiveMeter() as meter:  # measured at torch.distributed, not counted by fastzo
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        elapsed = time.perf_counter() - start
        if t >= warmup:
            times.append(elapsed)
            exchange.append(exchange_time[0])
            sent.append(sum(e["bytes_in"] for e in meter.totals().values()))
            received.append(sum(e["bytes_out"] for e in meter.totals().values()))
    result["mezo"] = dict(step_time=times, exchange_time=exchange, bytes_sent=sent,
                          bytes_received=received, backend=opt.backend or _picked_backend())

    # ---- DDP + SGD, the backprop data-parallel step of the same model
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model, config = build_model(args.model)
    model.train()
    ddp = DistributedDataParallel(model)
    counted = [0]

    def counting_hook(state, bucket):
        counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)
    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    sgd = torch.optim.SGD(ddp.parameters(), lr=1e-5)
    times, allreduced = [], []
    for t in range(warmup + steps):
        ids = _batch(config, args.batch, args.seq, rank, world, t)
        counted[0] = 0
        dist.barrier()
        start = time.perf_counter()
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if t >= warmup:
            times.append(elapsed)
            allreduced.append(counted[0])
    result["ddp"] = dict(step_time=times, bytes_allreduced=allreduced)
    # every rank's step times: a step lasts as long as its slowest rank
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out_path)
    dist.destroy_process_group()


def _picked_backend():
    from fastzo.backends import pick_backend

    return pick_backend(torch.device("cpu"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, args, tmp):
    out_path = Path(tmp) / f"world{world}.pt"
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, str(out_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(args.timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise SystemExit(f"{world} ranks did not finish within {args.timeout} s")
        if p.exitcode != 0:
            raise SystemExit(f"a rank of the {world}-rank run exited with {p.exitcode}")
    return torch.load(out_path, weights_only=False)


def versions():
    import fastzo

    parts = [f"torch {torch.__version__}", f"fastzo {fastzo.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-9.6M", choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default=None, help="fastzo kernel backend (default: fastest)")
    parser.add_argument("--distribution", default=None, choices=["rademacher", "gaussian"],
                        help="default: gaussian with a native backend, rademacher on the oracle")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.warmup = "gpt2-tiny", 3, 1
    if args.distribution is None:
        args.distribution = "rademacher" if (args.backend or _picked_backend()) == "torch" else "gaussian"
    worlds = [int(w) for w in args.worlds.split(",")]
    cores = os.cpu_count() or 1
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []

    def add(benchmark, backend, size, metric, unit, values):
        values = np.atleast_1d(np.asarray(values, dtype=float))
        rows.append(dict(benchmark=benchmark, backend=backend, dtype="float32", size=size,
                         metric=metric, unit=unit, median=float(np.median(values)),
                         p20=float(np.quantile(values, 0.2)), p80=float(np.quantile(values, 0.8)),
                         device=device, versions=vers, timestamp=stamp))

    vers = versions()
    import tempfile

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            ranks = run_world(world, args, tmp)
            r0 = ranks[0]
            threads = r0["threads"]
            device = (f"cpu: {cpu_name()}, {cores} cores, {world} rank(s) x {threads} thread(s)"
                      + (" (oversubscribed)" if world * threads > cores else ""))
            size = f"{args.model} {r0['params'] / 1e6:.2f}M params; ranks={world}; batch={args.batch}x{args.seq}"
            # a step lasts as long as its slowest rank
            mezo_t = np.max([r["mezo"]["step_time"] for r in ranks], axis=0)
            ddp_t = np.max([r["ddp"]["step_time"] for r in ranks], axis=0)
            exch_t = np.max([r["mezo"]["exchange_time"] for r in ranks], axis=0)
            sent = np.array(r0["mezo"]["bytes_sent"], dtype=float)
            wire_mezo = sent * (world - 1)
            ddp_bytes = np.array(r0["ddp"]["bytes_allreduced"], dtype=float)
            wire_ddp = ddp_bytes * 2 * (world - 1) / world
            kernel = r0["mezo"]["backend"]
            mezo_name = f"mezo_data_parallel ({args.distribution} z)"
            add(mezo_name, f"gloo/{kernel}", size, "step_time", "s", mezo_t)
            add(mezo_name, f"gloo/{kernel}", size, "exchange_time", "s", exch_t)
            add(mezo_name, f"gloo/{kernel}", size, "collective_bytes_per_rank", "bytes", sent)
            add(mezo_name, f"gloo/{kernel}", size, "wire_bytes_sent_per_rank_est", "bytes", wire_mezo)
            add("ddp_sgd_data_parallel", "gloo", size, "step_time", "s", ddp_t)
            add("ddp_sgd_data_parallel", "gloo", size, "collective_bytes_per_rank", "bytes", ddp_bytes)
            add("ddp_sgd_data_parallel", "gloo", size, "wire_bytes_sent_per_rank_est", "bytes", wire_ddp)
            ratio = float(np.median(ddp_bytes) / np.median(sent))
            add("ddp_over_mezo", "gloo", size, "collective_bytes_ratio", "x", ratio)
            table.append((world, threads, r0["params"], np.median(sent), np.median(ddp_bytes), ratio,
                          np.median(mezo_t), np.median(exch_t), np.median(ddp_t)))
            assert np.median(ddp_bytes) >= r0["param_bytes"] * 0.999, "DDP all-reduced fewer bytes than the params"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'ranks':>5} {'thr':>3} {'params':>10} {'MeZO B/step':>11} {'DDP B/step':>12} "
          f"{'ratio':>10} {'MeZO s/step':>11} {'exchange s':>10} {'DDP s/step':>10}")
    for world, threads, n, s, d, ratio, mt, et, dt in table:
        print(f"{world:>5} {threads:>3} {n:>10,} {s:>11.0f} {d:>12,.0f} {ratio:>10,.0f} {mt:>11.3f} "
              f"{et:>10.4f} {dt:>10.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

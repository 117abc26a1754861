"""Data parallelism, sharded weights, seed checks and faults of fastzo.MeZO (docs/distributed.md).

Each scenario spawns 2–4 CPU processes joined by a gloo process group (free port, bounded time)
and collects what every rank returns; tests compare those results with each other and with a
single-process run computed here. Scenarios are module-scoped fixtures, so one spawn serves the
tests that read it; every spawn is killed after TIMEOUT seconds, so nothing can hang the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import fastzo
from fastzo.distributed import DistributedStateError, PeerFailureError, ShardingError

# The backend users get on a CPU (cpp where the extension is built, else the oracle); the main
# data-parallel scenario also runs on the oracle, which defines the numbers.
BACKEND = "cpp" if "cpp" in fastzo.available_backends() else "torch"
DP_BACKENDS = list(dict.fromkeys(["torch", BACKEND]))
TIMEOUT = 60  # seconds per spawn
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ process harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """A forkserver that imported torch and this module once: ranks start in well under a
    second instead of paying the imports each (seconds on two loaded cores), and nothing is
    forked from the pytest process, whose thread pools are not fork-safe."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "torch.distributed.fsdp", "torch.distributed.tensor",
                                "torch.distributed.device_mesh"])
    return ctx


def _entry(fn, rank, world, port, out_dir, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=20))
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world, *args, out_dir, may_die=()):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the results by rank.

    Ranks in ``may_die`` may exit without a result (they die on purpose).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out_dir), args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"ranks {hung} of {fn.__name__} did not finish within {TIMEOUT} s")
    results = {}
    for r in range(world):
        err = out_dir / f"{r}.err"
        if err.exists():
            pytest.fail(f"rank {r} of {fn.__name__} raised:\n{err.read_text()}")
        path = out_dir / f"{r}.pt"
        if path.exists():
            results[r] = torch.load(path, weights_only=False)
        elif r not in may_die:
            pytest.fail(f"rank {r} of {fn.__name__} exited with {procs[r].exitcode} and no result")
    return results


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only waits (14 ms per 24×6 linear
    measured with two threads on two loaded cores, against well under 1 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ problems
def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batch(n=24):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 6, generator=g)
    return X, torch.sin(X[:, :3])


def loss_fn(model, X, y):
    return ((model(X) - y) ** 2).mean()


def flat(model_or_params):
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) \
        else model_or_params
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def group():
    import torch.distributed as dist

    return dist.group.WORLD


OPTS = dict(lr=0.05, eps=1e-3, seed=7, backend=BACKEND)
STEPS = 6
SAVE_AT = 3


# ----------------------------------------------------------- scenario: data parallel, 2 ranks
def dp_worker(rank, world, steps, save_at, backend):
    from fastzo.distributed import CollectiveMeter

    OPTS = globals()["OPTS"] | dict(backend=backend)
    X, y = batch()
    Xr, yr = X.chunk(world)[rank], y.chunk(world)[rank]
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), process_group=group(), **OPTS)
    checkpoint, losses = None, []
    with CollectiveMeter() as meter:  # what actually goes through torch.distributed
        for t in range(steps):
            if t == save_at:
                checkpoint = (flat(model), opt.state_dict())
            losses.append(opt.step(lambda: loss_fn(model, Xr, yr)))
    out = dict(weights=flat(model), losses=losses, checkpoint=checkpoint, stats=dict(opt._dist.stats),
               record=opt.last_step, measured=meter.totals(), backend=backend)
    for name, options in VARIANTS.items():
        variant = mlp()
        vopt = fastzo.MeZO(variant.parameters(), process_group=group(), **options, **OPTS)
        for _ in range(4):
            vopt.step(lambda: loss_fn(variant, Xr, yr))
        vopt.materialize()
        out[name] = dict(weights=flat(variant), exchanges=vopt._dist.stats["exchanges"])
    # Seed state disagreement: a fresh optimizer whose rank 1 has another seed, then another step.
    for name, change in (("seed", dict(seed=8)), ("step", None)):
        before = flat(model)
        options = dict(OPTS) | (change if rank == 1 and change else {})
        bad = fastzo.MeZO(model.parameters(), process_group=group(), **options)
        if name == "step" and rank == 1:
            bad.step_count = 5  # e.g. resumed from another checkpoint
        try:
            bad.step(lambda: loss_fn(model, Xr, yr))
            out[name] = "no error"
        except DistributedStateError as exc:
            out[name] = str(exc)
        out[name + "_restore_error"] = (flat(model) - before).abs().max().item()
    return out


VARIANTS = {"fused steps": dict(fused_steps=True), "forward estimator": dict(estimator="forward"),
            "q=2": dict(num_directions=2), "rademacher": dict(distribution="rademacher")}


@pytest.fixture(scope="module", params=DP_BACKENDS)
def dp_run(request, tmp_path_factory):
    return launch(dp_worker, 2, STEPS, SAVE_AT, request.param, out_dir=tmp_path_factory.mktemp("dp"))


def single_process(steps, model=None, opt=None, backend=BACKEND):
    X, y = batch()
    model = model if model is not None else mlp()
    opt = opt if opt is not None else fastzo.MeZO(model.parameters(), **(OPTS | dict(backend=backend)))
    losses = [opt.step(lambda: loss_fn(model, X, y)) for _ in range(steps)]
    return model, opt, losses


def test_replicas_stay_bit_identical(dp_run):
    assert torch.equal(dp_run[0]["weights"], dp_run[1]["weights"])
    assert dp_run[0]["losses"] == dp_run[1]["losses"]
    assert not torch.equal(dp_run[0]["weights"], flat(mlp())), "the run did not train"


def test_one_exchange_of_56_bytes_per_step(dp_run):
    # measured by wrapping torch.distributed's collectives on each rank
    for rank in (0, 1):
        measured = dp_run[rank]["measured"]
        assert measured == {"all_gather": dict(calls=STEPS, bytes_in=56 * STEPS, bytes_out=2 * 56 * STEPS)}
    stats = dp_run[0]["stats"]  # the coordinator's own account agrees
    assert stats["exchanges"] == STEPS
    assert stats["bytes_sent"] == 56 * STEPS and stats["bytes_received"] == 2 * 56 * STEPS


def test_the_coordinator_counts_no_bytes_without_a_collective():
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), split_directions=True, num_directions=2, **OPTS)
    opt.step(lambda: loss_fn(model, *batch()))
    assert opt._dist.stats["exchanges"] == 2  # one round per direction in a world of one
    assert opt._dist.stats["bytes_sent"] == opt._dist.stats["bytes_received"] == 0


def test_data_parallel_equals_single_process_on_the_whole_batch(dp_run):
    model, opt, losses = single_process(STEPS, backend=dp_run[0]["backend"])
    # The ranks average the two half-batch means, the single process takes one mean: equal up to
    # float32 rounding of the loss, which g = ΔL/2ε amplifies by 1/ε.
    torch.testing.assert_close(dp_run[0]["weights"], flat(model), rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.tensor(dp_run[0]["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    assert dp_run[0]["record"].seeds == opt.last_step.seeds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_data_parallel_variants(dp_run, variant):
    options = VARIANTS[variant]
    assert torch.equal(dp_run[0][variant]["weights"], dp_run[1][variant]["weights"])
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), **options, **(OPTS | dict(backend=dp_run[0]["backend"])))
    single_process(4, model, opt)
    opt.materialize()
    # the forward estimator's g = ΔL/ε amplifies the loss rounding twice as much as central's
    torch.testing.assert_close(dp_run[0][variant]["weights"], flat(model), rtol=0, atol=5e-5)
    q = options.get("num_directions", 1)
    per_step = q + (options.get("estimator") == "forward")
    assert dp_run[0][variant]["exchanges"] == 4 * per_step


def test_resume_on_a_different_world_size(dp_run):
    weights, state = dp_run[0]["checkpoint"]
    model = mlp()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(weights, model.parameters())
    opt = fastzo.MeZO(model.parameters(), **(OPTS | dict(backend=dp_run[0]["backend"])))  # no group
    opt.load_state_dict(state)
    assert opt.step_count == SAVE_AT
    model, opt, _ = single_process(STEPS - SAVE_AT, model, opt)
    assert opt.step_count == STEPS and opt.last_step.seeds == dp_run[0]["record"].seeds
    torch.testing.assert_close(flat(model), dp_run[0]["weights"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("what", ["seed", "step"])
def test_seed_state_mismatch_is_detected_at_the_first_step(dp_run, what):
    for rank in (0, 1):
        message = dp_run[rank][what]
        assert "disagree" in message and "rank 0: step" in message and "rank 1: step" in message
        # restored by the inverse passes: exact up to float32 rounding of θ ± εz
        assert dp_run[rank][what + "_restore_error"] < 1e-6


def test_process_group_none_means_no_communication():
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), **OPTS)
    assert opt._dist is None


# ------------------------------------------------------ scenario: split directions, 4 ranks
def counted(closure):
    calls = [0]

    def wrapped():
        calls[0] += 1
        return closure()
    return wrapped, calls


def split_worker(rank, world, cases):
    X, y = batch()  # every rank the same batch: each rank evaluates other directions
    out = {}
    for name, options in cases.items():
        model = mlp()
        opt = fastzo.MeZO(model.parameters(), process_group=group(), split_directions=True,
                          **options, **OPTS)
        closure, calls = counted(lambda: loss_fn(model, X, y))
        losses = [opt.step(closure) for _ in range(3)]
        out[name] = dict(weights=flat(model), losses=losses, forwards=calls[0],
                         exchanges=opt._dist.stats["exchanges"])
    # plain data parallelism on 4 ranks in the same spawn
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), process_group=group(), **OPTS)
    for _ in range(3):
        opt.step(lambda: loss_fn(model, X.chunk(world)[rank], y.chunk(world)[rank]))
    out["dp"] = flat(model)
    # DTensors on a 2×2 mesh: HSDP-style (Replicate, Shard(0)) and nested (Shard(0), Shard(0))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    plain = two_d_params()
    layouts = [(Replicate(), Shard(0)), (Shard(0), Shard(0)), (Shard(0), Replicate())]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, list(pl))) for t, pl in zip(plain, layouts)]
    opt = fastzo.MeZO(params, process_group=group(), **OPTS)
    for _ in range(3):
        opt.step(lambda: two_d_loss([p.full_tensor() for p in params]))
    out["2d"] = [p.full_tensor() for p in params]
    return out


def two_d_params():
    torch.manual_seed(3)
    return [torch.randn(7, 6) * 0.3, torch.randn(9, 7) * 0.3, torch.randn(3, 9) * 0.3]


def two_d_loss(params):
    X, y = batch()
    w1, w2, w3 = params
    return ((torch.tanh(torch.tanh(X @ w1.T) @ w2.T) @ w3.T - y) ** 2).mean()


SPLIT_CASES = {"central q=6": dict(num_directions=6),
               "forward q=3": dict(num_directions=3, estimator="forward")}


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    return launch(split_worker, 4, SPLIT_CASES, out_dir=tmp_path_factory.mktemp("split"))


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_directions(split_run, case):
    options = SPLIT_CASES[case]
    ranks = [split_run[r][case] for r in range(4)]
    for r in range(1, 4):
        assert torch.equal(ranks[r]["weights"], ranks[0]["weights"])
        assert ranks[r]["losses"] == ranks[0]["losses"]
    # Equal, bit for bit, to one process evaluating all q directions itself (same point θ, same
    # passes in the same order): the split only moves forwards between ranks.
    X, y = batch()
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), split_directions=True, **options, **OPTS)
    closure, calls = counted(lambda: loss_fn(model, X, y))
    losses = [opt.step(closure) for _ in range(3)]
    assert torch.equal(ranks[0]["weights"], flat(model))
    assert ranks[0]["losses"] == losses
    # forwards per rank: 2 per own direction (central) or 1 + 1 per own direction (forward)
    q = options["num_directions"]
    own = [len(range(r, q, 4)) for r in range(4)]
    per_dir = 2 if options.get("estimator", "central") == "central" else 1
    base = 0 if per_dir == 2 else 1
    assert [rk["forwards"] for rk in ranks] == [3 * (base + per_dir * n) for n in own]
    assert calls[0] == 3 * (base + per_dir * q)
    assert ranks[0]["exchanges"] == 3 * -(-q // 4)  # one all-gather per round of 4 directions


def test_split_directions_is_close_to_sequential_directions():
    """q-SPSA split over ranks and in one process: both evaluate every direction at θ and differ
    only in the rounding of the passes (one restore pass more per direction in the split)."""
    X, y = batch()
    runs = []
    for split in (False, True):
        model = mlp()
        opt = fastzo.MeZO(model.parameters(), num_directions=4, split_directions=split,
                          **(OPTS | dict(lr=0.01, distribution="rademacher")))
        for _ in range(8):
            opt.step(lambda: loss_fn(model, X, y))
        runs.append(flat(model))
    assert (runs[0] - runs[1]).abs().max() < 2e-3
    assert (runs[0] - flat(mlp())).abs().max() > 1e-2


def test_dtensors_on_a_two_dimensional_mesh(split_run):
    params = [torch.nn.Parameter(t) for t in two_d_params()]
    opt = fastzo.MeZO(params, **OPTS)
    for _ in range(3):
        opt.step(lambda: two_d_loss(params))
    for r in range(4):
        for got, want in zip(split_run[r]["2d"], params):
            assert torch.equal(got, want.detach())


def test_data_parallel_on_four_ranks(split_run):
    for r in range(1, 4):
        assert torch.equal(split_run[r]["dp"], split_run[0]["dp"])
    model, _, _ = single_process(3)
    torch.testing.assert_close(split_run[0]["dp"], flat(model), rtol=0, atol=2e-5)


# -------------------------------------------------- scenario: sharded weights, 3 ranks
def sharded_worker(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    X, y = batch()
    out = {}

    # DTensor parameters: uneven Shard(0) blocks (rows 2/2/1 and 1/1/0: rank 2's shard of b1 is
    # empty), a Replicate() weight; the closure's forward all-gathers them itself.
    torch.manual_seed(0)
    plain = [torch.randn(5, 6) * 0.3, torch.randn(2) * 0.1, torch.randn(3, 5) * 0.3, torch.randn(3) * 0.1]
    placements = [Shard(0), Shard(0), Replicate(), Shard(0)]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, [pl])) for t, pl in zip(plain, placements)]

    def dtensor_loss():
        w1, b1, w2, b2 = (p.full_tensor() for p in params)
        hidden = torch.tanh(X @ w1.T + torch.cat([b1, torch.zeros(3)]))
        return ((hidden @ w2.T + b2 - y) ** 2).mean()

    opt = fastzo.MeZO(params, process_group=group(), **OPTS)
    for _ in range(4):
        opt.step(dtensor_loss)
    out["dtensor"] = [p.full_tensor() for p in params]
    out["local_shapes"] = [tuple(p.to_local().shape) for p in params]

    # Placements fastzo cannot perturb shard by shard are refused with a clear error.
    bad = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    try:
        fastzo.MeZO([bad], process_group=group(), **OPTS)
        out["shard1"] = "no error"
    except ShardingError as exc:
        out["shard1"] = str(exc)
    try:
        fastzo.MeZO(params, **OPTS)
        out["no_group"] = "no error"
    except ValueError as exc:
        out["no_group"] = str(exc)

    # FSDP2: uneven shards (7 rows → 3/3/1, 2 rows → 1/1/0); the root keeps its parameters
    # unsharded after forward unless the optimizer reshards it after each pass.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = fastzo.MeZO(model.parameters(), process_group=group(), **OPTS)
    fsdp_params = list(model.parameters())
    for _ in range(4):
        opt.step(lambda: loss_fn(model, X, y[:, :2]))
    # No collective runs while the shards are perturbed.
    calls = []
    names = ["all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter_tensor"]
    saved = {n: getattr(dist, n) for n in names}
    for n in names:
        setattr(dist, n, lambda *a, _n=n, **k: calls.append(_n))
    try:
        opt._perturb(opt.seed_for(99), opt._eps_list())
        opt._perturb(opt.seed_for(99), [-e for e in opt._eps_list()])
    finally:
        for n in names:
            setattr(dist, n, saved[n])
    out["collectives_in_passes"] = calls
    out["fsdp"] = [p.full_tensor() for p in fsdp_params]
    out["fsdp_local_rows"] = [p.to_local().shape[0] for p in fsdp_params]
    return out


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    return launch(sharded_worker, 3, out_dir=tmp_path_factory.mktemp("sharded"))


def test_dtensor_shards_equal_the_unsharded_run(sharded_run):
    assert [sharded_run[r]["local_shapes"][1] for r in range(3)] == [(1,), (1,), (0,)]
    torch.manual_seed(0)
    plain = [torch.randn(5, 6) * 0.3, torch.randn(2) * 0.1, torch.randn(3, 5) * 0.3, torch.randn(3) * 0.1]
    params = [torch.nn.Parameter(t) for t in plain]
    X, y = batch()

    def loss():
        w1, b1, w2, b2 = params
        hidden = torch.tanh(X @ w1.T + torch.cat([b1, torch.zeros(3)]))
        return ((hidden @ w2.T + b2 - y) ** 2).mean()

    opt = fastzo.MeZO(params, **OPTS)
    for _ in range(4):
        opt.step(loss)
    for r in range(3):
        for got, want in zip(sharded_run[r]["dtensor"], params):
            assert torch.equal(got, want.detach())


def test_fsdp2_shards_equal_the_unsharded_run(sharded_run):
    assert [sharded_run[r]["fsdp_local_rows"] for r in range(3)] == [[3, 3, 1, 1], [3, 3, 1, 1], [1, 1, 0, 0]]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    X, y = batch()
    opt = fastzo.MeZO(model.parameters(), **OPTS)
    for _ in range(4):
        opt.step(lambda: loss_fn(model, X, y[:, :2]))
    for r in range(3):
        assert sharded_run[r]["collectives_in_passes"] == []
        for got, want in zip(sharded_run[r]["fsdp"], model.parameters()):
            assert torch.equal(got, want.detach())


def test_unsupported_placements_are_refused(sharded_run):
    assert "Shard(dim=1)" in sharded_run[0]["shard1"] and "Shard(0)" in sharded_run[0]["shard1"]
    assert "process_group=" in sharded_run[0]["no_group"]


# ------------------------------------------------------------- scenario: faults, 2 ranks
def fault_worker(rank, world, out_dir):
    X, y = batch()
    Xr, yr = X.chunk(world)[rank], y.chunk(world)[rank]
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), process_group=group(), **OPTS)
    closure = lambda: loss_fn(model, Xr, yr)  # noqa: E731
    opt.step(closure)
    out = {}
    for where in ("plus", "minus"):
        before = flat(model)
        calls = [0]

        def failing():
            calls[0] += 1
            if rank == 1 and calls[0] == (1 if where == "plus" else 2):
                raise ValueError(f"bad batch on rank 1 ({where})")
            return closure()
        try:
            opt.step(failing)
            out[where] = "no error"
        except (ValueError, PeerFailureError) as exc:
            out[where] = f"{type(exc).__name__}: {exc}"
        out[where + "_restore_error"] = (flat(model) - before).abs().max().item()
        out[where + "_steps"] = opt.step_count
    opt.step(closure)  # the group still works: the failure was part of the same collective
    out["after"] = flat(model)
    # A rank that dies inside the closure: the survivor raises instead of hanging.
    before = flat(model)
    if rank == 1:
        torch.save(out, os.path.join(out_dir, "1.pt"))  # this rank leaves no result otherwise
        opt.step(lambda: os._exit(3))
    start = time.monotonic()
    try:
        opt.step(closure)
        out["dead"] = "no error"
    except PeerFailureError as exc:
        out["dead"] = str(exc)
    out["dead_seconds"] = time.monotonic() - start
    out["dead_restore_error"] = (flat(model) - before).abs().max().item()
    return out


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fault")
    return launch(fault_worker, 2, str(out_dir), out_dir=out_dir, may_die={1})


@pytest.mark.parametrize("where", ["plus", "minus"])
def test_a_rank_failing_mid_step_makes_every_rank_restore_and_raise(fault_run, where):
    assert fault_run[0][where].startswith("PeerFailureError") and "rank(s) [1]" in fault_run[0][where]
    for r in (0, 1):
        assert fault_run[r][where + "_restore_error"] < 1e-6
        assert fault_run[r][where + "_steps"] == 1  # the failed step is not counted
    assert fault_run[1][where].startswith(f"ValueError: bad batch on rank 1 ({where})")


def test_ranks_continue_in_step_after_a_failure(fault_run):
    assert torch.equal(fault_run[0]["after"], fault_run[1]["after"])


def test_the_failing_rank_reraises_its_own_error():
    # rank 1 died later in the scenario, so check its error type here, in one process: a
    # closure failure with a group of one still joins the (local) exchange and re-raises.
    model = mlp()
    opt = fastzo.MeZO(model.parameters(), split_directions=True, num_directions=2, **OPTS)

    def bad():
        raise ValueError("bad batch")
    with pytest.raises(ValueError, match="bad batch") as info:
        opt.step(bad)
    assert any("told the other 0 rank(s)" in note for note in getattr(info.value, "__notes__", []))
    assert opt.step_count == 0 and torch.allclose(flat(model), flat(mlp()), atol=1e-6)


def test_a_dead_rank_makes_the_survivor_raise_within_the_timeout(fault_run):
    assert "exchange with the other ranks failed" in fault_run[0]["dead"]
    assert fault_run[0]["dead_seconds"] < 25
    assert fault_run[0]["dead_restore_error"] < 1e-6


# ------------------------------------------------------------- the example, via torchrun
def test_example_runs_with_torchrun(tmp_path):
    """examples/distributed_train.py as documented, on 2 CPU ranks (gloo)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    checkpoint = tmp_path / "ck.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(_free_port()), str(REPO / "examples" / "distributed_train.py"),
           "--steps", "20", "--log-every", "10", "--backend", BACKEND, "--checkpoint", str(checkpoint)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "replicas identical on all 2 ranks" in run.stdout
    assert "56 bytes sent, 112 bytes received per rank" in run.stdout
    state = torch.load(checkpoint, weights_only=False)
    assert state["optim"]["mezo"]["step"] == 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_data_parallel_on_gpus(tmp_path):
    """The NCCL path: the exchange runs on the GPU, the replicas stay identical."""
    world = min(2, torch.cuda.device_count())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           "--master_port", str(_free_port()), str(REPO / "examples" / "distributed_train.py"),
           "--steps", "20"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"replicas identical on all {world} ranks" in run.stdout

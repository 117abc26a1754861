"""Every state change of fastzo.MeZO is safe: regression tests, one per case found by trying it
the way users do (failing directions, autocast, schedules in fused-steps mode, added groups,
trajectory files, pickling, autograd version counters, numpy scalars, layouts, meta tensors)."""

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch

import fastzo
from fastzo import NonFiniteLossError

BACKEND = "cpp" if "cpp" in fastzo.available_backends() else "torch"
EPS = 1e-3


def model_and_data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    X = torch.randn(32, 8, generator=g).to(dtype)
    y = X[:, :1].sin()
    return model, (lambda: ((model(X) - y) ** 2).float().mean())


def flat(model_or_params):
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def failing_on(closure, call, kind):
    """closure, except that its ``call``-th evaluation (1-based) fails the way ``kind`` says."""
    calls = []

    def wrapped():
        calls.append(1)
        if len(calls) == call:
            if kind == "exception":
                raise RuntimeError("data loader broke")
            if kind == "interrupt":
                raise KeyboardInterrupt
            if kind == "nan":
                return torch.tensor(math.nan)
            if kind == "vector":
                return torch.ones(3)
        return closure()

    return wrapped


ERRORS = {"exception": RuntimeError, "interrupt": KeyboardInterrupt, "nan": NonFiniteLossError,
          "vector": ValueError}


# ----------------------------------------------------------------- 1. n-SPSA after a failure
@pytest.mark.parametrize("kind", list(ERRORS))
@pytest.mark.parametrize("call", [3, 4], ids=["dir2-plus", "dir2-minus"])
def test_failure_in_a_later_direction_leaves_no_update(kind, call):
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=0.1, seed=3, backend=BACKEND, num_directions=2)
    opt.step(closure)
    before = flat(model).clone()
    with pytest.raises(ERRORS[kind]):
        opt.step(failing_on(closure, call, kind))
    assert opt.step_count == 1
    # Only the rounding of the ±εz round trips may remain; an update of lr·g·z would be ~1e-2.
    assert (flat(model) - before).abs().max() < 1e-6
    # A retry applies exactly one update: the run equals one that never failed.
    opt.step(closure)
    ref_model, ref_closure = model_and_data()
    ref = fastzo.MeZO(ref_model.parameters(), lr=0.1, seed=3, backend=BACKEND, num_directions=2)
    ref.step(ref_closure)
    ref.step(ref_closure)
    assert torch.allclose(flat(model), flat(ref_model), atol=1e-4)  # rounding, through g


def test_skipped_nonfinite_direction_really_restores():
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=0.1, seed=3, backend=BACKEND, num_directions=3,
                      on_nonfinite="skip")
    before = flat(model).clone()
    with pytest.warns(RuntimeWarning, match="weights restored"):
        assert opt.step(failing_on(closure, 5, "nan")) is None
    assert opt.step_count == 0
    assert (flat(model) - before).abs().max() < 1e-6


def test_all_directions_are_evaluated_at_the_same_point():
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=0.1, seed=3, backend=BACKEND, num_directions=3)
    start = flat(model).clone()
    seen = []
    opt.step(lambda: seen.append(flat(model)) or closure())
    centres = [(seen[2 * d] + seen[2 * d + 1]) / 2 for d in range(3)]
    for c in centres:
        assert (c - start).abs().max() < 1e-6


# ------------------------------------------------------------------ 2. autocast around step()
def test_autocast_around_step_sees_each_perturbation():
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-3, seed=0, backend=BACKEND)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        closure()  # a forward before the step fills the cast cache too
        for _ in range(3):
            opt.step(closure)
            assert opt.last_step.loss_plus != opt.last_step.loss_minus


# ------------------------------------------- 3. fused-steps mode and changes between steps
def fused_opt(model, **kwargs):
    return fastzo.MeZO(model.parameters(), lr=0.0, seed=1, backend=BACKEND, fused_steps=True, **kwargs)


@pytest.mark.parametrize("change", ["eps", "freeze", "unfreeze", "add_group"])
def test_fused_steps_with_lr_zero_never_move_the_weights(change):
    model, closure = model_and_data()
    extra = torch.nn.Parameter(torch.randn(5) * 0.1)
    start = flat(list(model.parameters()) + [extra]).clone()
    if change == "unfreeze":
        model[0].bias.requires_grad_(False)
    opt = fused_opt(model)
    for t in range(4):
        if t == 2:
            if change == "eps":
                opt.param_groups[0]["eps"] = 3e-3
            elif change == "freeze":
                model[0].weight.requires_grad_(False)
            elif change == "unfreeze":
                model[0].bias.requires_grad_(True)
            else:
                opt.add_param_group({"params": [extra]})
        opt.step(lambda: closure() + extra.sum() * 0)
    opt.materialize()
    assert (flat(list(model.parameters()) + [extra]) - start).abs().max() < 1e-6


# ------------------------------------------------------------------------ 4. add_param_group
@pytest.mark.parametrize("group,error", [
    (dict(params=[torch.zeros(3, dtype=torch.float64, requires_grad=True)]), TypeError),
    (dict(eps=-1e-3), ValueError), (dict(eps=0.0), ValueError), (dict(lr=-1.0), ValueError),
    (dict(weight_decay=math.nan), ValueError), (dict(lr="1"), TypeError),
])
def test_add_param_group_validates_like_the_constructor(group, error):
    model, _ = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-3, backend=BACKEND)
    group = dict(params=[torch.nn.Parameter(torch.ones(3))]) | group
    with pytest.raises(error):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1


def test_eps_set_to_zero_between_steps_is_refused_before_any_pass():
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-3, backend=BACKEND)
    opt.param_groups[0]["eps"] = 0.0
    before = flat(model).clone()
    with pytest.raises(ValueError, match="eps"):
        opt.step(closure)
    assert torch.equal(flat(model), before)


def test_a_group_that_became_unusable_fails_the_step_before_any_pass():
    model, closure = model_and_data()
    extra = torch.nn.Parameter(torch.randn(7) * 0.1)
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND)
    opt.add_param_group({"params": [extra], "eps": 2e-3})
    opt.step(closure)
    extra.data = torch.randn(14)[::2]  # swapped for a strided view between steps
    before = flat(list(model.parameters()) + [extra]).clone()
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(closure)
    assert torch.equal(flat(list(model.parameters()) + [extra]), before)
    assert opt.step_count == 1


def test_failure_restores_every_group():
    model, closure = model_and_data()
    extra = torch.nn.Parameter(torch.randn(7) * 0.1)
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND)
    opt.add_param_group({"params": [extra], "eps": 2e-3})
    before = flat(list(model.parameters()) + [extra]).clone()
    with pytest.raises(RuntimeError):
        opt.step(failing_on(closure, 2, "exception"))
    assert (flat(list(model.parameters()) + [extra]) - before).abs().max() < 1e-6


# --------------------------------------------------------------------- 5. trajectory files
def test_a_second_run_does_not_append_to_the_first_runs_trajectory(tmp_path):
    path = tmp_path / "run.jsonl"
    for seed in (1, 2):
        model, closure = model_and_data()
        opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=seed, backend=BACKEND, trajectory=path)
        if seed == 1:
            for _ in range(3):
                opt.step(closure)
        else:
            before = flat(model).clone()
            with pytest.raises(FileExistsError, match="already holds"):
                opt.step(closure)
            assert torch.equal(flat(model), before)
    assert sum(1 for line in open(path) if '"format"' in line) == 1


def test_resume_from_a_checkpoint_trims_the_trajectory_and_replays(tmp_path):
    path = tmp_path / "run.jsonl"
    model, closure = model_and_data()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=4, backend=BACKEND, trajectory=path)
    for t in range(6):
        if t == 3:
            checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
        opt.step(closure)
    # The process dies; a new one resumes from the checkpoint of step 3 and finishes.
    model, closure = model_and_data()
    model.load_state_dict(checkpoint[0])
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=4, backend=BACKEND, trajectory=path)
    opt.load_state_dict(checkpoint[1])
    for _ in range(3):
        opt.step(closure)
    steps = [json.loads(line)["step"] for line in open(path) if '"step"' in line]
    assert steps == list(range(6))
    trained = flat(model).clone()
    model.load_state_dict(start)
    fastzo.replay(model.parameters(), path)
    assert torch.equal(flat(model), trained)


def test_trim_trajectory_helper(tmp_path):
    path = tmp_path / "run.jsonl"
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=4, backend=BACKEND, trajectory=path)
    for _ in range(5):
        opt.step(closure)
    fastzo.trim_trajectory(path, 2)
    steps = [json.loads(line)["step"] for line in open(path) if '"step"' in line]
    assert steps == [0, 1]


def test_replay_after_failed_steps_is_bit_identical(tmp_path):
    path = tmp_path / "run.jsonl"
    model, closure = model_and_data()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=4, backend=BACKEND, trajectory=path,
                      fused_steps=True)
    for t in range(6):
        if t in (2, 4):
            with pytest.raises(RuntimeError):
                opt.step(failing_on(closure, 2 if t == 2 else 1, "exception"))
        opt.step(closure)
    opt.materialize()
    trained = flat(model).clone()
    model.load_state_dict(start)
    fastzo.replay(model.parameters(), path)
    assert torch.equal(flat(model), trained)


def test_replay_uses_the_recorded_backend(tmp_path):
    path = tmp_path / "run.jsonl"
    model, closure = model_and_data()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=4, backend="torch", trajectory=path)
    for _ in range(5):
        opt.step(closure)
    assert json.loads(open(path).readline())["backend"] == "torch"
    trained = flat(model).clone()
    model.load_state_dict(start)
    fastzo.replay(model.parameters(), path)  # no backend given: the recorded one
    assert torch.equal(flat(model), trained)
    if BACKEND != "torch":
        model.load_state_dict(start)
        with pytest.warns(UserWarning, match="recorded on backend 'torch'"):
            fastzo.replay(model.parameters(), path, backend=BACKEND)


# ------------------------------------------------------------------ 6. deepcopy / pickling
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(how):
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, seed=9, backend=BACKEND, num_directions=2)
    opt.step(closure)
    if how == "deepcopy":
        twin_model = copy.deepcopy(model)
        twin = copy.deepcopy(opt)
        twin.param_groups[0]["params"] = list(twin_model.parameters())
    else:
        twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
        twin.param_groups[0]["params"] = list(twin_model.parameters())
    X = torch.randn(4, 8)
    opt.step(lambda: model(X).pow(2).mean())
    twin.step(lambda: twin_model(X).pow(2).mean())
    assert twin.step_count == opt.step_count == 2
    assert torch.equal(flat(model), flat(twin_model))


# ------------------------------------------------------------------ 7. version counters
def test_a_graph_built_before_the_step_refuses_to_backpropagate_after_it():
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND)
    loss = model(torch.randn(4, 8)).pow(2).sum()  # saves the weights for backward
    opt.step(closure)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# ------------------------------------------------------------------------------ 8. scalars
@pytest.mark.parametrize("convert", [np.float32, np.float64, np.int64, np.array, int])
def test_numpy_and_integer_scalars_are_accepted(convert):
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND)
    value = opt.step(lambda: convert(round(closure().item() * 1000)) if convert in (np.int64, int)
                     else convert(closure().item()))
    assert isinstance(value, float) and opt.step_count == 1


@pytest.mark.parametrize("value", [np.ones(3), np.bool_(True), True, "1.0"])
def test_non_scalars_are_still_refused(value):
    model, _ = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND)
    before = flat(model).clone()
    with pytest.raises((TypeError, ValueError), match="scalar"):
        opt.step(lambda: value)
    assert (flat(model) - before).abs().max() < 1e-6


# ---------------------------------------------------------------- 9. layouts and devices
def conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))


def test_channels_last_is_trained_in_memory_order_and_replays(tmp_path):
    net = conv_net().to(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    path = tmp_path / "run.jsonl"
    opt = fastzo.MeZO(net.parameters(), lr=1e-2, backend=BACKEND, trajectory=path)
    for _ in range(3):
        opt.step(lambda: net(x).pow(2).mean())
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    # Element index = position in memory: z of the channels_last tensor, viewed in memory order.
    w = torch.zeros(8, 3, 3, 3).to(memory_format=torch.channels_last)
    fastzo.perturb_([w], seed=5, scale=1.0, backend="torch")
    z = fastzo.zo_noise(w.numel(), seed=5, key=0)
    assert torch.equal(w.permute(0, 2, 3, 1).reshape(-1), z)
    trained = flat(net).clone()
    net.load_state_dict(start)  # copies into the channels_last parameters
    fastzo.replay(net.parameters(), path)
    assert torch.equal(flat(net), trained)
    contiguous = conv_net()
    contiguous.load_state_dict(start)
    with pytest.raises(ValueError, match="memory format"):
        fastzo.replay(contiguous.parameters(), path)


def test_overlapping_or_strided_views_are_refused_with_what_to_do():
    w = torch.nn.Parameter(torch.randn(4, 12)[:, ::2])
    with pytest.raises(ValueError, match="contiguous"):
        fastzo.MeZO([w], lr=1e-3)
    with pytest.raises(ValueError, match=r"\.contiguous\(\)"):
        fastzo.perturb_([torch.randn(4, 6)[:, ::2]], seed=1, scale=1.0)


def test_meta_parameters_get_the_right_diagnosis():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        fastzo.MeZO(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="meta"):
        fastzo.perturb_(list(model.parameters()), seed=1, scale=1.0)


# ------------------------------------------------- 11. tests run what users run: auto-selection
def test_auto_selection_on_cpu_never_picks_the_triton_interpreter(monkeypatch):
    from fastzo.backends import auto_order, pick_backend

    assert "triton" not in auto_order(torch.device("cpu"))
    if "cpp" in fastzo.available_backends():
        assert pick_backend(torch.device("cpu")) == "cpp"
    calls = []
    for name in fastzo.available_backends():
        module = fastzo.backends.get_backend(name)
        original = module.perturb_
        monkeypatch.setattr(module, "perturb_", lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    fastzo.perturb_([torch.zeros(10)], seed=1, scale=1.0)
    assert calls == [pick_backend(torch.device("cpu"))]


def test_forward_estimator_skips_a_nonfinite_base_loss():
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND, estimator="forward",
                      on_nonfinite="skip")
    before = flat(model).clone()
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.step(failing_on(closure, 1, "nan")) is None
    assert torch.equal(flat(model), before) and opt.step_count == 0


def test_a_checkpoint_resumes_only_into_the_same_memory_format():
    net = conv_net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9)
    opt = fastzo.MeZO(net.parameters(), lr=1e-2, backend=BACKEND)
    opt.step(lambda: net(x).pow(2).mean())
    state = opt.state_dict()
    contiguous = conv_net()
    with pytest.raises(ValueError, match="memory format"):
        fastzo.MeZO(contiguous.parameters(), lr=1e-2, backend=BACKEND).load_state_dict(state)
    same = conv_net().to(memory_format=torch.channels_last)
    fastzo.MeZO(same.parameters(), lr=1e-2, backend=BACKEND).load_state_dict(state)


@pytest.mark.parametrize("options,passes", [
    (dict(), 3), (dict(num_directions=3), 11), (dict(fused_steps=True), 2),
    (dict(estimator="forward"), 2), (dict(estimator="forward", num_directions=3), 8),
], ids=["q=1", "q=3", "fused", "forward", "forward q=3"])
def test_passes_per_step_are_as_documented(options, passes, monkeypatch):
    """README: 3 passes (q=1), 4q−1 for q directions (every direction restored before the next,
    the updates after all losses), 2 in fused-steps mode after the first step."""
    model, closure = model_and_data()
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend=BACKEND, **options)
    opt.step(closure)
    calls = []
    for name in ("perturb_", "restore_and_update_", "restore_update_and_perturb_"):
        original = getattr(fastzo.ops, name)
        monkeypatch.setattr(fastzo.ops, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    opt.step(closure)
    assert len(calls) == passes

"""fastzo.MeZO: convergence, reproducibility, resume, replay, failure paths, options."""

import math

import pytest
import torch

import fastzo
from fastzo import NonFiniteLossError
from helpers import DEVICE, fast_backends, ulp

# The backend a user gets: backend=None, i.e. cpp on a CPU (never the Triton interpreter, even
# with TRITON_INTERPRET=1 set as in these tests), the fastest GPU backend on a GPU. Backend
# agreement is tested in test_backends_follow_the_same_trajectory.
DEFAULT_BACKEND = None


def MeZO(*args, **kwargs):
    kwargs.setdefault("backend", DEFAULT_BACKEND)
    return fastzo.MeZO(*args, **kwargs)

EPS = 1e-3


def least_squares(gen, n=200, d=20):
    A = torch.randn(n, d, generator=gen, device="cpu").to(DEVICE)
    x_true = torch.randn(d, generator=gen).to(DEVICE)
    return A, A @ x_true, x_true


def run(steps, dtype=torch.float32, seed=0, backend=DEFAULT_BACKEND, save_at=None, **kwargs):
    """A small deterministic problem: returns the final weights of an MLP regression."""
    g = torch.Generator().manual_seed(123)
    torch.manual_seed(123)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = model.to(DEVICE, dtype)
    X = torch.randn(64, 8, generator=g).to(DEVICE, dtype)
    y = X[:, :1].sin()
    opt = MeZO(model.parameters(), lr=kwargs.pop("lr", 1e-2), seed=seed, backend=backend, **kwargs)
    closure = lambda: ((model(X) - y) ** 2).mean()  # noqa: E731
    checkpoint = None
    for t in range(steps):
        if save_at == t:
            checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
        opt.step(closure)
    opt.materialize()
    return model, opt, checkpoint, closure


def flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def test_least_squares_converges_to_the_known_solution(gen):
    A, b, x_true = least_squares(gen)
    x = torch.nn.Parameter(torch.zeros(20, device=DEVICE))
    opt = MeZO([x], lr=4e-3, seed=1)
    loss = lambda: ((A @ x - b) ** 2).mean()  # noqa: E731
    start = loss().item()
    for _ in range(1500):
        opt.step(loss)
    assert loss().item() < 1e-3 * start
    assert torch.allclose(x.detach(), x_true, atol=0.05)


@pytest.mark.parametrize("options", [
    dict(distribution="rademacher"), dict(estimator="forward"), dict(sign=True, lr=2e-2),
    dict(num_directions=4), dict(fused_steps=True),
], ids=["rademacher", "one-sided", "sign", "q=4", "fused"])
def test_every_variant_decreases_the_loss(options, gen):
    A, b, _ = least_squares(gen)
    x = torch.nn.Parameter(torch.zeros(20, device=DEVICE))
    kwargs = dict(lr=3e-3) | options
    opt = MeZO([x], seed=2, **kwargs)
    loss = lambda: ((A @ x - b) ** 2).mean()  # noqa: E731
    start = loss().item()
    for _ in range(300):
        opt.step(loss)
    opt.materialize()
    assert loss().item() < 0.3 * start


@pytest.mark.slow
def test_mlp_classifier_on_digits_learns():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = slice(0, 1400), slice(1400, None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3, seed=3)
    accuracy = lambda s: (model(X[s]).argmax(1) == y[s]).float().mean().item()  # noqa: E731
    before = accuracy(test)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, 1400, (64,), generator=gen)
        opt.step(lambda: torch.nn.functional.cross_entropy(model(X[idx]), y[idx]))
    assert accuracy(test) > before + 0.3


def test_same_seed_same_trajectory_bitwise_and_other_seed_differs():
    a, *_ = run(20, seed=5)
    b, *_ = run(20, seed=5)
    c, *_ = run(20, seed=6)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


@pytest.mark.parametrize("backend", fast_backends())
def test_backends_follow_the_same_trajectory(backend):
    ref, *_ = run(20, seed=5, backend="torch")
    got, *_ = run(20, seed=5, backend=backend)
    assert torch.allclose(flat(got), flat(ref), atol=1e-5, rtol=1e-5)
    rad_ref, *_ = run(10, seed=5, backend="torch", distribution="rademacher")
    rad, *_ = run(10, seed=5, backend=backend, distribution="rademacher")
    assert torch.allclose(flat(rad), flat(rad_ref), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_resume_is_bit_identical(dtype, fused):
    steps, k = 12, 5
    full, _, checkpoint, _ = run(steps, dtype=dtype, save_at=k, fused_steps=fused)
    weights, opt_state = checkpoint
    resumed, opt, _, closure = run(0, dtype=dtype, fused_steps=fused, seed=999)
    resumed.load_state_dict(weights)
    opt.load_state_dict(opt_state)
    assert opt.step_count == k and opt.base_seed == 0
    for _ in range(steps - k):
        opt.step(closure)
    opt.materialize()
    assert torch.equal(flat(resumed), flat(full))


def test_plain_run_without_saving_equals_a_resumed_one():
    uninterrupted, *_ = run(10)
    _, _, (weights, state), _ = run(10, save_at=4)
    resumed, opt, _, closure = run(0)
    resumed.load_state_dict(weights)
    opt.load_state_dict(state)
    for _ in range(6):
        opt.step(closure)
    assert torch.equal(flat(resumed), flat(uninterrupted))


def test_fused_steps_match_plain_steps_within_rounding():
    plain, *_ = run(30)
    fused, opt, _, _ = run(30, fused_steps=True)
    assert opt.weights_are_clean
    assert torch.allclose(flat(fused), flat(plain), atol=1e-5)


def test_fused_checkpoint_holds_the_pending_perturbation():
    model, opt, _, closure = run(0, fused_steps=True)
    opt.step(closure)
    state = opt.state_dict()
    assert not opt.weights_are_clean and state["mezo"]["pending"]["seed"] == opt.seed_for(1)


def test_fused_weights_hold_the_next_perturbation_until_materialized():
    model, opt, _, closure = run(0, fused_steps=True)
    opt.step(closure)
    assert not opt.weights_are_clean
    perturbed = flat(model).clone()
    with opt.clean_weights():
        assert opt.weights_are_clean
        assert not torch.equal(flat(model), perturbed)
    opt.step(closure)  # continues with a fresh +εz
    assert opt.step_count == 2


@pytest.mark.parametrize("options", [dict(), dict(fused_steps=True), dict(num_directions=3),
                                     dict(estimator="forward", sign=True)],
                         ids=["plain", "fused", "q=3", "forward-sign"])
def test_replay_rebuilds_the_weights_bit_identically(options, tmp_path):
    path = tmp_path / "run.jsonl"
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    X = torch.randn(32, 8, generator=g)
    opt = MeZO(model.parameters(), lr=1e-2, seed=77, trajectory=path, **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    for t in range(10):
        opt.step(lambda: model(X).pow(2).mean())
        sched.step()
        if t == 6:
            with opt.clean_weights():  # an evaluation in the middle; replay must follow it
                model(X)
    opt.materialize()
    trained = flat(model).clone()
    model.load_state_dict(start)
    fastzo.replay(model.parameters(), path, backend=DEFAULT_BACKEND)
    assert torch.equal(flat(model), trained)
    assert path.stat().st_size < 4000


def test_closure_error_restores_weights_and_does_not_count(gen):
    model, opt, _, closure = run(3)
    for fail_on in (1, 2):
        before = flat(model).clone()
        calls = []

        def failing():
            calls.append(1)
            if len(calls) == fail_on:
                raise RuntimeError("data loader broke")
            return closure()

        with pytest.raises(RuntimeError, match="data loader"):
            opt.step(failing)
        assert opt.step_count == 3
        # +εz then −εz (and +εz, −2εz, +εz): float32 rounding, at most 1.5 ulp of |θ| + 2ε|z|
        bound = 1.5 * ulp(before.abs() + 2 * EPS * 6, torch.float32)
        assert ((flat(model) - before).abs() <= bound).all()


def test_keyboard_interrupt_restores_weights():
    model, opt, _, closure = run(1)
    before = flat(model).clone()

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted)
    assert torch.allclose(flat(model), before, atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_raises_by_default_and_restores(bad):
    model, opt, _, closure = run(1)
    before = flat(model).clone()
    with pytest.raises(NonFiniteLossError):
        opt.step(lambda: torch.tensor(bad))
    assert torch.allclose(flat(model), before, atol=1e-6)
    assert opt.step_count == 1


def test_nonfinite_loss_can_be_skipped_with_a_warning():
    model, opt, _, closure = run(1, on_nonfinite="skip")
    before = flat(model).clone()
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.step(lambda: float("nan")) is None
    assert opt.step_count == 1
    assert torch.allclose(flat(model), before, atol=1e-6)
    opt.step(closure)
    assert opt.step_count == 2


@pytest.mark.parametrize("value", [torch.ones(3), "0.5", None])
def test_non_scalar_closure_result_is_refused_and_weights_restored(value):
    model, opt, _, _ = run(1)
    before = flat(model).clone()
    with pytest.raises((TypeError, ValueError), match="scalar"):
        opt.step(lambda: value)
    assert torch.allclose(flat(model), before, atol=1e-6)


def test_non_differentiable_objective_works():
    """Maximise accuracy (a float) by minimising its negative."""
    model, opt, _, _ = run(0, lr=0.5)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    labels = (X[:, 0] > 0).float()
    acc = lambda: ((model(X)[:, 0] > 0).float() == labels).float().mean().item()  # noqa: E731
    before = acc()
    for _ in range(150):
        opt.step(lambda: -acc())
    assert acc() > before


def test_step_returns_mean_loss_and_exposes_last_step():
    model, opt, _, closure = run(0)
    loss = opt.step(closure)
    s = opt.last_step
    assert loss == pytest.approx((s.loss_plus + s.loss_minus) / 2)
    assert s.projected_grad == pytest.approx((s.loss_plus - s.loss_minus) / (2 * EPS))
    assert s.seed == opt.seed_for(0) and s.step == 0


def test_frozen_parameters_are_bit_identical():
    model, *_ = run(0)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = MeZO(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.step(lambda: model(torch.ones(2, 8)).sum())
    assert torch.equal(model[0].weight, frozen)


def test_tied_parameter_is_perturbed_once():
    w1 = torch.nn.Parameter(torch.randn(50))
    w2 = torch.nn.Parameter(w1.detach().clone())
    with pytest.warns(UserWarning):
        opt_tied = MeZO([w1, w1], lr=1e-2, seed=4)
    opt_single = MeZO([w2], lr=1e-2, seed=4)
    seen = []
    opt_tied.step(lambda: seen.append(w1.detach().clone()) or w1.sum())
    opt_single.step(lambda: w2.sum())
    assert torch.equal(w1, w2)


def test_param_groups_have_their_own_hyperparameters():
    a = torch.nn.Parameter(torch.ones(100))
    b = torch.nn.Parameter(torch.ones(100))
    opt = MeZO([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.0}], lr=1e-2,
               weight_decay=0.5)
    opt.step(lambda: (a.sum() + b.sum()))
    assert (b.detach() - 1).abs().max() < 1e-6  # lr 0: only rounding of the round trip
    assert (a.detach() - 1).abs().max() > 1e-4


def test_weight_decay_shrinks_weights_with_zero_gradient():
    w = torch.nn.Parameter(torch.full((10,), 2.0))
    opt = MeZO([w], lr=0.1, weight_decay=0.5)
    opt.step(lambda: 1.0)  # constant objective: g = 0
    assert torch.allclose(w.detach(), torch.full((10,), 2.0 * (1 - 0.05)))


def test_schedulers_drive_the_learning_rate():
    w = torch.nn.Parameter(torch.ones(10))
    opt = MeZO([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t >= 1 else 1.0)
    opt.step(lambda: w.sum())
    sched.step()
    moved = w.detach().clone()
    opt.step(lambda: w.sum())
    assert opt.param_groups[0]["lr"] == 0.0
    assert torch.allclose(w.detach(), moved, atol=1e-6)


@pytest.mark.parametrize("kwargs,error", [
    (dict(lr=-1.0), ValueError), (dict(lr=math.nan), ValueError), (dict(eps=0.0), ValueError),
    (dict(eps=-1e-3), ValueError), (dict(eps=math.inf), ValueError), (dict(weight_decay=-0.1), ValueError),
    (dict(seed=-1), ValueError), (dict(seed=2**64), ValueError), (dict(seed=1.5), TypeError),
    (dict(distribution="uniform"), ValueError), (dict(num_directions=0), ValueError),
    (dict(estimator="backward"), ValueError), (dict(on_nonfinite="ignore"), ValueError),
    (dict(fused_steps=True, num_directions=2), ValueError), (dict(backend="opencl"), ValueError),
    (dict(lr="0.1"), TypeError),
])
def test_bad_hyperparameters_are_refused(kwargs, error):
    with pytest.raises(error):
        MeZO([torch.nn.Parameter(torch.ones(3))], **(dict(lr=1e-3) | kwargs))


def test_integer_parameters_are_refused():
    with pytest.raises(TypeError):
        MeZO([torch.ones(3, dtype=torch.float64, requires_grad=True)], lr=1e-3)


def test_step_needs_a_closure():
    opt = MeZO([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    with pytest.raises(ValueError, match="closure"):
        opt.step()

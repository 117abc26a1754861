"""A state machine test of fastzo.MeZO (Hypothesis' RuleBasedStateMachine).

Random sequences of steps, steps whose closure fails (exception, KeyboardInterrupt, NaN, a
non-scalar) in any evaluation, state_dict save and load into a fresh optimizer,
add_param_group, lr/eps/weight_decay and requires_grad changes, materialize()/clean_weights()
and evaluations in between, in plain and fused-steps mode, with one and two directions. After
every rule the weights are compared with an independent float64 re-computation of the expected
trajectory (z from fastzo.zo_noise, the update written out here), and every forward checks that
it sees θ ± εz of the right direction.

Budget: the "ci" profile (default) runs a few seconds; FASTZO_HYPOTHESIS_PROFILE=long runs
hundreds of longer sequences (see tests/conftest.py).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,  # noqa: E402
                                 rule)

import fastzo  # noqa: E402
from fastzo import NonFiniteLossError  # noqa: E402

BACKEND = "torch"  # the oracle
TOL = 2e-5  # float32 rounding of a few dozen passes over weights of size ~1
FAILURES = {"exception": RuntimeError, "interrupt": KeyboardInterrupt, "nan": NonFiniteLossError,
            "vector": ValueError}
SHAPES = [(5,), (3, 4), (7,), (2, 3)]


class MeZOMachine(RuleBasedStateMachine):
    @initialize(q=st.sampled_from([1, 2]), fused=st.booleans(), seed=st.integers(0, 2**64 - 1),
                distribution=st.sampled_from(["gaussian", "rademacher"]))
    def setup(self, q, fused, seed, distribution):
        fused = fused and q == 1
        gen = torch.Generator().manual_seed(seed % 2**63)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES[:2]]
        self.targets = [torch.randn(s, generator=gen) for s in SHAPES]
        self.spare = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES[2:]]
        self.options = dict(seed=seed, backend=BACKEND, num_directions=q, fused_steps=fused,
                            distribution=distribution)
        self.opt = fastzo.MeZO([{"params": [self.params[0]]}, {"params": [self.params[1]], "eps": 2e-3}],
                               lr=0.05, **self.options)
        self.expected = [p.detach().double().clone() for p in self.params]  # clean θ
        self.pending = None  # (seed, eps per group, keys) of a +εz the weights hold
        self.count = 0
        self.distribution = distribution

    # ----------------------------------------------------------------- the expected model
    def keyed(self):
        """(group index, param index, key) of every parameter, in the optimizer's order."""
        out, key = [], 0
        for gi, group in enumerate(self.opt.param_groups):
            for p in group["params"]:
                out.append((gi, [id(x) for x in self.params].index(id(p)), key))
                key += 1
        return out

    def z(self, seed, i, key):
        p = self.params[i]
        return fastzo.zo_noise(p.numel(), seed, key, distribution=self.distribution).double().view(p.shape)

    def with_perturbation(self, base, seed, multiple, eps, keys):
        out = [b.clone() for b in base]
        for gi, i, key in self.keyed():
            if key in keys:
                out[i] += multiple * eps[gi] * self.z(seed, i, key)
        return out

    def now(self):
        """What the weights must hold now."""
        if self.pending is None:
            return self.expected
        seed, eps, keys = self.pending
        return self.with_perturbation(self.expected, seed, 1, eps, keys)

    def loss(self, weights):
        return sum(((w.double() - t.double()) ** 2).sum().item() for w, t in zip(weights, self.targets))

    def check_close(self, got, want, what):
        for i, (g, w) in enumerate(zip(got, want)):
            err = (g.detach().double() - w).abs().max().item()
            assert err < TOL, f"{what}: parameter {i} is off by {err}"

    @invariant()
    def weights_are_as_expected(self):
        if not hasattr(self, "opt"):
            return
        self.check_close(self.params, self.now(), "after the last rule")
        assert self.opt.step_count == self.count
        assert self.opt.weights_are_clean == (self.pending is None)

    # ------------------------------------------------------------------------ the rules
    def closure(self, seen, fail_at=None, kind=None):
        def f():
            seen.append([p.detach().double().clone() for p in self.params])
            if fail_at is not None and len(seen) == fail_at:
                if kind == "exception":
                    raise RuntimeError("data loader broke")
                if kind == "interrupt":
                    raise KeyboardInterrupt
                if kind == "nan":
                    return float("nan")
                return torch.ones(2)
            return self.loss(self.params)
        return f

    def step_plan(self):
        t, q = self.count, self.opt.num_directions
        eps = [float(g["eps"]) for g in self.opt.param_groups]
        keys = {key for gi, i, key in self.keyed() if self.params[i].requires_grad}
        seeds = [self.opt.seed_for(t, d) for d in range(q)]
        if self.pending is not None and (self.pending[0] != seeds[0] or self.pending[1] != eps
                                         or self.pending[2] != keys):
            self.pending = None  # the optimizer materializes a stale +εz first
        return t, q, eps, keys, seeds

    @rule()
    def step(self):
        t, q, eps, keys, seeds = self.step_plan()
        seen = []
        self.opt.step(self.closure(seen))
        assert len(seen) == 2 * q
        grads = []
        for d, seed in enumerate(seeds):  # every direction evaluated at θ ± εz of its own
            self.check_close(seen[2 * d], self.with_perturbation(self.expected, seed, 1, eps, keys), "L+")
            self.check_close(seen[2 * d + 1], self.with_perturbation(self.expected, seed, -1, eps, keys), "L-")
            plus, minus = self.loss(seen[2 * d]), self.loss(seen[2 * d + 1])
            grads.append([(plus - minus) / 2 / e / q for e in eps])
        theta = [e.clone() for e in self.expected]
        for d in [q - 1] + list(range(q - 1)):  # the optimizer's update order
            for gi, i, key in self.keyed():
                if key in keys:
                    group = self.opt.param_groups[gi]
                    decay = 1 - group["lr"] * group["weight_decay"]
                    theta[i] = theta[i] * decay - group["lr"] * grads[d][gi] * self.z(seeds[d], i, key)
        self.expected = theta
        self.count += 1
        self.pending = (self.opt.seed_for(self.count), eps, keys) if self.opt.fused_steps else None

    @rule(kind=st.sampled_from(sorted(FAILURES)), at=st.integers(1, 4))
    def failing_step(self, kind, at):
        _, q, _, _, _ = self.step_plan()
        at = min(at, 2 * q)
        seen = []
        with pytest.raises(FAILURES[kind]):
            self.opt.step(self.closure(seen, at, kind))
        # an error stops at once; a NaN is seen once the direction's pair of losses is in
        assert len(seen) == (at if kind != "nan" else 2 * math.ceil(at / 2))
        self.pending = None  # a failed step leaves the clean θ

    @rule()
    def save_and_load_into_a_fresh_optimizer(self):
        state = self.opt.state_dict()
        groups = [{"params": list(g["params"])} for g in self.opt.param_groups]
        fresh = fastzo.MeZO(groups, lr=1.0, **(self.options | dict(seed=12345)))
        fresh.load_state_dict(state)
        self.opt = fresh

    @precondition(lambda self: self.spare)
    @rule(lr=st.sampled_from([0.0, 0.01, 0.05]), eps=st.sampled_from([1e-3, 3e-3]))
    def add_param_group(self, lr, eps):
        p = self.spare.pop(0)
        self.params.append(p)
        self.expected.append(p.detach().double().clone())
        self.opt.add_param_group({"params": [p], "lr": lr, "eps": eps})

    @rule(data=st.data(), name=st.sampled_from(["lr", "eps", "weight_decay"]))
    def change_a_hyperparameter(self, data, name):
        gi = data.draw(st.integers(0, len(self.opt.param_groups) - 1))
        values = {"lr": [0.0, 0.02, 0.05], "eps": [5e-4, 1e-3, 4e-3], "weight_decay": [0.0, 0.1]}
        self.opt.param_groups[gi][name] = data.draw(st.sampled_from(values[name]))

    @rule(data=st.data())
    def toggle_requires_grad(self, data):
        p = self.params[data.draw(st.integers(0, len(self.params) - 1))]
        p.requires_grad_(not p.requires_grad)

    @rule()
    def materialize(self):
        self.opt.materialize()
        self.pending = None

    @rule()
    def evaluate_in_clean_weights(self):
        with self.opt.clean_weights():
            self.pending = None
            self.check_close(self.params, self.expected, "inside clean_weights()")
            with torch.no_grad():
                self.loss(self.params)


MeZOMachine.TestCase.settings = hypothesis.settings(deadline=None)
test_mezo_state_machine = MeZOMachine.TestCase

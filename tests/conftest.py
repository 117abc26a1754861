import os

# The Triton kernels run on CPU tensors through the interpreter; this must be set before
# triton (and so fastzo) is imported.
if not os.environ.get("FASTZO_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def has_gpu() -> bool:
    return torch.cuda.is_available()


@pytest.fixture
def gen():
    """A fresh random generator per test: inputs are random, but a failure is reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed {seed}")
    return torch.Generator().manual_seed(seed)


# Hypothesis budgets (tests/test_stateful.py). "ci", the default, keeps the state machine to a few
# seconds; FASTZO_HYPOTHESIS_PROFILE=long runs hundreds of longer random sequences on demand.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the stateful test skips without Hypothesis
    pass
else:
    settings.register_profile("ci", max_examples=25, stateful_step_count=15, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=600, stateful_step_count=40, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("FASTZO_HYPOTHESIS_PROFILE", "ci"))

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

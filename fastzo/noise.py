"""The noise contract, computed exactly in PyTorch (the oracle).

``docs/noise.md`` is the specification; this module is its reference implementation. Every
other backend is tested against the functions here. All integer work happens in int64 tensors
holding uint32 values, so the oracle is exact on any device; the Gaussian transform is computed
in float64 and rounded once to float32, which makes it the "true" value of the contract that the
fast backends approximate to a few float32 ulp.
"""

from __future__ import annotations

import math

import torch

# Philox4x32-10 constants (Salmon et al., SC'11; Random123 philox.h).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
UINT64_MAX = 2**64 - 1
MAX_KEY = 2**32 - 1
MAX_INDEX = 2**62  # element indices live in [0, 2**62): the group index must fit 64 bits

# Counter word 3 selects an independent stream, so the same (seed, key, index) never reuses
# Philox output between purposes.
STREAM_GAUSSIAN = 0
STREAM_RADEMACHER = 1
STREAM_ROUNDING = 2

GAUSSIAN_PER_CALL = 4  # two Box-Muller pairs per Philox evaluation
RADEMACHER_PER_CALL = 128  # one bit per element, 4 x 32 bits per evaluation
ROUNDING_PER_CALL = 8  # 16 random bits per element for stochastic rounding

DISTRIBUTIONS = ("gaussian", "rademacher")
ELEMENTS_PER_CALL = {"gaussian": GAUSSIAN_PER_CALL, "rademacher": RADEMACHER_PER_CALL}
STREAM_OF = {"gaussian": STREAM_GAUSSIAN, "rademacher": STREAM_RADEMACHER}

# Oracle work is chunked so that no temporary grows with the size of a weight.
CHUNK = 1 << 20


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}"
        )
    return distribution


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= UINT64_MAX:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def check_key(key) -> int:
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"tensor key must be a Python int in [0, 2**32), got {type(key).__name__} {key!r}")
    if not 0 <= key <= MAX_KEY:
        raise ValueError(f"tensor key must be in [0, 2**32), got {key}")
    return key


def split_seed(seed: int) -> tuple[int, int]:
    """Philox key words (k0, k1) = (low 32 bits, high 32 bits) of the step seed."""
    return seed & MASK32, seed >> 32


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a*b, without int64 overflow.

    The constant a is split in 16-bit halves so every partial product stays below 2**48.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo
    p_hi = b * a_hi
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)
    lo = low_sum & MASK32
    hi = (p_hi >> 16) + (low_sum >> 32)
    return hi & MASK32, lo


def philox4x32_10(counters: torch.Tensor, key) -> torch.Tensor:
    """Random123's Philox4x32-10.

    ``counters``: int64 tensor of shape (..., 4) holding uint32 values; ``key``: a pair of
    uint32 ints. Returns an int64 tensor of shape (..., 4) of uint32 values.
    """
    if not isinstance(counters, torch.Tensor) or counters.dtype != torch.int64:
        raise TypeError("counters must be an int64 tensor of shape (..., 4)")
    if counters.ndim == 0 or counters.shape[-1] != 4:
        raise ValueError(f"counters must have shape (..., 4), got {tuple(counters.shape)}")
    if counters.numel() and (counters.min() < 0 or counters.max() > MASK32):
        raise ValueError("counters must hold uint32 values in [0, 2**32)")
    k0, k1 = (int(k) for k in key)
    for k in (k0, k1):
        if not 0 <= k <= MASK32:
            raise ValueError(f"key words must be uint32, got {key}")
    c0, c1, c2, c3 = counters.unbind(-1)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def counters_for(groups: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    """Counter layout: (group low 32 bits, group high 32 bits, tensor key, stream)."""
    return torch.stack(
        (
            groups & MASK32,
            groups >> 32,
            torch.full_like(groups, key),
            torch.full_like(groups, stream),
        ),
        dim=-1,
    )


def _philox_words(first_group: int, n_groups: int, seed: int, key: int, stream: int, device) -> torch.Tensor:
    groups = torch.arange(first_group, first_group + n_groups, dtype=torch.int64, device=device)
    return philox4x32_10(counters_for(groups, key, stream), split_seed(seed))


def uniform24(bits: torch.Tensor) -> torch.Tensor:
    """uint32 -> uniform in (0, 1): ((x >> 8) + 0.5) * 2**-24, exact in float32, never 0 or 1."""
    return ((bits >> 8).to(torch.float64) + 0.5) * 2.0**-24


def _gaussian_chunk(numel: int, seed: int, key: int, offset: int, device) -> torch.Tensor:
    first = offset // GAUSSIAN_PER_CALL
    last = (offset + numel - 1) // GAUSSIAN_PER_CALL
    words = _philox_words(first, last - first + 1, seed, key, STREAM_GAUSSIAN, device)
    u = uniform24(words)
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))  # pairs (x0, x1) and (x2, x3)
    angle = (2.0 * math.pi) * u[:, 1::2]
    z = torch.stack(
        (radius[:, 0] * torch.cos(angle[:, 0]), radius[:, 0] * torch.sin(angle[:, 0]),
         radius[:, 1] * torch.cos(angle[:, 1]), radius[:, 1] * torch.sin(angle[:, 1])),
        dim=-1,
    ).reshape(-1)
    start = offset - first * GAUSSIAN_PER_CALL
    return z[start:start + numel].to(torch.float32)


def _rademacher_chunk(numel: int, seed: int, key: int, offset: int, device) -> torch.Tensor:
    first = offset // RADEMACHER_PER_CALL
    last = (offset + numel - 1) // RADEMACHER_PER_CALL
    words = _philox_words(first, last - first + 1, seed, key, STREAM_RADEMACHER, device)
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    bits = ((words[..., None] >> shifts) & 1).reshape(-1)  # element 128j + 32w + b
    start = offset - first * RADEMACHER_PER_CALL
    return (1 - 2 * bits[start:start + numel]).to(torch.float32)


def _noise_chunks(numel: int, seed: int, key: int, offset: int, device, distribution: str):
    """Yield (local start, z) for consecutive chunks of at most CHUNK elements."""
    chunk_fn = _gaussian_chunk if distribution == "gaussian" else _rademacher_chunk
    for start in range(0, numel, CHUNK):
        n = min(CHUNK, numel - start)
        yield start, chunk_fn(n, seed, key, offset + start, device)


def zo_noise(numel: int, seed: int, key: int, offset: int = 0, device="cpu",
             distribution: str = "gaussian") -> torch.Tensor:
    """The contract's float32 z for elements [offset, offset + numel) of tensor ``key``."""
    check_seed(seed)
    check_key(key)
    check_distribution(distribution)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + numel > MAX_INDEX:
        raise ValueError(f"offset must be an int with 0 <= offset and offset + numel <= 2**62, got {offset!r}")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start, z in _noise_chunks(numel, seed, key, offset, out.device, distribution):
        out[start:start + z.numel()] = z
    return out


def rounding_bits(numel: int, seed: int, key: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """16 random bits per element (int64 in [0, 2**16)) from the stochastic-rounding stream.

    Element i takes half-word (i % 8) of Philox call i // 8: word (i % 8) // 2, low half for
    even i, high half for odd i.
    """
    first = offset // ROUNDING_PER_CALL
    last = (offset + numel - 1) // ROUNDING_PER_CALL
    words = _philox_words(first, last - first + 1, seed, key, STREAM_ROUNDING, device)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(-1)
    start = offset - first * ROUNDING_PER_CALL
    return halves[start:start + numel]


STREAM_SEEDS = 3


def step_seed(base_seed: int, step: int, direction: int = 0) -> int:
    """The uint64 seed of optimizer step ``step``, direction ``direction``.

    Philox4x32-10 with key = base seed and counter (step low, step high, direction, 3):
    seed = x0 | x1 << 32. Pure, so every rank and every resumed run derives the same seeds.
    """
    check_seed(base_seed)
    counter = torch.tensor([[step & MASK32, step >> 32, direction, STREAM_SEEDS]], dtype=torch.int64)
    words = philox4x32_10(counter, split_seed(base_seed))[0].tolist()
    return words[0] | (words[1] << 32)


# ------------------------------------------------------------------------------------------
# Exact (bit-reversible) perturbation of 16-bit weights: the grid S_q and its integer index.
# docs/noise.md, section "Exact perturbation of 16-bit weights", is the specification.


class Format16:
    """Parameters of a 16-bit storage format for the exact grid."""

    def __init__(self, name: str, mbits: int, bias: int, max_bits: int, inf_bits: int,
                 min_exponent: int, max_exponent: int):
        self.name = name
        self.mbits = mbits  # explicit mantissa bits
        self.bias = bias
        self.max_bits = max_bits  # bit pattern of the largest finite magnitude
        self.inf_bits = inf_bits  # bit pattern of +inf; magnitudes at or above it are inf/NaN
        # q = 2**e with min_exponent <= e <= max_exponent: q at least the smallest subnormal and
        # 1/q a normal float32; T = q * 2**mbits a finite normal power of two.
        self.min_exponent = min_exponent
        self.max_exponent = max_exponent

    def lq(self, exponent: int) -> int:
        """log2(q / smallest subnormal): the quantum in units of the smallest subnormal."""
        return exponent + self.bias + self.mbits - 1

    def threshold_bits(self, exponent: int) -> int:
        """Bit pattern of T = q * 2**mbits (exponent field lq + 1, mantissa 0)."""
        return (self.lq(exponent) + 1) << self.mbits

    def max_index(self, exponent: int) -> int:
        """Nmax = N(largest finite value)."""
        return (1 << self.mbits) + self.max_bits - self.threshold_bits(exponent)


FORMATS16 = {
    torch.bfloat16: Format16("bfloat16", 7, 127, 0x7F7F, 0x7F80, -126, 120),
    torch.float16: Format16("float16", 10, 15, 0x7BFF, 0x7C00, -24, 5),
}

MAX_MULTIPLE = 256
# Exact passes require |multiple|·(6·|eps|/q + 1) <= 2·Nmax + 1 (ops._check_steps): a step is
# then shorter than the index ring, so wrapping needs one conditional add or subtract.


def grid_index(bits: torch.Tensor, exponent: int, fmt: Format16) -> torch.Tensor:
    """N(x) for 16-bit patterns ``bits`` (int64 in [0, 2**16), finite values).

    Below T: x/q (a value between grid points maps to the grid point below it in magnitude);
    at and above T: 2**mbits + bits(|x|) - bits(T). N(-x) = -N(x).
    """
    lq, t_bits = fmt.lq(exponent), fmt.threshold_bits(exponent)
    mag = bits & 0x7FFF
    e = mag >> fmt.mbits
    m = mag & ((1 << fmt.mbits) - 1)
    sig = torch.where(e == 0, m, m + (1 << fmt.mbits))
    shift = (lq - (torch.clamp(e, min=1) - 1)).clamp(0, 62)
    below = sig >> shift
    above = (1 << fmt.mbits) + mag - t_bits
    n = torch.where(mag < t_bits, below, above)
    return torch.where(bits >= 0x8000, -n, n)


def grid_bits(n: torch.Tensor, exponent: int, fmt: Format16) -> torch.Tensor:
    """N⁻¹: the 16-bit pattern (int64) of grid index n, |n| <= Nmax; index 0 is +0."""
    lq, t_bits = fmt.lq(exponent), fmt.threshold_bits(exponent)
    a = n.abs()
    p = torch.frexp(torch.clamp(a, min=1).double())[1].long() - 1  # floor(log2 a)
    normal = ((p + lq - fmt.mbits) << fmt.mbits) + (a << (fmt.mbits - p).clamp(min=0))
    subnormal = a << min(lq, 62)
    below = torch.where(p + lq >= fmt.mbits, normal, subnormal)
    below = torch.where(a == 0, torch.zeros_like(a), below)
    above = a - (1 << fmt.mbits) + t_bits
    mag = torch.where(a < (1 << fmt.mbits), below, above)
    return torch.where(n < 0, mag | 0x8000, mag)


def grid_wrap(n: torch.Tensor, exponent: int, fmt: Format16) -> torch.Tensor:
    """n reduced modulo 2·Nmax + 1 into [−Nmax, Nmax]."""
    n_max = fmt.max_index(exponent)
    return torch.remainder(n + n_max, 2 * n_max + 1) - n_max


def exact_steps(z: torch.Tensor, eps: float, exponent: int) -> torch.Tensor:
    """Integer steps k = round_half_even(fl32(a · z)), a = fl32(eps · 2**-exponent), as int64."""
    a = torch.tensor(eps, dtype=torch.float32) * torch.tensor(2.0**-exponent, dtype=torch.float32)
    return torch.round(a * z).long()


def update_scale(bits: torch.Tensor, exponent: int, fmt: Format16) -> torch.Tensor:
    """r = q / spacing of the grid at 16-bit patterns ``bits`` (float32): 1 below T, and
    2**−min(E − lq − 1, 126) at or above T (E the exponent field). The exact restore-and-update
    scales the update lr·g·z by r, undoing the factor s/q by which the integer steps enlarge the
    perturbation of weights above T, so that the expected update is MeZO's."""
    lq, t_bits = fmt.lq(exponent), fmt.threshold_bits(exponent)
    mag = bits & 0x7FFF
    shift = ((mag >> fmt.mbits) - (lq + 1)).clamp(0, 126)
    ones = torch.ones(bits.shape, dtype=torch.float32, device=bits.device)
    return torch.where(mag >= t_bits, torch.exp2(-shift.to(torch.float32)), ones)

"""Low-rank factorisation of a dense weight change ΔW: rank policies, randomized vs exact SVD, factor split.

Exact truncated SVD (`torch.linalg.svd(full_matrices=False)`) costs O(m·n·min(m, n)) with a large
constant; the rank-k part alone is found far faster by a randomized range finder (Halko, Martinsson &
Tropp 2011): sketch the range with q = k + p Gaussian probes, sharpen it with a few power iterations
(re-orthonormalised each half step so that fp32 does not wash out the smaller directions), then take the
exact SVD of the small q×n projection. Every matrix product touches ΔW with only q columns, so the cost
is O(m·n·q) and it runs as a handful of GEMMs on a GPU.

The factorisation U_k S_k V_kᵀ that comes out is the orthogonal projection U_k U_kᵀ ΔW, hence

    ‖ΔW − U_k S_k V_kᵀ‖²_F = ‖ΔW‖²_F − Σ_{i≤k} σ̃_i²

exactly (in exact arithmetic) for every k ≤ q: the energy kept at any rank is known from the computed
singular values and the norm of ΔW alone. That is what the energy / error rank modes use. With the
exact SVD the σ are the true ones and the same formula gives the optimum (Eckart–Young); with the
randomized one σ̃_i ≤ σ_i, so the formula is an upper bound on the optimum (tight in practice:
`bench/bench_extract.py` measures it against the exact SVD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import WeightsmithError

# Per-layer rank policies. sv_ratio / sv_fro / sv_cumulative are kohya sd-scripts' dynamic modes
# (networks/resize_lora.py), with its exact definitions (`kohya_rank`); "budget" (a rank per layer from one
# file-size budget for the whole LoRA) is decided across layers in `budget.py`, not here.
LAYER_RANK_MODES = ("fixed", "energy", "error", "full", "sv_ratio", "sv_fro", "sv_cumulative")
RANK_MODES = (*LAYER_RANK_MODES, "budget")
SV_MODES = ("sv_ratio", "sv_fro", "sv_cumulative")
KOHYA_MIN_SV = 1e-6  # kohya's MIN_SV: a layer whose largest singular value is at most this gets rank 1
METHODS = ("auto", "randomized", "exact")

# Randomized when the sketch (rank + oversampling) is at most this fraction of min(m, n); beyond that
# the exact SVD costs about as much and is exact.
RANDOMIZED_MAX_FRACTION = 0.5
POWER_ITERATIONS = 2
MIN_OVERSAMPLE = 10
ADAPTIVE_START = 32  # first sketch width of the energy / error modes; doubled until the target is met
# Singular values below this fraction of σ₁ are numerical zeros of an fp32 SVD: dropping them changes
# nothing measurable and keeps a true rank-4 change from being stored as rank 64 of noise.
NUMERICAL_ZERO = 4 * torch.finfo(torch.float32).eps


class OptionError(WeightsmithError, ValueError):
    """An option value out of range (rank, energy, quantile…): refused before any tensor is read. Also a
    ValueError, for callers that catch those."""


CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 per temporary in the norm helpers
NORM_ROW = 1024


def sq_norm(t: torch.Tensor) -> float:
    """‖t‖²_F, accurately, fast and in bounded memory: fp32 norms of 1024-element rows (short sums, so
    accurate; no temporary the size of t), squared and summed in float64. torch.linalg.vector_norm over a
    whole multi-million-element fp32 tensor drifts by ~1e-4..1e-3 relative on the CPU, which wrecks
    ‖ΔW‖² − Σσ² when the residual is a few percent; square().sum() is accurate but 10-40x slower."""
    flat = t.reshape(-1)
    parts = []  # per-row norms (and the ragged tail), reduced once at the end: one sync per tensor
    for chunk in flat.split(CHUNK_ELEMENTS):
        chunk = chunk.float()
        whole = chunk.numel() - chunk.numel() % NORM_ROW
        if whole:
            parts.append(torch.linalg.vector_norm(chunk[:whole].view(-1, NORM_ROW), dim=1))
        if whole < chunk.numel():
            parts.append(torch.linalg.vector_norm(chunk[whole:]).reshape(1))
    if not parts:
        return 0.0
    return float(torch.cat(parts).double().square().sum())


def frobenius(t: torch.Tensor) -> float:
    return math.sqrt(sq_norm(t))


def subtract_(out: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """out -= other in place, in row chunks: a mixed-dtype `sub_` (fp32 minus a bf16 memory-mapped
    tensor) would first convert all of `other`, a second full fp32 copy of the layer."""
    if out.ndim == 0 or (other.dtype == out.dtype and other.device == out.device):
        return out.sub_(other.to(out.device, out.dtype))
    rows = max(1, CHUNK_ELEMENTS // max(out[0].numel(), 1))
    for start in range(0, out.shape[0], rows):
        out[start : start + rows].sub_(other[start : start + rows].to(out.device, out.dtype))
    return out


def residual_sq_norm(mat: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖mat − up @ down‖²_F without forming the whole residual: a few thousand rows at a time."""
    rows = max(1, CHUNK_ELEMENTS // max(mat.shape[1], 1))
    total = 0.0
    for start in range(0, mat.shape[0], rows):
        total += sq_norm(torch.addmm(mat[start : start + rows], up[start : start + rows], down, alpha=-1.0))
    return total


@dataclass(frozen=True)
class RankPolicy:
    """How many singular directions to keep for one layer.

    fixed:  `rank` (capped by `max_rank` and the matrix size)
    energy: the smallest rank keeping ≥ `energy` of ‖ΔW‖²_F
    error:  the smallest rank with relative Frobenius error ≤ `error`
    full:   every direction (exact SVD): reconstructs ΔW up to fp32 rounding
    sv_ratio / sv_fro / sv_cumulative: kohya's dynamic modes with `dynamic_param` (see `kohya_rank`)
    `max_rank` caps every mode (the per-layer cap)."""

    mode: str = "fixed"
    rank: int = 64
    energy: float = 0.99
    error: float = 0.05
    max_rank: int | None = None
    dynamic_param: float | None = None  # kohya's --dynamic_param for the sv_* modes

    def __post_init__(self) -> None:
        if self.mode not in LAYER_RANK_MODES:
            raise OptionError(f"unknown rank mode {self.mode!r}; choose one of {', '.join(LAYER_RANK_MODES)}")
        if self.mode in SV_MODES:
            check_dynamic_param(self.mode, self.dynamic_param)
        if self.mode == "fixed" and self.rank < 1:
            raise OptionError(f"rank must be ≥ 1 (got {self.rank}); give a positive rank, e.g. 16")
        if self.mode == "energy" and not 0.0 < self.energy <= 1.0:
            raise OptionError(f"energy must be in (0, 1] (got {self.energy}); give a fraction of |dW|² to keep, e.g. 0.99")
        if self.mode == "error" and not 0.0 <= self.error < 1.0:
            raise OptionError(f"error must be in [0, 1) (got {self.error}); give a relative error target, e.g. 0.05")
        if self.max_rank is not None and self.max_rank < 1:
            raise OptionError(f"max_rank must be ≥ 1 (got {self.max_rank}); give a positive cap or leave it unset")

    @property
    def target_energy(self) -> float | None:
        """Fraction of ‖ΔW‖² to keep for the adaptive modes; None for fixed, full and the sv_* modes."""
        if self.mode == "energy":
            return self.energy
        if self.mode == "error":
            return 1.0 - self.error**2
        return None

    @property
    def adaptive(self) -> bool:
        """Whether the rank depends on the spectrum (a sketch grown until the rule is decided)."""
        return self.target_energy is not None or self.mode in ("sv_ratio", "sv_fro")

    @property
    def needs_whole_spectrum(self) -> bool:
        """sv_cumulative compares against Σ of every singular value, which no partial sketch knows."""
        return self.mode == "sv_cumulative"

    def cap(self, full_rank: int) -> int:
        """The largest rank this policy may use on a matrix of rank ≤ full_rank."""
        cap = full_rank if self.max_rank is None else min(self.max_rank, full_rank)
        if self.mode == "fixed":
            cap = min(cap, self.rank)
        return max(cap, 1)


@dataclass
class LowRank:
    """A rank-r factorisation ΔW ≈ up @ down (√S on both sides), with what is known of the spectrum."""

    up: torch.Tensor  # [m, r] fp32
    down: torch.Tensor  # [r, n] fp32
    singular_values: torch.Tensor  # all that were computed (≥ r of them), fp32, on the CPU
    total_sq: float  # ‖ΔW‖²_F
    method: str  # "randomized" | "exact"
    target_met: bool = True  # False when an energy/error target needed more than the cap allowed

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kept_sq(self) -> float:
        return float(self.singular_values[: self.rank].double().square().sum())

    @property
    def energy(self) -> float:
        """Fraction of ‖ΔW‖² kept by the rank-r factorisation (before any cast or clamp)."""
        return min(self.kept_sq / self.total_sq, 1.0) if self.total_sq > 0 else 1.0

    @property
    def optimal_error(self) -> float:
        """Relative Frobenius error of the best rank-r approximation: exact for the exact SVD (from the
        discarded singular values, which avoids the cancellation of ‖ΔW‖² − Σσ² near full rank), an
        upper bound (the fp32 factorisation's own error, ‖ΔW‖² − Σσ̃²) for the randomized one."""
        if self.total_sq <= 0:
            return 0.0
        if self.method == "exact":
            tail = float(self.singular_values[self.rank :].double().square().sum())
            return math.sqrt(tail / self.total_sq)
        return math.sqrt(max(self.total_sq - self.kept_sq, 0.0) / self.total_sq)

    @property
    def optimal_is_exact(self) -> bool:
        return self.method == "exact"


def oversampling(rank: int) -> int:
    """Extra probes for the range finder: +rank/2 (at least +10). With 2 power iterations the error stays
    within ~0.2% of the optimum on decaying (1/i) spectra and within ~0.8% in the worst case seen, a
    rank-16 change over a flat bf16-rounding noise floor, where the tail directions are nearly degenerate
    (+rank costs GEMMs a third wider for ~0.1% less; see bench/bench_extract.py)."""
    return max(MIN_OVERSAMPLE, rank // 2)


def use_randomized(m: int, n: int, rank: int) -> bool:
    """Randomized pays off while the sketch stays well below the smaller dimension."""
    return rank + oversampling(rank) <= RANDOMIZED_MAX_FRACTION * min(m, n)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """Householder QR: an orthonormal basis of y's columns, always (used for the final basis)."""
    return torch.linalg.qr(y).Q


def _normalized(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of y's columns between power iterations, by Cholesky QR (the q×q Gram
    matrix in fp64, then one GEMM with its inverse factor): BLAS-3 only, 5-15x faster than Householder
    QR on tall-skinny matrices. Falls back to Householder when the Gram matrix is singular (a change of
    rank below the sketch width). The final basis always comes from Householder QR."""
    y64 = y.double()
    chol, info = torch.linalg.cholesky_ex(y64.T @ y64)
    if int(info) != 0:
        return _orthonormal(y)
    eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
    inv_t = torch.linalg.solve_triangular(chol, eye, upper=False).T
    q = y @ inv_t.to(y.dtype)
    return q if bool(torch.isfinite(q).all()) else _orthonormal(y)


def randomized_svd(
    a: torch.Tensor, width: int, power_iterations: int = POWER_ITERATIONS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, q], S [q], Vh [q, n]) of a rank-q randomized SVD of `a` (fp32, any device), q = width.
    Deterministic for a given seed."""
    m, n = a.shape
    q = min(width, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    probes = torch.randn(n, q, generator=gen, device=a.device, dtype=a.dtype)
    y = a @ probes
    for _ in range(power_iterations):
        y = a @ _normalized(a.T @ _normalized(y))
    basis = _orthonormal(y)
    u_small, s, vh = _wide_svd(basis.T @ a)
    return basis @ u_small, s, vh


def _wide_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a wide q×n matrix through the QR of bᵀ and the SVD of the q×q triangle: several times
    faster than LAPACK's SVD of the wide matrix itself (which dominated the randomized path), as exact."""
    q_t, r_t = torch.linalg.qr(b.T)  # bᵀ = Q R  ⇒  b = Rᵀ Qᵀ
    u, s, wh = torch.linalg.svd(r_t.T)  # Rᵀ = U S Wᵀ  ⇒  b = U S (Q W)ᵀ
    return u, s, (q_t @ wh.T).T


def exact_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(a, full_matrices=False)


def check_dynamic_param(mode: str, param: float | None) -> None:
    """kohya's ranges: sv_ratio takes a ratio σ₁/σ_k ≥ 1, sv_fro and sv_cumulative a fraction in (0, 1]."""
    if param is None or not math.isfinite(param):
        raise OptionError(f"rank mode {mode} needs dynamic_param (kohya's --dynamic_param): a ratio ≥ 1 for "
                          "sv_ratio (e.g. 10), a fraction in (0, 1] for sv_fro / sv_cumulative (e.g. 0.9)")
    if mode == "sv_ratio" and param < 1.0:
        raise OptionError(f"sv_ratio keeps singular values above σ₁ / dynamic_param, so dynamic_param must be ≥ 1 "
                          f"(got {param}); give e.g. 10")
    if mode in ("sv_fro", "sv_cumulative") and not 0.0 < param <= 1.0:
        raise OptionError(f"{mode} takes a fraction in (0, 1] as dynamic_param (got {param}); give e.g. 0.9")


def kohya_rank(singular_values: torch.Tensor, mode: str, param: float, max_rank: int | None = None) -> int:
    """The rank kohya sd-scripts' resize_lora.py (`rank_resize` with `index_sv_*`) picks from a whole
    spectrum S (descending), with its definitions exactly:

    sv_ratio:      the number of σ > σ₁ / param (at least 1)
    sv_cumulative: the smallest k with Σ_{i≤k} σ_i / Σ σ ≥ param
    sv_fro:        the smallest k with Σ_{i≤k} σ_i² / Σ σ² ≥ param²  (the Frobenius norm kept ≥ param)

    each at most len(S), then capped by `max_rank` (kohya's --new_rank); a spectrum with σ₁ ≤ 1e-6 gets
    rank 1. Computed in fp64 (kohya's fp32 cumulative sums can differ by one right at a boundary)."""
    s = singular_values.double().reshape(-1)
    n = s.numel()
    if n == 0:
        return 0
    if mode == "sv_ratio":
        index = int((s > s[0] / param).sum()) - 1
    elif mode == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / float(s.sum()), torch.tensor([param], dtype=s.dtype)))
    elif mode == "sv_fro":
        sq = s.square()
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / float(sq.sum()), torch.tensor([param**2], dtype=s.dtype)))
    else:
        raise OptionError(f"unknown kohya dynamic mode {mode!r}; choose one of {', '.join(SV_MODES)}")
    rank = max(0, min(index, n - 1)) + 1
    if float(s[0]) <= KOHYA_MIN_SV:
        return 1
    return rank if max_rank is None else min(rank, max_rank)


def choose_rank(singular_values: torch.Tensor, total_sq: float, policy: RankPolicy, full_rank: int) -> tuple[int, bool]:
    """(rank, target met) for `policy` given the leading singular values of a matrix with ‖·‖² = total_sq."""
    s = singular_values.double()
    cap = min(policy.cap(full_rank), s.numel())
    if policy.mode in SV_MODES:
        return _sv_rank(s, total_sq, policy, full_rank, cap)
    target = policy.target_energy
    if target is None:
        return cap, True
    kept = torch.cumsum(s.square(), 0)[:cap]
    reached = torch.nonzero(kept >= target * total_sq * (1 - 1e-12))
    if reached.numel():
        return int(reached[0]) + 1, True
    return cap, False


def _sv_rank(s: torch.Tensor, total_sq: float, policy: RankPolicy, full_rank: int, cap: int) -> tuple[int, bool]:
    """kohya's sv_* rank from the leading singular values `s` of a matrix with min(m, n) = full_rank.
    "met" says whether these values decide it: sv_ratio once a computed σ falls to σ₁ / param, sv_fro once
    the kept energy reaches param² of the known ‖ΔW‖² (kohya's rule with Σσ² = ‖ΔW‖²_F), sv_cumulative
    only from the whole spectrum."""
    param = float(policy.dynamic_param)
    whole = s.numel() >= full_rank
    if policy.mode == "sv_cumulative" or whole:
        if not whole:
            return cap, False
        return min(kohya_rank(s, policy.mode, param, policy.max_rank), policy.cap(full_rank)), True
    if float(s[0]) <= KOHYA_MIN_SV:
        return 1, True
    if policy.mode == "sv_ratio":
        count = int((s > s[0] / param).sum())
        decided = count < s.numel()
        return min(max(count, 1), cap), decided or cap <= count
    kept = torch.cumsum(s.square(), 0)
    reached = torch.nonzero(kept / total_sq >= param**2)
    if reached.numel():
        return min(int(reached[0]) + 1, cap), True
    return cap, cap <= s.numel()


def _numerical_rank(s: torch.Tensor, rank: int) -> int:
    """`rank` without trailing singular values that are fp32 noise (or exactly zero)."""
    if rank == 0 or s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return min(rank, int((s[:rank] > s[0] * NUMERICAL_ZERO).sum()))


def split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up = U_r √S_r, down = √S_r V_rᵀ: both factors at the same magnitude (best for bf16/fp16 storage)."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def low_rank(
    a: torch.Tensor,
    policy: RankPolicy,
    method: str = "auto",
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
    total_sq: float | None = None,
) -> LowRank:
    """Factorise a 2-D fp32 matrix under `policy`. method "auto" picks randomized when the rank needed is
    small against min(m, n), exact otherwise; adaptive modes grow a randomized sketch geometrically until
    the target is met (the known ‖ΔW‖² says when), falling back to the exact SVD once that is cheaper.
    `total_sq` = ‖a‖²_F when the caller already has it."""
    if method not in METHODS:
        raise OptionError(f"unknown SVD method {method!r}; choose one of {', '.join(METHODS)}")
    m, n = a.shape
    full = min(m, n)
    total_sq = sq_norm(a) if total_sq is None else total_sq  # callers that know ‖a‖² save a pass
    if total_sq == 0.0:
        return LowRank(a.new_zeros((m, 0)), a.new_zeros((0, n)), torch.zeros(0), 0.0, "exact")
    cap = policy.cap(full)
    adaptive = policy.adaptive
    width = min(cap, ADAPTIVE_START) if adaptive else cap
    if policy.mode == "full" or policy.needs_whole_spectrum or method == "exact" or (
            method == "auto" and not use_randomized(m, n, width)):
        return _finish(*exact_svd(a), total_sq, policy, full, "exact")
    while True:
        u, s, vh = randomized_svd(a, width + oversampling(width), power_iterations, seed)
        rank, met = choose_rank(s[:width], total_sq, policy, full)
        if met or width >= cap:
            return _finish(u, s, vh, total_sq, policy, full, "randomized", rank=rank, met=met)
        width = min(2 * width, cap)
        if method == "auto" and not use_randomized(m, n, width):
            return _finish(*exact_svd(a), total_sq, policy, full, "exact")


def _finish(u, s, vh, total_sq: float, policy: RankPolicy, full: int, method: str,
            rank: int | None = None, met: bool | None = None) -> LowRank:
    if rank is None:
        rank, met = choose_rank(s, total_sq, policy, full)
    rank = _numerical_rank(s, rank)
    up, down = split_sqrt(u, s, vh, rank)
    return LowRank(up=up, down=down, singular_values=s.detach().float().cpu(), total_sq=total_sq,
                   method=method, target_met=bool(met))


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors' entries to ±h, h = the `quantile` of |entries| of both (kohya / ComfyUI's
    outlier clamp, symmetric). Uses kthvalue: torch.quantile refuses inputs above 2^24 elements on some
    torch versions, which silently dropped large layers in other tools."""
    if not 0.0 < quantile < 1.0:
        raise OptionError(f"clamp quantile must be in (0, 1) (got {quantile}); give e.g. 0.99, or leave the clamp off")
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    if values.numel() == 0:
        return up, down
    k = min(max(int(math.ceil(quantile * values.numel())), 1), values.numel())
    hi = values.kthvalue(k).values
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


# What every report calls "optimal" (extract, validate, convert --to-type lora): one definition, one
# computation, so the same LoRA gets the same number from every command.
OPTIMAL_MEANS = ("optimal: the smallest relative error any change of the module's rank can reach (Eckart-Young, "
                 "from the singular values of the true change). '(bound)': for layers too large for the exact SVD "
                 "it is what the randomized SVD extraction uses reaches at that rank, an upper bound typically "
                 "0.2-2% above the true optimum: an extraction shows a ratio near 1 there, and another tool's LoRA "
                 "may show a ratio slightly below 1")


def key_seed(seed: int, key: str) -> int:
    """A per-layer seed independent of layer order (so any subset of layers extracts identically)."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**62)


def optimal_at_rank(delta: torch.Tensor, rank: int, key: str) -> tuple[float, bool]:
    """(relative error of the best rank-`rank` approximation of `delta` (the weight `key`'s change), exact?):
    the exact SVD where `low_rank` would use it, else the randomized SVD with extraction's settings and the
    layer's seed — so an extraction at a fixed rank already holds this very number (`is_optimal_at_rank`)."""
    mat = delta.reshape(delta.shape[0], -1)
    if rank >= min(mat.shape):
        return 0.0, True
    lr = low_rank(mat, RankPolicy("fixed", rank=rank), seed=key_seed(0, key))
    return lr.optimal_error, lr.optimal_is_exact


def is_optimal_at_rank(lr: LowRank, policy: RankPolicy, method: str, seed: int, shape: tuple[int, int]) -> bool:
    """Whether the factorisation `lr` (made under `policy`/`method`/`seed`) is the computation
    `optimal_at_rank` does for its rank, so its optimal error can be reported as it is."""
    return (policy.mode == "fixed" and method == "auto" and seed == 0 and lr.rank == policy.cap(min(shape)))

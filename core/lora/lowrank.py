"""Factor algebra: sums of low-rank products handled through their factors alone.

A weighted sum of low-rank terms  Σ c_i · up_i @ down_i  is the single product U @ D of stacked factors

    U = [s_1·√|c_1|·up_1, s_2·√|c_2|·up_2, …]      D = [√|c_1|·down_1; √|c_2|·down_2; …]      (s_i = sign c_i)

(compose builds those), and its thin SVD — hence its optimal rank-r approximation (Eckart–Young) —
needs two thin QRs and the SVD of a small R×R core (R = Σ rank_i):

    U = Q_u R_u,  Dᵀ = Q_d R_d   ⇒   U D = Q_u (R_u R_dᵀ) Q_dᵀ,   R_u R_dᵀ = P S Qᵀ   ⇒   U D = (Q_u P) S (Q_d Q)ᵀ.

That costs O((out + in)·R²) instead of O(out·in·min(out, in)) for a dense SVD, and no out×in matrix is
ever formed. It runs in fp64 — cheap at these sizes — so the result is exact to far below the inputs'
own precision (singular values are accurate to ~1e-16·‖U‖‖D‖; a LoRA composed with its own negative
gives exactly nothing). The error of a truncation follows from the discarded singular values.
Factors here are 2-D; callers flatten conv factors and restore them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import one_cpu_thread
from ..errors import MismatchError

EXACT_DTYPE = torch.float64


@dataclass
class ProductSVD:
    """Thin SVD of a product kept factored: left = q_left @ p, right = qh @ q_right; singular values
    descending, round-off set to 0."""

    q_left: torch.Tensor  # [out, k1]
    p: torch.Tensor  # [k1, k]
    singular_values: torch.Tensor  # [k]
    qh: torch.Tensor  # [k, k2]
    q_right: torch.Tensor  # [k2, in]

    @property
    def left(self) -> torch.Tensor:
        return self.q_left @ self.p

    @property
    def right(self) -> torch.Tensor:
        return self.qh @ self.q_right

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimal rank-`rank` factors (up [out, rank], down [rank, in]), √σ on each side."""
        root = self.singular_values[:rank].sqrt()
        return self.q_left @ (self.p[:, :rank] * root), (root[:, None] * self.qh[:rank]) @ self.q_right


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> ProductSVD:
    """Thin SVD of up [out, R] @ down [R, in] from the factors (two QRs + SVD of the small core), in fp64."""
    up = up.to(EXACT_DTYPE)
    down = down.to(EXACT_DTYPE)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        # LAPACK would fail with a bare LinAlgError; callers that know the file name check first
        raise MismatchError("the LoRA factors hold NaN or Inf values, which have no SVD; find the file that holds "
                            "them with `weightsmith inspect FILE` and download it again")
    with one_cpu_thread(up.device):
        q_up, r_up = torch.linalg.qr(up)  # reduced: [out, k1], [k1, R]
        q_down, r_down = torch.linalg.qr(down.T)  # [in, k2], [k2, R]
        p, s, qh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # k1, k2 ≤ R
    # Below R·eps·‖U‖‖D‖ a singular value is round-off of the QRs (e.g. a LoRA minus itself).
    tol = up.shape[1] * torch.finfo(EXACT_DTYPE).eps * float(up.norm()) * float(down.norm())
    s = torch.where(s > tol, s, torch.zeros_like(s))
    return ProductSVD(q_left=q_up, p=p, singular_values=s, qh=qh, q_right=q_down.T)


def choose_rank(singular_values: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """Rank to keep: `rank` caps it, `energy` (fraction of Σσ² to keep, in (0, 1]) picks the smallest
    rank reaching it; with both, the smaller of the two. Exact zeros are never kept."""
    s2 = singular_values.double() ** 2
    nonzero = int((singular_values > 0).sum())
    keep = nonzero
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        cum = torch.cumsum(s2, 0)
        total = float(cum[-1]) if len(cum) else 0.0
        if total > 0:
            keep = min(keep, int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=cum.dtype))) + 1)
    if rank is not None:
        if rank < 0:
            raise ValueError(f"rank must be ≥ 0, got {rank}")
        keep = min(keep, rank)
    return max(0, min(keep, len(singular_values)))


@dataclass
class Recompression:
    """A rank-`rank` factorisation up @ down of a product, with what the truncation cost."""

    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in]
    rank: int
    singular_values: torch.Tensor  # all of them, descending (for reports)

    @property
    def norm(self) -> float:
        """‖exact product‖_F."""
        return float(self.singular_values.double().square().sum().sqrt())

    @property
    def abs_error(self) -> float:
        """‖exact − up@down‖_F, from the discarded singular values."""
        return float(self.singular_values[self.rank :].double().square().sum().sqrt())

    @property
    def rel_error(self) -> float:
        n = self.norm
        return self.abs_error / n if n > 0 else 0.0

    @property
    def energy_kept(self) -> float:
        s2 = self.singular_values.double().square()
        total = float(s2.sum())
        return float(s2[: self.rank].sum()) / total if total > 0 else 1.0


def recompress(up: torch.Tensor, down: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Recompression:
    """The optimal rank-r approximation of up @ down (r from `rank`/`energy`, see `choose_rank`), as new
    factors split √σ on each side, computed without forming the product. Runs on the factors' device
    (in fp64 internally) and returns the factors' dtype."""
    svd = svd_of_product(up, down)
    r = choose_rank(svd.singular_values, rank, energy)
    new_up, new_down = svd.factors(r)
    return Recompression(up=new_up.to(up.dtype), down=new_down.to(down.dtype), rank=r,
                         singular_values=svd.singular_values)


def dense_truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the rank-r truncated SVD of a dense matrix (factors up, down). Slow at large widths;
    for tests and benchmarks, which compare `recompress` against it."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]

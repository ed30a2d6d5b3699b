"""Merge methods: a registry of small pure functions over fp32 tensors.

Every method takes the list of input tensors (one per model, in input order, all the same shape, fp32,
on the compute device), the per-input weights and its own keyword parameters, and returns the merged
tensor. Nothing here reads files, knows key names or casts to an output dtype: planning and execution do
that (plan.py, execute.py). Methods that draw random numbers receive a `seed` that the executor has
already derived per key (`derive_seed`), so a merge is reproducible whatever the key order or device:
masks are drawn on the CPU with their own generator and only then moved to the compute device.

Methods working "relative to a base" (TIES, DARE, add_dissimilar) take the base as one of the inputs
(`base`, an input index, 0 = model A by default) and merge the other inputs' deltas to it.

`chunkable` methods treat every row (slice along dim 0) independently, so the executor may feed them a
tensor in row blocks that stay in cache and keep peak memory independent of the tensor's size. A hot
method may add an in-place twin (`@inplace_twin`): the same operations in the same order, so the same
bits, but allowed to overwrite its inputs, which the executor then gives it as scratch copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import WeightsmithError
from ..mix import pick_among

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    min_inputs: int
    max_inputs: int | None  # None: any number
    defaults: dict = field(default_factory=dict)
    weights: str = "none"  # "normalized" (default 1/N), "ones" (default 1 each), or "none" (ignored)
    chunkable: bool = False  # rows are independent: the executor may process row blocks
    random: bool = False  # uses `seed` (derived per key by the executor)
    uses_base: bool = False  # has a `base` input-index parameter
    description: str = ""
    inplace: Callable[..., torch.Tensor] | None = None  # bit-identical twin that may overwrite its inputs

    def default_weights(self, n: int) -> list[float]:
        if self.weights == "normalized":
            return [1.0 / n] * n
        return [1.0] * n

    def inputs_text(self) -> str:
        if self.max_inputs == self.min_inputs:
            return str(self.min_inputs)
        if self.max_inputs is None:
            return f"{self.min_inputs}+"
        return f"{self.min_inputs}-{self.max_inputs}"


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, inputs: tuple[int, int | None], weights: str = "none", chunkable: bool = False,
                 random: bool = False, uses_base: bool = False, description: str = "", **defaults):
    """Register `fn(tensors, weights, **params) -> tensor` under `name` with its parameter defaults."""

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, fn, inputs[0], inputs[1], dict(defaults), weights, chunkable, random,
                                    uses_base, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def inplace_twin(name: str):
    """Register `fn_(tensors, weights, **params)` as the in-place twin of method `name`: the same
    arithmetic in the same order (bit-identical results), free to overwrite its input tensors. The
    executor hands it scratch copies of row blocks; a fresh allocation per temporary cost 2-4x the
    arithmetic of a weighted sum (page faults and cold cache lines, measured on 1 MB blocks)."""

    def deco(fn):
        METHODS[name] = dataclasses.replace(METHODS[name], inplace=fn)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise WeightsmithError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None


def derive_seed(seed: int, key: str, index: int = 0) -> int:
    """A 63-bit seed for one key (and one input) from the user's seed: independent of key order."""
    h = hashlib.blake2b(f"{int(seed)}\x00{key}\x00{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _uniform(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """U[0, 1) drawn on the CPU from a generator of its own, then moved: the same on every device."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=gen, dtype=torch.float32).to(device)


def _deltas(ts: Tensors, base: int) -> list[tuple[int, torch.Tensor]]:
    b = ts[base]
    return [(i, t - b) for i, t in enumerate(ts) if i != base]


# --------------------------------------------------------------------------------------------------
# Linear methods


@merge_method("weighted_sum", inputs=(2, None), weights="normalized", chunkable=True, normalize=True,
              description="Σ wᵢ·Mᵢ (weights normalised to sum 1 unless normalize=false)")
def weighted_sum(ts: Tensors, weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Σ wᵢ·Mᵢ. Evaluated as ComfyUI's patch chain does (w₀·M₀, then += wᵢ·Mᵢ), so an in-graph merge
    built on nested patches gives bit-identical fp32 weights."""
    w = sum_weights(weights, normalize)
    out = ts[0] * w[0]
    for t, wi in zip(ts[1:], w[1:]):
        out += t * wi
    return out


def sum_weights(weights: Sequence[float], normalize: bool = True) -> list[float]:
    """The weights weighted_sum multiplies by (normalized to sum 1 unless asked not to or they sum to 0)."""
    w = list(weights)
    total = sum(w)
    if normalize and total != 0:
        w = [x / total for x in w]
    return w


@inplace_twin("weighted_sum")
def weighted_sum_(ts: Tensors, weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    w = sum_weights(weights, normalize)
    out = ts[0].mul_(w[0])
    for t, wi in zip(ts[1:], w[1:]):
        out += t.mul_(wi)
    return out


@merge_method("add_difference", inputs=(3, 3), chunkable=True, alpha=1.0,
              description="A + α·(B − C): add what C→B changed to A")
def add_difference(ts: Tensors, weights: Sequence[float], alpha: float = 1.0) -> torch.Tensor:
    a, b, c = ts
    d = b - c
    d *= alpha
    return a + d


@inplace_twin("add_difference")
def add_difference_(ts: Tensors, weights: Sequence[float], alpha: float = 1.0) -> torch.Tensor:
    a, b, c = ts
    d = b.sub_(c)
    d *= alpha
    return a.add_(d)


@merge_method("train_difference", inputs=(3, 3), chunkable=True, alpha=1.0,
              description="A + α·1.8·(B − C)·|B − A|/(|B − C| + |B − A|) (supermerger's train difference)")
def train_difference(ts: Tensors, weights: Sequence[float], alpha: float = 1.0) -> torch.Tensor:
    """SuperMerger's "train difference": add (B − C) to A, scaled per element by how far A is from B
    relative to how far C is from B (where A already equals B nothing is added), times 1.8·α."""
    a, b, c = ts
    diff_bc = b - c
    dist_ab = (b - a).abs_()
    total = diff_bc.abs() + dist_ab
    scale = torch.where(total != 0, dist_ab / total, torch.zeros((), device=a.device))
    return a + diff_bc * scale * (1.8 * alpha)


# --------------------------------------------------------------------------------------------------
# Task-vector methods (relative to a base)


def _top_k_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """True for the k = int(density·n) largest |x|; ties at the threshold go to the lowest flat index,
    so the mask is exactly defined (bf16 inputs make equal magnitudes common)."""
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    mag = x.abs().reshape(-1)
    # the k-th largest magnitude is the (n-k+1)-th smallest
    thr = torch.kthvalue(mag.cpu() if mag.device.type == "mps" else mag, n - k + 1).values.to(mag.device)
    above = mag > thr
    at = mag == thr
    room = k - int(above.sum())
    keep_at = at & (torch.cumsum(at, 0) <= room)
    return (above | keep_at).reshape(x.shape)


def _elect_and_merge(deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES sign election and disjoint merge over (already trimmed) deltas, weighted."""
    weighted = [d * w for d, w in zip(deltas, weights)]
    total = torch.zeros_like(deltas[0])
    for wd in weighted:
        total += wd
    elected = torch.where(total >= 0, 1.0, -1.0)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for d, wd, w in zip(deltas, weighted, weights):
        agree = torch.sign(d) == elected  # zero (trimmed or dropped) entries never agree
        merged += torch.where(agree, wd, 0.0)
        if normalize:
            divisor += torch.where(agree, w, 0.0)
    if normalize:
        divisor = torch.where(divisor == 0, 1.0, divisor)
        merged /= divisor
    return merged


@merge_method("ties", inputs=(2, None), weights="ones", uses_base=True, base=0, density=0.2, scale=1.0,
              normalize=True, description="TIES: trim each delta to its top `density`, elect signs, merge agreeing deltas")
def ties(ts: Tensors, weights: Sequence[float], base: int = 0, density: float = 0.2, scale: float = 1.0,
         normalize: bool = True) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): for each non-base input, δᵢ = Mᵢ − base keeps its k = density·n
    largest-magnitude entries; the sign of Σ wᵢδᵢ is elected per element (0 counts as +); the result is
    base + scale · (Σ over agreeing i of wᵢδᵢ) / (Σ over agreeing i of wᵢ) (plain sum if normalize=false)."""
    deltas, ws = [], []
    for i, d in _deltas(ts, base):
        deltas.append(torch.where(_top_k_mask(d, density), d, 0.0))
        ws.append(weights[i])
    merged = _elect_and_merge(deltas, ws, normalize)
    return ts[base] + merged * scale


@merge_method("dare", inputs=(2, None), weights="ones", random=True, uses_base=True, base=0, drop_rate=0.5,
              rescale=True, seed=0, sign_consensus=False, normalize=False, scale=1.0,
              description="DARE: drop delta entries at `drop_rate` (seeded), rescale by 1/(1−p), add (or TIES-merge)")
def dare(ts: Tensors, weights: Sequence[float], base: int = 0, drop_rate: float = 0.5, rescale: bool = True,
         seed: int = 0, sign_consensus: bool = False, normalize: bool = False, scale: float = 1.0) -> torch.Tensor:
    """DARE (Yu et al. 2023): each delta δᵢ = Mᵢ − base keeps each entry with probability 1 − p (mask
    U[0,1) < 1 − p from a CPU generator seeded with derive_seed(seed, key, i)) and is divided by 1 − p if
    rescale. Then base + scale · Σ wᵢδᵢ' (divided by Σ wᵢ if normalize), or with sign_consensus the TIES
    election/disjoint merge of the δᵢ' (DARE-TIES)."""
    if not 0.0 <= drop_rate < 1.0:
        raise WeightsmithError(f"dare: drop_rate must be in [0, 1), got {drop_rate}")
    keep = 1.0 - drop_rate
    deltas, ws = [], []
    for i, d in _deltas(ts, base):
        mask = _uniform(d.shape, derive_seed(seed, "dare", i), d.device) < keep
        d = torch.where(mask, d, 0.0)
        if rescale:
            d /= keep
        deltas.append(d)
        ws.append(weights[i])
    if sign_consensus:
        merged = _elect_and_merge(deltas, ws, normalize)
    else:
        merged = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, ws):
            merged += d * w
        if normalize and sum(ws) != 0:
            merged /= sum(ws)
    return ts[base] + merged * scale


# --------------------------------------------------------------------------------------------------
# Geometric and similarity-driven methods


_SUM_BLOCK = 1 << 12


def fixed_order_sum(t: torch.Tensor) -> float:
    """Σt in float64, added in an order fixed by the size alone: the same bits whatever torch's thread
    count. A whole-tensor method must give one result on a worker thread (torch single-threaded), run
    alone (all cores) or in ComfyUI's graph; torch.dot (BLAS) and a full .sum() split the work by thread
    count (measured: a 56M-element dot moved in its 4th digit between 1 and 8 threads). Per-row sums of
    fixed-width rows are each done by one thread, so they are reproducible; repeat until one row is left."""
    flat = t.reshape(-1)
    while flat.numel() > _SUM_BLOCK:
        rows = flat.numel() // _SUM_BLOCK
        parts = flat[: rows * _SUM_BLOCK].view(rows, _SUM_BLOCK).sum(dim=1, dtype=torch.float64)
        rest = flat[rows * _SUM_BLOCK:]
        flat = torch.cat([parts, rest.sum(dtype=torch.float64).reshape(1)]) if rest.numel() else parts
    return float(flat.sum(dtype=torch.float64))


@merge_method("slerp", inputs=(2, 2), weights="normalized", dot_threshold=0.9995,
              description="spherical interpolation of A and B per tensor, t = w_B/(w_A + w_B)")
def slerp(ts: Tensors, weights: Sequence[float], dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation of the two flattened tensors (the angle from their directions,
    applied to the raw tensors, as mergekit does); falls back to linear interpolation when they are
    (anti)parallel within `dot_threshold` or one is zero."""
    a, b = ts
    wa, wb = weights
    t = wb / (wa + wb) if (wa + wb) != 0 else 0.5
    na, nb = math.sqrt(fixed_order_sum(a * a)), math.sqrt(fixed_order_sum(b * b))
    if na == 0 or nb == 0:
        return a * (1 - t) + b * t
    dot = min(1.0, max(-1.0, fixed_order_sum(a * b) / (na * nb)))
    if abs(dot) > dot_threshold:
        return a * (1 - t) + b * t
    theta = math.acos(dot)
    s = math.sin(theta)
    return a * (math.sin((1 - t) * theta) / s) + b * (math.sin(t * theta) / s)


@merge_method("comparative_interpolation", inputs=(2, 2), random=True, alpha=0.5, beta=0.0, gamma=1.0, seed=0,
              description="per-element interpolation A→B weighted by how similar (or different) A and B are")
def comparative_interpolation(ts: Tensors, weights: Sequence[float], alpha: float = 0.5, beta: float = 0.0,
                              gamma: float = 1.0, seed: int = 0) -> torch.Tensor:
    """untitledmerger's comparative interpolation. δ = |A − B|; w = ((max δ − δ)/max δ)^(1/α − 1) (or the
    difference weight (δ/max δ)^(1/α − 1) when beta = 1); mask = lerp(Bernoulli(w), w, gamma);
    A·(1 − mask) + B·mask. gamma = 1 (the default) uses w itself: no randomness. Written on whole
    weights, it equals the same interpolation of the deltas to any common base (the mask weights sum to
    1), so base + (1 − mask)·(A − base) + mask·(B − base) gives the identical result."""
    a, b = ts
    delta = (a - b).abs_()
    top = delta.max()
    if top == 0:
        return a.clone()
    exponent = 1.0 / max(alpha, 1e-3) - 1.0
    w = (delta / top) if beta == 1 else (top - delta) / top
    w = torch.nan_to_num(w.pow_(exponent)).clamp_(0, 1)
    if gamma != 1:
        coin = (_uniform(w.shape, seed, w.device) < w).to(w.dtype)
        w = torch.lerp(coin, w, gamma)
    return a * (1 - w) + b * w


@merge_method("add_dissimilar", inputs=(3, 4), chunkable=True, uses_base=True, base=0, alpha=0.5, beta=1.0,
              gamma=1.0, multiplier=1.0,
              description="A + m·lerp(B−base, C−base, α)·lerp(d, 1−d, β), d from the cosine of the two deltas")
def add_dissimilar(ts: Tensors, weights: Sequence[float], base: int = 0, alpha: float = 0.5, beta: float = 1.0,
                   gamma: float = 1.0, multiplier: float = 1.0) -> torch.Tensor:
    """untitledmerger's add-dissimilarities on deltas: with a = B − base, b = C − base (inputs 2 and 3 of
    A, B, C[, base]), c = cos(a, b) per row (per output channel; over the whole tensor for 1-D ones),
    d = ((c + 1)/2)^gamma, result = lerp(a, b, alpha)·lerp(d, 1 − d, beta) (beta = 1: what the two
    deltas do differently); output A + multiplier·result. The base defaults to A itself."""
    a_in, b_in, c_in = ts[0], ts[1], ts[2]
    ref = ts[base]
    da, db = b_in - ref, c_in - ref
    if da.ndim >= 2:
        fa, fb = da.reshape(da.shape[0], -1), db.reshape(db.shape[0], -1)
        cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1).clamp(-1, 1)
        cos = cos.reshape(-1, *([1] * (da.ndim - 1)))
    else:
        cos = torch.nn.functional.cosine_similarity(da.reshape(1, -1), db.reshape(1, -1), dim=1).clamp(-1, 1)
    d = ((cos + 1) / 2).pow(gamma)
    return a_in + torch.lerp(da, db, alpha) * torch.lerp(d, 1 - d, beta) * multiplier


# --------------------------------------------------------------------------------------------------
# Lossless mix (core/mix.py) as merge methods: A is the reference, B, C… the candidates


@merge_method("lossless_min", inputs=(3, None), weights="ones", chunkable=True,
              description="per element, the candidate (B, C, …) nearest to A, compared as |A − wᵢ·Xᵢ| (ties: first)")
def lossless_min(ts: Tensors, weights: Sequence[float]) -> torch.Tensor:
    """The lossless-mix rule (core/mix.py): every element is some candidate's own value; the weights of
    the candidates only scale the comparison (A's weight is unused)."""
    return pick_among(ts[0], list(ts[1:]), list(weights[1:]), "min", out_dtype=torch.float32)


@merge_method("lossless_max", inputs=(3, None), weights="ones", chunkable=True,
              description="per element, the candidate (B, C, …) farthest from A, compared as |A − wᵢ·Xᵢ| (ties: last)")
def lossless_max(ts: Tensors, weights: Sequence[float]) -> torch.Tensor:
    return pick_among(ts[0], list(ts[1:]), list(weights[1:]), "max", out_dtype=torch.float32)


def format_params(params: dict) -> str:
    """'alpha=0.5, base=A' for people: the base input is shown as a letter (it is an index inside)."""
    return ", ".join(f"{k}={'ABCDEFGH'[v] if k == 'base' and isinstance(v, int) and 0 <= v < 8 else v}"
                     for k, v in params.items())


def describe_methods() -> list[dict]:
    """One row per method for `--list-methods` and tooltips."""
    return [{"method": m.name, "inputs": m.inputs_text(), "params": format_params(m.defaults),
             "description": m.description} for m in METHODS.values()]

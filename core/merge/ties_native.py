"""TIES-merging of a large key in passes over row ranges (encodings/fp8_native.c), where the torch route
needs the whole tensor at once: each delta's k-th largest magnitude came from `torch.kthvalue` over all
of it, with int64 indices and cumsum temporaries (measured: 6.4 GB peak and 57 s for a 2 x 1 GB Flux
merge, 8 bytes of temporaries per element).

The threshold is found exactly by radix selection on the magnitudes' fp32 bits (non-negative floats
order as their bits): pass 1 counts the top 16 bits of every |δ| per range (a 65536-bin histogram), which
names the bin holding the k-th largest; pass 2 counts the low 16 bits inside that bin, per range, which
gives the threshold, how many are above it, the room left for equal ones (ties at the threshold go to the
lowest flat index, as `_top_k_mask` defines) and how many equal ones each range holds (so each range of
pass 3 knows how many it may keep). Pass 3 computes the merged values with the same fp32 operations in
the same order as `ties` (trim, weighted sum, sign election, disjoint mean, base + scale · merged), so
the result is the torch route's, bit for bit (tests/test_ties_native.py). Inputs are read as stored
(scaled fp8 payloads with their scale folded in, bf16, fp32, e4m3): nothing is decoded whole, and memory
holds the key's fp32 result and a few MB of histograms.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from ..encodings import fp8_native
from ..encodings.encode import ScaledRows
from ..encodings.fp8 import keeps_subnormals, kernel_input
from .plan import KeyPlan

BINS = 1 << 16
ALL = 1 << 62  # a quota no range reaches: keep every element equal to the threshold


def _as_native(t) -> tuple[torch.Tensor, int, float] | None:
    """(flat stored tensor, kind, factor) of one input, or None where the kernels do not read it."""
    if isinstance(t, ScaledRows):
        return kernel_input(t.payload, t.scale) if t.payload.dtype == torch.float8_e4m3fn else None
    return kernel_input(t)


class NativeTies:
    """One TIES key's three passes; each range method is called on a worker thread, the `choose_*` steps
    between passes once, by the engine (KeyJob.then)."""

    def __init__(self, kp: KeyPlan, inputs: list[tuple[torch.Tensor, int, float]], params: dict):
        self.n = len(inputs)
        self.numel = kp.numel
        self.base = int(params.get("base", 0))
        self.density = float(params.get("density", 0.2))
        self.scale = float(params.get("scale", 1.0))
        self.normalize = bool(params.get("normalize", True))
        self.weights = [float(w) for i, w in enumerate(kp.weights) if i != self.base]
        self.flats = [t for t, _, _ in inputs]
        self.kinds = (ctypes.c_int * self.n)(*[k for _, k, _ in inputs])
        self.factors = (ctypes.c_float * self.n)(*[f for _, _, f in inputs])
        self.k = int(self.density * self.numel)
        nd = self.n - 1
        self.hi = np.zeros(nd, dtype=np.uint32)
        self.thr = np.zeros(nd, dtype=np.uint32)
        self.room = np.zeros(nd, dtype=np.int64)
        self.quota_before: dict[int, np.ndarray] = {}  # range start -> equal ones earlier ranges may keep

    def _ptrs(self, lo: int, hi: int):
        parts = [f[lo:hi] for f in self.flats]
        return parts, (ctypes.c_void_p * self.n)(*[p.data_ptr() for p in parts])

    def _hist(self, lo: int, hi: int, refine: bool) -> np.ndarray:
        lib = fp8_native.library()
        assert lib is not None
        hist = np.zeros((self.n - 1, BINS), dtype=np.int64)
        _parts, ptrs = self._ptrs(lo, hi)  # the slices stay alive through the call
        want = np.ascontiguousarray(self.hi)
        rc = lib.ws_ties_hist(self.n, self.kinds, ptrs, self.factors, self.base, hi - lo, int(refine),
                              want.ctypes.data, hist.ctypes.data)
        if rc != 0:
            raise ValueError("ws_ties_hist refused its arguments")
        return hist

    def hist_top(self, lo: int, hi: int) -> np.ndarray:
        return self._hist(lo, hi, False)

    def hist_low(self, lo: int, hi: int) -> np.ndarray:
        return self._hist(lo, hi, True)

    def trivial(self) -> bool:
        """k = 0 (nothing kept) or k >= n (everything kept): no threshold to find."""
        return self.k <= 0 or self.k >= self.numel

    def choose_top(self, hists: list[np.ndarray]) -> None:
        """The top-16-bit bin that holds the k-th largest magnitude of each delta."""
        total = np.sum(hists, axis=0)  # (deltas, bins)
        self._above_hi = np.zeros(self.n - 1, dtype=np.int64)
        for j in range(self.n - 1):
            from_top = np.cumsum(total[j][::-1])  # elements in bins >= b, b from the top
            b = int(np.searchsorted(from_top, self.k))  # the first from the top reaching k
            self.hi[j] = BINS - 1 - b
            self._above_hi[j] = from_top[b - 1] if b else 0

    def choose_low(self, starts: list[int], hists: list[np.ndarray]) -> None:
        """The exact threshold, the count above it, the room for equal ones, and each range's share."""
        total = np.sum(hists, axis=0)
        for j in range(self.n - 1):
            from_top = np.cumsum(total[j][::-1])
            need = self.k - int(self._above_hi[j])
            b = int(np.searchsorted(from_top, need))
            low = BINS - 1 - b
            above = int(self._above_hi[j]) + (int(from_top[b - 1]) if b else 0)
            self.thr[j] = (int(self.hi[j]) << 16) | low
            self.room[j] = self.k - above
            seen = 0
            for lo, h in zip(starts, hists):
                q = self.quota_before.setdefault(lo, np.zeros(self.n - 1, dtype=np.int64))
                q[j] = max(0, int(self.room[j]) - seen)
                seen += int(h[j][low])

    def choose_trivial(self, starts: list[int]) -> None:
        for lo in starts:
            if self.k >= self.numel:  # every delta kept whole: a threshold below every magnitude...
                self.thr[:] = 0
                self.quota_before[lo] = np.full(self.n - 1, ALL, dtype=np.int64)  # ... and every zero kept
            else:  # nothing kept: a threshold above every magnitude, NaN included
                self.thr[:] = 0xFFFFFFFF
                self.quota_before[lo] = np.zeros(self.n - 1, dtype=np.int64)

    def apply(self, lo: int, hi: int, y: torch.Tensor, sums: bool) -> tuple[float, list | None]:
        """y (fp32, hi - lo elements) = the merged values of the range; (max |y|, the report's sums)."""
        lib = fp8_native.library()
        assert lib is not None and keeps_subnormals()
        _parts, ptrs = self._ptrs(lo, hi)
        quota = np.ascontiguousarray(self.quota_before[lo])
        thr = np.ascontiguousarray(self.thr)
        w = (ctypes.c_float * (self.n - 1))(*self.weights)
        out_sums = np.zeros(2 * self.n + 1, dtype=np.float64) if sums else None
        amax = ctypes.c_uint32(0)
        rc = lib.ws_ties_apply(self.n, self.kinds, ptrs, self.factors, self.base, hi - lo, thr.ctypes.data,
                               quota.ctypes.data, w, int(self.normalize), self.scale, y.data_ptr(),
                               None if out_sums is None else out_sums.ctypes.data, ctypes.byref(amax))
        if rc != 0:
            raise ValueError("ws_ties_apply refused its arguments")
        amax_value = fp8_native.bits_to_float(amax.value)
        if out_sums is None:
            return amax_value, None
        n = self.n
        sq, dot = [float(x) for x in out_sums[:n]], [float(x) for x in out_sums[n:2 * n]]
        dot[0] = 0.0  # as _block_sums: x_A·x_A is not a similarity
        return amax_value, (sq, dot, float(out_sums[2 * n]))


def native_ties(kp: KeyPlan, full: list, params: dict) -> NativeTies | None:
    """The passes for a `ties` key whose inputs the kernels read (all of them: fp32, bf16, e4m3 or
    tensor-wise scaled e4m3), on the CPU, kernels built; None otherwise (the torch route)."""
    if kp.method != "ties" or fp8_native.library() is None or not 2 <= len(full) <= 8 or not keeps_subnormals():
        return None
    inputs = [_as_native(t) for t in full]
    if any(x is None for x in inputs) or any(x[0].numel() != kp.numel for x in inputs):
        return None
    base = int(params.get("base", 0))
    if not 0 <= base < len(full):
        return None
    return NativeTies(kp, inputs, params)

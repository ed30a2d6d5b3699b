"""A weighted sum of tensor-wise scaled e4m3 inputs in native passes (encodings/fp8_native.c): the common
scaled-fp8 merge (ComfyUI's ModelMergeSimple, `merge --dtype keep` on two fp8 checkpoints), written
fp8-scaled (the two passes below) or in a plain dtype (one summing pass per block, cast by the caller).

The generic route decodes each input's row block (q · scale) into fp32, runs weighted_sum_ over them
(x₀·w₀, += xⱼ·wⱼ), keeps the whole fp32 sum until its amax is known, then quantizes it: some ten torch
passes per block and 9 bytes of memory traffic per element for the stored sum. Here a first pass over
the fp8 inputs gives only the amax, and a second recomputes the sum and quantizes it straight away
(computing twice costs less than storing 4 bytes and reading them back; no fp32 copy of the tensor is
held). The kernel does the same fp32 operations in the same order, so the written bytes are those of
the generic route (tests/test_fp8_native.py). It is used only where that is certain: every input an
e4m3fn payload with one scale whose folded factor is exact, weights and scales small enough that no
sum can overflow fp32, the thread keeping subnormals, and the kernels built; a block holding an e4m3
NaN code goes the generic route (which turns it into NaN and reports it).
"""

from __future__ import annotations

import math

import torch

from ..encodings import fp8_native
from ..encodings.encode import ScaledRows
from ..encodings.fp8 import keeps_subnormals, kernel_input
from .methods import sum_weights
from .plan import KeyPlan

FP32_SAFE = 1e38  # below fp32's max (3.4e38) with room: no partial sum of the weighted inputs reaches inf


class NativeWeightedSum:
    """A key's weighted sum over flat element ranges of its fp8 inputs, in native passes: `amax(lo, hi)`
    (nothing stored), `quantize(lo, hi, scale, out)` (the sum / scale cast to e4m3, as quantize_fp8
    does to the stored sum) and `sum(lo, hi, out)` (the fp32 sum, for a plain output dtype); each
    declines (None / False) a range holding an e4m3 NaN code, which then takes the generic route."""

    def __init__(self, payloads: list[torch.Tensor], factors: list[float], weights: list[float]):
        self.payloads, self.factors, self.weights = payloads, factors, weights

    def amax(self, lo: int, hi: int) -> float | None:
        if not keeps_subnormals():  # asked on the worker thread that computes (per-thread CPU flags)
            return None
        nan, amax = fp8_native.wsum_amax_e4m3([p[lo:hi] for p in self.payloads], self.factors, self.weights)
        return None if nan else amax

    def sum(self, lo: int, hi: int, out: torch.Tensor) -> bool:
        """Whether the range's weighted sum was written into the fp32 tensor `out` (for an output in a
        plain dtype, cast by the caller)."""
        if not keeps_subnormals():
            return False
        nan, _ = fp8_native.wsum_e4m3([p[lo:hi] for p in self.payloads], self.factors, self.weights, out)
        return not nan

    def quantize(self, lo: int, hi: int, scale: float, out: torch.Tensor) -> bool:
        """Whether the range was written into `out` (uint8/e4m3, hi - lo elements)."""
        if not keeps_subnormals():
            return False
        return not fp8_native.wsum_quantize_e4m3([p[lo:hi] for p in self.payloads], self.factors, self.weights,
                                                 scale, out)


def native_weighted_sum(kp: KeyPlan, full: list, params: dict) -> NativeWeightedSum | None:
    """The native passes for a weighted_sum key whose inputs are all tensor-wise scaled e4m3 rows;
    None when the key does not qualify."""
    if kp.method != "weighted_sum" or not full or fp8_native.library() is None:
        return None
    if not all(isinstance(t, ScaledRows) and t.payload.dtype == torch.float8_e4m3fn
               and t.payload.device.type == "cpu" and t.payload.is_contiguous() for t in full):
        return None
    weights = sum_weights(kp.weights, params.get("normalize", True))
    inputs = [kernel_input(t.payload, t.scale) for t in full]
    if any(x is None for x in inputs) or len(weights) != len(full):
        return None  # a scale whose fold overflows: the generic route's two multiplies
    factors = [f for _, _, f in inputs]
    bound = sum(448.0 * abs(float(t.scale)) * abs(w) for t, w in zip(full, weights))
    if not all(math.isfinite(x) for x in (*factors, *weights)) or not bound < FP32_SAFE:
        return None
    return NativeWeightedSum([flat.view(torch.int8) for flat, _, _ in inputs], factors, weights)

"""DoRA magnitude (`dora_scale`): ComfyUI 0.3.75's `weight_decompose`, replicated step for step.

    W' = W + α·ΔW                                   (α = alpha / rank, ΔW the adapter's product)
    n  = ‖W‖ per output row      if dora_scale.shape[0] == out   (ComfyUI takes the *original* W there)
         ‖W'‖ per input column   otherwise                       (LyCORIS `wd_on_output=False`: [1, in])
    W' ← W' · dora_scale / (n + eps(W.dtype))
    result = W + strength·(W' − W)

It is not linear in ΔW: the result depends on the base weight, so a DoRA module has no ΔW of its own
and composing or re-ranking it needs the base model (or is refused, said so).
"""

from __future__ import annotations

import torch


def weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, lora_diff: torch.Tensor, alpha: float,
                     strength: float) -> torch.Tensor:
    """The new weight ComfyUI computes (fp32 in, fp32 out; `weight` is not modified)."""
    weight = weight.float()
    scale = dora_scale.to(weight.device, torch.float32)
    calc = weight + lora_diff.float().reshape(weight.shape) * alpha
    if scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0],
                                                                                     *[1] * (weight.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    calc = calc * (scale / norm)
    if strength != 1.0:
        return weight + strength * (calc - weight)
    return calc

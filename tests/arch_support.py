"""Shared checks for the per-architecture tests: a 'fine-tune' of a tiny ComfyUI model, the change a comfy-named
LoRA makes, and the two facts every naming must show (ComfyUI loads it whole and patches base → tuned; reading
it back and writing ComfyUI's naming is exact)."""

from __future__ import annotations

import copy
import re

import torch
from comfy_support import apply_lora, effective_weights

from weightsmith.lora.formats import detect_format, load_lora, lora_state_dict
from weightsmith.report import an_arch


def tuned(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Every linear and conv weight gets a rank-2 change; every other tensor (biases, norms) a dense one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.ndim >= 2 and k.endswith(".weight"):
            d = torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v[0].numel(), generator=g)
            out[k] = v + 0.05 * d.reshape(v.shape)
        else:
            out[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    return out


def deltas(comfy_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module of a comfy-named LoRA state dict, the change it makes (ΔW = alpha/rank · up @ down; diffs)."""
    out = {}
    for k, v in comfy_sd.items():
        if k.endswith(".lora_up.weight"):
            m = k[: -len(".lora_up.weight")]
            down = comfy_sd[m + ".lora_down.weight"].double()
            alpha = comfy_sd.get(m + ".alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[m] = scale * (v.double().flatten(1) @ down.flatten(1))
        elif k.endswith((".diff", ".diff_b", ".set_weight")):
            out[k] = v.double()
    return out


def without(lora, names):
    """A shallow copy of `lora` without the modules `names`."""
    out = copy.copy(lora)
    out.modules = {n: m for n, m in lora.modules.items() if n not in names}
    return out


def only(lora, keep):
    """A shallow copy of `lora` with the modules for which `keep(name)` holds."""
    return without(lora, [n for n in lora.modules if not keep(n)])


def expected_weights(base, tuned_sd, lora) -> dict[str, torch.Tensor]:
    """What base patched by `lora` must equal: the tuned tensor where the LoRA has a module (or a bias change),
    the base tensor elsewhere."""
    from weightsmith.lora.keymaps import bias_key, weight_key

    touched = {weight_key(n) for n in lora.modules} | {bias_key(n) for n, m in lora.modules.items()
                                                         if m.diff_b is not None}
    return {k: (tuned_sd[k] if k in touched else v) for k, v in base.items()}


def assert_comfy_patches_exactly(patcher, lsd, want, fmt, rtol=1e-4, atol=1e-5) -> None:
    """ComfyUI loads every key of `lsd` (nothing 'not loaded', nothing refused) and its patched weights equal `want`."""
    clone, missing, refused = apply_lora(patcher, lsd)
    assert missing == [] and refused == [], (fmt, missing[:3], refused[:3])
    eff = effective_weights(clone)
    for k, v in want.items():
        torch.testing.assert_close(eff[k], v, rtol=rtol, atol=atol, msg=f"{fmt}: {k}")


def assert_reads_back_exactly(lora, lsd, fmt, arch=None) -> None:
    """`lsd` is detected as `fmt`, read back whole, and written in ComfyUI's naming makes the same changes."""
    back = load_lora(lsd, arch=arch)
    assert back.arch == lora.arch and detect_format(lsd) == fmt and not back.unknown_keys, (
        fmt, back.arch, back.unknown_keys[:3])
    again, first = deltas(lora_state_dict(back, "comfy")), deltas(lora_state_dict(lora, "comfy"))
    assert set(again) == set(first), (fmt, sorted(set(again) ^ set(first))[:4])
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-6, atol=1e-7, msg=f"{fmt}: {k}")


def arch_refusal(mine: str, other: str) -> str:
    """The pattern of the refusal of a `mine` LoRA where an `other` model is given (display names, articles)."""
    return re.escape(f"{an_arch(mine)} LoRA, not {an_arch(other)} one")


def inspect_checkpoint(tmp_path, capsys, sd: dict[str, torch.Tensor]) -> str:
    """What `weightsmith inspect` prints for `sd` saved as a full checkpoint (`model.diffusion_model.` keys)."""
    from safetensors.torch import save_file

    from weightsmith.cli import main

    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()}, str(path))
    assert main(["inspect", str(path)]) == 0
    return capsys.readouterr().out

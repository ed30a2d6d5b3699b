"""LyCORIS (the PyPI `lycoris-lora` package) as a real producer: LoKr / LoHa / LoRA / DoRA / full-diff
networks on a small torch module tree named like a model's layers, saved the LyCORIS way."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def module_tree(base: dict[str, torch.Tensor], keep=lambda key: True) -> nn.Module:
    """nn.Linear / nn.Conv2d modules at the paths of `base`'s 2-D / 4-D weights, holding those weights."""
    root = nn.Module()
    for key, w in base.items():
        if not key.endswith(".weight") or w.ndim not in (2, 4) or not keep(key):
            continue
        path = key[: -len(".weight")].split(".")
        node = root
        for part in path[:-1]:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if w.ndim == 2:
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        else:
            layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=False, padding=w.shape[2] // 2)
        layer.weight.data.copy_(w.float())
        node.add_module(path[-1], layer)
    return root


def lycoris_network(tree: nn.Module, prefix: str, algo: str, seed: int = 0, dim: int = 4, alpha: float = 2.0,
                    **kwargs):
    """A LyCORIS network on `tree` with random (trained-looking) factors; `prefix` is its key prefix
    (`lora_unet`: kohya naming, `lycoris`: SimpleTuner's)."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"lora_prefix": prefix, "target_module": ["Linear", "Conv2d"], "enable_conv": True,
                                 "target_name": [], "module_algo_map": {}, "name_algo_map": {}})
    torch.manual_seed(seed)
    net = create_lycoris(tree, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kwargs)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else 0.2 * noise)
    return net


def save_network(net, path: Path) -> Path:
    net.save_weights(str(path), torch.float32, {})
    return path


def lycoris_deltas(net) -> dict[str, torch.Tensor]:
    """The producer's own ΔW per LyCORIS module name (linear types only). LyCORIS 4.1's LoHa
    `get_diff_weight` applies alpha/r twice (once in `get_weight`, once more after); its `get_weight` is
    the ΔW its saved file means (and what ComfyUI applies)."""
    out = {}
    for m in net.loras:
        d = m.get_weight(m.shape) if type(m).__name__ == "LohaModule" else m.get_diff_weight(1.0)[0]
        out[m.lora_name] = d.detach().float()
    return out

"""Adapter types beyond the plain low-rank pair, one module each, with ComfyUI 0.3.75's exact semantics:

- `lokr`  LoKr: kron(w1, w2), each factor whole or low-rank (+ Tucker t2)
- `loha`  LoHa: (w1_a @ w1_b) ⊙ (w2_a @ w2_b) (+ Tucker t1/t2)
- `locon` a LoRA pair with a DoRA magnitude and/or a LoCon Tucker core (`lora_mid`)
- `dora`  the DoRA magnitude (`dora_scale`) any of them may carry: `weight_decompose`

Full diffs (`diff`, `diff_b`, `set_weight`, norms `w_norm`/`b_norm`) are fields of `model.ModuleDelta`;
plain low-rank pairs are `model.LoraTerm`. `ADAPTER_SUFFIXES` tells readers which key suffixes these
types own; `build_adapter` turns one file module's tensors into an adapter, the way ComfyUI picks one.
"""

from __future__ import annotations

import torch

from ...errors import BadFileError
from .base import Adapter
from .locon import LoCon
from .loha import LoHa
from .lokr import LoKr

ADAPTER_TYPES: dict[str, type[Adapter]] = {"lokr": LoKr, "loha": LoHa, "lora": LoCon}

# key suffix -> role used by the readers' suffix tables ("<type>:<field>")
ADAPTER_SUFFIXES: list[tuple[str, str]] = [
    *((suffix, f"lokr:{f}") for f, suffix in LoKr.ROLES.items()),
    *((suffix, f"loha:{f}") for f, suffix in LoHa.ROLES.items()),
    (".lora_mid.weight", "lora:mid"), (".dora_scale", "dora"),
    (".w_norm", "diff"), (".b_norm", "diff_b"),
]

# What a key suffix we do not handle looks like (for messages about keys no reader understood).
FOREIGN_SUFFIXES = {
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R.weight": "OFT (PEFT)", ".rescale": "OFT/BOFT",
    ".a1.weight": "GLoRA", ".b1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b2.weight": "GLoRA",
    ".lora_embedding_A": "PEFT embedding LoRA", ".lora_embedding_B": "PEFT embedding LoRA",
    ".ia3_l": "IA3", ".boft_R": "BOFT", ".vera_lambda_b": "VeRA",
    ".lora_magnitude_vector": "DoRA (PEFT lora_magnitude_vector)", ".scalar": "LyCORIS scalar",
}


def looks_like(key: str) -> str | None:
    """The adapter type a key's suffix suggests (None when it suggests nothing)."""
    for suffix, kind in FOREIGN_SUFFIXES.items():
        if key.endswith(suffix) or f"{suffix}." in key:
            return kind
    return None


def build_adapter(prefix: str, kind: str, parts: dict[str, torch.Tensor], alpha: float | None,
                  dora: torch.Tensor | None, where: str) -> Adapter:
    """One adapter from a file module's factors (`parts`: field -> tensor); a factor missing -> BadFileError."""
    cls = ADAPTER_TYPES[kind]
    for role, t in parts.items():
        if not t.is_floating_point() or not t.numel():
            raise BadFileError(f"{where}: {prefix}{cls.ROLES.get(role, '')} is "
                               f"{'empty' if not t.numel() else str(t.dtype).replace('torch.', '')}: a {kind} factor "
                               "must hold floating-point values; the file is damaged: download it again or re-export it")
    try:
        adapter = cls(**parts, alpha=alpha, dora_scale=dora)
    except TypeError as e:  # a required factor absent
        missing = [f for f in cls.ROLES if f not in parts]
        raise BadFileError(f"{where}: {prefix} holds a partial {kind} ({', '.join(cls.ROLES[f] for f in parts)}; "
                           f"missing {', '.join(cls.ROLES[f] for f in missing)}): the file is damaged") from e
    except Exception as e:  # the type's own checks
        raise BadFileError(f"{where}: {prefix}: {e}") from e
    try:
        adapter.product(device="meta")  # factors that do not multiply fail here, on shapes alone (no math)
    except RuntimeError as e:
        shapes = ", ".join(f"{cls.ROLES.get(r, r)} {tuple(t.shape)}" for r, t in parts.items())
        raise BadFileError(f"{where}: {prefix}: the {kind} factors ({shapes}) do not multiply into one weight "
                           f"change ({str(e).splitlines()[0][:120]}); the file is damaged: download it again or "
                           "re-export it") from None
    return adapter


__all__ = ["ADAPTER_SUFFIXES", "ADAPTER_TYPES", "Adapter", "LoCon", "LoHa", "LoKr", "build_adapter", "looks_like"]

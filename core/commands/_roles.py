"""Which file is which: a LoRA given where a model belongs (or the other way round) is named at once, with
the command line in the right order, instead of failing later as "different architectures"."""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightsmithError


class ArgumentOrderError(WeightsmithError):
    """A LoRA given where a model is expected, or a model where a LoRA is."""


def has_adapter_keys(keys) -> bool:
    """Some key ends in a LoRA/LoKr/LoHa factor suffix (any naming family)."""
    from ..lora.formats_base import KOHYA_SUFFIXES, PEFT_SUFFIXES

    suffixes = tuple(suf for suf, _ in KOHYA_SUFFIXES + PEFT_SUFFIXES + [(".down.weight", ""), (".up.weight", "")])
    return any(k.endswith(suffixes) for k in keys)


def looks_like_lora(src) -> bool:
    """A file of adapter factors in a known LoRA format, not a model: the test `inspect` uses (a full
    checkpoint's `model.diffusion_model.` keys also look like ComfyUI LoRA keys: a model is a model)."""
    from ..arch import detect_arch
    from ..lora.formats import detect_format

    keys = src.keys()
    return bool(keys) and detect_format(keys) != "unknown" and detect_arch(src).arch == "unknown" \
        and has_adapter_keys(keys)


def looks_like_model(src) -> bool:
    """A model of an architecture we recognise (so certainly not a LoRA)."""
    from ..arch import detect_arch

    return detect_arch(src).arch != "unknown"


def check_roles(command: str, given: list[tuple[str, Path]], lora_slot: str | None = None) -> None:
    """`given`: (role, path) in command-line order; `lora_slot` the role that must be a LoRA (None: none
    may be). Refuses a LoRA in a model's place (and a model in the LoRA's), naming the file and showing the
    order the command takes."""
    from ..sources import open_model

    sources = {role: open_model(path) for role, path in given}
    is_lora = {role: looks_like_lora(src) for role, src in sources.items()}
    lora_is_model = lora_slot is not None and looks_like_model(sources[lora_slot])
    if not lora_is_model and not any(is_lora[role] for role, _ in given if role != lora_slot):
        return  # (a LoRA slot holding something unrecognised is left to the LoRA reader's own message)
    paths = dict(given)
    usage = " ".join(role.upper() for role, _ in given)
    loras = [role for role, _ in given if is_lora[role]]
    if lora_slot is None:
        role = loras[0]
        raise ArgumentOrderError(
            f"{paths[role]} is a LoRA, given as the {role} model; `weightsmith {command}` takes {usage}, all full "
            "models" + (" (to measure how well a LoRA reproduces a fine-tune: `weightsmith validate BASE TUNED "
                        "LORA`)" if command == "extract" else ""))
    if len(loras) == 1:  # one LoRA, in the wrong place: the order the user meant is clear
        models = [p for role, p in given if role != loras[0]]
        order = dict(zip([r for r, _ in given if r != lora_slot], models))
        fixed = " ".join(str(order[r]) if r != lora_slot else str(paths[loras[0]]) for r, _ in given)
        raise ArgumentOrderError(
            f"the arguments are in the wrong order: {paths[loras[0]]} is the LoRA, but it was given as the "
            f"{loras[0]} model; `weightsmith {command}` takes {usage}. Did you mean `weightsmith {command} {fixed}`?")
    if not loras:
        raise ArgumentOrderError(f"{paths[lora_slot]} is a full model, not a LoRA; "
                                 f"`weightsmith {command}` takes {usage}, the LoRA last")
    raise ArgumentOrderError(f"{' and '.join(str(paths[r]) for r in loras)} are LoRAs; `weightsmith {command}` takes "
                             f"{usage}: two full models and one LoRA")

"""Extract a LoRA from two models: ΔW = tuned − base, layer by layer, factorised at a chosen rank.

Planning (which tensor becomes what, under which rank policy) is separate from execution (one layer at a
time: load both tensors, subtract in fp32 on the chosen device, factorise, cast, measure, free). Neither
model is ever held whole: sources are memory-mapped files, in-memory dicts or ComfyUI ModelPatchers
(`nodes.common.PatcherSource`) that compute one effective weight at a time.

What is stored per layer:
  linear [out, in]          up [out, r], down [r, in]
  conv   [out, in, kh, kw]  flattened to [out, in·kh·kw]; up [out, r, 1, 1], down [r, in, kh, kw] (kohya/LoCon)
  1x1 conv                  as a linear, same 4-D layout
  1-D weights / norm scales `diff` (the full change), biases `diff_b`  (with store_diff)
Factors split √S on both sides and alpha = the stored rank: scale 1 in every loader. The report's
errors are measured on the factors as stored (after the cast to the output dtype and any clamp).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from ..devices import resolve_device
from ..dtypes import cast_for_output, dtype_name, parse_dtype
from ..errors import WeightsmithError
from ..progress import ProgressFn, no_progress
from . import keymaps
from .budget import (
    HEADER_SLACK,
    METADATA_ALLOWANCE,
    Allocation,
    LayerSpectrum,
    allocate,
    format_size,
    initial_width,
    tensor_header_bytes,
)
from .model import LoRA, LoraTerm
from .svd import (
    METHODS,
    RANK_MODES,
    OptionError,
    RankPolicy,
    check_dynamic_param,
    clamp_factors,
    frobenius,
    low_rank,
    oversampling,
    randomized_svd,
    residual_sq_norm,
    subtract_,
)
from .validate import (
    ExtractionReport,
    ModelPair,
    ModuleReport,
    lora_arch,
    module_kind,
    nonfinite_inputs,
    nonfinite_module,
    pair_models,
)

DEFAULT_MIN_DELTA = 1e-6
SAME_AS_RANK = -1  # conv_rank as the user gives it (node widget and CLI alike): -1 = same as rank, 0 = leave out


def conv_rank_option(value: int | None) -> int | None:
    """The user's conv_rank (node widget or --conv-rank, one meaning for both) as ExtractOptions takes it:
    -1 (or None) = the same as rank, 0 = leave k×k convolutions out, n > 0 = rank n."""
    return None if value is None or value == SAME_AS_RANK else value


@dataclass(frozen=True)
class ExtractOptions:
    rank: int = 64
    conv_rank: int | None = None  # None: same as `rank`; 0: leave k×k convs out
    rank_mode: str = "fixed"
    energy: float = 0.99
    error: float = 0.05
    max_rank: int | None = None
    min_delta: float = DEFAULT_MIN_DELTA  # ‖ΔW‖ / ‖W_base‖ below which a layer counts as unchanged
    store_diff: bool = True
    clamp_quantile: float | None = None
    dtype: torch.dtype = torch.bfloat16
    method: str = "auto"  # auto | randomized | exact
    seed: int = 0
    dynamic_param: float | None = None  # kohya's --dynamic_param (sv_ratio / sv_fro / sv_cumulative)
    size: int | None = None  # bytes of the whole LoRA file (rank mode "budget")

    def _policy(self, rank: int, cap: int | None) -> RankPolicy:
        if self.rank_mode == "budget":  # the cap only: each layer's rank comes from the allocation
            return RankPolicy("fixed", cap or 1 << 30, max_rank=cap)
        return RankPolicy(self.rank_mode, rank, self.energy, self.error, cap, self.dynamic_param)

    def linear_policy(self) -> RankPolicy:
        return self._policy(self.rank, self.max_rank)

    def conv_policy(self) -> RankPolicy:
        rank = self.conv_rank or self.rank
        cap = self.max_rank
        if self.conv_rank and self.rank_mode not in ("fixed", "full"):
            cap = self.conv_rank if cap is None else min(cap, self.conv_rank)
        return self._policy(rank, cap)

    def as_metadata(self) -> dict:
        out = {
            "rank": self.rank, "conv_rank": self.conv_rank, "rank_mode": self.rank_mode, "energy": self.energy,
            "error": self.error, "max_rank": self.max_rank, "min_delta": self.min_delta,
            "store_diff": self.store_diff, "clamp_quantile": self.clamp_quantile,
            "dtype": dtype_name(self.dtype), "method": self.method, "seed": self.seed,
        }
        if self.dynamic_param is not None:
            out["dynamic_param"] = self.dynamic_param
        if self.size is not None:
            out["size"] = self.size
        return out


@dataclass(frozen=True)
class LayerPlan:
    key: str  # model tensor key, prefix stripped
    module: str | None  # canonical LoRA module name (None: not representable)
    kind: str  # linear | conv1x1 | conv | vector | bias | other
    action: str  # lowrank | diff | diff_b | drop
    policy: RankPolicy | None = None
    reason: str = ""  # why a changed tensor is dropped


def _output_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    try:
        out = parse_dtype(dtype) or torch.bfloat16
    except ValueError as e:
        raise OptionError(str(e)) from None
    if not out.is_floating_point:
        raise OptionError(f"dtype {dtype_name(out)} cannot hold LoRA factors; choose bf16, fp16 or fp32")
    return out


def check_options(opts: ExtractOptions) -> ExtractOptions:
    """Refuse out-of-range settings before any tensor is read (OptionError: a WeightsmithError)."""
    if opts.rank_mode not in RANK_MODES:
        raise OptionError(f"unknown rank mode {opts.rank_mode!r}; choose one of {', '.join(RANK_MODES)}")
    if opts.rank_mode == "budget" and (opts.size is None or opts.size <= 0):
        raise OptionError("rank mode budget needs a file size (--size 100MB, or the node's size_mb); give the size "
                          "the LoRA file should have")
    if opts.rank_mode in ("sv_ratio", "sv_fro", "sv_cumulative"):
        check_dynamic_param(opts.rank_mode, opts.dynamic_param)
    opts.linear_policy()  # the rank settings
    opts.conv_policy()
    if opts.conv_rank is not None and opts.conv_rank < 0:
        raise OptionError(f"conv_rank {opts.conv_rank}: give -1 for the same as rank, 0 to leave k×k convolutions out, "
                          "or a rank above 0")
    if not (isinstance(opts.min_delta, (int, float)) and opts.min_delta >= 0 and math.isfinite(opts.min_delta)):
        raise OptionError(f"min_delta must be a finite number ≥ 0 (got {opts.min_delta}); give e.g. "
                          f"{DEFAULT_MIN_DELTA:g}, or 0 to keep every changed layer")
    if opts.clamp_quantile is not None and not 0.0 < opts.clamp_quantile < 1.0:
        raise OptionError(f"clamp quantile must be in (0, 1) (got {opts.clamp_quantile}); give e.g. 0.99, or leave "
                          "the clamp off")
    if opts.method not in METHODS:
        raise OptionError(f"unknown SVD method {opts.method!r}; choose one of {', '.join(METHODS)}")
    return opts


def plan_layer(key: str, shape: tuple[int, ...], dtype: torch.dtype, opts: ExtractOptions) -> LayerPlan:
    kind = module_kind(key, shape)
    if not dtype.is_floating_point:
        return LayerPlan(key, None, "other", "drop", reason="not a floating-point tensor")
    if kind == "bias":
        module = keymaps.DIFFUSION + key[: -len(".bias")]
        if opts.store_diff:
            return LayerPlan(key, module, kind, "diff_b")
        return LayerPlan(key, module, kind, "drop", reason="biases are left out (store_diff off)")
    module = keymaps.module_of_key(key)
    if module is None:
        return LayerPlan(key, None, "other", "drop", reason="no LoRA key can address this tensor")
    if kind == "vector" or keymaps.is_parameter_name(key):  # a whole parameter (Wan modulation): a diff only
        if opts.store_diff:
            return LayerPlan(key, module, kind, "diff")
        return LayerPlan(key, module, kind, "drop", reason="1-D weights are left out (store_diff off)")
    if kind == "conv":
        if opts.conv_rank == 0:
            return LayerPlan(key, module, kind, "drop", reason="conv_rank 0 leaves k×k convolutions out")
        return LayerPlan(key, module, kind, "lowrank", opts.conv_policy())
    return LayerPlan(key, module, kind, "lowrank", opts.linear_policy())


def plan_extraction(pair: ModelPair, opts: ExtractOptions) -> list[LayerPlan]:
    return [plan_layer(k, pair.info(k).shape, pair.info(k).dtype, opts) for k in pair.keys]


def _key_seed(seed: int, key: str) -> int:
    """A per-layer seed independent of layer order (so any subset of layers extracts identically)."""
    from .svd import key_seed  # `optimal_at_rank` seeds each layer the same way

    return key_seed(seed, key)


def _cast(t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    out = cast_for_output(t, dtype)
    if dtype.is_floating_point and not bool(torch.isfinite(out).all()):
        raise WeightsmithError(
            f"{key}: the LoRA factors overflow {dtype_name(dtype)}; extract with dtype bf16 or fp32"
        )
    return out


def extract_layer(plan: LayerPlan, delta: torch.Tensor, norm: float, opts: ExtractOptions, lora: LoRA) -> ModuleReport:
    """Factorise (or store) one layer's change into `lora`; the module's report, errors measured on what
    was stored."""
    shape = tuple(delta.shape)
    if plan.action in ("diff", "diff_b"):
        stored = _cast(delta, opts.dtype, plan.key)
        err = frobenius(delta - stored.float()) / norm
        md = lora.module(plan.module)
        if plan.action == "diff":
            md.diff = stored.cpu()
        else:
            md.diff_b = stored.cpu()
        return ModuleReport(plan.key, shape, plan.kind, "diff", norm, err, 0.0, True, None, 1.0, "diff")
    mat = delta.reshape(shape[0], -1)
    lr = low_rank(mat, plan.policy, method=opts.method, seed=_key_seed(opts.seed, plan.key), total_sq=norm * norm)
    up, down = lr.up, lr.down
    if opts.clamp_quantile:
        up, down = clamp_factors(up, down, opts.clamp_quantile)
    up, down = _cast(up, opts.dtype, plan.key), _cast(down, opts.dtype, plan.key)
    err = math.sqrt(residual_sq_norm(mat, up.float(), down.float())) / norm
    r = lr.rank
    lora.module(plan.module).terms.append(
        LoraTerm(up=up.reshape(shape[0], r, *([1] * (len(shape) - 2))).cpu(),
                 down=down.reshape(r, *shape[1:]).cpu(), alpha=float(r))
    )
    note = "" if lr.target_met else f"target not reached within the rank cap {plan.policy.cap(min(mat.shape))}"
    # "optimal" as validate computes it for this LoRA: the factorisation's own value where it is that very
    # computation (a fixed rank with the default seed and method), else computed the same way
    from .svd import is_optimal_at_rank, optimal_at_rank

    if is_optimal_at_rank(lr, plan.policy, opts.method, opts.seed, tuple(mat.shape)):
        opt, exact = lr.optimal_error, lr.optimal_is_exact
    else:
        opt, exact = optimal_at_rank(mat, r, plan.key) if r else (1.0, True)
    return ModuleReport(plan.key, shape, plan.kind, "lowrank", norm, err, opt, exact,
                        r, lr.energy, lr.method, note)


@torch.no_grad()  # sources may hand out nn.Parameters (ModelPatchers): no autograd graphs
def extract_lora(
    base,
    tuned,
    rank: int = 64,
    conv_rank: int | None = None,
    rank_mode: str = "fixed",
    energy: float = 0.99,
    error: float = 0.05,
    max_rank: int | None = None,
    min_delta: float = DEFAULT_MIN_DELTA,
    store_diff: bool = True,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    clamp_quantile: float | None = None,
    dtype: str | torch.dtype = "bf16",
    method: str = "auto",
    seed: int = 0,
    missing: str = "auto",
    dynamic_param: float | None = None,
    size: int | None = None,
) -> tuple[LoRA, ExtractionReport]:
    """The LoRA taking `base` to `tuned` (paths, state dicts or TensorSources; checkpoint prefixes do not
    matter), and its reconstruction report. Identical models give an empty LoRA and a report saying so;
    models of different architectures raise MismatchError naming the keys; `missing` decides keys only one
    model has (auto: skipped and listed between related bases such as Flux dev and schnell; skip; error).
    rank_mode "budget" allocates ranks across layers for a file of `size` bytes (see budget.py): a first
    pass sketches every layer's spectrum, a second extracts at the allocated ranks."""
    opts = check_options(ExtractOptions(rank, conv_rank, rank_mode, energy, error, max_rank, min_delta, store_diff,
                                        clamp_quantile or None, _output_dtype(dtype), method, seed, dynamic_param,
                                        size))
    device = resolve_device(device)  # a missing GPU fails here, before any file is read
    progress = progress or no_progress
    t0 = time.perf_counter()
    pair = pair_models(base, tuned, missing)
    plans = plan_extraction(pair, opts)
    lora = LoRA(arch=lora_arch(pair.arch), source_format="extracted")
    report = ExtractionReport("extraction", pair.arch, settings=opts.as_metadata() | {"device": str(device)},
                              decoded=pair.decoded(), unpaired=pair.unpaired)
    steps = 2 * len(plans) if opts.rank_mode == "budget" else len(plans)
    if opts.rank_mode == "budget":
        plans, report.budget = budget_plans(pair, plans, opts, device, lambda i, _n: progress(i, steps))
    done = steps - len(plans)
    for i, plan in enumerate(plans):
        progress(done + i, steps)
        report.compared += 1
        delta, norm, base_norm = _layer_delta(pair, plan, device)
        verdict = _verdict(pair, plan, delta, norm, base_norm, opts)
        if verdict == "unchanged":
            report.unchanged += 1
        elif verdict is not None:
            report.modules.append(verdict)
        else:
            report.modules.append(extract_layer(plan, delta, norm, opts, lora))
        del delta
    progress(steps, steps)
    report.seconds = time.perf_counter() - t0
    if not report.modules:
        report.message = (f"base and tuned are identical on all {report.compared} tensors: "
                          "nothing to extract, the LoRA is empty")
    elif not lora.modules:
        report.message = (f"no layer changed enough to extract ({len(report.modules)} changed tensors, all "
                          "skipped or left out): the LoRA is empty")
    lora.metadata = {"weightsmith.extract": json.dumps(opts.as_metadata()),
                     "weightsmith.extract_summary": json.dumps(_metadata_summary(report)),
                     "weightsmith.base_arch": pair.arch}
    return lora, report


def _layer_delta(pair: ModelPair, plan: LayerPlan, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """(ΔW in fp32 on `device`, ‖ΔW‖, ‖W_base‖) of one layer."""
    b = pair.base.get(plan.key)  # stored dtype; a file's tensor stays memory-mapped on the CPU
    tuned = pair.tuned.get(plan.key)
    # a decoded weight (a quantized file) is already a fresh fp32 tensor of its own: ΔW is computed in it
    # (a copy of it was a third layer-sized buffer: 264 MB for Flux's largest, measured at full size)
    fresh = (device.type == "cpu" and tuned.dtype == torch.float32
             and getattr(pair.tuned, "encoding", lambda _: None)(plan.key) is not None)
    delta = subtract_(tuned if fresh else tuned.to(device, torch.float32, copy=True), b)  # one fp32 copy
    return delta, frobenius(delta), frobenius(b)


def _verdict(pair: ModelPair, plan: LayerPlan, delta: torch.Tensor, norm: float, base_norm: float,
             opts: ExtractOptions) -> ModuleReport | str | None:
    """What happens to a layer other than extraction: its report (non-finite, skipped, dropped), the string
    "unchanged", or None when it is to be extracted."""
    shape = tuple(delta.shape)
    where = nonfinite_inputs(pair, plan.key, delta, norm)
    if where:  # skipped and reported (the SVD would fail); strict sources refused it on reading
        return nonfinite_module(plan.key, shape, plan.kind, where)
    if norm == 0.0:
        return "unchanged"
    if norm <= opts.min_delta * base_norm:
        return ModuleReport(plan.key, shape, plan.kind, "skipped", norm, 1.0,
                            note=f"|dW|/|W| = {norm / base_norm:.3g} below min_delta")
    if plan.action == "drop":
        return ModuleReport(plan.key, shape, plan.kind, "dropped", norm, 1.0, note=plan.reason)
    return None


ALPHA_BYTES = 4  # alphas are stored as fp32 scalars


def _lowrank_overhead(module: str, m: int, n: int, cap: int, size: int) -> int:
    """Header entries and alpha of one low-rank module (ComfyUI key names; others are as long)."""
    return ALPHA_BYTES + sum(tensor_header_bytes(f"{module}.{part}", shape, size) for part, shape in
                             (("lora_up.weight", (m, cap)), ("lora_down.weight", (cap, n)), ("alpha", ())))


def _sketch(pair: ModelPair, plan: LayerPlan, width: int, opts: ExtractOptions, device: torch.device,
            delta: torch.Tensor | None = None) -> LayerSpectrum:
    """A layer's leading `width` singular values from a randomized sketch (never a full SVD)."""
    if delta is None:
        delta, _, _ = _layer_delta(pair, plan, device)
    mat = delta.reshape(delta.shape[0], -1)
    m, n = mat.shape
    cap = plan.policy.cap(min(m, n))
    width = min(width, cap)
    _, s, _ = randomized_svd(mat, width + oversampling(width), seed=_key_seed(opts.seed, plan.key))
    total_sq = frobenius(delta) ** 2
    return LayerSpectrum(plan.key, m, n, cap, total_sq, s[:width].double().cpu(), complete=width >= cap,
                         overhead=_lowrank_overhead(plan.module, m, n, cap, opts.size or 0))


@torch.no_grad()
def budget_plans(pair: ModelPair, plans: list[LayerPlan], opts: ExtractOptions, device: torch.device,
                 progress: ProgressFn) -> tuple[list[LayerPlan], dict]:
    """The extraction plans with each low-rank layer's rank allocated for a file of `opts.size` bytes, and
    the allocation's report. Pass over every layer: ΔW, the fixed part of the file (full diffs, alphas,
    header), a randomized sketch of each changed low-rank layer; then the greedy allocation, widening the
    sketches of layers it would give more rank than they show (see budget.py)."""
    assert opts.size is not None
    elem = opts.dtype.itemsize
    fixed = HEADER_SLACK + METADATA_ALLOWANCE
    candidates: list[LayerPlan] = []
    shapes: dict[str, tuple[int, int]] = {}
    for plan in plans:
        info = pair.info(plan.key)
        if plan.action in ("diff", "diff_b"):
            fixed += info.numel * elem + tensor_header_bytes(f"{plan.module}.{plan.action}", info.shape, opts.size)
        elif plan.action == "lowrank":
            m = info.shape[0]
            n = info.numel // max(m, 1)
            candidates.append(plan)
            shapes[plan.key] = (m, n)
    budget = opts.size - fixed
    if budget <= 0:
        raise OptionError(f"size {format_size(opts.size)} leaves nothing for the LoRA's ranks: its fixed part (full "
                          f"diffs of 1-D weights and biases, header) takes {format_size(fixed)}; give a "
                          "larger --size, or leave the diffs out (--no-diff / store_diff off)")
    width0 = initial_width([(m, n, p.policy.cap(min(m, n))) for p in candidates
                            for m, n in [shapes[p.key]]], budget, elem)
    spectra: dict[str, LayerSpectrum] = {}
    for i, plan in enumerate(plans):
        progress(i, len(plans))
        if plan.action not in ("lowrank", "diff", "diff_b"):
            continue
        delta, norm, base_norm = _layer_delta(pair, plan, device)
        stored = _verdict(pair, plan, delta, norm, base_norm, opts) is None
        if stored and plan.action == "lowrank":
            spectra[plan.key] = _sketch(pair, plan, width0, opts, device, delta)
        elif not stored and plan.action != "lowrank":  # an unchanged diff: its bytes go to the ranks
            info = pair.info(plan.key)
            budget += info.numel * elem + tensor_header_bytes(f"{plan.module}.{plan.action}", info.shape, opts.size)
            fixed -= info.numel * elem + tensor_header_bytes(f"{plan.module}.{plan.action}", info.shape, opts.size)
        del delta
    by_key = {p.key: p for p in plans}
    alloc = allocate(list(spectra.values()), budget, elem)
    while alloc.limited:  # an allocation reached a sketch's width: sketch those layers twice as wide
        for key in alloc.limited:
            progress(len(plans), len(plans))  # (a node's Interrupt is honoured here too)
            spectra[key] = _sketch(pair, by_key[key], 2 * spectra[key].width, opts, device)
        alloc = allocate(list(spectra.values()), budget, elem)
    new_plans = []
    for plan in plans:
        r = alloc.ranks.get(plan.key)
        if r is None:
            new_plans.append(plan)
        elif r == 0:
            new_plans.append(LayerPlan(plan.key, plan.module, plan.kind, "drop",
                                       reason="the size budget left no rank for this layer"))
        else:
            new_plans.append(LayerPlan(plan.key, plan.module, plan.kind, "lowrank", RankPolicy("fixed", r)))
    return new_plans, _budget_report(alloc, opts.size, fixed)


def _budget_report(alloc: Allocation, size: int, fixed: int) -> dict:
    ranks = [r for r in alloc.ranks.values() if r]
    estimated = fixed + alloc.rank_bytes
    rank_range = f"{min(ranks)}-{max(ranks)}" if ranks else "none"
    lines = [f"size budget {format_size(size)}: ranks {rank_range} over {len(ranks)} layers "
             f"({format_size(alloc.rank_bytes)} of factors + {format_size(fixed)} fixed, about "
             f"{format_size(estimated)}); estimated relative error {alloc.relative_error:.4g} vs "
             f"{alloc.uniform_relative_error:.4g} at the best uniform rank of that size ({alloc.uniform_rank})"
             + (" (the uniform ranks were better here and are used)" if alloc.chose == "uniform" else "")]
    return {"size": size, "fixed_bytes": fixed, "rank_bytes": alloc.rank_bytes, "estimated_bytes": estimated,
            "allocation": alloc.chose, "relative_error": alloc.relative_error,
            "uniform_rank": alloc.uniform_rank, "uniform_relative_error": alloc.uniform_relative_error,
            "ranks": dict(alloc.ranks), "lines": lines}


def leave_out(lora: LoRA, report: ExtractionReport, modules: list[str], reason: str, bias_only: bool = False) -> None:
    """Remove `modules` (or only their bias changes) from an extracted LoRA after the fact, e.g. because a
    file format has no name for them, marking what they covered as dropped so the report stays true to
    what is saved."""
    keys = set()
    for name in modules:
        md = lora.modules.get(name)
        if md is None:
            continue
        if md.diff_b is not None:
            keys.add(keymaps.bias_key(name))
            md.diff_b = None
        if not bias_only and (md.terms or md.diff is not None):
            keys.add(keymaps.weight_key(name))
            md.terms, md.diff = [], None
        if md.is_empty():
            del lora.modules[name]
    for m in report.modules:
        if m.key in keys:
            m.status, m.error, m.optimal_error, m.rank, m.energy, m.method, m.note = (
                "dropped", 1.0, None, None, None, "", reason)


def _metadata_summary(report: ExtractionReport) -> dict:
    s = report.summary()
    keep = ("arch", "changed", "lowrank", "diff", "skipped", "dropped", "nonfinite", "rank_min", "rank_max",
            "error_global", "error_weighted", "optimal_global")
    return {k: s[k] for k in keep}

"""Merge planning, rules and presets, key matching across layouts, policies, streaming output (no partial
file), dtypes, the report and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weightsmith.arch import detect_arch
from weightsmith.cli import main as cli_main
from weightsmith.errors import MismatchError, OutputPathError, WeightsmithError
from weightsmith.merge import execute_merge, merge, parse_rule, plan_merge
from weightsmith.merge.rules import expand_alias, parse_rules, resolve
from weightsmith.safetensors_io import write_safetensors
from weightsmith.sources import open_model
from weightsmith.testmodels import FluxConfig, finetune, flux_diffusers_shapes, flux_state_dict, random_state_dict

CFG = FluxConfig(hidden=64)


@pytest.fixture(scope="module")
def dev_schnell():
    dev = flux_state_dict(CFG, "dev", seed=0)
    schnell = finetune(flux_state_dict(CFG, "schnell", seed=0), seed=5)
    return dev, schnell


# --------------------------------------------------------------------------------------------------
# rules


def test_parse_rules():
    r = parse_rule("double_blocks\\.0\\.=dare(drop_rate=0.9, seed=7)")
    assert (r.kind, r.method, r.params) == ("method", "dare", {"drop_rate": 0.9, "seed": 7})
    assert r.matches("double_blocks.0.img_attn.qkv.weight") and not r.matches("double_blocks.10.x")
    assert parse_rule("@guidance=take:first").take is None
    assert parse_rule("txt_=take:B").take == 1 and parse_rule("txt_=take:2").take == 1
    assert parse_rule("img=weight:0.7, 0.3").weights == (0.7, 0.3)
    assert parse_rule("a=b=drop").pattern == "a=b"  # a regex may contain '='
    assert parse_rule("@single.3=ties").matches("single_transformer_blocks.3.attn.to_q.weight")
    assert parse_rule("@img=ties").matches("double_blocks.2.img_mlp.0.weight")
    assert not parse_rule("@img=ties").matches("double_blocks.2.txt_mlp.0.weight")
    assert parse_rule("@in.4=take:A").matches("input_blocks.4.1.proj_in.weight")
    assert parse_rules("# comment\n\n@mid=drop\n")[0].kind == "drop"
    for bad, msg in (("x=nosuchmethod", "unknown merge method"), ("(=drop", "bad regex"), ("@nogroup=drop", "unknown key group"),
                     ("x=take:0", "numbered from 1"), ("x=ties(bogus=1)", "no parameter bogus"), ("no action", "REGEX=ACTION")):
        with pytest.raises(WeightsmithError, match=msg):
            parse_rule(bad)


def test_first_match_wins_separately_for_method_and_weights():
    rules = parse_rules(["@double=weight:0.9,0.1", "@img=ties", "double_blocks=take:B", "@double=weight:0.1,0.9"])
    action, weight = resolve("double_blocks.0.img_attn.qkv.weight", rules)
    assert action.text == "@img=ties" and weight.weights == (0.9, 0.1)
    action, weight = resolve("double_blocks.0.txt_attn.qkv.weight", rules)
    assert action.take == 1
    assert resolve("single_blocks.0.linear1.weight", rules) == (None, None)
    assert expand_alias("plain") == "plain"


# --------------------------------------------------------------------------------------------------
# the guidance case: dev + schnell


@pytest.mark.parametrize("order", ["dev_first", "schnell_first"])
def test_guidance_preset_keeps_dev_or_drops_to_schnell(dev_schnell, tmp_path, order):
    dev, schnell = dev_schnell
    inputs = [dev, schnell] if order == "dev_first" else [schnell, dev]
    keep = tmp_path / "keep.safetensors"
    rep = merge(inputs, keep, presets="flux-guidance-keep", dtype="fp32")
    out = load_file(keep)
    for k in ("guidance_in.in_layer.weight", "guidance_in.out_layer.bias"):
        assert torch.equal(out[k], dev[k])  # from the model that has one, whatever its position
    assert detect_arch(open_model(keep)).arch == "flux-dev"
    k = "double_blocks.0.img_attn.qkv.weight"
    assert torch.allclose(out[k], 0.5 * dev[k] + 0.5 * schnell[k], atol=1e-7)
    assert rep.to_dict()["plan"]["rules"][0]["keys"] == 4
    drop = tmp_path / "drop.safetensors"
    merge(inputs, drop, presets="flux-guidance-drop", dtype="fp32")
    assert not any(k.startswith("guidance_in.") for k in load_file(drop))
    assert detect_arch(open_model(drop)).arch == "flux-schnell"


def test_missing_key_policies(dev_schnell, tmp_path):
    dev, schnell = dev_schnell
    plan = plan_merge([schnell, dev], missing_policy="take")
    assert plan.only_in == {k: ["B"] for k in dev if k.startswith("guidance_in.")}
    assert {kp.decided_by for kp in plan.keys if kp.name.startswith("guidance_in.")} == {"missing: taken from B"}
    plan = plan_merge([dev, schnell], missing_policy="drop")
    assert not any(kp.name.startswith("guidance_in") for kp in plan.output_keys())
    with pytest.raises(MismatchError, match=r"'guidance_in\.in_layer\.weight' is only in A"):
        plan_merge([dev, schnell], missing_policy="error")
    # a rule handles it even under the error policy
    plan = plan_merge([dev, schnell], missing_policy="error", rules=["@guidance=take:A"])
    assert plan.counts()["take"] == 4
    with pytest.raises(MismatchError, match="input B has no key"):
        plan_merge([dev, schnell], rules=["@guidance=take:B"])


def test_shape_mismatch_is_an_error_unless_a_rule_takes_one(tmp_path):
    a = flux_state_dict(CFG, "dev", seed=0)
    b = flux_state_dict(FluxConfig(hidden=64, in_channels=16), "dev", seed=1)
    with pytest.raises(MismatchError, match=r"'img_in\.weight': shapes differ \(A \[64, 64\], B \[64, 16\]\)"):
        plan_merge([a, b])
    out = tmp_path / "o.safetensors"
    merge([a, b], out, rules=[r"^img_in\.weight$=take:A"], dtype="fp32")
    assert torch.equal(load_file(out)["img_in.weight"], a["img_in.weight"])
    assert not out.with_name("x").exists()


def test_dtype_kinds_and_non_float_keys(tmp_path):
    a = {"w": torch.ones(4, 4), "ids": torch.arange(4)}
    b = {"w": torch.zeros(4, 4), "ids": torch.arange(4) + 10}
    out = tmp_path / "o.safetensors"
    rep = merge([a, b], out)
    got = load_file(out)
    assert torch.equal(got["ids"], a["ids"]) and got["ids"].dtype == torch.int64
    assert any(k["decided_by"] == "non-float: copied from A" for k in rep.to_dict()["keys_detail"])
    with pytest.raises(MismatchError, match="dtypes of different kinds"):
        plan_merge([a, {"w": b["w"], "ids": torch.zeros(4)}])


def test_different_naming_or_architecture_refused():
    bfl = flux_state_dict(CFG, "dev")
    diffusers = random_state_dict(flux_diffusers_shapes(CFG))
    with pytest.raises(MismatchError, match="different key naming"):
        plan_merge([bfl, diffusers])


# --------------------------------------------------------------------------------------------------
# layouts: a full checkpoint, a sharded folder with other split points and an index file line up


def _shard(sd: dict, folder: Path, n: int, prefix: str = "", index: bool = False) -> Path:
    folder.mkdir()
    keys = list(sd)
    per = -(-len(keys) // n)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05}-of-{n:05}.safetensors"
        part = {prefix + k: sd[k] for k in keys[i * per:(i + 1) * per]}
        write_safetensors(folder / name, part)
        weight_map.update(dict.fromkeys(part, name))
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return folder / "model.safetensors.index.json"
    return folder


def test_keys_match_across_layouts_and_prefix_follows_a(tmp_path):
    a = flux_state_dict(CFG, "dev", seed=0)
    b = finetune(a, seed=1)
    c = finetune(a, seed=2)
    te = {"cond_stage_model.transformer.w": torch.randn(8, 8), "first_stage_model.decoder.w": torch.randn(3, 3)}
    ckpt = tmp_path / "a_ckpt.safetensors"
    write_safetensors(ckpt, {**{"model.diffusion_model." + k: v for k, v in a.items()}, **te})
    folder = _shard(b, tmp_path / "b_shards", 3)
    index = _shard(c, tmp_path / "c_index", 4, prefix="model.diffusion_model.", index=True)
    out = tmp_path / "o.safetensors"
    rep = merge([ckpt, folder, index], out, weights=[0.5, 0.25, 0.25], dtype="fp32")
    got = load_file(out)
    assert set(got) == {"model.diffusion_model." + k for k in a} | set(te)
    for k in a:
        want = 0.5 * a[k] + 0.25 * b[k] + 0.25 * c[k]
        assert torch.allclose(got["model.diffusion_model." + k], want, rtol=0, atol=1e-6), k
    for k, v in te.items():
        assert torch.equal(got[k], v)  # copied from A
    assert {r["group"] for r in rep.groups()} >= {"te", "vae", "double_blocks.0"}
    # others: drop, and merge (text encoders merged by their raw names where inputs have them)
    plan = plan_merge([ckpt, folder], others="drop")
    assert not any(kp.part != "unet" for kp in plan.keys)
    ckpt2 = tmp_path / "b_ckpt.safetensors"
    write_safetensors(ckpt2, {**{"model.diffusion_model." + k: v for k, v in b.items()},
                              **{k: v + 1 for k, v in te.items()}})
    out2 = tmp_path / "o2.safetensors"
    merge([ckpt, ckpt2], out2, others="merge", dtype="fp32")
    w = "cond_stage_model.transformer.w"
    assert torch.allclose(load_file(out2)[w], te[w] + 0.5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# execution: streaming, atomic, dtypes, report


def test_interrupt_leaves_no_file(dev_schnell, tmp_path):
    dev, schnell = dev_schnell
    out = tmp_path / "o.safetensors"
    plan = plan_merge([dev, finetune(dev, 3)])

    def progress(done, total):
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_merge(plan, out, progress=progress)
    assert os.listdir(tmp_path) == []
    # and an input file is never the output
    a = tmp_path / "a.safetensors"
    write_safetensors(a, dev)
    with pytest.raises(OutputPathError, match="one of the inputs"):
        merge([a, schnell], a, overwrite=True)


def test_output_dtypes(dev_schnell, tmp_path):
    dev, _ = dev_schnell
    b = finetune(dev, seed=9)
    a16 = {k: v.to(torch.bfloat16) for k, v in dev.items()}
    for dtype, want in (("keep", torch.bfloat16), ("fp16", torch.float16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        out = tmp_path / f"o_{dtype}.safetensors"
        merge([a16, b], out, dtype=None if dtype == "keep" else dtype)
        got = load_file(out)
        k = "single_blocks.0.linear1.weight"
        assert got[k].dtype == want
        ref = (0.5 * a16[k].float() + 0.5 * b[k]).to(want)
        assert torch.equal(got[k].view(torch.uint8), ref.view(torch.uint8))  # one rounding, from fp32


def test_report_contents_and_nonfinite(tmp_path):
    a = {"blocks.0.w": torch.ones(300, 300), "blocks.1.w": torch.ones(8)}
    b = {"blocks.0.w": -torch.ones(300, 300), "blocks.1.w": torch.full((8,), float("nan")), "extra": torch.ones(2)}
    rep = merge([a, b], None, weights=[0.75, 0.25], params={"normalize": False})
    groups = {g["group"]: g for g in rep.groups()}
    assert groups["blocks.0"]["cos(A,B)"] == pytest.approx(-1.0)
    assert groups["blocks.0"]["change"] == pytest.approx(0.5)  # 0.75·1 + 0.25·(−1) = 0.5: |0.5 − 1| / 1
    d = rep.to_dict()
    assert d["dry_run"] and d["keys"] == {"merged": 2, "taken": 1, "dropped": 0}
    assert d["nonfinite_keys"] == [{"key": "blocks.1.w", "inputs_with_nonfinite": ["B"]}]
    assert d["plan"]["only_in"] == {"extra": ["B"]}
    assert "NaN/Inf" in rep.table() and rep.chart().shape[2] == 3
    with pytest.raises(Exception, match="NaN or Inf"):
        src = open_model(_write(tmp_path / "nan.safetensors", b))
        src.set_nonfinite_policy("error")
        merge([a, src], None)


def _write(path, sd):
    write_safetensors(path, sd)
    return path


ADD = {"normalize": False}  # weights 1, 1: the plain sum


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "row_blocks"])
def test_overflow_of_the_output_dtype_is_refused_after_the_cast(tmp_path, chunk):
    """Finiteness is judged on the values as written: 1e5 is finite in fp32 but inf in fp16. The merge
    stops naming the key and the dtype to widen; nothing is written. NaN from an input is still reported."""
    a = {"blocks.0.w": torch.full((64, 64), 3e4), "blocks.1.w": torch.ones(8)}
    b = {"blocks.0.w": torch.full((64, 64), 7e4), "blocks.1.w": torch.ones(8)}
    out = tmp_path / "o.safetensors"
    with pytest.raises(WeightsmithError, match=r"'blocks\.0\.w'.*fp16.*wider --dtype") as e:
        execute_merge(plan_merge([a, b], weights=[1.0, 1.0], params=ADD), out, "fp16", chunk_elems=chunk)
    assert "Nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    rep = execute_merge(plan_merge([a, b], weights=[1.0, 1.0], params=ADD), out, "fp32", chunk_elems=chunk)  # fits
    assert rep.nonfinite_keys() == [] and float(load_file(out)["blocks.0.w"][0, 0]) == 1e5
    b["blocks.1.w"] = torch.full((8,), float("nan"))
    rep = execute_merge(plan_merge([a, b], weights=[0.5, 0.5]), None, "fp16", chunk_elems=chunk)
    assert rep.nonfinite_keys() == ["blocks.1.w"]
    with pytest.raises(WeightsmithError, match=r"'blocks\.0\.w'.*fp16"):  # a taken key cast to fp16 too
        execute_merge(plan_merge([a, b], rules=["blocks.0=take:B"]), None, "fp16")


def test_report_and_chart_paths_are_checked_before_the_merge(tmp_path, dev_schnell, capsys):
    a, b = _write(tmp_path / "a.safetensors", dev_schnell[0]), _write(tmp_path / "b.safetensors", dev_schnell[1])
    out = tmp_path / "m.safetensors"
    (tmp_path / "old.json").write_text("{}")
    for extra in (["--report", str(b)], ["--report", str(tmp_path / "old.json")], ["--chart", str(out)],
                  ["--report", str(tmp_path / "r.png"), "--chart", str(tmp_path / "r.png")],
                  ["--report", str(tmp_path / "missing" / "r.json")]):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert cli_main(["merge", str(a), str(b), "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and ("choose" in err or "create" in err), err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no model written before the refusal


def test_plan_validation_errors(dev_schnell):
    dev, schnell = dev_schnell
    with pytest.raises(WeightsmithError, match="takes 3 models"):
        plan_merge([dev, schnell], "add_difference")
    with pytest.raises(WeightsmithError, match="one weight per model"):
        plan_merge([dev, schnell], weights="0.5")
    with pytest.raises(WeightsmithError, match="has no parameter density"):
        plan_merge([dev, schnell], params="density=0.3")
    with pytest.raises(WeightsmithError, match="base 'C' names model C, but only 2 inputs are given"):
        plan_merge([dev, schnell], "ties", params="base=C")
    with pytest.raises(WeightsmithError, match="every key dropped"):
        plan_merge([dev, schnell], rules=[".=drop"])
    plan = plan_merge([dev, schnell], rules=["nomatch=drop"])
    assert "rule 'nomatch=drop' matched no key" in plan.notes


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli(dev_schnell, tmp_path, capsys):
    dev, schnell = dev_schnell
    a, b = _write(tmp_path / "dev.safetensors", dev), _write(tmp_path / "schnell.safetensors", schnell)
    out, report, chart = tmp_path / "out.safetensors", tmp_path / "r.json", tmp_path / "c.png"
    rc = cli_main(["merge", str(a), str(b), "-o", str(out), "--preset", "flux-guidance-keep", "--dtype", "bf16",
                   "--rule", "@single=weight:0.2,0.8", "--report", str(report), "--chart", str(chart)])
    assert rc == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("guidance_in.in_layer.weight").dtype == torch.bfloat16
        assert json.loads(f.metadata()["weightsmith.merge"])["rules"] == ["@single=weight:0.2,0.8", "@guidance=take:first"]
    k = "single_blocks.0.linear2.weight"
    assert torch.equal(load_file(out)[k], (0.2 * dev[k] + 0.8 * schnell[k]).to(torch.bfloat16))
    data = json.loads(report.read_text())
    assert data["keys"]["taken"] == 4 and chart.stat().st_size > 1000
    assert "per key group" in capsys.readouterr().out
    # dry run and plan only write no model
    assert cli_main(["merge", str(a), str(b), "-o", str(tmp_path / "no.safetensors"), "--dry-run"]) == 0
    assert cli_main(["merge", str(a), str(b), "--plan-only", "--method", "ties", "--param", "density=0.5"]) == 0
    assert not (tmp_path / "no.safetensors").exists()
    assert "4 keys not in every input" in capsys.readouterr().out
    assert cli_main(["merge", "--list-methods", "--list-presets", "--list-groups"]) == 0
    assert "lossless_min" in capsys.readouterr().out
    # user errors: exit 2 with a message, nothing written
    assert cli_main(["merge", str(a), str(b), "-o", str(out)]) == 2  # exists
    assert cli_main(["merge", str(a), str(b), "-o", str(tmp_path / "x.safetensors"), "--rule", "x=bogus"]) == 2
    assert "unknown merge method 'bogus'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "dev.safetensors", "out.safetensors", "r.json",
                                                          "schnell.safetensors"]


def test_lossless_methods_worked_example():
    a = {"w": torch.tensor([0.2, -0.02])}
    b = {"w": torch.tensor([0.25, -0.06])}
    c = {"w": torch.tensor([0.3, -0.03])}
    out_min = merge([a, b, c], None, "lossless_min")
    assert out_min.to_dict()["keys"]["merged"] == 1
    from weightsmith.merge import METHODS

    assert METHODS["lossless_min"].fn([a["w"], b["w"], c["w"]], [1, 1, 1]).tolist() == pytest.approx([0.25, -0.03])
    assert METHODS["lossless_max"].fn([a["w"], b["w"], c["w"]], [1, 1, 1]).tolist() == pytest.approx([0.3, -0.06])


def test_runs_under_inference_mode_with_worker_threads(tmp_path):
    """ComfyUI executes nodes under torch.inference_mode; the row-block workers must follow it."""
    a, b = {"w": torch.randn(600, 600)}, {"w": torch.randn(600, 600)}
    plan = plan_merge([a, b])
    with torch.inference_mode():
        execute_merge(plan, tmp_path / "o.safetensors", threads=2, chunk_elems=1 << 12)
    assert torch.equal(load_file(tmp_path / "o.safetensors")["w"], a["w"] * 0.5 + b["w"] * 0.5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sd_unet_block_rules_and_presets(kind, tmp_path):
    from weightsmith.sdunet import sd_unet_state_dict

    a = sd_unet_state_dict(kind, "tiny", seed=1)
    b = sd_unet_state_dict(kind, "tiny", seed=2)
    rules = ["@in=weight:0.9,0.1", "@mid=weight:0.5,0.5", "@out=weight:0.2,0.8"]
    out = tmp_path / "o.safetensors"
    rep = merge([a, b], out, rules=rules, presets="sd-mid-from-a", dtype="fp32")
    got = load_file(out)
    seen = set()
    for k in a:
        if k.startswith("input_blocks."):
            want, seen = 0.9 * a[k] + 0.1 * b[k], seen | {"in"}
        elif k.startswith("middle_block."):
            want, seen = a[k], seen | {"mid"}  # the user's @mid weight rule still applies, but the preset's take wins the action
        elif k.startswith("output_blocks."):
            want, seen = 0.2 * a[k] + 0.8 * b[k], seen | {"out"}
        else:
            want = 0.5 * a[k] + 0.5 * b[k]
        assert torch.allclose(got[k], want, rtol=0, atol=1e-6), k
    assert {"in", "out"} <= seen  # (the tiny SD1.5 has no middle block)
    groups = {g["group"] for g in rep.groups()}
    assert {"input_blocks.1", "output_blocks.0", "time_embed"} <= groups
    assert detect_arch(open_model(out)).arch == kind

"""Seeded generators of malformed and unusual weight files for the CLI fuzz test (tests/test_fuzz_cli.py).

Every generator takes a `random.Random` and a folder and writes one input there; the result is a `Case`:
the path to give the CLI, the role it plays (`model` where a model goes, `lora` where a LoRA goes) and a
name saying what was done to it. Families:

- header: structured JSON mutations of a valid small safetensors header (dtypes, shapes, offsets, entry
  types, nesting, `__metadata__`, key names, header length, trailing bytes), some keeping the file
  consistent (offsets and data laid out again) so that the odd value reaches the commands' logic;
- tensors: consistent files holding odd tensors (zero-element, scalars, fp8 with NaN, int/bool factors,
  rank 0, all-zero rows, diffs of the wrong shape, alphas that are NaN or arrays, reshape hints that are
  not JSON);
- bytes: random byte flips and truncations of a whole file;
- shards: `*.safetensors.index.json` files (given by path and as their folder) whose `weight_map` or its
  values are of the wrong type, empty, or name files outside, missing or not regular;
- torch: zip checkpoints written by `torch.save` with odd contents, random bytes named `.ckpt`,
  safetensors named `.bin`;
- special: a FIFO, a socket, `/dev/null`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

VALID_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"]
ODD_DTYPES = ["C64", "F8_E8M0", "F4", "U64", "", "f32", None, 5, ["F32"], {"F32": 1}]
ODD_SHAPES = [[], [0], [0, 64], [64, 0], [True, 64], [False], [2**63], [2**64], [2**63 - 1], [-1], [1.5], ["64"],
              None, "64", 64, [[64]], [1] * 40, [2, 2, 2, 2, 2, 2, 2, 2], [None], {"0": 64}]
ODD_OFFSETS = [None, [], [0], [0, 1, 2], [-4, 0], [4, 0], [0.0, 4.0], [True, False], ["0", "4"], [0, 2**63],
               [2**64, 2**64 + 4], "0,4", {"0": 4}]
ODD_VALUES = [None, [], 1, 1.5, "x", True, {}, [1, 2], {"a": {"b": {}}}]


@dataclass
class Case:
    name: str  # family/mutation
    role: str  # "model" or "lora"
    path: Path  # the input to give the CLI (a file, a folder or an index)


@dataclass
class Seeds:
    """The valid files the mutations start from (written once per session)."""

    model: Path  # a small Flux model, bf16
    lora: Path  # a comfy-format Flux LoRA for that model (rank 4)
    kohya_lora: Path  # the same LoRA in kohya names (alphas, lora_unet_*)
    quantized: list[Path] = field(default_factory=list)  # the model as ComfyUI scaled fp8 / mixed precision
    adapter_lora: Path | None = None  # the kohya LoRA with a LoKr and a LoHa module

    def models(self) -> list[Path]:
        return [self.model, *self.quantized]

    def loras(self) -> list[Path]:
        return [self.lora, self.kohya_lora, *([self.adapter_lora] if self.adapter_lora else [])]

    def pick(self, rng: random.Random) -> tuple[str, Path]:
        """A seed file and its role: the plain model and LoRAs most often, the others now and then."""
        role = rng.choice(["model", "lora"])
        files = self.models() if role == "model" else self.loras()
        return role, files[0] if rng.random() < 0.5 else rng.choice(files)


# ----------------------------------------------------------------------------------- raw safetensors


def parse(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def pack(header: dict | bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def relayout(header: dict, data: bytes, rng: random.Random) -> bytes:
    """Offsets and data laid out again after shapes or dtypes changed: a consistent file whose entries
    hold whatever the mutation put there (when they are well-formed enough to be sized)."""
    out, blob = {}, bytearray()
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            out[key] = entry
            continue
        entry = dict(entry)
        size = _entry_nbytes(entry)
        if size is None:
            out[key] = entry
            continue
        old = entry.get("data_offsets")
        src = b""
        if isinstance(old, list) and len(old) == 2 and all(type(o) is int for o in old) and 0 <= old[0] <= old[1]:
            src = data[old[0] : old[1]]
        chunk = (src * (size // max(1, len(src)) + 1))[:size] if src else bytes(rng.getrandbits(8) for _ in range(size))
        entry["data_offsets"] = [len(blob), len(blob) + size]
        blob += chunk
        out[key] = entry
    return pack(out, bytes(blob))


_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
         "I8": 1, "U8": 1, "BOOL": 1}


def _entry_nbytes(entry: dict) -> int | None:
    shape, dtype = entry.get("shape"), entry.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        return None
    n = _ITEM.get(dtype, 4) if isinstance(dtype, str) else 4
    for s in shape:
        n *= s
    return n if n <= 1 << 22 else None


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


# ----------------------------------------------------------------------------------- header mutations

HeaderMutation = Callable[[random.Random, dict, bytes], tuple[str, bytes]]


def _m_dtype(rng, h, d):
    k = rng.choice(_tensor_keys(h))
    code = rng.choice(VALID_DTYPES + ODD_DTYPES)
    h[k]["dtype"] = code
    if rng.random() < 0.6:
        return f"dtype_relayout={code}", relayout(h, d, rng)
    return f"dtype={code}", pack(h, d)


def _m_shape(rng, h, d):
    k = rng.choice(_tensor_keys(h))
    shape = rng.choice(ODD_SHAPES)
    h[k]["shape"] = shape
    if rng.random() < 0.6:
        return f"shape_relayout={json.dumps(shape)[:20]}", relayout(h, d, rng)
    return f"shape={json.dumps(shape)[:20]}", pack(h, d)


def _m_reshape(rng, h, d):
    """A consistent file with one tensor of another (small) shape: the commands meet a shape they do not expect."""
    k = rng.choice(_tensor_keys(h))
    shape = rng.choice([[0], [1], [3], [64, 63], [2, 3, 4], [1, 1, 1, 1], [0, 0], [65, 64], []])
    h[k]["shape"] = shape
    return f"reshape={shape}", relayout(h, d, rng)


def _m_offsets(rng, h, d):
    keys = _tensor_keys(h)
    k = rng.choice(keys)
    how = rng.choice(["odd", "overlap", "gap", "swap", "shift", "same"])
    if how == "odd":
        h[k]["data_offsets"] = rng.choice(ODD_OFFSETS)
        return f"offsets={json.dumps(h[k]['data_offsets'])[:20]}", pack(h, d)
    if how == "overlap" and len(keys) > 1:  # two tensors of one size sharing bytes
        a, b = rng.sample(keys, 2)
        h[b]["data_offsets"], h[b]["shape"], h[b]["dtype"] = h[a]["data_offsets"], h[a]["shape"], h[a]["dtype"]
        return "offsets_overlap", pack(h, d)
    if how == "gap":  # every tensor after k moves 8 bytes on: 8 bytes nobody owns
        start = h[k]["data_offsets"][1]
        for e in keys:
            o = h[e]["data_offsets"]
            if o[0] >= start:
                h[e]["data_offsets"] = [o[0] + 8, o[1] + 8]
        return "offsets_gap", pack(h, d[:start] + b"\0" * 8 + d[start:])
    if how == "swap":
        o = h[k]["data_offsets"]
        h[k]["data_offsets"] = [o[1], o[0]]
        return "offsets_swapped", pack(h, d)
    if how == "shift":
        o = h[k]["data_offsets"]
        n = rng.choice([1, 2, 4, -1])
        h[k]["data_offsets"] = [o[0] + n, o[1] + n]
        return f"offsets_shift={n}", pack(h, d)
    h[k]["data_offsets"] = [0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]]
    return "offsets_from_zero", pack(h, d)


def _m_entry(rng, h, d):
    k = rng.choice(_tensor_keys(h))
    v = rng.choice(ODD_VALUES + ["deep"])
    if v == "deep":
        h[k] = "DEEP"
        raw = json.dumps(h).replace('"DEEP"', _deep(rng.choice([100, 5000, 100000]), rng.choice(["list", "dict"])))
        return "entry_deep", pack(raw, d)
    h[k] = v
    return f"entry={json.dumps(v)[:20]}", pack(h, d)


def _m_extra_field(rng, h, d):
    k = rng.choice(_tensor_keys(h))
    h[k][rng.choice(["extra", "dtype2", "", "__proto__"])] = rng.choice(ODD_VALUES)
    return "entry_extra_field", pack(h, d)


def _m_whole(rng, h, d):
    what = rng.choice(["list", "string", "number", "null", "true", "deep_list", "deep_dict", "empty_object",
                       "metadata_only", "nan", "bom", "utf16", "not_utf8", "whitespace"])
    raw = {
        "list": "[]", "string": '"x"', "number": "12", "null": "null", "true": "true",
        "deep_list": _deep(rng.choice([1000, 100000]), "list"),
        "deep_dict": _deep(rng.choice([1000, 100000]), "dict"),
        "empty_object": "{}", "metadata_only": '{"__metadata__": {"a": "b"}}', "nan": '{"a": NaN}',
        "whitespace": " " * 64,
    }.get(what)
    if what == "bom":
        return "header_bom", pack(b"\xef\xbb\xbf" + json.dumps(h).encode(), d)
    if what == "utf16":
        return "header_utf16", pack(json.dumps(h).encode("utf-16"), d)
    if what == "not_utf8":
        return "header_not_utf8", pack(json.dumps(h).encode()[:-1] + b"\xff}", d)
    return f"header_{what}", pack(raw, d)


def _m_metadata(rng, h, d):
    choice = rng.choice([
        [], "x", 1, None, {"a": 1}, {"a": None}, {"a": {"b": "c"}}, {"a": ["b"]}, "DEEP",
        {"weightsmith.reshape": "not json"}, {"weightsmith.reshape": "[1, 2]"}, {"weightsmith.reshape": '{"x": "y"}'},
        {"weightsmith.reshape": '{"diffusion_model.img_in": [1e9, 1]}'},
        {"weightsmith.reshape": '{"diffusion_model.img_in": [-1, 64]}'},
        {"weightsmith.reshape": '{"diffusion_model.img_in": "64"}'},
        {"weightsmith.reshape": _deep(100000, "list")},
        {"weightsmith.format": "bogus"}, {"weightsmith.format": "kohya"}, {"weightsmith.format": "diffusers"},
        {"weightsmith.arch": "sd15"}, {"weightsmith.arch": "bogus"}, {"weightsmith.arch": "chroma"},
        {"weightsmith.sd_layout": "sdxl/nonsense"}, {"weightsmith.sd_layout": "bogus"},
        {"ss_network_dim": "x", "ss_network_alpha": "nan"}, {"modelspec.architecture": "\x00"},
    ])
    if choice == "DEEP":
        h["__metadata__"] = "DEEP"
        raw = json.dumps(h).replace('"DEEP"', _deep(100000, "dict"))
        return "metadata_deep", pack(raw, d)
    h["__metadata__"] = choice if not isinstance(choice, dict) else {**h.get("__metadata__", {}), **choice}
    return f"metadata={json.dumps(choice)[:30]}", pack(h, d)


def _m_keys(rng, h, d):
    keys = _tensor_keys(h)
    k = rng.choice(keys)
    new = rng.choice(["", " ", "\x00", "é" * 10, "x" * 5000, "__metadata__x", "..", "/etc/passwd",
                      "unet." + k, k.split(".", 1)[-1], k + ".", "." + k, k.upper(), "a" * 3 + "\n" + k])
    if new in h:
        new = new + "_"
    h[new] = h.pop(k)
    return f"key_renamed={new[:20]!r}", pack(h, d)


def _m_drop(rng, h, d):
    keys = _tensor_keys(h)
    for k in rng.sample(keys, rng.randint(1, len(keys))):
        del h[k]
    return "keys_dropped", relayout(h, d, rng)


def _m_length(rng, h, d):
    raw = json.dumps(h).encode()
    n = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, len(raw) + 7, 2**32, 2**63, 2**64 - 1, 8])
    return f"length={n}", pack(raw, d, length=n)


def _m_trailing(rng, h, d):
    extra = rng.choice([b"\0", b"\0" * 8, bytes(rng.getrandbits(8) for _ in range(100)), b"{}"])
    return f"trailing={len(extra)}", pack(h, d + extra)


def _m_padding(rng, h, d):
    raw = json.dumps(h).encode() + rng.choice([b" " * 7, b"\0" * 7, b"\n", b"\t\t"])
    return "header_padding", pack(raw, d)


HEADER_MUTATIONS: list[HeaderMutation] = [_m_dtype, _m_shape, _m_reshape, _m_offsets, _m_entry, _m_extra_field,
                                          _m_whole, _m_metadata, _m_keys, _m_drop, _m_length, _m_trailing, _m_padding]


def header_cases(rng: random.Random, folder: Path, seeds: Seeds, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        role, src = seeds.pick(rng)
        header, data = parse(src)
        mutate = rng.choice(HEADER_MUTATIONS)
        what, raw = mutate(rng, header, data)
        path = folder / f"h{i:04}.safetensors"
        path.write_bytes(raw)
        cases.append(Case(f"header/{what}", role, path))
    return cases


# ----------------------------------------------------------------------------------- odd tensors


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _lora_pairs(sd: dict) -> list[tuple[str, str]]:
    """(up key, down key) of each module, comfy or kohya names."""
    return sorted((k, k.replace("lora_up", "lora_down")) for k in sd if "lora_up" in k)


def _odd_lora(rng: random.Random, sd: dict, meta: dict) -> str:
    pairs = _lora_pairs(sd)
    up_k, down_k = rng.choice(pairs)
    prefix = up_k.rsplit(".lora_up", 1)[0]
    up, down = sd[up_k], sd[down_k]
    what = rng.choice(["rank0", "zero_rows_up", "zero_rows_down", "all_zero", "fp8_factors", "int_factors",
                       "bool_factors", "u8_factors", "f64_factors", "mixed_dtypes", "inner_mismatch", "up_1d",
                       "down_3d", "up_scalar", "alpha_nan", "alpha_inf", "alpha_zero", "alpha_negative",
                       "alpha_array", "alpha_empty", "alpha_int", "alpha_bool", "alpha_fp8", "alpha_huge",
                       "diff_wrong", "diff_b_2d", "diff_scalar", "diff_empty", "reshape_float", "reshape_huge",
                       "reshape_bool", "reshape_meta_not_json", "set_weight_odd", "nan_up", "inf_down",
                       "empty_everything", "huge_rank", "only_up", "only_alpha"])
    alpha_k = prefix + ".alpha"
    if what == "rank0":
        sd[up_k], sd[down_k] = up[:, :0].contiguous(), down[:0].contiguous()
    elif what == "zero_rows_up":
        u = up.clone()
        u[: max(1, u.shape[0] // 2)] = 0
        sd[up_k] = u
    elif what == "zero_rows_down":
        dn = down.clone()
        dn[0] = 0
        sd[down_k] = dn
    elif what == "all_zero":
        sd[up_k], sd[down_k] = torch.zeros_like(up), torch.zeros_like(down)
    elif what == "fp8_factors":
        sd[up_k], sd[down_k] = up.to(torch.float8_e4m3fn), down.to(torch.float8_e5m2)
    elif what == "int_factors":
        sd[up_k], sd[down_k] = (up * 100).to(torch.int8), (down * 100).to(torch.int32)
    elif what == "bool_factors":
        sd[up_k], sd[down_k] = up > 0, down > 0
    elif what == "u8_factors":
        sd[up_k] = (up.abs() * 100).to(torch.uint8)
    elif what == "f64_factors":
        sd[up_k], sd[down_k] = up.double(), down.double()
    elif what == "mixed_dtypes":
        sd[up_k], sd[down_k] = up.half(), down.float()
    elif what == "inner_mismatch":
        sd[down_k] = torch.cat([down, down[:1]])
    elif what == "up_1d":
        sd[up_k] = up[:, 0].contiguous()
    elif what == "down_3d":
        sd[down_k] = down.reshape(down.shape[0], 1, -1).contiguous()
    elif what == "up_scalar":
        sd[up_k] = torch.tensor(1.0)
    elif what.startswith("alpha_"):
        sd[alpha_k] = {
            "alpha_nan": torch.tensor(float("nan")), "alpha_inf": torch.tensor(float("inf")),
            "alpha_zero": torch.tensor(0.0), "alpha_negative": torch.tensor(-4.0),
            "alpha_array": torch.tensor([1.0, 2.0]), "alpha_empty": torch.zeros(0),
            "alpha_int": torch.tensor(4, dtype=torch.int64), "alpha_bool": torch.tensor(True),
            "alpha_fp8": torch.tensor(2.0).to(torch.float8_e4m3fn), "alpha_huge": torch.tensor(3e38),
        }[what]
    elif what == "diff_wrong":
        sd[prefix + ".diff"] = torch.ones(rng.choice([(3,), (up.shape[0], down.shape[1] + 1), (2, 2, 2)]))
    elif what == "diff_b_2d":
        sd[prefix + ".diff_b"] = torch.ones(up.shape[0], 2)
    elif what == "diff_scalar":
        sd[prefix + ".diff"] = torch.tensor(1.0)
    elif what == "diff_empty":
        sd[prefix + ".diff"] = torch.zeros(0)
    elif what.startswith("reshape_") and what != "reshape_meta_not_json":
        sd[prefix + ".reshape_weight"] = {
            "reshape_float": torch.tensor([1.5, 2.5]), "reshape_huge": torch.tensor([2**40, 2**40]),
            "reshape_bool": torch.tensor([True, False]),
        }[what]
    elif what == "reshape_meta_not_json":
        meta["weightsmith.reshape"] = rng.choice(["not json", "[1,2]", '{"a": "b"}', '{"a": [1e300]}', "null"])
    elif what == "set_weight_odd":
        sd[prefix + ".set_weight"] = rng.choice([torch.zeros(0), torch.tensor(1.0), torch.ones(3, 3, 3)])
    elif what == "nan_up":
        u = up.clone()
        u.view(-1)[0] = float("nan")
        sd[up_k] = u
    elif what == "inf_down":
        dn = down.clone()
        dn.view(-1)[0] = float("inf")
        sd[down_k] = dn
    elif what == "empty_everything":
        for k in list(sd):
            sd[k] = torch.zeros((0,) + tuple(sd[k].shape[1:]), dtype=sd[k].dtype)
    elif what == "huge_rank":
        r = down.shape[1] * 4
        sd[up_k], sd[down_k] = torch.randn(up.shape[0], r) * 0.01, torch.randn(r, down.shape[1]) * 0.01
    elif what == "only_up":
        del sd[down_k]
    elif what == "only_alpha":
        del sd[up_k], sd[down_k]
    return what


def _odd_model(rng: random.Random, sd: dict, meta: dict) -> str:
    k = rng.choice(sorted(sd))
    t = sd[k]
    what = rng.choice(["zero_elements", "scalar", "flat", "extra_dim", "fp8", "fp8_nan", "all_fp8_nan", "int",
                       "bool", "f64", "f16_inf", "nan", "narrower", "extra_zero_tensor", "extra_scalar",
                       "extra_int", "all_zero_elements", "u8"])
    if what == "zero_elements":
        sd[k] = (t[:0] if t.ndim else t.reshape(1)[:0]).contiguous()
    elif what == "scalar":
        sd[k] = t.reshape(-1)[0].clone()
    elif what == "flat":
        sd[k] = t.reshape(-1).contiguous()
    elif what == "extra_dim":
        sd[k] = t.unsqueeze(0).contiguous()
    elif what == "fp8":
        sd[k] = t.to(torch.float8_e4m3fn)
    elif what == "fp8_nan":
        f = t.float().to(torch.float8_e4m3fn)
        f.view(torch.uint8).view(-1)[0] = 0x7F  # e4m3fn NaN
        sd[k] = f
    elif what == "all_fp8_nan":
        for key in sd:
            sd[key] = sd[key].float().to(torch.float8_e4m3fn)
        f = sd[k].clone()
        f.view(torch.uint8).view(-1)[0] = 0x7F
        sd[k] = f
    elif what == "int":
        sd[k] = (t.float() * 100).to(torch.int32)
    elif what == "bool":
        sd[k] = t > 0
    elif what == "u8":
        sd[k] = (t.float().abs() * 100).to(torch.uint8)
    elif what == "f64":
        sd[k] = t.double()
    elif what == "f16_inf":
        f = t.half().clone()
        f.view(-1)[0] = float("inf")
        sd[k] = f
    elif what == "nan":
        f = t.clone()
        f.view(-1)[-1] = float("nan")
        sd[k] = f
    elif what == "narrower":
        sd[k] = t[..., :-1].contiguous() if t.ndim else t
    elif what == "extra_zero_tensor":
        sd["extra.empty"] = torch.zeros(0, 4)
    elif what == "extra_scalar":
        sd["extra.scalar"] = torch.tensor(3.0)
    elif what == "extra_int":
        sd[k + "_count"] = torch.tensor([1, 2, 3])
    elif what == "all_zero_elements":
        for key in sd:
            sd[key] = sd[key].reshape(-1)[:0].contiguous()
    return what


def tensor_cases(rng: random.Random, folder: Path, seeds: Seeds, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        role, src = seeds.pick(rng)
        sd, meta = _load(src)
        what = (_odd_model if role == "model" else _odd_lora)(rng, sd, meta)
        path = folder / f"t{i:04}.safetensors"
        save_file(sd, str(path), metadata=meta or None)
        cases.append(Case(f"tensors/{role}/{what}", role, path))
    return cases


# ----------------------------------------------------------------------------------- bytes


def byte_cases(rng: random.Random, folder: Path, seeds: Seeds, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        role, src = seeds.pick(rng)
        raw = bytearray(src.read_bytes())
        (hlen,) = struct.unpack("<Q", raw[:8])
        how = rng.choice(["flip_header", "flip_header", "flip_length", "flip_data", "truncate", "truncate_header",
                          "append", "zero_page"])
        if how == "flip_header":
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(8, 8 + hlen)] ^= 1 << rng.randrange(8)
        elif how == "flip_length":
            raw[rng.randrange(0, 8)] ^= 1 << rng.randrange(8)
        elif how == "flip_data":
            for _ in range(rng.randint(1, 16)):
                raw[rng.randrange(8 + hlen, len(raw))] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            raw = raw[: rng.randrange(8 + hlen, len(raw))]
        elif how == "truncate_header":
            raw = raw[: rng.randrange(0, 8 + hlen)]
        elif how == "append":
            raw += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif how == "zero_page":
            start = rng.randrange(0, len(raw))
            raw[start : start + 4096] = bytes(len(raw[start : start + 4096]))
        path = folder / f"b{i:04}.safetensors"
        path.write_bytes(bytes(raw))
        cases.append(Case(f"bytes/{how}", role, path))
    return cases


# ----------------------------------------------------------------------------------- shard indexes

ODD_WEIGHT_MAPS = ["null", "list", "int", "string", "empty", "value_null", "value_int", "value_list", "value_dict",
                   "value_empty", "value_dot", "value_folder", "outside", "absolute", "missing", "index_itself",
                   "no_weight_map", "top_list", "deep", "not_json", "empty_file", "partial", "extra_keys",
                   "wrong_keys", "duplicated_shard", "valid", "fifo_shard", "bom"]


def _split_model(folder: Path, model: Path) -> dict[str, str]:
    sd, meta = _load(model)
    keys = sorted(sd)
    half = len(keys) // 2
    wm = {}
    for j, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{j + 1:05}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name), metadata=meta or None)
        wm.update(dict.fromkeys(part, name))
    return wm


def shard_cases(rng: random.Random, folder: Path, seeds: Seeds, n: int) -> list[Case]:
    cases = []
    kinds = list(ODD_WEIGHT_MAPS)
    rng.shuffle(kinds)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d = folder / f"s{i:04}"
        d.mkdir()
        wm = _split_model(d, seeds.model)
        first = next(iter(wm))
        data: object = {"metadata": {"total_size": 0}, "weight_map": wm}
        text = None
        if kind in ("null", "list", "int", "string", "empty"):
            data["weight_map"] = {"null": None, "list": ["a"], "int": 3, "string": "x", "empty": {}}[kind]
        elif kind.startswith("value_"):
            data["weight_map"][first] = {"value_null": None, "value_int": 1, "value_list": [wm[first]],
                                         "value_dict": {"a": wm[first]}, "value_empty": "", "value_dot": ".",
                                         "value_folder": "sub"}[kind]
            (d / "sub").mkdir()
        elif kind == "outside":
            data["weight_map"][first] = "../" + seeds.model.name
        elif kind == "absolute":
            data["weight_map"][first] = str(seeds.model)
        elif kind == "missing":
            data["weight_map"][first] = "gone.safetensors"
        elif kind == "index_itself":
            data["weight_map"][first] = "model.safetensors.index.json"
        elif kind == "no_weight_map":
            del data["weight_map"]
        elif kind == "top_list":
            data = [data]
        elif kind == "deep":
            text = json.dumps(data).replace('{"total_size": 0}', _deep(100000, "dict"))
        elif kind == "not_json":
            text = "weight_map: {}"
        elif kind == "empty_file":
            text = ""
        elif kind == "bom":
            text = "\ufeff" + json.dumps(data)
        elif kind == "partial":  # lists only one of the shards
            data["weight_map"] = {k: v for k, v in wm.items() if v == wm[first]}
        elif kind == "extra_keys":
            data["weight_map"]["not.in.any.shard"] = wm[first]
        elif kind == "wrong_keys":
            data["weight_map"] = {"k" + k: v for k, v in wm.items()}
        elif kind == "duplicated_shard":
            import shutil

            shutil.copy(d / wm[first], d / "copy.safetensors")
            data["weight_map"]["x"] = "copy.safetensors"
        elif kind == "fifo_shard":
            os.mkfifo(d / "fifo.safetensors")
            data["weight_map"][first] = "fifo.safetensors"
        index = d / "model.safetensors.index.json"
        index.write_text(text if text is not None else json.dumps(data))
        given = index if rng.random() < 0.6 else d
        cases.append(Case(f"shards/{kind}/{'index' if given == index else 'folder'}", "model", given))
    return cases


# ----------------------------------------------------------------------------------- torch checkpoints


def torch_cases(rng: random.Random, folder: Path, seeds: Seeds, n: int) -> list[Case]:
    sd, _ = _load(seeds.model)
    lsd, _ = _load(seeds.lora)
    kinds = ["plain", "plain_lora", "list", "tensor", "int_keys", "empty_dict", "zero_elements", "bool_tensors",
             "fp8_nan", "scalars", "nested_strings", "none_values", "random_bytes_ckpt", "safetensors_as_bin",
             "safetensors_as_ckpt", "truncated_zip", "flipped_zip", "empty_pt", "text_as_pt", "zip_not_torch"]
    rng.shuffle(kinds)
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        ext = rng.choice([".pt", ".ckpt", ".pth"])
        path = folder / f"z{i:04}{ext}"
        role = "model"
        if kind == "plain":
            torch.save(sd, path)
        elif kind == "plain_lora":
            torch.save(lsd, path)
            role = "lora"
        elif kind == "list":
            torch.save(list(sd.values()), path)
        elif kind == "tensor":
            torch.save(next(iter(sd.values())), path)
        elif kind == "int_keys":
            torch.save({i: v for i, v in enumerate(sd.values())}, path)
        elif kind == "empty_dict":
            torch.save({}, path)
        elif kind == "zero_elements":
            torch.save({k: v[:0] for k, v in sd.items()}, path)
        elif kind == "bool_tensors":
            torch.save({k: v > 0 for k, v in sd.items()}, path)
        elif kind == "fp8_nan":
            f = {k: v.float().to(torch.float8_e4m3fn) for k, v in sd.items()}
            k0 = sorted(f)[0]
            f[k0].view(torch.uint8).view(-1)[0] = 0x7F
            torch.save(f, path)
        elif kind == "scalars":
            torch.save({k: v.reshape(-1)[0].clone() for k, v in sd.items()}, path)
        elif kind == "nested_strings":
            torch.save({"a": "b", "c": [1, 2], **dict(list(sd.items())[:3])}, path)
        elif kind == "none_values":
            torch.save(dict.fromkeys(sd), path)
        elif kind == "random_bytes_ckpt":
            path = path.with_suffix(".ckpt")
            path.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 100, 5000]))))
        elif kind in ("safetensors_as_bin", "safetensors_as_ckpt"):
            path = path.with_suffix(".bin" if kind.endswith("bin") else ".ckpt")
            path.write_bytes(seeds.model.read_bytes())
        elif kind in ("truncated_zip", "flipped_zip"):
            torch.save(sd, path)
            raw = bytearray(path.read_bytes())
            if kind == "truncated_zip":
                raw = raw[: rng.randrange(1, len(raw))]
            else:
                for _ in range(8):
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(raw))
        elif kind == "empty_pt":
            path.write_bytes(b"")
        elif kind == "text_as_pt":
            path.write_text("this is not a checkpoint\n")
        elif kind == "zip_not_torch":
            import zipfile

            with zipfile.ZipFile(path, "w") as z:
                z.writestr("readme.txt", "hello")
        cases.append(Case(f"torch/{kind}{path.suffix}", role, path))
    return cases


# ----------------------------------------------------------------------------------- not regular files


def special_cases(folder: Path) -> list[Case]:
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    sock_path = folder / "sock.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    sock.close()  # the socket file stays
    link = folder / "link_to_fifo.safetensors"
    link.symlink_to(fifo)
    fifo_ckpt = folder / "fifo.ckpt"
    os.mkfifo(fifo_ckpt)
    fifo_bare = folder / "fifo_model"
    os.mkfifo(fifo_bare)
    cases = [Case("special/fifo", "model", fifo), Case("special/fifo", "lora", fifo),
             Case("special/fifo_ckpt", "model", fifo_ckpt), Case("special/fifo_no_suffix", "lora", fifo_bare),
             Case("special/socket", "model", sock_path), Case("special/symlink_to_fifo", "lora", link)]
    if Path("/dev/null").exists():
        cases.append(Case("special/dev_null", "model", Path("/dev/null")))
    return cases


# ----------------------------------------------------------------------------------- all of them


def make_seeds(folder: Path) -> Seeds:
    from weightsmith.lora.formats import save_lora
    from weightsmith.lora.testloras import flux_block_linears, random_lora
    from weightsmith.testmodels import FluxConfig, flux_shapes, flux_state_dict

    model = folder / "seed_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in flux_state_dict(FluxConfig(), "dev", seed=1).items()}, str(model))
    lora = random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=4, seed=5, targets=flux_block_linears)
    save_lora(lora, folder / "seed_lora.safetensors", fmt="comfy")
    save_lora(lora, folder / "seed_kohya.safetensors", fmt="kohya")
    seeds = Seeds(model, folder / "seed_lora.safetensors", folder / "seed_kohya.safetensors")
    sd, _ = _load(model)
    from weightsmith.encodings import testfiles

    for name, enc in (("scaled_fp8", testfiles.scaled_fp8(sd)), ("mixed", testfiles.mixed_precision(sd))):
        path = folder / f"seed_{name}.safetensors"
        save_file(enc.tensors, str(path), metadata=enc.metadata or None)
        seeds.quantized.append(path)
    seeds.adapter_lora = _adapter_lora(seeds.kohya_lora, folder / "seed_adapters.safetensors")
    return seeds


def _adapter_lora(kohya: Path, path: Path) -> Path:
    """The kohya LoRA with two modules replaced by a LoKr (64x64 = kron(8x8, 8x8)) and a LoHa (256x64)."""
    sd, meta = _load(kohya)
    gen = torch.Generator().manual_seed(3)
    lokr, loha = "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_mlp_0"
    for prefix in (lokr, loha):
        for k in [k for k in sd if k.startswith(prefix + ".")]:
            del sd[k]
    sd.update({f"{lokr}.lokr_w1": torch.randn(8, 8, generator=gen) * 0.1,
               f"{lokr}.lokr_w2": torch.randn(8, 8, generator=gen) * 0.1, f"{lokr}.alpha": torch.tensor(4.0),
               f"{loha}.hada_w1_a": torch.randn(256, 4, generator=gen) * 0.1,
               f"{loha}.hada_w1_b": torch.randn(4, 64, generator=gen) * 0.1,
               f"{loha}.hada_w2_a": torch.randn(256, 4, generator=gen) * 0.1,
               f"{loha}.hada_w2_b": torch.randn(4, 64, generator=gen) * 0.1, f"{loha}.alpha": torch.tensor(4.0)})
    save_file(sd, str(path), metadata=meta or None)
    return path


def make_cases(folder: Path, seeds: Seeds, seed: int, counts: dict[str, int]) -> list[Case]:
    """`counts`: how many of each family (header, tensors, bytes, shards, torch); specials always."""
    rng = random.Random(seed)
    out: list[Case] = []
    for family, make in (("header", header_cases), ("tensors", tensor_cases), ("bytes", byte_cases),
                         ("shards", shard_cases), ("torch", torch_cases)):
        sub = folder / family
        sub.mkdir(parents=True)
        out += make(random.Random(rng.random()), sub, seeds, counts.get(family, 0))
    sub = folder / "special"
    sub.mkdir(parents=True)
    out += special_cases(sub)
    return out

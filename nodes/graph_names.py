"""Names for a node's MODEL inputs that a user recognises in the graph: the file its loader read, or the
title of the node it comes from — not the socket letters ("a = a, b = b")."""

from __future__ import annotations

from pathlib import PurePosixPath

# widget values that name a model file, in the loaders ComfyUI and this pack ship
_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _describe_node(node: dict) -> str:
    inputs = node.get("inputs") or {}
    files = [v for v in inputs.values() if isinstance(v, str) and v.lower().endswith(_FILE_SUFFIXES)]
    title = (node.get("_meta") or {}).get("title") or node.get("class_type") or "node"
    if len(files) == 1:  # a loader: the file is what the user picked
        return PurePosixPath(files[0].replace("\\", "/")).name
    return title


def input_names(prompt: dict | None, unique_id, sockets: list[str]) -> list[str]:
    """`model_a: sd15-tiny-a.safetensors (#1)` per socket, from the API prompt (the hidden PROMPT input);
    the socket name alone when the node was called outside a prompt or the input is not a link."""
    node = (prompt or {}).get(str(unique_id)) if unique_id is not None else None
    out = []
    for socket in sockets:
        link = ((node or {}).get("inputs") or {}).get(socket)
        source = prompt.get(str(link[0])) if isinstance(link, list) and link and prompt else None
        out.append(f"{socket}: {_describe_node(source)} (#{link[0]})" if isinstance(source, dict) else socket)
    return out

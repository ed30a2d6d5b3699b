"""Weightsmith: the ComfyUI entry point. The math lives in core/ (importable as `weightsmith`)."""

WEB_DIRECTORY = "./web"

try:
    import folder_paths  # noqa: F401  (importable only inside ComfyUI)
except ImportError:
    # Imported outside ComfyUI: pytest sets up the repo root as a package, packaging tools scan it.
    # There are no nodes to offer then, and importing them would need ComfyUI.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

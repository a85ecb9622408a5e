"""The Wan model zoo: DiT, VAEs, the umT5 text encoder and the Wan2.1 CLIP image encoder,
loaded from official files.

Public API (see DESIGN.md)::

    from wanlora.models import load_dit, load_vae, load_text_encoder, load_clip
"""

from __future__ import annotations

__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_clip"]

_HOME = {
    "load_dit": "wanlora.models.loading",
    "load_vae": "wanlora.models.vae",
    "load_text_encoder": "wanlora.models.text_encoder",
    "load_clip": "wanlora.models.clip",
}


def __getattr__(name: str):
    # Imported on first use so that `import wanlora.models` stays light (no transformers import
    # for a command that only needs the DiT).
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'wanlora.models' has no attribute {name!r}")

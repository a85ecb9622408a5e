"""The attention dispatcher: one place that picks the attention kernel.

The DiT calls :func:`attention` and never knows which backend runs. Backends:

* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``; any dtype, CPU or GPU.
* ``"flash"``: ``flash_attn.flash_attn_func`` (pip package ``flash-attn``); fp16/bf16 only, so fp32
  inputs are cast to bf16 and the result back, as the official ``wan/modules/attention.py:
  flash_attention`` does.
* ``"sage"``: ``sageattention.sageattn`` (pip package ``sageattention``); fp16/bf16, cast as above.
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (pip package ``xformers``).

``"torch"`` (the name other Wan tools use) is accepted everywhere as an alias of ``"sdpa"``.

No mask, no dropout, softmax scale ``1/sqrt(d)``: Wan's self-attention sees only real tokens (no
padding: a batch shares one grid) and its cross-attention does not mask the zero-padded text rows
(``wan_numerics.md`` §2.2).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

__all__ = ["ATTN_ALIASES", "ATTN_MODES", "attention", "check_attn_mode"]

#: backend name -> (module to import, pip package that provides it)
_BACKENDS = {
    "sdpa": (None, None),
    "flash": ("flash_attn", "flash-attn"),
    "sage": ("sageattention", "sageattention"),
    "xformers": ("xformers.ops", "xformers"),
}
ATTN_MODES = tuple(_BACKENDS)
#: other names accepted for a backend (musubi-tuner and others call sdpa "torch")
ATTN_ALIASES = {"torch": "sdpa"}


def check_attn_mode(mode: str):
    """Import the backend of ``mode`` (or an :data:`ATTN_ALIASES` name) and return its module
    (``None`` for ``"sdpa"``).

    Raises:
        ValueError: an unknown mode (the message lists the valid ones).
        ImportError: the backend's package is not installed (the message names the pip package).
    """
    mode = ATTN_ALIASES.get(mode, mode)
    if mode not in _BACKENDS:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {', '.join(ATTN_MODES)}")
    module, package = _BACKENDS[mode]
    if module is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"attention mode {mode!r} needs the package {package!r} ({e}); install it with "
            f"`pip install {package}` or use --attn_mode sdpa"
        ) from None


def _half(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "sdpa") -> torch.Tensor:
    """Multi-head attention without mask, scale ``1/sqrt(d)``.

    Args:
        q: ``[B, Lq, N, d]`` queries (N heads of width d).
        k, v: ``[B, Lk, N, d]`` keys and values.
        mode: one of :data:`ATTN_MODES` or :data:`ATTN_ALIASES`.

    Returns:
        ``[B, Lq, N, d]`` in ``v``'s dtype. q and k are cast to ``v``'s dtype first (the DiT hands
        over fp32 q/k after RoPE and v in the compute dtype). Matches ``wan/modules/attention.py:
        flash_attention`` with ``k_lens=None`` (Wan's attention call sites never mask here).

    Raises:
        ValueError, ImportError: as :func:`check_attn_mode` (unknown mode, package missing).
    """
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)
    mode = ATTN_ALIASES.get(mode, mode)
    if mode == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    lib = check_attn_mode(mode)
    if mode == "flash":
        out = lib.flash_attn_func(*_half(q, k, v))
    elif mode == "sage":
        out = lib.sageattn(*_half(q, k, v), tensor_layout="NHD", is_causal=False)
    else:  # xformers
        out = lib.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return out.to(dtype)

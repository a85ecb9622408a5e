"""The attention dispatcher: one place that picks the attention kernel.

The DiT calls :func:`attention` and never knows which backend runs. Backends (``--attn_mode``):

===========  ==============================================================  =========  ========
mode         kernel                                                          backward   dtypes
===========  ==============================================================  =========  ========
``sdpa``     ``F.scaled_dot_product_attention``; PyTorch picks the kernel    yes        any
             (FlashAttention-2 class on CUDA for bf16/fp16 and head dim
             <= 256, memory-efficient for fp32, a fused CPU kernel on CPU)
``cudnn``    the same call restricted to cuDNN attention                     yes        bf16/fp16
             (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``; CUDA only;
             the fastest kernel on Hopper next to FA3)
``flash``    FlashAttention-2, ``flash_attn.flash_attn_func``                yes        bf16/fp16
             (pip ``flash-attn``)
``flash3``   FlashAttention-3 (Hopper), ``flash_attn_interface.              yes        bf16/fp16
             flash_attn_func`` (built from ``flash-attention/hopper``)
``xformers`` ``xformers.ops.memory_efficient_attention`` (pip ``xformers``)  yes        any
``sage``     SageAttention, ``sageattention.sageattn`` (pip                  **no**     bf16/fp16
             ``sageattention``): 8-bit q·k; inference only
===========  ==============================================================  =========  ========

``"torch"`` (the name other Wan tools use) is accepted everywhere as an alias of ``"sdpa"``.
:data:`TRAINING_ATTN_MODES` are the modes with a backward pass; SageAttention's kernels have
none, so LoRA adapters on q/k/v would get no gradient through it: :func:`check_attn_mode` with
``training=True`` and :func:`attention` on inputs that require a gradient refuse it.

**Precision.** Attention runs in the dtype of ``v`` — the DiT's compute dtype: bf16 when the DiT
runs in bf16 (bf16 weights, or float32 weights under bf16 autocast), float32 in a float32 run. q/k
come out of RoPE in float32 and are cast to that dtype here, so a bf16 run attends in bf16 exactly
as the official GPU path does (``wan/modules/attention.py: flash_attention`` casts q/k/v to bf16).
The kernels that only take fp16/bf16 (``cudnn``, ``flash``, ``flash3``, ``sage``) cast float32
inputs to bf16 (the official ``half_dtype``) and their output back to float32.

**Layout.** q/k/v arrive as ``[B, L, N, d]``. ``sdpa`` hands PyTorch ``[B, N, L, d]`` views of
them (last dimension contiguous: what its FlashAttention kernel needs, and that kernel's native
memory layout, so no copy is made; a copy would also be held for backward: +23 MiB per block at
1950 tokens in float32, ``benchmarks/checkpoint_memory.py``), with no mask, no dropout and the
default scale, so PyTorch can choose its flash kernel for bf16/fp16 and head dim 128.
``cudnn`` hands it contiguous ``[B, N, L, d]`` copies (cast and transpose in one kernel). The
other kernels take ``[B, L, N, d]`` (their native layout) as it is.

No mask, no dropout, softmax scale ``1/sqrt(d)``: Wan's self-attention sees only real tokens (no
padding: a batch shares one grid) and its cross-attention does not mask the zero-padded text rows
(``wan_numerics.md`` §2.2).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

__all__ = ["ATTN_ALIASES", "ATTN_MODES", "TRAINING_ATTN_MODES", "attention", "check_attn_mode"]

#: backend name -> (module to import, how to install it)
_BACKENDS = {
    "sdpa": (None, None),
    "cudnn": (None, None),
    "flash": ("flash_attn", "pip install flash-attn"),
    "flash3": ("flash_attn_interface", "build FlashAttention-3 from flash-attention's hopper/ folder "
               "(cd hopper && python setup.py install)"),
    "xformers": ("xformers.ops", "pip install xformers"),
    "sage": ("sageattention", "pip install sageattention"),
}
ATTN_MODES = tuple(_BACKENDS)
#: modes whose kernels have a backward pass (usable for training)
TRAINING_ATTN_MODES = tuple(m for m in ATTN_MODES if m != "sage")
#: other names accepted for a backend (musubi-tuner and others call sdpa "torch")
ATTN_ALIASES = {"torch": "sdpa"}
#: modes whose kernels take only fp16/bf16
_HALF_ONLY = ("cudnn", "flash", "flash3", "sage")

_NO_BACKWARD = ("--attn_mode sage has no backward pass (SageAttention is inference-only), so LoRA on "
                "q/k/v would get no gradient; train with --attn_mode {} and use sage for generation")


def check_attn_mode(mode: str, training: bool = False):
    """Validate ``mode`` (or an :data:`ATTN_ALIASES` name), import its backend and return the
    module (``None`` for the SDPA modes).

    Args:
        mode: an ``--attn_mode`` value.
        training: the mode will be trained through; modes without a backward (``sage``) raise.

    Raises:
        ValueError: an unknown mode (the message lists the valid ones), or a mode without a
            backward pass when ``training``.
        ImportError: the backend's package is not installed (the message says how to install it).
    """
    mode = ATTN_ALIASES.get(mode, mode)
    if mode not in _BACKENDS:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {', '.join(ATTN_MODES)}")
    if training and mode not in TRAINING_ATTN_MODES:
        raise ValueError(_NO_BACKWARD.format("/".join(TRAINING_ATTN_MODES)))
    module, install = _BACKENDS[mode]
    if module is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"attention mode {mode!r} needs the module {module} ({e}); {install}, or use --attn_mode sdpa"
        ) from None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, contiguous: bool = False) -> torch.Tensor:
    """SDPA on ``[B, N, L, d]`` in ``dtype``; returns ``[B, L, N, d]`` (a transposed view).

    The inputs are transposed views of ``[B, L, N, d]`` (last dim contiguous, the layout the
    FlashAttention kernel reads natively; q/k are cast in the same kernel) unless ``contiguous``,
    which makes contiguous ``[B, N, L, d]`` copies (for cuDNN attention)."""
    if contiguous:
        qkv = [_heads_first(t, dtype) for t in (q, k, v)]
    else:
        qkv = [t.transpose(1, 2).to(dtype) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*qkv).transpose(1, 2)


def _heads_first(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L, N, d]`` -> contiguous ``[B, N, L, d]`` in ``dtype``: one copy kernel (cast and
    transpose together; ``Tensor.to`` would keep the transposed strides)."""
    t = t.transpose(1, 2)
    if t.dtype == dtype and t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "sdpa") -> torch.Tensor:
    """Multi-head attention without mask, scale ``1/sqrt(d)``.

    Args:
        q: ``[B, Lq, N, d]`` queries (N heads of width d).
        k, v: ``[B, Lk, N, d]`` keys and values.
        mode: one of :data:`ATTN_MODES` or :data:`ATTN_ALIASES`.

    Returns:
        ``[B, Lq, N, d]`` in ``v``'s dtype. Computed in ``v``'s dtype (bf16 for fp32 inputs to the
        fp16/bf16-only kernels); see the module docstring. Matches ``wan/modules/attention.py:
        flash_attention`` with ``k_lens=None`` (Wan's attention call sites never mask here).

    Raises:
        ValueError, ImportError: as :func:`check_attn_mode` (unknown mode, package missing).
        RuntimeError: ``sage`` on inputs that require a gradient (it has no backward pass), or
            ``cudnn`` on a non-CUDA device.
    """
    out_dtype = v.dtype
    mode = ATTN_ALIASES.get(mode, mode)
    dtype = out_dtype
    if mode in _HALF_ONLY and dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    if mode == "sdpa":
        return _sdpa(q, k, v, dtype)
    if mode == "cudnn":
        if q.device.type != "cuda":
            raise RuntimeError(f"--attn_mode cudnn needs a CUDA GPU (the tensors are on {q.device.type}); "
                               "use --attn_mode sdpa")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return _sdpa(q, k, v, dtype, contiguous=True).to(out_dtype)
    if mode == "sage" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(_NO_BACKWARD.format("/".join(TRAINING_ATTN_MODES)))
    lib = check_attn_mode(mode)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if mode == "flash":
        out = lib.flash_attn_func(q, k, v)
    elif mode == "flash3":
        out = lib.flash_attn_func(q, k, v)
        if isinstance(out, tuple):  # FA3 releases before 3.0.0b2 return (out, softmax_lse)
            out = out[0]
    elif mode == "sage":
        out = lib.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    else:  # xformers
        out = lib.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return out.to(out_dtype)

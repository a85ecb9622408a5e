"""float8 base weights: the frozen Linear layers of the DiT blocks stored in ``float8_e4m3fn``.

A Wan2.2 A14B expert holds 14.0 B parameters in the 400 Linear layers of its 40 blocks
(``self_attn``/``cross_attn`` ``q, k, v, o`` and ``ffn.0``/``ffn.2``); everything else is 0.9 B.
Storing those Linear weights in one byte each halves the model (28.6 GB bf16 -> 14.9 GB), and
since the base model is frozen in LoRA training, nothing but a dequantization is needed:

* ``--fp8_base``: ``q = W`` cast to ``float8_e4m3fn`` (round to nearest even, values beyond ±448
  saturated), dequantized as ``q`` (scale 1);
* ``--fp8_scaled``: one float32 scale per output channel ``s_o = max_i |W_oi| / 448`` (1 for an
  all-zero row), ``q = fp8(W / s)``, dequantized as ``q · s``. Every row then uses the full
  e4m3 range: the relative rounding error is at most 2^-4 per element whatever the row's magnitude.

Dequantization is exact: e4m3 values have 4 significant bits, so ``q`` in float32 is exact and
``q · s`` rounds once (float32), then once more to the compute dtype. Each forward and backward
dequantizes one layer at a time into the compute dtype (bf16/fp16/fp32) and runs the ordinary
matmul — no fp8 kernels, so it works on every device, including the CPU. The autograd function
keeps only the fp8 weight (no dequantized copy) for the backward pass.

ComfyUI's ready-made files load as they are (:func:`fp8_scale_key`): ``*_fp8_e4m3fn.safetensors``
(plain cast, no scales), ``*_fp8_scaled.safetensors`` (``X.scale_weight``: a per-tensor scalar,
or per-channel, plus a ``scaled_fp8`` marker tensor) and the newer ``X.weight_scale`` layout.

Which layers: :func:`fp8_targets` — the Linear layers inside ``blocks.N``; the official float32
islands (norms, modulation, time and text embeddings, patch embedding, head) keep their dtypes
(:func:`wanlora.models.loading.keeps_float32`). LoRA adapters hook :class:`Fp8Linear` like any
``nn.Linear`` (it is one) and stay in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanlora.models.fp8_matmul import Fp8ScaledMatmul

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Fp8Linear",
    "fp8_targets",
    "is_fp8_target",
    "quantize_weight",
    "dequantize_weight",
    "convert_to_fp8_linears",
    "quantize_linears_",
    "fp8_scale_key",
    "set_fp8_compute",
    "row_scale",
]

#: The storage dtype (4 exponent bits, 3 mantissa bits, no infinities, max 448).
FP8_DTYPE = torch.float8_e4m3fn
#: The largest finite ``float8_e4m3fn`` value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)

_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def is_fp8_target(module_name: str) -> bool:
    """Whether the DiT module ``module_name`` (``blocks.3.ffn.0``) is stored in fp8: the ten
    Linear layers of every block, nothing outside the blocks."""
    parts = module_name.split(".", 2)
    return len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _BLOCK_LINEARS


def fp8_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(dotted name, nn.Linear)`` of ``model``'s modules that :func:`is_fp8_target` selects."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_fp8_target(n)]


def quantize_weight(weight: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize a Linear weight to ``float8_e4m3fn``.

    Args:
        weight: ``[out, in]`` of any float dtype (computed in float32).
        scaled: per-output-channel scales (``--fp8_scaled``) or a plain saturating cast
            (``--fp8_base``).

    Returns:
        ``(q, scale)``: ``q [out, in]`` float8_e4m3fn, ``scale [out, 1]`` float32 (``None`` when
        not scaled), such that :func:`dequantize_weight` gives ``q · scale``.
    """
    w = weight.detach().float()
    if not scaled:
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None  # not in place: w may be the input
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``q · scale`` in ``dtype`` (float32 product, one final rounding).

    Args:
        q: ``[out, in]`` float8 (or any float dtype: a float weight is only cast).
        scale: ``None``, a scalar, ``[out]`` or ``[out, 1]`` float scale.
        dtype: the compute dtype.
    """
    if scale is None:
        return q.to(dtype)
    s = scale.float()
    if s.ndim == 1 and s.numel() == q.shape[0] and q.shape[0] != 1:
        s = s[:, None]
    if q.dtype == torch.float32:
        return (q * s).to(dtype)
    # in place on the float32 upcast: 4 + 2 bytes per element in flight, not 4 + 4 + 2
    return q.float().mul_(s).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W = q · s`` dequantized on the fly; backward gives only the input's
    gradient (the weights are frozen) and dequantizes again instead of keeping a copy."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, dtype):
        ctx.save_for_backward(q, scale)
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        w = dequantize_weight(q, scale, dtype)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize_weight(q, scale, ctx.dtype)
            grad_x = (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype)
        return grad_x, None, None, None, None


class Fp8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in ``float8_e4m3fn``.

    Attributes:
        weight: ``[out, in]`` float8_e4m3fn parameter (``requires_grad`` False).
        weight_scale: ``[out, 1]`` (or scalar) float32 buffer, or ``None`` (plain cast).
        bias: ``[out]`` in the compute dtype.
        compute_dtype: the dtype the weight is dequantized into and the matmul runs in.

    ``forward(x)``: ``x [..., in]`` -> ``[..., out]`` in ``compute_dtype``. Under autocast the
    compute dtype is autocast's. With :attr:`fp8_matmul` (``--fp8_compute``, :func:`set_fp8_compute`)
    the matmuls run in fp8 (:mod:`wanlora.models.fp8_matmul`) instead of dequantizing. It is an ``nn.Linear`` (``isinstance`` holds), so LoRA modules
    hook it unchanged; merging a LoRA into it is refused (:func:`wanlora.lora.algebra.merge_delta_`).
    """

    fp8_matmul: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scaled: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.register_buffer(
            "weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device) if scaled else None)

    @property
    def scaled(self) -> bool:
        """True when the weight has scales (``--fp8_scaled`` or a ComfyUI scaled file)."""
        return self.weight_scale is not None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype`` (default the compute dtype)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        matmul = Fp8ScaledMatmul if self.fp8_matmul else _Fp8Matmul
        with torch.autocast(x.device.type, enabled=False):
            return matmul.apply(x, self.weight, self.weight_scale, self.bias, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8={'scaled' if self.scaled else 'cast'}, "
                f"{'fp8 matmul, ' if self.fp8_matmul else ''}"
                f"compute_dtype={self.compute_dtype}")


def convert_to_fp8_linears(model: nn.Module, scaled: bool, compute_dtype: torch.dtype,
                           scaled_layers: set[str] | None = None, select=None) -> list[str]:
    """Replace :func:`fp8_targets` of ``model`` by empty :class:`Fp8Linear` (same device, e.g.
    the meta device before :func:`~wanlora.models.loading.load_dit` assigns the weights).

    Args:
        scaled: give every converted layer a ``weight_scale`` buffer.
        scaled_layers: instead of ``scaled``, the module names that get one (a ComfyUI file
            whose scales cover some layers only).
        select: which ``nn.Linear`` module names to convert (default :func:`is_fp8_target`, the
            DiT's block Linears; the umT5 encoder passes its own,
            :func:`wanlora.models.text_encoder.load_text_encoder`).

    Returns:
        The converted module names.
    """
    select = is_fp8_target if select is None else select
    names = []
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and select(n)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        has_scale = scaled if scaled_layers is None else name in scaled_layers
        new = Fp8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        scaled=has_scale, compute_dtype=compute_dtype, device=lin.weight.device)
        setattr(parent, child, new)
        names.append(name)
    return names


def fp8_scale_key(weight_key: str, keys) -> str | None:
    """The scale tensor of a stored fp8 weight in a ComfyUI file, or ``None``.

    ``X.weight`` has its scale in ``X.scale_weight`` (``*_fp8_scaled.safetensors``, comfy
    ``ops.scaled_fp8``) or ``X.weight_scale`` (the newer quantized-tensor layout); ``keys`` is
    the file's key set.
    """
    if not weight_key.endswith(".weight"):
        return None
    stem = weight_key[: -len("weight")]
    for k in (stem + "scale_weight", stem + "weight_scale"):
        if k in keys:
            return k
    return None


def row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A stored fp8 scale (scalar, ``[1]``, ``[out]`` or ``[out, 1]``) as ``[out, 1]`` float32:
    the layout of :attr:`Fp8Linear.weight_scale`. A per-tensor scale is repeated per row (the
    product ``q · s`` is the same float32 multiplication).

    Args:
        scale: the scale tensor of a ComfyUI scaled-fp8 weight (any float dtype).
        rows: the weight's output channels.

    Raises:
        ValueError: a block-wise or otherwise shaped scale (the caller names the file and key).
    """
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, 1).contiguous()
    if s.numel() == rows and (s.ndim == 1 or tuple(s.shape) == (rows, 1)):
        return s.reshape(rows, 1)
    raise ValueError(f"the fp8 scale has shape {tuple(s.shape)} (block-wise?); only per-tensor or per-row "
                     "scales are supported")


@torch.no_grad()
def quantize_linears_(model: nn.Module, scaled: bool, compute_dtype: torch.dtype) -> list[str]:
    """Quantize the :func:`fp8_targets` of an already-built model in place (same device): each
    ``nn.Linear`` becomes an :class:`Fp8Linear` holding :func:`quantize_weight` of its weight and
    its bias in ``compute_dtype``. For models built in memory (benchmarks, tests); checkpoints
    are quantized while loading by :func:`~wanlora.models.loading.load_dit`. Layers still on the
    ``meta`` device are left for a later call, so a model can be materialized and quantized one
    block at a time (never holding all of it in its full precision).

    Returns:
        The converted module names.
    """
    names = []
    for name, lin in fp8_targets(model):
        if isinstance(lin, Fp8Linear) or lin.weight.is_meta:
            continue
        parent_name, _, child = name.rpartition(".")
        q, s = quantize_weight(lin.weight, scaled)
        new = Fp8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, scaled=scaled,
                        compute_dtype=compute_dtype, device="meta")
        new.weight = nn.Parameter(q, requires_grad=False)
        new.weight_scale = s
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().to(compute_dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, new)
        names.append(name)
    return names


def set_fp8_compute(model: nn.Module, enabled: bool = True) -> list[str]:
    """Run every :class:`Fp8Linear` of ``model`` with fp8 matmuls (``--fp8_compute``; module
    :mod:`wanlora.models.fp8_matmul`) or, with ``enabled=False``, dequantized again.

    Returns:
        The names of the layers switched.
    Raises:
        ValueError: a layer whose ``in``/``out`` is not a multiple of 16 (named), or a model with no
            fp8 layers (``--fp8_compute`` needs ``--fp8_base`` / ``--fp8_scaled`` weights).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    if enabled and not layers:
        raise ValueError("--fp8_compute: the DiT has no fp8 layers; load it with --fp8_scaled (or --fp8_base)")
    for name, m in layers:
        if enabled and (m.in_features % 16 or m.out_features % 16):
            raise ValueError(f"--fp8_compute: layer {name} is {m.out_features}x{m.in_features}; fp8 matmuls need "
                             "both sizes a multiple of 16")
    for _, m in layers:
        m.fp8_matmul = enabled
    return [n for n, _ in layers]

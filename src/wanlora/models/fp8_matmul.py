"""fp8 matmuls for the frozen fp8 Linear layers (``--fp8_compute``).

:class:`wanlora.models.fp8.Fp8Linear` stores ``W = q · s`` (``q [out, in]`` float8_e4m3fn, ``s``
one float32 scale per output channel, or none). By default it dequantizes ``W`` and runs a
bf16 matmul. With ``--fp8_compute`` the two matmuls LoRA training does with the frozen weight run
on the fp8 tensor cores (``torch._scaled_mm``: cuBLASLt/CUTLASS on compute capability 8.9+:
RTX 4090/5090, L40S, H100/H200, B200), every operand in e4m3 with one scale per row (as torchao's
rowwise float8 training recipe does):

* forward ``y = x Wᵀ``: ``x [M, in]`` is quantized per row (token), ``s_x = max_k |x_mk| / 448``,
  ``q_x = e4m3(x / s_x)``; ``y = (q_x q_wᵀ) · s_x · s_wᵀ`` — the scales are applied to the fp32
  accumulator (``scale_a [M, 1]``, ``scale_b [1, out]``), the output rounded once to bf16.
* backward (input gradient only: the base is frozen) ``∂x = ∂y W``: the weight's per-output-channel
  scale is folded into the gradient first (``g = ∂y · s_wᵀ``; ``out`` is the contraction
  dimension here, where a scale cannot be applied after the product), ``g`` is quantized per row
  the same way and ``∂x = (q_g q_w) · s_g``. ``q_w`` is needed column-major: one transposed fp8
  copy of the layer's weight per backward, freed after it.

The LoRA path beside it keeps its own dtype. Numerics: besides the weight's own fp8 rounding,
the activations and output gradients are rounded to 4 significant bits (relative error ≤ 2^-4
per element, ~2^-6 typical on a dot product of thousands of terms); the product is accumulated in
float32. The CPU build of PyTorch implements ``torch._scaled_mm`` too (a reference emulation,
slow), so this path runs and is tested on the CPU against the dequantize-and-matmul reference.

Shapes: ``in`` and ``out`` must be multiples of 16 (cuBLASLt fp8 layout rule; every Wan Linear is).
"""

from __future__ import annotations

import torch

__all__ = ["fp8_compute_problem", "check_fp8_compute", "quantize_rows", "Fp8ScaledMatmul", "E4M3_MAX"]

#: The largest finite ``float8_e4m3fn`` value (448).
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
#: CUDA compute capability with fp8 tensor cores (Ada, Hopper, Blackwell).
MIN_CAPABILITY = (8, 9)


def fp8_compute_problem(device) -> str | None:
    """Why ``--fp8_compute`` cannot run on ``device``, or ``None`` when it can (a CUDA GPU of compute
    capability 8.9 or higher, or the CPU's reference emulation)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no fp8 matmul kernels on the {device.type} device"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{name} (compute capability {capability[0]}.{capability[1]}) has no fp8 tensor cores; "
                f"they need 8.9+ (RTX 4090/5090, L40S, H100/H200)")
    return None


def check_fp8_compute(device) -> None:
    """Raise ``ValueError`` (one line: the GPU, the requirement, the fix) when :func:`fp8_compute_problem`
    finds one."""
    problem = fp8_compute_problem(device)
    if problem:
        raise ValueError(f"--fp8_compute: {problem}; drop --fp8_compute (--fp8_base/--fp8_scaled still halve the "
                         "weights' memory, computed in bf16)")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a 2-D tensor, on the device (no host read).

    Args:
        x: ``[M, K]`` float (computed in float32).
    Returns:
        ``(q [M, K] float8_e4m3fn, scale [M, 1] float32)`` with ``q · scale ≈ x``; ``scale =
        max_k |x_mk| / 448`` (1 for an all-zero row), ``q`` rounded to nearest, within ±448.
    """
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _weight_scale_row(scale: torch.Tensor | None, out_features: int, device) -> torch.Tensor:
    """The weight's scale as ``[1, out]`` float32 (``None``/scalar/``[out]``/``[out, 1]`` accepted)."""
    if scale is None:
        return torch.ones(1, out_features, dtype=torch.float32, device=device)
    return scale.float().reshape(-1).expand(out_features).reshape(1, out_features).contiguous()


class Fp8ScaledMatmul(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W = q · s`` in fp8 on both passes (module docstring).

    ``apply(x, q, scale, bias, dtype)``: ``x [..., in]`` any float dtype, ``q [out, in]``
    float8_e4m3fn, ``scale`` as :func:`wanlora.models.fp8.dequantize_weight` takes it, ``bias
    [out]`` or ``None``; returns ``[..., out]`` in ``dtype``. Only ``x`` gets a gradient (in its
    own dtype). Saves the fp8 weight and its scale for backward, nothing of ``x``.
    """

    @staticmethod
    def forward(ctx, x, q, scale, bias, dtype):
        out_features, in_features = q.shape
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        s_w = _weight_scale_row(scale, out_features, x.device)
        ctx.save_for_backward(q, s_w)
        qx, s_x = quantize_rows(x.reshape(-1, in_features))
        y = torch._scaled_mm(qx, q.t(), scale_a=s_x, scale_b=s_w, out_dtype=torch.bfloat16).to(dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        q, s_w = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        out_features, in_features = q.shape
        qg, s_g = quantize_rows(grad_out.reshape(-1, out_features).float() * s_w)
        w_col = q.t().contiguous().t()  # [out, in] column-major, as _scaled_mm takes its second operand
        ones = torch.ones(1, in_features, dtype=torch.float32, device=q.device)
        grad_x = torch._scaled_mm(qg, w_col, scale_a=s_g, scale_b=ones, out_dtype=torch.bfloat16)
        return grad_x.to(ctx.x_dtype).reshape(*grad_out.shape[:-1], in_features), None, None, None, None

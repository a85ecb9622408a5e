"""The LoRA weight algebra, written once: scale, delta, merge into a weight, alpha folding.

For a base ``nn.Linear`` with weight ``W [out, in]`` a LoRA module holds ``down`` (A) ``[r, in]``,
``up`` (B) ``[out, r]`` and a scalar ``alpha``; applied with strength ``m`` it changes the weight by

    ΔW = m · (alpha / r) · up @ down                                       [out, in], float32

(the kohya / musubi-tuner convention, ``reference/lora_formats.md`` §2 "Math"; ComfyUI, diffusers and
Wan2GP apply the same update to the same tensors). ``alpha`` None or 0 means ``alpha = r`` (scale 1).
Every place that needs the update — the training network's merge (:mod:`wanlora.lora.adapter`),
the layout conversion (:mod:`wanlora.lora.layouts`), ``wanlora-merge-lora``
(:mod:`wanlora.lora.merge`) and generation (:mod:`wanlora.lora.apply`) — calls :func:`lora_delta`.
The math is float32 whatever the stored dtype; results are cast back once.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lora_scale", "lora_delta", "merge_delta_", "fold_alpha"]


def lora_scale(alpha: float | torch.Tensor | None, rank: int) -> float:
    """``alpha / rank`` as a Python float; ``alpha`` None or 0 means ``alpha = rank`` (scale 1.0).

    Args:
        alpha: the module's alpha (a float, a 0-dim tensor, or None).
        rank: ``r``, the first dim of ``down`` (>= 1).
    Raises:
        ValueError: ``rank`` < 1.
    """
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float().item())
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | torch.Tensor | None = None,
               multiplier: float = 1.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight update ``ΔW = multiplier · (alpha / rank) · up @ down`` in float32.

    Args:
        down: A, ``[r, in]`` (``lora_down.weight`` / ``lora_A.weight``), any float dtype.
        up: B, ``[out, r]`` (``lora_up.weight`` / ``lora_B.weight``).
        alpha: the module's alpha; None or 0 means ``alpha = r`` (scale 1).
        multiplier: strength ``m`` (``--lora_multiplier``; negative subtracts).
        out: optional float32 ``[out, in]`` tensor; the update is *added* into it in place
            (``out += ΔW`` through one ``addmm_``, no temporary of the full size) and ``out`` is
            returned. ``down``/``up`` are moved to its device.
    Returns:
        ``ΔW`` float32 ``[out, in]`` on ``up``'s device (or ``out``, updated).
    Raises:
        ValueError: shapes that are not ``[r, in]`` and ``[out, r]`` of one rank, or an ``out``
            of another shape or dtype.
    """
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"LoRA down {tuple(down.shape)} and up {tuple(up.shape)} are not [rank, in] "
                         f"and [out, rank] of one rank")
    s = float(multiplier) * lora_scale(alpha, down.shape[0])
    if out is None:
        return (up.float() @ down.float()).mul_(s)
    if out.dtype != torch.float32 or tuple(out.shape) != (up.shape[0], down.shape[1]):
        raise ValueError(f"lora_delta(out=...): expected float32 {(up.shape[0], down.shape[1])}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out.addmm_(up.to(out.device, torch.float32), down.to(out.device, torch.float32), alpha=s)


@torch.no_grad()
def merge_delta_(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 alpha: float | torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """Merge a LoRA into a weight in place: ``W ← cast(float32(W) + ΔW)`` (:func:`lora_delta`).

    ``multiplier = -m`` undoes a merge with ``m``: exact up to float32 rounding for a float32 ``W``
    (a bf16/fp16 ``W`` rounds once more each way).

    Args:
        weight: the base ``[out, in]`` weight (any float dtype, any device); modified in place.
        down, up, alpha, multiplier: as :func:`lora_delta`.
    Returns:
        ``weight``.
    Raises:
        ValueError: shapes that do not fit ``weight``; a float8 weight (fp8 base weights: the
            delta would be rounded away — apply the LoRA as hooks instead).
    """
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError("cannot merge a LoRA into fp8 base weights (the delta would be rounded away); "
                         "apply it as hooks (--lora_dynamic) or load the DiT without --fp8_base")
    if tuple(weight.shape) != (up.shape[0], down.shape[1]):
        raise ValueError(f"LoRA ({up.shape[0]}, {down.shape[1]}) does not fit the weight {tuple(weight.shape)}")
    w32 = weight.float() if weight.dtype != torch.float32 else weight
    lora_delta(down, up, alpha, multiplier, out=w32)
    if w32 is not weight:
        weight.copy_(w32)
    return weight


def fold_alpha(down: torch.Tensor, up: torch.Tensor, alpha: float | torch.Tensor | None,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``alpha / rank`` into the two factors: ``down' = s·down``, ``up' = s·up`` with
    ``s = sqrt(alpha / rank)``, so that ``up' @ down' = (alpha / rank) · up @ down`` and a client
    applies scale 1 (alpha = rank). Splitting the factor evenly keeps bf16 files well scaled (the
    convention of musubi-tuner's ``convert_lora.py``, ``reference/lora_formats.md`` §3).

    Args:
        down: ``[r, in]``; up: ``[out, r]``; alpha: as :func:`lora_scale`.
        dtype: dtype of the results (None: each keeps its own). The product with ``s`` is taken in
            float32 and rounded once to that dtype.
    Returns:
        ``(down', up')``; a module whose scale is already 1 is only cast.
    """
    s2 = lora_scale(alpha, down.shape[0])
    if s2 == 1.0:
        return down.to(dtype or down.dtype), up.to(dtype or up.dtype)
    s = math.sqrt(s2)
    return (down.float() * s).to(dtype or down.dtype), (up.float() * s).to(dtype or up.dtype)

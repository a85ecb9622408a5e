"""The LoRA weight algebra, written once: scale, delta, merge into a weight, alpha folding.

For a base ``nn.Linear`` with weight ``W [out, in]`` a LoRA module holds ``down`` (A) ``[r, in]``,
``up`` (B) ``[out, r]`` and a scalar ``alpha``; applied with strength ``m`` it changes the weight by

    ΔW = m · (alpha / r) · up @ down                                       [out, in], float32

(the kohya / musubi-tuner convention, ``reference/lora_formats.md`` §2 "Math"; ComfyUI, diffusers and
Wan2GP apply the same update to the same tensors). ``alpha`` None or 0 means ``alpha = r`` (scale 1).

The two LyCORIS kinds wanlora trains and applies (``lycoris-lora``'s ``modules/loha.py`` and
``modules/lokr.py``, the update its training forward adds; ComfyUI's ``weight_adapter`` applies the
same) replace ``up @ down`` by:

    LoHa   ΔW = m · (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)            r = w1_b.shape[0]
    LoKr   ΔW = m · s · kron(W1, W2)    W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, W2 likewise;
           s = alpha / r with r the rank of a factor stored as a product (w2_b.shape[0], else
           w1_b.shape[0]); s = 1 when both factors are stored whole or the file has no alpha.

A *module* (what :func:`wanlora.lora.layouts.lora_modules` returns per layer) is a dict with
``kind`` (``"lora"``, ``"loha"`` or ``"lokr"``), ``alpha`` (float or None) and its tensors:
``down``/``up`` for LoRA, ``hada_w1_a``... for LoHa, ``lokr_w1``... for LoKr (the LyCORIS suffixes
without the dot). :func:`module_delta` computes any kind's update, :func:`module_shape` its
``(out, in)``.
Every place that needs the update — the training network's merge (:mod:`wanlora.lora.adapter`),
the layout conversion (:mod:`wanlora.lora.layouts`), ``wanlora-merge-lora``
(:mod:`wanlora.lora.merge`) and generation (:mod:`wanlora.lora.apply`) — calls :func:`lora_delta`.
The math is float32 whatever the stored dtype; results are cast back once.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lora_scale", "lora_delta", "merge_delta_", "fold_alpha", "loha_delta", "lokr_delta",
           "module_delta", "module_shape", "module_rank", "merge_module_", "MODULE_TENSORS"]

#: The tensors each module kind may hold (LyCORIS suffixes without the dot; ``alpha`` aside).
MODULE_TENSORS = {
    "lora": ("down", "up"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}


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


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
               alpha: float | torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """The LoHa update ``ΔW = m · (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` in float32
    (Hadamard product of two rank-``r`` matrices; LyCORIS ``modules/loha.py``, FedPara).

    Args:
        w1_a, w2_a: ``[out, r]``; w1_b, w2_b: ``[r, in]`` (``hada_w1_a`` ... as stored, any float dtype).
        alpha: the module's alpha (None or 0: ``alpha = r``, scale 1).
        multiplier: strength ``m``.
    Returns:
        ``ΔW`` float32 ``[out, in]``.
    Raises:
        ValueError: factors that are not ``[out, r] @ [r, in]`` twice with one ``out``, ``in``, ``r``.
    """
    shapes = [tuple(t.shape) for t in (w1_a, w1_b, w2_a, w2_b)]
    if any(len(sh) != 2 for sh in shapes) or shapes[0] != shapes[2] or shapes[1] != shapes[3] \
            or shapes[0][1] != shapes[1][0]:
        raise ValueError(f"LoHa factors {shapes} are not [out, r], [r, in], [out, r], [r, in]")
    s = float(multiplier) * lora_scale(alpha, w1_b.shape[0])
    return (w1_a.float() @ w1_b.float()).mul_(w2_a.float() @ w2_b.float()).mul_(s)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0, multiplier: float = 1.0) -> torch.Tensor:
    """The LoKr update ``ΔW = m · scale · kron(W1, W2)`` in float32 (LyCORIS ``modules/lokr.py``).

    Args:
        w1: ``[a, c]``; w2: ``[b, d]`` (the two whole Kronecker factors; products already formed).
        scale: ``alpha / r`` or 1 (module docstring; :func:`module_delta` derives it from a module).
        multiplier: strength ``m``.
    Returns:
        ``ΔW`` float32 ``[a·b, c·d]`` (``torch.kron``: entry ``(i·b + k, j·d + l) = W1[i, j] · W2[k, l]``).
    Raises:
        ValueError: a factor that is not 2-D (Tucker/conv factors are not Wan Linear layers).
    """
    if w1.ndim != 2 or w2.ndim != 2:
        raise ValueError(f"LoKr factors {tuple(w1.shape)} and {tuple(w2.shape)} are not 2-D matrices")
    return torch.kron(w1.float(), w2.float()).mul_(float(multiplier) * float(scale))


def _lokr_factor(module: dict, n: int) -> tuple[torch.Tensor, int | None]:
    """``(W_n, r)``: factor ``n`` (1 or 2) whole, and its rank when stored as ``a @ b`` (else None)."""
    whole, a, b = (module.get(f"lokr_w{n}{s}") for s in ("", "_a", "_b"))
    if whole is not None:
        return whole, None
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"LoKr factor w{n}: expected lokr_w{n}, or lokr_w{n}_a [p, r] and lokr_w{n}_b [r, q]")
    return a.float() @ b.float(), int(b.shape[0])


def _lokr_parts(module: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(W1, W2, scale)`` of a LoKr module: ``scale = alpha / r`` with ``r`` the rank of the product
    factor (``w2`` first, as ComfyUI's ``LoKrAdapter.calculate_weight`` picks it), else 1."""
    w1, r1 = _lokr_factor(module, 1)
    w2, r2 = _lokr_factor(module, 2)
    rank = r2 if r2 is not None else r1
    alpha = module.get("alpha")
    scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
    return w1, w2, scale


def module_delta(module: dict, multiplier: float = 1.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 update ``ΔW [out, in]`` of one module of any kind (module docstring).

    Args:
        module: ``{"kind", "alpha", <tensors>}`` as :func:`wanlora.lora.layouts.lora_modules` gives.
        multiplier: strength ``m``.
        out: optional float32 ``[out, in]`` tensor the update is added into (returned).
    Raises:
        ValueError: an unknown kind, factors of the wrong shapes, or ``out`` of another shape/dtype.
    """
    kind = module.get("kind", "lora")
    if kind == "lora":
        return lora_delta(module["down"], module["up"], module.get("alpha"), multiplier, out=out)
    if kind == "loha":
        d = loha_delta(module["hada_w1_a"], module["hada_w1_b"], module["hada_w2_a"], module["hada_w2_b"],
                       module.get("alpha"), multiplier)
    elif kind == "lokr":
        w1, w2, scale = _lokr_parts(module)
        d = lokr_delta(w1, w2, scale, multiplier)
    else:
        raise ValueError(f"unknown LoRA module kind {kind!r}; expected one of {', '.join(MODULE_TENSORS)}")
    if out is None:
        return d
    if out.dtype != torch.float32 or out.shape != d.shape:
        raise ValueError(f"module_delta(out=...): expected float32 {tuple(d.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out.add_(d.to(out.device))


def module_shape(module: dict) -> tuple[int, int]:
    """``(out, in)`` of the weight a module updates (no product is formed).

    Raises:
        ValueError: an unknown kind or missing factors.
    """
    kind = module.get("kind", "lora")
    if kind == "lora":
        return int(module["up"].shape[0]), int(module["down"].shape[1])
    if kind == "loha":
        return int(module["hada_w1_a"].shape[0]), int(module["hada_w1_b"].shape[1])
    if kind == "lokr":
        dims = []
        for n in (1, 2):
            whole = module.get(f"lokr_w{n}")
            a, b = module.get(f"lokr_w{n}_a"), module.get(f"lokr_w{n}_b")
            if whole is None and (a is None or b is None):
                raise ValueError(f"LoKr factor w{n}: expected lokr_w{n}, or lokr_w{n}_a and lokr_w{n}_b")
            dims.append((int(whole.shape[0]), int(whole.shape[1])) if whole is not None
                        else (int(a.shape[0]), int(b.shape[1])))
        return dims[0][0] * dims[1][0], dims[0][1] * dims[1][1]
    raise ValueError(f"unknown LoRA module kind {kind!r}; expected one of {', '.join(MODULE_TENSORS)}")


def module_rank(module: dict) -> int | None:
    """The rank ``r`` that ``alpha`` divides: LoRA ``down.shape[0]``, LoHa ``w1_b.shape[0]``, LoKr the
    rank of its product factor (``w2_b``, else ``w1_b``); None for a LoKr stored whole (scale 1)."""
    kind = module.get("kind", "lora")
    if kind == "lora":
        return int(module["down"].shape[0])
    if kind == "loha":
        return int(module["hada_w1_b"].shape[0])
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if module.get(name) is not None:
            return int(module[name].shape[0])
    return None


@torch.no_grad()
def merge_module_(weight: torch.Tensor, module: dict, multiplier: float = 1.0) -> torch.Tensor:
    """Merge a module of any kind into a weight in place: ``W ← cast(float32(W) + ΔW)``
    (:func:`module_delta`; plain LoRA goes through :func:`merge_delta_`).

    Raises:
        ValueError: a float8 weight, or a module that does not fit ``weight``.
    """
    if module.get("kind", "lora") == "lora":
        return merge_delta_(weight, module["down"], module["up"], module.get("alpha"), multiplier)
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError("cannot merge a LoHa/LoKr into fp8 base weights (the delta would be rounded away); "
                         "load the DiT without --fp8_base")
    if tuple(weight.shape) != module_shape(module):
        raise ValueError(f"{module['kind']} module {module_shape(module)} does not fit the weight "
                         f"{tuple(weight.shape)}")
    w32 = weight.float() if weight.dtype != torch.float32 else weight
    module_delta(module, multiplier, out=w32)
    if w32 is not weight:
        weight.copy_(w32)
    return weight

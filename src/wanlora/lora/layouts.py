"""Wan LoRA key layouts: detection, conversion and reading any of them.

Three layouts of the same LoRA (``reference/lora_formats.md`` §2, §3, §6.2)::

    default    lora_unet_blocks_0_self_attn_q.lora_down.weight   [rank, in]
               lora_unet_blocks_0_self_attn_q.lora_up.weight     [out, rank]
               lora_unet_blocks_0_self_attn_q.alpha              []  (0-dim)
    comfy      diffusion_model.blocks.0.self_attn.q.lora_A.weight  [rank, in]
               diffusion_model.blocks.0.self_attn.q.lora_B.weight  [out, rank]
               (optional .alpha; none when the alpha is folded into A and B)
    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight       [rank, in]
               transformer.blocks.0.attn1.to_q.lora_B.weight       [out, rank]
               (never .alpha keys: diffusers refuses them; alpha folded)

``default`` is musubi-tuner's / kohya's layout and the one every client reads when the LoRA
covers the 10 Linear layers of every block; ``comfy`` is the tolerant one (ComfyUI, diffusers,
Wan2GP; any subset of modules); ``diffusers`` loads only in diffusers.

LyCORIS LoHa and LoKr modules (``lycoris-lora``, ``--network_module lycoris.kohya``) use the same
module names with their own tensor suffixes and keep their ``.alpha`` in every layout (ComfyUI
reads it; there is no folding)::

    default    lora_unet_blocks_0_ffn_0.hada_w1_a  [out, r]   .hada_w1_b [r, in]  .hada_w2_a  .hada_w2_b
               lora_unet_blocks_0_ffn_0.lokr_w1    [a, c]     .lokr_w2 [b, d]  or  .lokr_w2_a [b, r] .lokr_w2_b [r, d]
    comfy      diffusion_model.blocks.0.ffn.0.hada_w1_a ...  diffusion_model.blocks.0.ffn.0.lokr_w1 ...

(``reference/lora_formats.md`` §2 and §5: ComfyUI's loader finds them under both prefixes;
diffusers and Wan2GP load neither, so there is no diffusers layout for them.)

Every function here is pure (dicts of tensors in, dicts out); :func:`load_lora_file` is the one
reader used by generation, training (``--network_weights``), conversion and merging.

Math: a module's weight update is ``ΔW = (alpha / rank) · up @ down`` (``up`` = B ``[out, r]``,
``down`` = A ``[r, in]``); a module with no alpha has scale 1 (alpha = rank). It is computed in one
place, :mod:`wanlora.lora.algebra`, which :func:`delta_weights` and :func:`from_default` call.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from wanlora.lora.algebra import MODULE_TENSORS, fold_alpha as fold_scale, module_delta, module_rank, module_shape

__all__ = [
    "LAYOUTS",
    "BLOCK_LINEARS",
    "WAN21_I2V_LINEARS",
    "TOP_LINEARS",
    "LoraFormatError",
    "module_to_key",
    "key_to_module",
    "wan_to_diffusers_path",
    "diffusers_to_wan_path",
    "detect_layout",
    "to_default",
    "from_default",
    "lora_modules",
    "delta_weights",
    "lora_ranks",
    "load_lora_file",
]

LAYOUTS = ("default", "comfy", "diffusers")

#: The 10 Linear layers of every Wan attention block, as dotted paths relative to ``blocks.N``.
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)
#: Wan2.1 I2V/FLF2V only (CLIP image branch); absent from every Wan2.2 model.
WAN21_I2V_LINEARS = ("cross_attn.k_img", "cross_attn.v_img")
#: Linear layers outside the blocks (not trained by default, but read and written).
TOP_LINEARS = (
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3",
)

_DEFAULT_PREFIX = "lora_unet_"
_COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "transformer.", "")
_DIFFUSERS_PREFIX = "transformer."

# Wan path (relative to blocks.N, or top level) <-> diffusers path (WanTransformer3DModel).
_BLOCK_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_TOP_TO_DIFFUSERS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_BLOCK_FROM_DIFFUSERS = {v: k for k, v in _BLOCK_TO_DIFFUSERS.items()}
_TOP_FROM_DIFFUSERS = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}
_BLOCK_LOCAL = {p.replace(".", "_"): p for p in _BLOCK_TO_DIFFUSERS}
_TOP_LOCAL = {p.replace(".", "_"): p for p in _TOP_TO_DIFFUSERS}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DEFAULT_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")

# Suffixes of one LoRA module in each family.
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")
_ALPHA_SUFFIX = ".alpha"
#: LyCORIS tensor suffix -> module kind (the LoHa / LoKr factors of Linear layers).
_LYCORIS_SUFFIXES = {f".{name}": kind for kind in ("loha", "lokr") for name in MODULE_TENSORS[kind]}
#: LyCORIS pieces no Wan LoRA target uses, or that change the math beyond ``ΔW`` (refused by name).
_LYCORIS_REFUSED = {
    ".hada_t1": "LoHa Tucker factors (use_tucker) belong to conv layers; every Wan LoRA target is Linear",
    ".hada_t2": "LoHa Tucker factors (use_tucker) belong to conv layers; every Wan LoRA target is Linear",
    ".lokr_t1": "LoKr Tucker factors (use_tucker) belong to conv layers; every Wan LoRA target is Linear",
    ".lokr_t2": "LoKr Tucker factors (use_tucker) belong to conv layers; every Wan LoRA target is Linear",
    ".on_input": "LyCORIS IA3 is not supported; train with --network_args algo=lokr, loha or locon",
    ".oft_blocks": "LyCORIS OFT/BOFT is not supported; train with --network_args algo=lokr, loha or locon",
    ".oft_diag": "LyCORIS OFT/BOFT is not supported; train with --network_args algo=lokr, loha or locon",
    ".a1.weight": "LyCORIS GLoRA is not supported; train with --network_args algo=lokr, loha or locon",
}


class LoraFormatError(ValueError):
    """A LoRA file or state dict that no layout of this module describes (or an unsupported LyCORIS kind)."""


# ----------------------------------------------------------------------------------------------
# Module names


def module_to_key(path: str) -> str:
    """Wan dotted module path -> default-layout module name.

    ``blocks.0.self_attn.q`` -> ``lora_unet_blocks_0_self_attn_q``; ``head.head`` ->
    ``lora_unet_head_head``. Add ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
    """
    return _DEFAULT_PREFIX + path.replace(".", "_")


def key_to_module(name: str) -> str:
    """Default-layout module name -> Wan dotted module path (inverse of :func:`module_to_key`).

    Accepts the name with or without a tensor suffix (``.lora_down.weight``, ``.alpha``) and
    VideoX-Fun's double underscore (``lora_unet__blocks_0_...``). ``self_attn``, ``cross_attn``,
    ``k_img`` keep their underscores: the tail is mapped through the known Wan Linear names.

    Raises:
        LoraFormatError: the name is not ``lora_unet_`` + a known Wan Linear layer.
    """
    base = name.split(".", 1)[0]
    if not base.startswith(_DEFAULT_PREFIX):
        raise LoraFormatError(f"LoRA key {name!r} does not start with {_DEFAULT_PREFIX!r}")
    rest = base[len(_DEFAULT_PREFIX):].lstrip("_")
    path = _map_path(rest, _BLOCK_LOCAL, _TOP_LOCAL, _DEFAULT_BLOCK_RE)
    if path is not None:
        return path
    raise LoraFormatError(
        f"LoRA key {name!r}: {rest!r} is not a Linear layer of the Wan DiT (known per block: "
        f"{', '.join(_BLOCK_TO_DIFFUSERS)}; top level: {', '.join(_TOP_TO_DIFFUSERS)})"
    )


def _map_path(path: str, block_map: dict[str, str], top_map: dict[str, str],
              block_re: re.Pattern = _BLOCK_RE) -> str | None:
    """``blocks.N.<local>`` -> ``blocks.N.<block_map[local]>``, a top-level path through ``top_map``;
    None when ``path`` is neither (``block_re`` splits off the block number)."""
    m = block_re.match(path)
    if m and m.group(2) in block_map:
        return f"blocks.{int(m.group(1))}.{block_map[m.group(2)]}"
    return top_map.get(path)


def _is_wan_path(path: str) -> bool:
    """True for the dotted path of a Linear layer of the Wan DiT (``blocks.0.self_attn.q``, ``head.head``)."""
    return _map_path(path, _BLOCK_TO_DIFFUSERS, _TOP_TO_DIFFUSERS) is not None


def _check_wan_path(path: str, key: str) -> str:
    if _is_wan_path(path):
        return path
    raise LoraFormatError(f"LoRA key {key!r}: {path!r} is not a Linear layer of the Wan DiT")


def wan_to_diffusers_path(path: str) -> str:
    """``blocks.3.self_attn.o`` -> ``blocks.3.attn1.to_out.0`` (diffusers ``WanTransformer3DModel``).

    Raises:
        LoraFormatError: not a Wan Linear layer.
    """
    out = _map_path(path, _BLOCK_TO_DIFFUSERS, _TOP_TO_DIFFUSERS)
    if out is None:
        raise LoraFormatError(f"{path!r} is not a Linear layer of the Wan DiT")
    return out


def diffusers_to_wan_path(path: str) -> str:
    """Inverse of :func:`wan_to_diffusers_path` (``blocks.0.ffn.net.0.proj`` -> ``blocks.0.ffn.0``).

    Raises:
        LoraFormatError: not a diffusers name of a Wan Linear layer.
    """
    out = _map_path(path, _BLOCK_FROM_DIFFUSERS, _TOP_FROM_DIFFUSERS)
    if out is None:
        raise LoraFormatError(f"{path!r} is not a diffusers name of a Wan DiT Linear layer")
    return out


# ----------------------------------------------------------------------------------------------
# Detection


def _refuse_unsupported(keys) -> None:
    for k in keys:
        for suffix, why in _LYCORIS_REFUSED.items():
            if k.endswith(suffix):
                raise LoraFormatError(f"LoRA key {k!r}: {why}")


def _split_suffix(key: str) -> tuple[str, str] | None:
    for s in _DOWN_SUFFIXES + _UP_SUFFIXES + (_ALPHA_SUFFIX,) + tuple(_LYCORIS_SUFFIXES):
        if key.endswith(s):
            return key[: -len(s)], s
    return None


def detect_layout(state_dict) -> str:
    """Which layout a LoRA state dict uses: ``"default"``, ``"comfy"`` or ``"diffusers"``.

    Decided from the key names (tensor values are not read): ``lora_unet_`` -> default;
    ``transformer.`` followed by diffusers module names (``attn1``, ``ffn.net``, ...) ->
    diffusers; ``diffusion_model.`` (also ``model.diffusion_model.``, ``transformer.`` or no
    prefix followed by Wan names, ``blocks.0.self_attn.q``) -> comfy. Either suffix family
    (``lora_down/lora_up`` or ``lora_A/lora_B``), with or without ``.alpha``, is accepted, and
    so are LyCORIS LoHa/LoKr tensors (``hada_*``, ``lokr_*``) under the default or comfy prefixes.

    Raises:
        LoraFormatError: empty, an unsupported LyCORIS kind (Tucker factors, IA3, OFT, GLoRA), or no
            known layout.
    """
    keys = list(state_dict.keys() if hasattr(state_dict, "keys") else state_dict)
    if not keys:
        raise LoraFormatError("the LoRA holds no tensors")
    _refuse_unsupported(keys)
    if any(k.startswith(_DEFAULT_PREFIX) for k in keys):
        return "default"
    for k in keys:
        split = _split_suffix(k)
        if split is None:
            continue
        base = split[0]
        if base.startswith(_DIFFUSERS_PREFIX):
            path = base[len(_DIFFUSERS_PREFIX):]
            if _map_path(path, _BLOCK_FROM_DIFFUSERS, _TOP_FROM_DIFFUSERS) is not None:
                return "diffusers"
        if any(base.startswith(p) and _is_wan_path(base[len(p):]) for p in _COMFY_PREFIXES):
            return "comfy"
    raise LoraFormatError(
        f"unknown LoRA key layout (first keys: {keys[:3]}); expected lora_unet_* (musubi/kohya), "
        "diffusion_model.* (ComfyUI) or transformer.* with diffusers names"
    )


# ----------------------------------------------------------------------------------------------
# Conversion


def _module_path(base: str, layout: str) -> str:
    if layout == "default":
        return key_to_module(base)
    if layout == "diffusers":
        if not base.startswith(_DIFFUSERS_PREFIX):
            raise LoraFormatError(f"LoRA key {base!r}: every diffusers key starts with 'transformer.'")
        return diffusers_to_wan_path(base[len(_DIFFUSERS_PREFIX):])
    for prefix in _COMFY_PREFIXES:
        if base.startswith(prefix) and _is_wan_path(base[len(prefix):]):
            return base[len(prefix):]
    return _check_wan_path(base, base)


def lora_modules(state_dict: dict[str, torch.Tensor], layout: str | None = None) -> dict[str, dict]:
    """Group a LoRA state dict of any layout by Wan module path.

    Returns:
        ``{wan_path: module}`` with ``module = {"kind": "lora", "down": [r, in], "up": [out, r],
        "alpha": float | None}`` for LoRA, or ``{"kind": "loha" | "lokr", "alpha": ..., <LyCORIS
        tensors by suffix>}`` (``hada_w1_a`` ...; ``lokr_w1`` ...) for LyCORIS modules (the module
        dict of :mod:`wanlora.lora.algebra`; tensors as stored, not copied; ``alpha`` None when
        the file has none for that module).

    Raises:
        LoraFormatError: DoRA or ``.diff`` keys, unsupported LyCORIS pieces, unknown module names,
            a module with a down but no up (or the reverse), mixed kinds in one module, LyCORIS
            tensors in the diffusers layout, or factors whose shapes do not fit together.
    """
    layout = layout or detect_layout(state_dict)
    if layout not in LAYOUTS:
        raise LoraFormatError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    _refuse_unsupported(state_dict.keys())
    mods: dict[str, dict] = {}
    for key, t in state_dict.items():
        split = _split_suffix(key)
        if split is None:
            raise LoraFormatError(
                f"LoRA key {key!r} is neither a lora_down/lora_up (lora_A/lora_B), LoHa (hada_*) or LoKr "
                "(lokr_*) weight nor an alpha; DoRA (dora_scale), full diffs (.diff, .diff_b) and biases "
                "are not supported"
            )
        base, suffix = split
        path = _module_path(base, layout)
        entry = mods.setdefault(path, {"kind": None, "alpha": None})
        kind = "lora" if suffix in _DOWN_SUFFIXES + _UP_SUFFIXES else _LYCORIS_SUFFIXES.get(suffix)
        if kind is not None:
            if entry["kind"] not in (None, kind):
                raise LoraFormatError(f"LoRA module {path!r} mixes {entry['kind']} and {kind} tensors ({key!r})")
            entry["kind"] = kind
        if suffix in _DOWN_SUFFIXES:
            entry["down"] = t
        elif suffix in _UP_SUFFIXES:
            entry["up"] = t
        elif kind is not None:
            if layout == "diffusers":
                raise LoraFormatError(f"LoRA key {key!r}: diffusers cannot load LoHa/LoKr; use the default "
                                      "or comfy layout")
            entry[suffix[1:]] = t
        else:
            if layout == "diffusers":
                raise LoraFormatError(
                    f"LoRA key {key!r}: a diffusers-layout file carries no .alpha keys "
                    "(diffusers raises on them); fold the alpha or use the comfy layout"
                )
            entry["alpha"] = float(t.float().item())
    for path, e in mods.items():
        _check_module(path, e)
    return mods


def _check_module(path: str, e: dict) -> None:
    """Refuse a module whose tensors are incomplete or do not fit together (message names ``path``)."""
    if e["kind"] is None:
        raise LoraFormatError(f"LoRA module {path!r} has an alpha but no weights")
    if e["kind"] == "lora":
        e.setdefault("down", None)
        e.setdefault("up", None)
        if e["down"] is None or e["up"] is None:
            missing = "down (lora_A)" if e["down"] is None else "up (lora_B)"
            raise LoraFormatError(f"LoRA module {path!r} has no {missing} weight")
        if e["down"].ndim != 2 or e["up"].ndim != 2 or e["down"].shape[0] != e["up"].shape[1]:
            raise LoraFormatError(
                f"LoRA module {path!r}: down {tuple(e['down'].shape)} and up "
                f"{tuple(e['up'].shape)} are not [rank, in] and [out, rank] of one rank"
            )
        return
    shapes = {k: tuple(v.shape) for k, v in e.items() if isinstance(v, torch.Tensor)}
    try:
        if e["kind"] == "loha":
            missing = [n for n in MODULE_TENSORS["loha"] if n not in e]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            a1, b1, a2, b2 = (shapes[n] for n in MODULE_TENSORS["loha"])
            if len(a1) != 2 or len(b1) != 2 or a1 != a2 or b1 != b2 or a1[1] != b1[0]:
                raise ValueError("expected hada_w1_a/hada_w2_a [out, r] and hada_w1_b/hada_w2_b [r, in]")
        else:
            for n in (1, 2):
                whole, a, b = (shapes.get(f"lokr_w{n}{x}") for x in ("", "_a", "_b"))
                ok = (whole is not None and len(whole) == 2 and a is None and b is None) or (
                    whole is None and a is not None and b is not None and len(a) == 2 and len(b) == 2
                    and a[1] == b[0])
                if not ok:
                    raise ValueError(f"expected lokr_w{n} [p, q], or lokr_w{n}_a [p, r] and lokr_w{n}_b [r, q]")
        module_shape(e)
    except (ValueError, KeyError) as err:
        kind = {"loha": "LoHa", "lokr": "LoKr"}[e["kind"]]
        raise LoraFormatError(f"{kind} module {path!r} {shapes}: {err}") from None


def to_default(state_dict: dict[str, torch.Tensor], layout: str | None = None,
               alpha_overrides: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Any layout -> default layout, keeping the weight update of every module.

    Tensors are kept as stored (no dtype change); a module without alpha gets
    ``alpha = rank`` (scale 1), stored as a 0-dim float32 tensor like every alpha written here.
    LoHa/LoKr modules keep their tensors and suffixes (:func:`_lycoris_tensors`).
    ``alpha_overrides`` (``{wan_path: alpha}``) supplies alphas from elsewhere (diffusers'
    ``lora_adapter_metadata``).
    """
    out: dict[str, torch.Tensor] = {}
    for path, e in sorted(lora_modules(state_dict, layout).items(), key=lambda kv: _sort_key(kv[0])):
        name = module_to_key(path)
        if e["kind"] != "lora":
            out.update(_lycoris_tensors(name, e))
            continue
        rank = e["down"].shape[0]
        alpha = e["alpha"]
        if alpha is None and alpha_overrides:
            alpha = alpha_overrides.get(path)
        out[f"{name}.lora_down.weight"] = e["down"]
        out[f"{name}.lora_up.weight"] = e["up"]
        out[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha), dtype=torch.float32)
    return out


def from_default(state_dict: dict[str, torch.Tensor], target: str, fold_alpha: bool = True,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Default layout (or any layout) -> ``target`` layout.

    Folding (``fold_alpha=True``; always for ``diffusers``): both down and up are multiplied by
    ``sqrt(alpha / rank)`` in float32 and then cast, so ``up' @ down' = (alpha/rank) up @ down``
    and clients apply scale 1 (the convention of musubi's ``convert_lora.py``; keeping the two
    factors balanced keeps bf16 files well scaled). ``default`` with ``fold_alpha=True`` writes the
    folded tensors with ``alpha = rank``.

    Args:
        state_dict: a LoRA in any layout.
        target: ``"default"``, ``"comfy"`` or ``"diffusers"``.
        fold_alpha: fold alpha into the weights (comfy/default); False keeps ``.alpha`` keys.
            LoHa/LoKr modules always keep their tensors and ``.alpha`` (ComfyUI applies
            ``alpha / r`` to them as LyCORIS does), only renamed: ``diffusion_model.<path>.lokr_w1``.
        dtype: output dtype of the weights (None keeps each tensor's dtype); alphas stay float32.

    Raises:
        LoraFormatError: unknown target, LoHa/LoKr to ``diffusers``, or an input
            :func:`lora_modules` refuses.
    """
    if target not in LAYOUTS:
        raise LoraFormatError(f"unknown target layout {target!r}; use one of {', '.join(LAYOUTS)}")
    fold = fold_alpha or target == "diffusers"
    out: dict[str, torch.Tensor] = {}
    for path, e in sorted(lora_modules(state_dict).items(), key=lambda kv: _sort_key(kv[0])):
        if e["kind"] != "lora":
            if target == "diffusers":
                raise LoraFormatError(f"{path}: a {e['kind']} module has no diffusers layout (diffusers loads "
                                      "neither LoHa nor LoKr); use --target comfy or default")
            name = module_to_key(path) if target == "default" else "diffusion_model." + path
            out.update(_lycoris_tensors(name, e, dtype))
            continue
        down, up = e["down"], e["up"]
        rank = down.shape[0]
        alpha = float(rank if e["alpha"] is None else e["alpha"])
        if fold:
            down, up = fold_scale(down, up, alpha, dtype)
            alpha = float(rank)
        else:
            down, up = down.to(dtype or down.dtype), up.to(dtype or up.dtype)
        if target == "default":
            name = module_to_key(path)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        elif target == "comfy":
            name = "diffusion_model." + path
            out[f"{name}.lora_A.weight"] = down
            out[f"{name}.lora_B.weight"] = up
            if not fold:
                out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        else:
            name = _DIFFUSERS_PREFIX + wan_to_diffusers_path(path)
            out[f"{name}.lora_A.weight"] = down
            out[f"{name}.lora_B.weight"] = up
    return out


def _lycoris_tensors(name: str, e: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A LoHa/LoKr module's tensors under the module name ``name`` (``lora_unet_...`` or
    ``diffusion_model....``): every factor (cast to ``dtype`` when given) and ``.alpha`` as a 0-dim
    float32 (``alpha = r`` when the file had none, which keeps the scale 1; a LoKr stored whole
    has scale 1 whatever its alpha, so ``r`` is taken as 1 there, as LyCORIS saves it)."""
    out = {f"{name}.{k}": (v.to(dtype) if dtype is not None else v)
           for k in MODULE_TENSORS[e["kind"]] if (v := e.get(k)) is not None}
    alpha = e["alpha"] if e["alpha"] is not None else (module_rank(e) or 1)
    out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def _sort_key(path: str):
    m = _BLOCK_RE.match(path)
    if m:
        local = m.group(2)
        return (1, int(m.group(1)), list(_BLOCK_TO_DIFFUSERS).index(local))
    return (0 if path in TOP_LINEARS[:5] else 2, 0, path)


def delta_weights(state_dict: dict[str, torch.Tensor], multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """The float32 weight update of every module: ``multiplier · (alpha/rank) · up @ down`` for LoRA,
    the LoHa/LoKr products for LyCORIS modules (:func:`wanlora.lora.algebra.module_delta`; a module
    without alpha has scale 1).

    Returns:
        ``{wan_path: ΔW [out, in] float32}`` (module paths, e.g. ``blocks.0.self_attn.q``; the
        checkpoint key is ``path + ".weight"``).
    """
    return {path: module_delta(e, multiplier) for path, e in lora_modules(state_dict).items()}


def lora_ranks(state_dict: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """``{wan_path: rank}`` of a LoRA in any layout (:func:`wanlora.lora.algebra.module_rank`; None
    for a LoKr module stored as two whole factors)."""
    return {p: module_rank(e) for p, e in lora_modules(state_dict).items()}


# ----------------------------------------------------------------------------------------------
# Reading files


def _diffusers_alphas(metadata: dict[str, str], state_dict) -> dict[str, float]:
    """Alphas a diffusers file declares in ``lora_adapter_metadata`` (PEFT LoraConfig JSON)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    if "lora_alpha" not in cfg:
        return {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    out = {}
    for path in lora_modules(state_dict, "diffusers"):
        dpath = wan_to_diffusers_path(path)
        alpha = cfg["lora_alpha"]
        for pat, a in alpha_pattern.items():
            if dpath == pat or dpath.endswith("." + pat) or re.fullmatch(pat, dpath):
                alpha = a
        out[path] = float(alpha)
    return out


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA ``.safetensors`` file of any layout, in the default layout.

    Args:
        path: a ``.safetensors`` LoRA (default, comfy or diffusers layout; ``lora_A/B`` or
            ``lora_down/up``; with or without ``.alpha``).

    Returns:
        ``(state_dict, metadata)``: ``lora_unet_<path>.lora_down.weight`` ``[r, in]``,
        ``.lora_up.weight`` ``[out, r]`` in the file's dtype, ``.alpha`` 0-dim float32 (= rank when
        the file had none: scale 1), and the file's safetensors metadata (strings, unchanged).
        LoHa/LoKr modules come as ``lora_unet_<path>.hada_w1_a`` ... / ``.lokr_w1`` ... with ``.alpha``.

    Raises:
        FileNotFoundError: no such file.
        LoraFormatError: a tensor with NaN or Inf values (a diverged training: applied, it gives a
            black video); not a safetensors file, unsupported LyCORIS kinds, DoRA/diff keys, unknown keys.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such LoRA file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise LoraFormatError(f"{p}: cannot read as safetensors ({e}); is it a LoRA .safetensors?") from None
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraFormatError(
            f"{p}: {len(bad)} of {len(sd)} tensors hold NaN or Inf values (first: {bad[0]}); the training that "
            "made it diverged — use an earlier save, or retrain with a lower --learning_rate or --max_grad_norm 1.0")
    try:
        layout = detect_layout(sd)
        overrides = _diffusers_alphas(metadata, sd) if layout == "diffusers" else None
        return to_default(sd, layout, alpha_overrides=overrides), metadata
    except LoraFormatError as e:
        raise LoraFormatError(f"{p}: {e}") from None

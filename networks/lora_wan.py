"""LoRA for the Wan DiT: which layers to adapt, and the kohya/musubi ``create_network`` entry points.

Targets (``reference/lora_formats.md`` §1–§2): every ``nn.Linear`` inside a transformer block
``blocks.N`` — ``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``ffn.0``, ``ffn.2``: 10 per
block, 400 for a 40-layer A14B expert or Wan2.1-14B, 300 for TI2V-5B and Wan2.1-1.3B; the Wan2.1
I2V-14B / FLF2V-14B DiTs add their image cross-attention ``cross_attn.k_img/v_img`` (12 per block,
480). That is exactly the set musubi-tuner's ``networks.lora_wan`` trains (every Linear of a
``WanAttentionBlock``), so the files load in ComfyUI, diffusers, musubi and Wan2GP. The CLIP
projection ``img_emb``, the embeddings, norms, modulation and head are never targeted (outside the
blocks or not Linear).

``--network_args`` (strings, ``key=value``) understood here:

- ``exclude_patterns=[".*ffn.*"]`` / ``include_patterns=[...]``: Python regexes full-matched
  against dotted names (``blocks.3.self_attn.q``); an exclude match drops a module unless an
  include pattern re-admits it (musubi semantics; the one rule of :mod:`wanlora.lora.patterns`,
  which ``wanlora-generate --exclude_patterns/--include_patterns`` follows too).
- ``rank_dropout=0.1``, ``module_dropout=0.1``: floats (training only).
- ``loraplus_lr_ratio=16``: LoRA+ — the ``lora_up`` weights train with ``lr * ratio``.
- ``verbose=True``: log every module.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from wanlora.lora.adapter import unwrap_model
from wanlora.lora.patterns import select_modules
from wanlora.networks.lora import LoRANetwork, read_lora_weights

logger = logging.getLogger(__name__)

__all__ = [
    "WAN_DEFAULT_EXCLUDE_PATTERNS",
    "wan_lora_candidates",
    "wan_lora_targets",
    "parse_network_args",
    "create_network",
    "create_network_from_weights",
]

_BLOCK_LINEAR = re.compile(r"blocks\.\d+\..+")

WAN_DEFAULT_EXCLUDE_PATTERNS = (
    r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head|modulation).*",
    r".*img_emb.*",
)
"""Always-added excludes: musubi's (embeddings, norms, head) plus the CLIP projection ``img_emb``."""

_KNOWN_ARGS = {"exclude_patterns", "include_patterns", "rank_dropout", "module_dropout",
               "loraplus_lr_ratio", "verbose"}


def wan_lora_candidates(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` inside ``blocks.N`` as ``(dotted_name, module)``, in module order."""
    return [(n, m) for n, m in unwrap_model(unet).named_modules()
            if isinstance(m, nn.Linear) and _BLOCK_LINEAR.fullmatch(n)]


def wan_lora_targets(unet: nn.Module, exclude_patterns=None, include_patterns=None,
                     verbose: bool = False) -> list[tuple[str, nn.Linear]]:
    """The Wan LoRA targets after the default and the user's include/exclude patterns (the one rule
    of :mod:`wanlora.lora.patterns`: full match on dotted names, include re-admits excluded ones)."""
    excl = list(exclude_patterns or []) + list(WAN_DEFAULT_EXCLUDE_PATTERNS)
    return select_modules(wan_lora_candidates(unet), excl, include_patterns, "--network_args", verbose)


def _parse_list(value: Any, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    s = str(value).strip()
    if s.startswith("["):
        try:
            with warnings.catch_warnings():  # "\." in a regex is an invalid escape Python keeps as is
                warnings.simplefilter("ignore")
                parsed = ast.literal_eval(s)
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                f"--network_args {key}={s}: not a Python list of strings ({e}); write it like "
                f"{key}=[\".*ffn.*\", \".*cross_attn.*\"]"
            ) from e
        if not isinstance(parsed, (list, tuple)) or not all(isinstance(p, str) for p in parsed):
            raise ValueError(f"--network_args {key}={s}: expected a list of strings")
        return list(parsed)
    return [s]  # a single bare pattern


def _parse_float(value: Any, key: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--network_args {key}={value!r}: expected a number, e.g. {key}=0.1") from e


def parse_network_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Parse ``--network_args`` strings into typed options.

    Returns:
        dict with ``exclude_patterns``, ``include_patterns`` (lists or None), ``rank_dropout``,
        ``module_dropout``, ``loraplus_lr_ratio`` (floats or None), ``verbose`` (bool).
        Unknown keys are logged as ignored.
    Raises:
        ValueError: a malformed list or number, or a dropout outside [0, 1).
    """
    unknown = sorted(set(kwargs) - _KNOWN_ARGS)
    if unknown:
        logger.warning("networks.lora_wan ignores --network_args %s (known: %s)",
                       ", ".join(unknown), ", ".join(sorted(_KNOWN_ARGS)))
    out = {
        "exclude_patterns": _parse_list(kwargs.get("exclude_patterns"), "exclude_patterns"),
        "include_patterns": _parse_list(kwargs.get("include_patterns"), "include_patterns"),
        "rank_dropout": _parse_float(kwargs.get("rank_dropout"), "rank_dropout"),
        "module_dropout": _parse_float(kwargs.get("module_dropout"), "module_dropout"),
        "loraplus_lr_ratio": _parse_float(kwargs.get("loraplus_lr_ratio"), "loraplus_lr_ratio"),
        "verbose": str(kwargs.get("verbose", False)).strip().lower() in ("true", "1", "yes"),
    }
    for key in ("rank_dropout", "module_dropout"):
        v = out[key]
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"--network_args {key}={v}: must be in [0, 1)")
    return out


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoders: list[nn.Module] | nn.Module | None,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs,
) -> LoRANetwork:
    """A new LoRA network on the Wan DiT ``unet`` (kohya/musubi ``create_network`` convention).

    Args:
        multiplier: run-time strength (1.0 for training).
        network_dim: rank (``--network_dim``; None -> 4).
        network_alpha: alpha (``--network_alpha``; None -> 1.0, musubi's default; 0 -> rank).
        vae, text_encoders: unused (convention).
        unet: the DiT (:class:`wanlora.models.dit.WanDiT` or any module with ``blocks.N``).
        neuron_dropout: dropout on the ``down`` output (``--network_dropout``).
        **kwargs: ``--network_args`` (see the module docstring).
    Returns:
        the network, not yet applied: call ``network.apply_to(text_encoders, unet)``.
    Raises:
        ValueError: bad ``--network_args`` or no target module left.
    """
    args = parse_network_args(kwargs)
    targets = wan_lora_targets(unet, args["exclude_patterns"], args["include_patterns"], args["verbose"])
    return LoRANetwork(
        targets,
        multiplier=multiplier,
        lora_dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=neuron_dropout,
        rank_dropout=args["rank_dropout"],
        module_dropout=args["module_dropout"],
        loraplus_lr_ratio=args["loraplus_lr_ratio"],
        verbose=args["verbose"],
    )


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoders: list[nn.Module] | nn.Module | None,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A LoRA network shaped by a weights file: rank and alpha per module read from the weights
    (also ``--dim_from_weights``). Weights are *not* loaded (kohya convention, so they can be
    merged instead): follow with ``network.load_weights(weights_sd)`` or
    ``network.merge_to(weights_sd=weights_sd)``.

    Args:
        multiplier: strength.
        file: LoRA file in any layout (read through ``wanlora.lora.layouts``); ignored when
            ``weights_sd`` is given.
        unet: the DiT. Any ``nn.Linear`` of it named in the weights is adapted (not only the
            block layers), so files from other trainers load.
        weights_sd: an already-read default-layout state dict.
        for_inference: no dropout; the network starts in eval mode.
        **kwargs: ``--network_args``; only ``rank_dropout``, ``module_dropout``,
            ``loraplus_lr_ratio``, ``verbose`` apply (the targets come from the weights).
    Returns:
        ``(network, weights_sd)``.
    Raises:
        ValueError: weights naming modules the DiT lacks (listed), or non-LoRA keys.
    """
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd, _ = read_lora_weights(file)
    args = parse_network_args(kwargs)
    network = LoRANetwork.from_weights(
        unet, weights_sd, multiplier, source=str(file) if file is not None else "(state dict)",
        rank_dropout=None if for_inference else args["rank_dropout"],
        module_dropout=None if for_inference else args["module_dropout"],
        loraplus_lr_ratio=args["loraplus_lr_ratio"],
        verbose=args["verbose"],
    )
    if for_inference:
        network.eval()
    return network, weights_sd

"""A generic LoRA network: low-rank adapters beside the base ``nn.Linear`` layers of a model.

Each adapter (:class:`LoRAModule`) sits *beside* its base Linear (peft style): the base layer and
its weights are never replaced or modified, the adapter adds its output through a forward hook on
the base layer. For a base layer ``y = W x + b`` with ``W`` of shape ``[out, in]``::

    y = W x + b + multiplier * scale * up(dropout(down(x)))       scale = alpha / rank
    lora_down.weight  [rank, in]    kaiming-uniform init
    lora_up.weight    [out, rank]   zero init (so a new network changes nothing)
    alpha             []            0-dim float32 buffer; 0 or None means alpha = rank

and the merged form is ``W' = W + multiplier * scale * (up @ down)`` (float32 math, cast back).

:class:`LoRANetwork` holds the adapters of one model as submodules named
``lora_unet_<dotted path with . -> _>`` so that its ``state_dict()`` *is* the kohya/musubi default
LoRA layout (``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
``reference/lora_formats.md`` §2). The flag semantics (alpha default, neuron/rank/module dropout,
LoRA+ learning-rate ratio, ``create_network``/``create_network_from_weights``) follow the kohya /
musubi-tuner convention users know; which modules to target is decided by an architecture module
such as :mod:`wanlora.networks.lora_wan`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "LoRAModule",
    "LoRANetwork",
    "lora_name_for",
    "select_modules",
    "compile_patterns",
    "read_lora_weights",
    "dims_from_weights",
    "addnet_hashes",
]

DEFAULT_PREFIX = "lora_unet"


def lora_name_for(dotted_name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The default-layout module name of a base layer: ``blocks.0.self_attn.q`` ->
    ``lora_unet_blocks_0_self_attn_q``."""
    return f"{prefix}_{dotted_name}".replace(".", "_")


def compile_patterns(patterns: Iterable[str] | None, field: str) -> list[re.Pattern]:
    """Compile regexes given through ``--network_args``; a bad regex is an error naming it.

    Raises:
        ValueError: a pattern is not a valid Python regular expression.
    """
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(
                f"--network_args {field}: {p!r} is not a valid regular expression ({e}); "
                f"patterns are Python regexes full-matched against dotted module names such as "
                f"'blocks.0.self_attn.q'"
            ) from e
    return out


def select_modules(
    candidates: Sequence[tuple[str, nn.Module]],
    exclude_patterns: Iterable[str] | None = None,
    include_patterns: Iterable[str] | None = None,
    verbose: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Filter ``(dotted_name, module)`` candidates with musubi's include/exclude semantics.

    A candidate whose dotted name full-matches an exclude pattern is dropped unless it also
    full-matches an include pattern (an include pattern only re-admits excluded names; it never
    adds modules outside ``candidates``).
    """
    excl = compile_patterns(exclude_patterns, "exclude_patterns")
    incl = compile_patterns(include_patterns, "include_patterns")
    kept = []
    for name, module in candidates:
        excluded = any(p.fullmatch(name) for p in excl)
        included = any(p.fullmatch(name) for p in incl)
        if excluded and not included:
            if verbose:
                logger.info("LoRA: exclude %s", name)
            continue
        kept.append((name, module))
    return kept


class LoRAModule(nn.Module):
    """One low-rank adapter beside a base ``nn.Linear`` (``org_module``).

    Args:
        lora_name: default-layout name, e.g. ``lora_unet_blocks_0_self_attn_q``.
        org_module: the base ``nn.Linear`` (weight ``[out, in]``); never modified except by
            :meth:`merge` / :meth:`unmerge`.
        multiplier: strength applied at run time (and at merge time).
        lora_dim: rank ``r``.
        alpha: scale numerator; ``None`` or 0 means ``alpha = rank`` (scale 1). A float alpha is
            kept exactly for the scale (``alpha / rank`` in Python float); the saved ``alpha``
            buffer is float32.
        dropout: neuron dropout probability on the ``down`` output (training only).
        rank_dropout: probability of zeroing each rank channel per sample (training only); the
            kept channels are rescaled by ``1 / (1 - p)``.
        module_dropout: probability of skipping the whole adapter for one call (training only).

    Raises:
        TypeError: ``org_module`` is not an ``nn.Linear``.
        ValueError: ``lora_dim`` < 1.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(org_module, nn.Linear):
            raise TypeError(
                f"LoRA {lora_name}: the base module is {type(org_module).__name__}, only nn.Linear "
                f"is supported; exclude it with --network_args \"exclude_patterns=[...]\""
            )
        lora_dim = int(lora_dim)
        if lora_dim < 1:
            raise ValueError(f"LoRA {lora_name}: rank (--network_dim) must be >= 1, got {lora_dim}")
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.in_features = org_module.in_features
        self.out_features = org_module.out_features
        w = org_module.weight
        factory = {"device": w.device if w.device.type != "meta" else None}
        self.lora_down = nn.Linear(self.in_features, lora_dim, bias=False, **factory)
        self.lora_up = nn.Linear(lora_dim, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, **factory))

        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        # The base layer is held outside the module tree, so the network's state_dict holds
        # only adapter weights and the base is never moved or trained through the network.
        self._org = [org_module]
        self._hook = None
        self._merged_multiplier: float | None = None

    # -- base layer -------------------------------------------------------------------------
    @property
    def org_module(self) -> nn.Linear:
        """The base ``nn.Linear`` this adapter sits beside."""
        return self._org[0]

    @property
    def merged(self) -> bool:
        """True while the adapter's delta is merged into the base weight."""
        return self._merged_multiplier is not None

    def apply_to(self) -> None:
        """Hook the base layer's forward so its output gains the adapter's delta."""
        if self._hook is None:
            self._hook = self.org_module.register_forward_hook(self._forward_hook)

    def remove(self) -> None:
        """Take the hook off the base layer (unmerging first if merged)."""
        if self.merged:
            self.unmerge()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- forward ----------------------------------------------------------------------------
    def _forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return output
        return self.add_delta(args[0], output)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapter's contribution ``multiplier * scale * up(dropout(down(x)))``.

        Args:
            x: base-layer input ``[..., in]``. Cast to the adapter's dtype unless autocast is on.
        Returns:
            ``[..., out]`` in the adapter's (or autocast) dtype, or None when module dropout
            skips the adapter for this call.
        """
        if self.module_dropout is not None and self.training and torch.rand(()) < self.module_dropout:
            return None
        w_dtype = self.lora_down.weight.dtype
        if x.is_floating_point() and x.dtype != w_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w_dtype)
        lx = self.lora_down(x)
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout, training=True)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            shape = (lx.shape[0],) + (1,) * (lx.ndim - 2) + (self.lora_dim,)
            mask = torch.rand(shape, device=lx.device) > self.rank_dropout
            lx = lx * mask.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(lx) * (self.multiplier * scale)

    def add_delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out + delta(x)``, rounded once to ``base_out``'s dtype."""
        d = self.delta(x)
        if d is None:
            return base_out
        return (base_out + d).to(base_out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base layer plus adapter: ``org_module(x)`` when hooked, else computed here."""
        if self._hook is not None:
            return self.org_module(x)
        return self.add_delta(x, F.linear(x, self.org_module.weight, self.org_module.bias))

    # -- merge ------------------------------------------------------------------------------
    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The merged delta ``multiplier * scale * up @ down``, float32 ``[out, in]``."""
        m = self.multiplier if multiplier is None else float(multiplier)
        up = self.lora_up.weight.detach().float()
        down = self.lora_down.weight.detach().float()
        return (up @ down) * (m * self.scale)

    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Add the delta into the base weight (float32 math, cast back to the base dtype).

        While merged the hook adds nothing. Raises RuntimeError when already merged.
        """
        if self.merged:
            raise RuntimeError(f"LoRA {self.lora_name} is already merged; unmerge() first")
        m = self.multiplier if multiplier is None else float(multiplier)
        w = self.org_module.weight
        delta = self.get_weight(m).to(w.device)
        w.copy_((w.float() + delta).to(w.dtype))
        self._merged_multiplier = m

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta merged by :meth:`merge` (same multiplier) from the base weight.

        Exact up to float32 rounding for a float32 base (bf16 bases round once more).
        Raises RuntimeError when not merged.
        """
        if not self.merged:
            raise RuntimeError(f"LoRA {self.lora_name} is not merged")
        w = self.org_module.weight
        delta = self.get_weight(self._merged_multiplier).to(w.device)
        w.copy_((w.float() - delta).to(w.dtype))
        self._merged_multiplier = None

    # -- state ------------------------------------------------------------------------------
    def refresh_scale(self) -> None:
        """Recompute ``scale`` from the ``alpha`` buffer (after loading weights)."""
        a = float(self.alpha.detach().float().item())
        self.scale = (a if a != 0 else self.lora_dim) / self.lora_dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "alpha" in state_dict:
            self.refresh_scale()

    def extra_repr(self) -> str:
        return (f"{self.lora_name}: in={self.in_features}, out={self.out_features}, "
                f"rank={self.lora_dim}, scale={self.scale:g}")


class LoRANetwork(nn.Module):
    """The adapters of one model (the DiT), keyed by their default-layout names.

    Args:
        targets: ``(dotted_name, nn.Linear)`` pairs of the base model to adapt.
        multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout: as
            :class:`LoRAModule`.
        modules_dim, modules_alpha: per-``lora_name`` rank and alpha (network built from a
            weights file); when given, a target absent from ``modules_dim`` gets no adapter.
        prefix: key prefix, ``lora_unet``.
        loraplus_lr_ratio: LoRA+ ratio used by :meth:`prepare_optimizer_params`.
        verbose: log each adapter.

    Raises:
        ValueError: no target module (names the fix), or two targets with the same name.
    """

    def __init__(
        self,
        targets: Sequence[tuple[str, nn.Module]],
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, float] | None = None,
        prefix: str = DEFAULT_PREFIX,
        loraplus_lr_ratio: float | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        self.multiplier = float(multiplier)
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.prefix = prefix
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.unet_loras: list[LoRAModule] = []
        self.text_encoder_loras: list[LoRAModule] = []  # kohya convention; always empty here
        self.dotted_names: dict[str, str] = {}
        for dotted, module in targets:
            name = lora_name_for(dotted, prefix)
            if name in self.dotted_names:
                raise ValueError(f"two target modules map to the LoRA name {name}")
            if modules_dim is not None:
                if name not in modules_dim:
                    continue
                dim, a = modules_dim[name], (modules_alpha or {}).get(name)
            else:
                dim, a = lora_dim, alpha
            lora = LoRAModule(name, module, self.multiplier, dim, a, dropout, rank_dropout, module_dropout)
            self.add_module(name, lora)
            self.unet_loras.append(lora)
            self.dotted_names[name] = dotted
            if verbose:
                logger.info("LoRA: %s", lora.extra_repr())
        if not self.unet_loras:
            raise ValueError(
                "no LoRA target modules were found in the model; check --network_module and the "
                "include/exclude patterns in --network_args"
            )
        logger.info("LoRA network: %d modules, rank %s, alpha %s", len(self.unet_loras),
                    "from weights" if modules_dim is not None else lora_dim,
                    "from weights" if modules_dim is not None else alpha)

    # -- application --------------------------------------------------------------------------
    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool = False,
                 apply_unet: bool = True) -> None:
        """Hook every adapter beside its base layer and freeze the base layers' parameters.

        ``text_encoders``/``unet`` are accepted for the kohya convention; the targets were fixed
        at construction. Text-encoder LoRA is not supported: ``apply_text_encoder=True`` only
        logs a notice. ``apply_unet=False`` applies nothing.
        """
        if apply_text_encoder:
            logger.info("LoRA: text-encoder LoRA is not supported; only the DiT is adapted")
        if not apply_unet:
            return
        if not hasattr(self, "_frozen"):
            self._frozen = []
        for lora in self.unet_loras:
            if lora._hook is not None:
                continue  # already applied
            for p in lora.org_module.parameters():
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
            lora.apply_to()

    def remove(self) -> None:
        """Take the network back off the model: unmerge where merged, remove every hook and
        restore the base parameters' ``requires_grad``. The base weights end as they began."""
        for lora in self.unet_loras:
            lora.remove()
        for p, rg in getattr(self, "_frozen", []):
            p.requires_grad_(rg)
        self._frozen = []

    restore = remove

    def set_multiplier(self, multiplier: float) -> None:
        """Set the run-time strength of every adapter (merged adapters keep their merged one)."""
        self.multiplier = float(multiplier)
        for lora in self.unet_loras:
            lora.multiplier = self.multiplier

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the dynamic application of every adapter."""
        for lora in self.unet_loras:
            lora.enabled = bool(enabled)

    def is_mergeable(self) -> bool:
        """Plain LoRA can always be merged into the base weights."""
        return True

    def merge_to(self, text_encoders=None, unet=None, weights_sd: dict | None = None,
                 dtype: torch.dtype | None = None, device=None, non_blocking: bool = False) -> None:
        """Merge every adapter into its base weight (float32 math, cast back to the base dtype).

        Args:
            weights_sd: optional default-layout state dict loaded first (strict, as
                :meth:`load_weights`); kohya-convention callers pass the weights here.
            text_encoders, unet, dtype, device, non_blocking: accepted for the kohya convention;
                the base weights keep their dtype and device.
        """
        if weights_sd is not None:
            self.load_weights(weights_sd)
        for lora in self.unet_loras:
            lora.merge()

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from its base weight."""
        for lora in self.unet_loras:
            if lora.merged:
                lora.unmerge()

    # -- training hooks of the kohya convention ----------------------------------------------
    def prepare_network(self, args) -> None:
        """Called once after creation (kohya convention); nothing to do."""

    def prepare_grad_etc(self, unet=None) -> None:
        """Make the adapters trainable (kohya convention)."""
        self.requires_grad_(True)

    def on_epoch_start(self, unet=None) -> None:
        """Put the adapters in training mode (dropouts on; kohya convention)."""
        self.train()

    def on_step_start(self) -> None:
        """Called before each step (kohya convention); nothing to do."""

    def enable_gradient_checkpointing(self) -> None:
        """Adapters hold no activations of their own; checkpointing is the DiT's."""

    def get_trainable_params(self):
        """Every adapter parameter (``lora_down``/``lora_up`` weights)."""
        return self.parameters()

    def set_loraplus_lr_ratio(self, ratio: float | None) -> None:
        """Set the LoRA+ ratio used by :meth:`prepare_optimizer_params` (None: off)."""
        self.loraplus_lr_ratio = ratio

    def prepare_optimizer_params(self, unet_lr: float = 1e-4, loraplus_lr_ratio: float | None = None,
                                 text_encoder_lr=None, **kwargs):
        """Optimizer parameter groups (kohya/musubi convention).

        Args:
            unet_lr: learning rate of the adapters.
            loraplus_lr_ratio: LoRA+ ratio; the ``lora_up`` weights get ``unet_lr * ratio``.
                ``None`` uses the ratio from ``--network_args`` (if any).
        Returns:
            ``(param_groups, descriptions)``: a list of ``{"params": [...], "lr": float}`` dicts —
            one group, or two with LoRA+ (``lora_down`` first, then ``lora_up``) — and a list of
            names per group (``"unet"``, ``"unet plus"``).
        """
        self.requires_grad_(True)
        ratio = self.loraplus_lr_ratio if loraplus_lr_ratio is None else loraplus_lr_ratio
        base, plus = [], []
        for lora in self.unet_loras:
            for name, p in lora.named_parameters():
                (plus if ratio is not None and name.startswith("lora_up") else base).append(p)
        groups, desc = [], []
        if base:
            groups.append({"params": base, "lr": unet_lr})
            desc.append("unet")
        if plus:
            groups.append({"params": plus, "lr": unet_lr * ratio})
            desc.append("unet plus")
        return groups, desc

    # -- files --------------------------------------------------------------------------------
    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
        """Write the adapters as a default-layout ``.safetensors`` file, atomically.

        Args:
            file: destination path; must end with ``.safetensors``.
            dtype: dtype of ``lora_down``/``lora_up`` (None keeps theirs); ``alpha`` stays
                float32 so a fractional alpha survives exactly as trained.
            metadata: string key/values (``reference/lora_formats.md`` §7.4), or None;
                ``sshs_model_hash``/``sshs_legacy_hash`` are added (:func:`addnet_hashes`).
        Raises:
            ValueError: the suffix is not ``.safetensors`` or a metadata value is not a string.
        """
        from wanlora.io_utils import save_safetensors

        if Path(file).suffix != ".safetensors":
            raise ValueError(f"LoRA file {file}: only .safetensors is written; rename it to *.safetensors")
        md = dict(metadata or {})
        bad = [k for k, v in md.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"LoRA metadata values must be strings; not strings: {bad}")
        sd = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu")
            if k.endswith(".alpha"):
                v = v.float()
            elif dtype is not None:
                v = v.to(dtype)
            sd[k] = v.contiguous()
        md.update(addnet_hashes(sd, md))
        save_safetensors(sd, file, metadata=md)

    def load_weights(self, file_or_sd) -> dict:
        """Load adapter weights, strictly.

        Args:
            file_or_sd: a LoRA file in any layout :func:`read_lora_weights` reads, or a state
                dict in the default layout. A module without ``.alpha`` gets ``alpha = rank``.
        Returns:
            the file's metadata (empty for a state dict).
        Raises:
            ValueError: keys the network lacks, network modules the weights lack, or shape
                mismatches — all listed, with the fix.
        """
        if isinstance(file_or_sd, dict):
            sd, md, src = file_or_sd, {}, "the given state dict"
        else:
            sd, md = read_lora_weights(file_or_sd)
            src = str(file_or_sd)
        own = self.state_dict()
        sd = dict(sd)
        for lora in self.unet_loras:  # a missing alpha means alpha = rank (scale 1)
            key = f"{lora.lora_name}.alpha"
            if key not in sd and f"{lora.lora_name}.lora_down.weight" in sd:
                sd[key] = torch.tensor(float(sd[f"{lora.lora_name}.lora_down.weight"].shape[0]))
        unexpected = sorted(set(sd) - set(own))
        missing = sorted(set(own) - set(sd))
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
                  for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
        if unexpected or missing or shapes:
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} keys the network lacks: {_preview(unexpected)}")
            if missing:
                parts.append(f"{len(missing)} network keys missing from the file: {_preview(missing)}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatches: {_preview(shapes)}")
            raise ValueError(
                f"LoRA weights {src} do not match the network: " + "; ".join(parts) +
                ". Build the network from the file (--dim_from_weights / create_network_from_weights) "
                "or use the --network_dim and --network_args it was trained with."
            )
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
        for lora in self.unet_loras:
            lora.refresh_scale()
        return md

    def extra_repr(self) -> str:
        return f"{len(self.unet_loras)} LoRA modules, multiplier={self.multiplier:g}"


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The ``sshs_model_hash`` / ``sshs_legacy_hash`` metadata kohya-style trainers precompute so
    webui-style LoRA managers need not hash the file.

    Computed on the safetensors serialization of ``tensors`` with only the ``ss_*`` metadata
    (the training record; later user metadata must not change the hash): the model hash is the
    SHA-256 of the data section after the header, the legacy hash the first 8 hex digits of the
    SHA-256 of the 64 KiB at byte offset 1 MiB.
    """
    import hashlib

    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")} or None)
    header_len = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header_len:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def _preview(items: list[str], n: int = 8) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_lora_weights(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file as ``(state_dict in the default lora_unet_* layout, metadata)``.

    Uses :func:`wanlora.lora.layouts.load_lora_file` (every layout: default, ComfyUI
    ``diffusion_model.*`` lora_A/B, diffusers-native) when available, else reads a default-layout
    ``.safetensors`` file directly.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"LoRA file {file} does not exist; check --network_weights / --lora_weight")
    try:
        from wanlora.lora.layouts import load_lora_file
    except ImportError:
        load_lora_file = None
    if load_lora_file is not None:
        sd, md = load_lora_file(file)
        return dict(sd), dict(md or {})
    from safetensors import safe_open

    sd = {}
    with safe_open(str(file), framework="pt") as f:
        md = dict(f.metadata() or {})
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    return sd, md


def dims_from_weights(weights_sd: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank and alpha of a default-layout state dict.

    Returns:
        ``(modules_dim, modules_alpha)`` keyed by ``lora_name``; rank = ``lora_down.weight``'s
        first dim; alpha from ``.alpha`` (missing: alpha = rank).
    Raises:
        ValueError: keys that are not plain LoRA (``lora_down``/``lora_up``/``alpha``), e.g.
            LoHa/LoKr — those need their own network module.
    """
    dims, alphas, other = {}, {}, []
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif rest == "alpha":
            alphas[name] = float(value.float().item())
        elif rest != "lora_up.weight":
            other.append(key)
    if other:
        raise ValueError(
            f"{len(other)} keys are not plain LoRA weights ({_preview(other)}); LoHa/LoKr files "
            f"need their network module, e.g. --network_module lycoris.kohya"
        )
    for name, dim in dims.items():
        alphas.setdefault(name, float(dim))
    return dims, {n: alphas[n] for n in dims}

"""LoRA adapters beside the ``nn.Linear`` layers of a model: forward hooks, merge, strict loading.

The hook machinery shared by training (:mod:`wanlora.networks.lora` builds its kohya-convention
network on :class:`LoRAAdapterSet`) and generation (:func:`wanlora.lora.apply.apply_loras` with
``--lora_dynamic``). Each adapter (:class:`LoRAModule`) sits *beside* its base Linear (peft style):
the base layer is never replaced, the adapter adds its output through a forward hook. For a base
layer ``y = W x + b`` with ``W [out, in]``::

    y = W x + b + multiplier * scale * up(dropout(down(x)))       scale = alpha / rank
    lora_down.weight  [rank, in]    kaiming-uniform init
    lora_up.weight    [out, rank]   zero init (so a new adapter changes nothing)
    alpha             []            0-dim float32 buffer; 0 or None means alpha = rank

and the merged form is ``W' = W + ΔW`` with ``ΔW`` from :func:`wanlora.lora.algebra.lora_delta`.
Adapters are registered under their default-layout names ``lora_unet_<dotted path, . -> _>``
(:func:`wanlora.lora.layouts.module_to_key`), so a set's ``state_dict()`` *is* the kohya / musubi
file layout (``reference/lora_formats.md`` §2).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanlora.lora.algebra import lora_delta, lora_scale, merge_delta_
from wanlora.lora.layouts import module_to_key

logger = logging.getLogger(__name__)

__all__ = ["LoRAModule", "LoRAAdapterSet", "unwrap_model", "dims_from_weights", "weight_targets"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under DDP / ``torch.compile`` / accelerate wrappers (``.module``, ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def _preview(items: list[str], n: int = 8) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items) - n} more)" if len(items) > n else "")


class LoRAModule(nn.Module):
    """One low-rank adapter beside a base ``nn.Linear`` (:attr:`base_layer`; kohya's name for it,
    ``org_module``, is kept as an alias for plug-in code).

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
        self.alpha_value = alpha  # Python float: the scale is alpha / rank without float32 rounding
        self.scale = lora_scale(alpha, lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, **factory))

        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        # The base layer is held outside the module tree, so the network's state_dict holds
        # only adapter weights and the base is never moved or trained through the network.
        self._base = [org_module]
        self._hook = None
        self._merged_multiplier: float | None = None

    # -- base layer -------------------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Linear:
        """The base ``nn.Linear`` this adapter sits beside."""
        return self._base[0]

    org_module = base_layer  # the kohya / LyCORIS name

    @property
    def merged(self) -> bool:
        """True while the adapter's delta is merged into the base weight."""
        return self._merged_multiplier is not None

    def apply_to(self) -> None:
        """Hook the base layer's forward so its output gains the adapter's delta."""
        if self._hook is None:
            self._hook = self.base_layer.register_forward_hook(self._forward_hook)

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
        """Base layer plus adapter: ``base_layer(x)`` when hooked, else computed here."""
        if self._hook is not None:
            return self.base_layer(x)
        return self.add_delta(x, F.linear(x, self.base_layer.weight, self.base_layer.bias))

    # -- merge ------------------------------------------------------------------------------
    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The merged delta ``multiplier * scale * up @ down``, float32 ``[out, in]``
        (:func:`wanlora.lora.algebra.lora_delta`)."""
        m = self.multiplier if multiplier is None else float(multiplier)
        return lora_delta(self.lora_down.weight.detach(), self.lora_up.weight.detach(), self.alpha_value, m)

    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Add the delta into the base weight (float32 math, cast back to the base dtype).

        While merged the hook adds nothing. Raises RuntimeError when already merged.
        """
        if self.merged:
            raise RuntimeError(f"LoRA {self.lora_name} is already merged; unmerge() first")
        m = self.multiplier if multiplier is None else float(multiplier)
        merge_delta_(self.base_layer.weight, self.lora_down.weight, self.lora_up.weight, self.alpha_value, m)
        self._merged_multiplier = m

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta merged by :meth:`merge` (same multiplier) from the base weight.

        Exact up to float32 rounding for a float32 base (bf16 bases round once more).
        Raises RuntimeError when not merged.
        """
        if not self.merged:
            raise RuntimeError(f"LoRA {self.lora_name} is not merged")
        merge_delta_(self.base_layer.weight, self.lora_down.weight, self.lora_up.weight,
                     self.alpha_value, -self._merged_multiplier)
        self._merged_multiplier = None

    # -- state ------------------------------------------------------------------------------
    def refresh_scale(self) -> None:
        """Recompute ``scale`` from the ``alpha`` buffer (after loading weights)."""
        self.alpha_value = float(self.alpha.detach().float().item())
        self.scale = lora_scale(self.alpha_value, self.lora_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "alpha" in state_dict:
            self.refresh_scale()

    def extra_repr(self) -> str:
        return (f"{self.lora_name}: in={self.in_features}, out={self.out_features}, "
                f"rank={self.lora_dim}, scale={self.scale:g}")


class LoRAAdapterSet(nn.Module):
    """The adapters of one model, registered under their default-layout names.

    Args:
        targets: ``(dotted_name, nn.Linear)`` pairs of the base model to adapt, in order.
        multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout: as :class:`LoRAModule`.
        modules_dim, modules_alpha: per-``lora_name`` rank and alpha (a set shaped by a weights
            file, :func:`dims_from_weights`); when given, a target absent from ``modules_dim`` gets
            no adapter.
        verbose: log each adapter.

    Attributes:
        adapters: the :class:`LoRAModule` list, in target order.
        lora_dim, alpha, dropout, rank_dropout, module_dropout, multiplier: as given.
        dotted_names: ``{lora_name: dotted module path}``.

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
        verbose: bool = False,
    ) -> None:
        super().__init__()
        self.multiplier = float(multiplier)
        self.lora_dim, self.alpha = lora_dim, alpha  # the defaults (per module: ``modules_dim``)
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.adapters: list[LoRAModule] = []
        self.dotted_names: dict[str, str] = {}
        self._frozen: list = []
        for dotted, module in targets:
            name = module_to_key(dotted)
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
            self.adapters.append(lora)
            self.dotted_names[name] = dotted
            if verbose:
                logger.info("LoRA: %s", lora.extra_repr())
        if not self.adapters:
            raise ValueError(
                "no LoRA target modules were found in the model; check --network_module and the "
                "include/exclude patterns in --network_args"
            )

    @classmethod
    def from_weights(cls, model: nn.Module, weights_sd: dict[str, torch.Tensor], multiplier: float = 1.0,
                     source: str = "(state dict)", **kwargs) -> "LoRAAdapterSet":
        """A set shaped by default-layout weights: one adapter per module they name, with the
        rank and alpha they hold (weights not loaded: :meth:`load_adapter_weights`).

        Args:
            model: the base model; any ``nn.Linear`` of it named in the weights is adapted.
            weights_sd: default-layout state dict (:func:`wanlora.lora.layouts.load_lora_file`).
            multiplier: strength.
            source: the file, for messages.
            **kwargs: ``dropout``, ``rank_dropout``, ``module_dropout``, ``verbose`` (and, for a
                subclass, its own options).
        Raises:
            ValueError: weights naming modules the model lacks as ``nn.Linear`` (listed), or keys
                that are not plain LoRA.
        """
        dims, alphas = dims_from_weights(weights_sd)
        return cls(weight_targets(model, dims, source), multiplier=multiplier, modules_dim=dims,
                   modules_alpha=alphas, **kwargs)

    # -- application --------------------------------------------------------------------------
    def attach(self) -> None:
        """Hook every adapter beside its base layer and freeze the base layers' parameters."""
        for lora in self.adapters:
            if lora._hook is not None:
                continue  # already attached
            for p in lora.base_layer.parameters():
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
            lora.apply_to()

    def detach(self) -> None:
        """Take the adapters back off the model: unmerge where merged, remove every hook and restore
        the base parameters' ``requires_grad``. The base weights end as they began."""
        for lora in self.adapters:
            lora.remove()
        for p, rg in self._frozen:
            p.requires_grad_(rg)
        self._frozen = []

    def set_multiplier(self, multiplier: float) -> None:
        """Set the run-time strength of every adapter (merged adapters keep their merged one)."""
        self.multiplier = float(multiplier)
        for lora in self.adapters:
            lora.multiplier = self.multiplier

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the dynamic application of every adapter."""
        for lora in self.adapters:
            lora.enabled = bool(enabled)

    def merge(self) -> None:
        """Merge every adapter into its base weight (:func:`wanlora.lora.algebra.merge_delta_`)."""
        for lora in self.adapters:
            lora.merge()

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from its base weight."""
        for lora in self.adapters:
            if lora.merged:
                lora.unmerge()

    def load_adapter_weights(self, sd: dict[str, torch.Tensor], source: str = "the given state dict") -> None:
        """Load default-layout adapter weights, strictly (a module without ``.alpha``: alpha = rank).

        Raises:
            ValueError: keys the set lacks, adapters the weights lack, or shape mismatches — all
                listed, with the fix.
        """
        own = self.state_dict()
        sd = dict(sd)
        for lora in self.adapters:  # a missing alpha means alpha = rank (scale 1)
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
                f"LoRA weights {source} do not match the network: " + "; ".join(parts) +
                ". Build the network from the file (--dim_from_weights / create_network_from_weights) "
                "or use the --network_dim and --network_args it was trained with."
            )
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
        for lora in self.adapters:
            lora.refresh_scale()

    def extra_repr(self) -> str:
        return f"{len(self.adapters)} LoRA modules, multiplier={self.multiplier:g}"


def weight_targets(model: nn.Module, lora_names, source: str = "(state dict)") -> list[tuple[str, nn.Linear]]:
    """The ``(dotted path, nn.Linear)`` of ``model`` for each default-layout module name, in the
    model's module order.

    Raises:
        ValueError: names of modules the model does not have as ``nn.Linear`` (listed, with the fix).
    """
    linears = {module_to_key(n): (n, m) for n, m in unwrap_model(model).named_modules()
               if isinstance(m, nn.Linear)}
    names = set(lora_names)
    unknown = sorted(names - set(linears))
    if unknown:
        raise ValueError(
            f"LoRA weights {source} name {len(unknown)} modules this DiT does not have as nn.Linear: "
            f"{_preview(unknown)}. Check that the LoRA was trained for this model (--task / --dit) "
            f"and is in a layout wanlora-convert-lora reads."
        )
    return [t for name, t in linears.items() if name in names]


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

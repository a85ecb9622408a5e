"""LyCORIS LoHa / LoKr modules applied beside a model's ``nn.Linear`` layers as forward hooks.

Generation merges a LoRA file into the DiT by default; it hooks instead with ``--lora_dynamic`` and
whenever the base weights are float8 (a merged delta would be rounded away). Plain LoRA files use
:class:`wanlora.lora.adapter.LoRAAdapterSet` there; LoHa/LoKr files use :class:`LycorisHooks`: for a
base layer ``y = W x + b``::

    y = W x + b + x ΔWᵀ        ΔW = multiplier · module update   [out, in]

with ``ΔW`` from :func:`wanlora.lora.algebra.module_delta` (the one formula; float32), rebuilt from
the factors at every call and cast once to the input's dtype, so no full-size copy of the weights is
kept (a 5120 x 5120 LoKr or rank-16 LoHa update costs far less than the layer's own matmul over the
video tokens). Merged and hooked differ by rounding only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanlora.lora.adapter import weight_targets
from wanlora.lora.algebra import module_delta, module_shape
from wanlora.lora.layouts import module_to_key

__all__ = ["LycorisHooks"]


class _Factors(nn.Module):
    """One module's LyCORIS tensors as buffers (so ``.to(device)`` moves them with the set)."""

    def __init__(self, module: dict):
        super().__init__()
        self.kind, self.alpha = module["kind"], module.get("alpha")
        for name, t in module.items():
            if isinstance(t, torch.Tensor):
                self.register_buffer(name, t.detach().clone())

    def as_module(self) -> dict:
        """The module dict of :mod:`wanlora.lora.algebra` (kind, alpha, tensors)."""
        return {"kind": self.kind, "alpha": self.alpha, **dict(self.named_buffers())}


class LycorisHooks(nn.Module):
    """The LoHa/LoKr modules of one file, hooked beside the model's Linear layers.

    Args:
        model: the DiT; every module path of ``modules`` must be an ``nn.Linear`` of it.
        modules: ``{wan_path: module}`` as :func:`wanlora.lora.layouts.lora_modules` returns
            (kinds ``loha`` / ``lokr``; a plain ``lora`` module of the same file works too).
        multiplier: strength ``m``.
        source: the file, for messages.

    Raises:
        ValueError: a path the model lacks as ``nn.Linear`` (listed), or a module whose ``(out, in)``
            differs from its layer's weight.
    """

    def __init__(self, model: nn.Module, modules: dict[str, dict], multiplier: float = 1.0,
                 source: str = "(state dict)"):
        super().__init__()
        self.multiplier = float(multiplier)
        self.enabled = True
        self._targets = dict(weight_targets(model, [module_to_key(p) for p in modules], source))
        self._hooks: list = []
        for path, module in modules.items():
            layer = self._targets[path]
            if module_shape(module) != tuple(layer.weight.shape):
                raise ValueError(f"{source}: {path} updates a {module_shape(module)} weight, the model's is "
                                 f"{tuple(layer.weight.shape)} (a LoRA for another model size?)")
            self.add_module(module_to_key(path), _Factors(module))

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` for the layer ``path``: ``x [..., in]`` -> ``[..., out]`` in ``x``'s dtype."""
        factors = getattr(self, module_to_key(path))
        d = module_delta(factors.as_module(), self.multiplier)
        return F.linear(x, d.to(device=x.device, dtype=x.dtype))

    def attach(self) -> None:
        """Register the forward hooks (once); the base layers are not modified."""
        if self._hooks:
            return
        for path, layer in self._targets.items():
            def hook(_module, args, output, _path=path):
                if not self.enabled:
                    return output
                return (output + self.delta(_path, args[0])).to(output.dtype)

            self._hooks.append(layer.register_forward_hook(hook))

    def set_enabled(self, enabled: bool) -> None:
        """Switch the hooks' update on or off without removing them (``LoRAAdapterSet``'s interface)."""
        self.enabled = bool(enabled)

    def detach(self) -> None:
        """Remove the hooks: the model computes as without the file again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def extra_repr(self) -> str:
        return f"{len(self._targets)} LyCORIS modules, multiplier={self.multiplier:g}"

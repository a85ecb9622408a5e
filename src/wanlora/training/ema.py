"""An exponential moving average (EMA) of each trained LoRA's weights (``--ema_decay``).

After every optimizer step of a LoRA (only that LoRA: with one LoRA per A14B expert, each EMA
follows its own expert's steps), each trainable parameter ``w`` updates its float32 shadow ``e``::

    d_n = min(decay, (1 + n) / (10 + n))     n = updates so far (0 at the first); with --no-ema_warmup d_n = decay
    e  <- e * d_n + w * (1 - d_n)            float32, in this order of operations

starting from the LoRA's weights when training starts (``--network_weights`` or the fresh
initialization). A step skipped on the device for a non-finite loss counts as an update too (its
weights did not change), so the update never waits for the device. The warm-up cap is diffusers'
``EMAModel.get_decay`` without ``use_ema_warmup`` (``training_utils.py``): the first update keeps
10 % of the initial weights, the 100th about 92 %, so an EMA of a short run is not held at the
initialization (a LoRA's ``up`` starts at zero).

The EMA is saved beside every LoRA save as ``NAME_ema`` (``NAME_ema.safetensors``,
``NAME-step00000200_ema_high_noise.safetensors``, ...; :class:`wanlora.training.checkpoint.Checkpointer`)
through the network's own ``save_weights`` with the EMA weights swapped in, so the files have the
raw files' layout and metadata (plus ``wan.ema_*``) and load wherever those load. ``--save_state``
folders hold each LoRA's EMA and its update count as ``ema.<key>``, so ``--resume`` continues the
average exactly. ``--sample_with_ema`` renders training samples with the EMA weights.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn

__all__ = ["LoraEMA", "ema_decay_at"]

log = logging.getLogger(__name__)


def ema_decay_at(decay: float, n: int, warmup: bool = True) -> float:
    """The decay of the ``n``-th update (0-based): ``min(decay, (1 + n) / (10 + n))`` with
    ``warmup`` (diffusers ``EMAModel.get_decay``), else ``decay``."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


class LoraEMA:
    """The EMA of every LoRA of a run (module docstring).

    Args:
        networks: ``{lora key: network}`` (unwrapped plug-in networks); their trainable
            parameters (``requires_grad``) are averaged, by parameter name.
        decay: ``--ema_decay`` in ``[0, 1)``.
        warmup: ``--ema_warmup`` (the ``(1 + n) / (10 + n)`` cap).
    Raises:
        ValueError: a decay outside ``[0, 1)`` (names the flag).
    """

    def __init__(self, networks: dict[str, nn.Module], decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decay {decay}: use a value in [0, 1), e.g. 0.999")
        self.networks, self.decay, self.warmup = networks, float(decay), bool(warmup)
        self.shadow: dict[str, dict[str, torch.Tensor]] = {}
        self.updates: dict[str, int] = {}
        for key in networks:
            self.reset(key)

    def _params(self, key: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.networks[key].named_parameters() if p.requires_grad]

    def reset(self, key: str) -> None:
        """Start the LoRA ``key``'s EMA again from its current weights (no updates yet)."""
        self.shadow[key] = {name: p.detach().float().clone() for name, p in self._params(key)}
        self.updates[key] = 0

    @torch.no_grad()
    def update(self, key: str) -> None:
        """One EMA update of the LoRA ``key`` from its current weights (call after its optimizer step)."""
        d = ema_decay_at(self.decay, self.updates[key], self.warmup)
        shadow = self.shadow[key]
        for name, p in self._params(key):
            shadow[name].mul_(d).add_(p.detach().float() * (1.0 - d))
        self.updates[key] += 1

    @contextlib.contextmanager
    def applied(self, keys: Iterable[str] | None = None):
        """Within the block the networks ``keys`` (default all) hold their EMA weights; their own
        weights are put back bit for bit afterwards, also on an exception."""
        keys = list(self.networks if keys is None else keys)
        saved = []
        try:
            with torch.no_grad():
                for key in keys:
                    for name, p in self._params(key):
                        saved.append((p, p.detach().clone()))
                        p.copy_(self.shadow[key][name])
            yield
        finally:
            with torch.no_grad():
                for p, raw in saved:
                    p.copy_(raw)

    def metadata(self, key: str) -> dict:
        """What an EMA file records besides the raw file's metadata (``wan.ema_*``)."""
        return {"wan.ema_decay": self.decay, "wan.ema_warmup": self.warmup, "wan.ema_updates": self.updates[key]}

    def state_dict(self, key: str) -> dict:
        """The LoRA ``key``'s EMA for a state folder: ``{"updates", "decay", "warmup", "weights"}``."""
        return {"updates": self.updates[key], "decay": self.decay, "warmup": self.warmup,
                "weights": {n: t.clone() for n, t in self.shadow[key].items()}}

    def load_state_dict(self, key: str, state: dict) -> None:
        """Restore :meth:`state_dict` (``--resume``). A different ``--ema_decay`` or ``--ema_warmup``
        than saved is logged and the current flags apply from here on.

        Raises:
            ValueError: weights of other parameter names or shapes than the network's (named).
        """
        weights = state["weights"]
        own = self.shadow[key]
        bad = sorted(set(weights) ^ set(own)) + [n for n in own if n in weights and weights[n].shape != own[n].shape]
        if bad:
            raise ValueError(f"the saved EMA of LoRA {key} does not match the network ({len(bad)} parameters differ, "
                             f"e.g. {bad[:3]}); resume without --ema_decay or from another save")
        if (state.get("decay"), state.get("warmup")) != (self.decay, self.warmup):
            log.warning("EMA of LoRA %s was saved with decay %s, warmup %s; continuing with decay %s, warmup %s",
                        key, state.get("decay"), state.get("warmup"), self.decay, self.warmup)
        for n, t in weights.items():
            own[n].copy_(t.float())
        self.updates[key] = int(state["updates"])

    def sampling_with_ema(self, sample_fn: Callable) -> Callable:
        """``sample_fn(step, epoch, networks)`` run with every LoRA's EMA weights (``--sample_with_ema``)."""

        def with_ema(*args, **kwargs):
            with self.applied():
                return sample_fn(*args, **kwargs)

        return with_ema

"""One trained LoRA with everything that updates it: network, DDP wrapper, optimizer, schedule.

A run trains one :class:`LoraBundle` per LoRA of its expert plan (two for ``separate`` A14B
experts, else one). The network comes from the plug-in module (``create_network``, the kohya
convention shared with musubi-tuner and LyCORIS; the kohya names ``unet``/``unet_loras`` stay on
that side of the boundary), hooked into the frozen DiT with ``apply_to``. What Accelerate prepares
is :class:`LoRAForward`, a module holding only the network, so DDP synchronizes the LoRA
parameters and never copies the DiT.

The network module's training hooks are called where the kohya trainers call them, with kohya's
arguments ``(text_encoder, unet)`` = ``(None, dit)``: ``prepare_grad_etc`` once after building,
``on_epoch_start`` at each epoch start, ``on_step_start()`` before each micro-batch of the active
LoRA (:meth:`LoraBundle.on_epoch_start`, :meth:`LoraBundle.on_step_start`), when the module
defines them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn

from wanlora.tasks import Task
from wanlora.training.config import LoraSettings, TrainConfig
from wanlora.training.optim import build_lr_scheduler, build_optimizer, parse_kv_args

__all__ = ["LoRAForward", "LoraBundle", "build_lora_bundles", "set_active", "check_lora_modules"]

log = logging.getLogger(__name__)


class LoRAForward(nn.Module):
    """What Accelerate prepares: one LoRA network plus a forward that runs the (frozen) DiT.

    ``forward(dit, x, timestep, context, y)`` simply calls ``dit(x, timestep, context, y)``: the
    LoRA hooks inside the DiT add the adapters' deltas. Passing the DiT as an argument keeps it
    out of this module, so DDP synchronizes only the LoRA parameters and never copies the base.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, dit, x, timestep, context, y=None, clip_fea=None):
        """``dit(x, timestep, context, y)`` (``clip_fea=`` for the Wan2.1 image models): shapes as
        :meth:`wanlora.models.dit.WanDiT.forward` (``x [B, C, F, H, W]``, ``timestep [B]`` or
        ``[B, F]`` on 0..1000); returns the velocity ``[B, C_out, F, H, W]`` float32."""
        if clip_fea is None:
            return dit(x, timestep, context, y)
        return dit(x, timestep, context, y, clip_fea=clip_fea)


@dataclass
class LoraBundle:
    """One trained LoRA (module docstring).

    Attributes:
        key: the LoRA's key in the expert plan (``high_noise``, ``low_noise`` or ``lora``).
        network: the plug-in network (unwrapped).
        wrapper: the :class:`LoRAForward` as Accelerate prepared it (DDP under several processes).
        optimizer, scheduler: as prepared; the scheduler steps on every optimizer step of the run.
        settings: the resolved flags (weights, rank, alpha, learning rate).
        trainable: the parameters the optimizer updates (gradient clipping, norms).
    """

    key: str
    network: nn.Module
    wrapper: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    settings: LoraSettings
    trainable: list

    def rank_alpha(self) -> tuple[int, float]:
        """The rank and alpha the network really has (``--dim_from_weights`` takes them from the
        file); the flags' for a network module that does not expose its adapters."""
        mods = getattr(self.network, "unet_loras", None)
        if mods:
            return int(mods[0].lora_dim), float(mods[0].alpha.item())
        return self.settings.dim, self.settings.alpha

    def on_epoch_start(self, dit: nn.Module) -> None:
        """The network module's ``on_epoch_start(None, dit)`` hook, when it has one."""
        if hasattr(self.network, "on_epoch_start"):
            self.network.on_epoch_start(None, dit)

    def on_step_start(self) -> None:
        """The network module's ``on_step_start()`` hook, when it has one."""
        if hasattr(self.network, "on_step_start"):
            self.network.on_step_start()


def build_lora_bundles(config: TrainConfig, module, plan, task: Task, dit: nn.Module, accelerator,
                       max_steps: int) -> dict[str, LoraBundle]:
    """``{lora key: LoraBundle}`` for every LoRA of ``plan``, on ``accelerator.device``, prepared.

    Raises:
        ValueError: adapters on modules the task does not have (:func:`check_lora_modules`), or
            optimizer arguments the optimizer rejects.
    """
    bundles = {}
    alone = len(plan.loras) == 1
    for key in plan.loras:
        settings = config.lora(key, alone=alone)
        net = build_network(config, module, key, dit, settings).to(accelerator.device)
        check_lora_modules(net, task, len(dit.blocks), key, warn=accelerator.is_main_process)
        groups, _ = net.prepare_optimizer_params(unet_lr=settings.learning_rate)
        o = config.optimization
        opt = build_optimizer(o.optimizer_type, groups, settings.learning_rate, o.optimizer_args)
        sched = build_lr_scheduler(o.lr_scheduler, opt, o.lr_warmup_steps, max_steps,
                                   o.lr_scheduler_num_cycles, o.lr_scheduler_power)
        wrapper, opt = accelerator.prepare(LoRAForward(net), opt)
        accelerator.register_for_checkpointing(sched)
        trainable = [p for p in net.parameters() if p.requires_grad]
        bundles[key] = LoraBundle(key, net, wrapper, opt, sched, settings, trainable)
    return bundles


def build_network(config: TrainConfig, module, key: str, dit: nn.Module, settings: LoraSettings) -> nn.Module:
    """One LoRA network (``module.create_network``, the kohya convention) on the DiT, hooked in by
    ``apply_to``, started from ``settings.weights`` when given, made trainable by the module's
    ``prepare_grad_etc(None, dit)`` hook (kohya's ``(text_encoder, unet)``)."""
    net_kwargs = parse_kv_args(config.network.network_args, "--network_args")
    net_kwargs = {k: (v if isinstance(v, str) else str(v)) for k, v in net_kwargs.items()}
    if settings.weights and config.network.dim_from_weights:
        network, _ = module.create_network_from_weights(1.0, settings.weights, None, None, dit, **net_kwargs)
    else:
        network = module.create_network(1.0, settings.dim, settings.alpha, None, None, dit,
                                        neuron_dropout=config.network.network_dropout, **net_kwargs)
    network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    if settings.weights:
        network.load_weights(settings.weights)
        log.info("LoRA %s: starting from %s", key, settings.weights)
    if hasattr(network, "prepare_network"):
        network.prepare_network(SimpleNamespace(**config.flat()))  # kohya hooks read flat flags
    if hasattr(network, "prepare_grad_etc"):
        network.prepare_grad_etc(None, dit)
    return network


def check_lora_modules(network, task: Task, num_layers: int, lora_key: str | None = None,
                       warn: bool = True) -> list[str]:
    """Check the modules a new network adapts, once before training (not at every save).

    Refuses Wan2.1-I2V-only modules for the task (:func:`wanlora.lora.metadata.check_lora_for_task`)
    and logs, when ``warn``, the coverage warnings of :func:`wanlora.lora.metadata.coverage_warnings`
    (``exclude_patterns`` / ``include_patterns`` that leave a partial LoRA, which diffusers' loader
    refuses in the default layout). A network whose state dict is not LoRA (LoHa/LoKr) is skipped.

    Returns:
        The coverage warnings (empty when every block has every layer).

    Raises:
        ValueError: modules the task does not have (named, with the exclude pattern that drops them).
    """
    from wanlora.lora.layouts import LoraFormatError, lora_modules
    from wanlora.lora.metadata import check_lora_for_task, coverage_warnings

    try:
        paths = set(lora_modules(network.state_dict()))
    except LoraFormatError:
        return []
    check_lora_for_task(paths, task.name)
    found = coverage_warnings(paths, num_layers, emit=False)
    for w in found if warn else ():
        log.warning("LoRA%s: %s", f" {lora_key}" if lora_key else "", w)
    return found


def set_active(bundles: dict[str, LoraBundle], active: str | None) -> None:
    """Enable the LoRA ``active`` (a key of ``bundles``, or None for none) and disable the others
    (``set_enabled``, or multiplier 1/0 for network modules without it)."""
    for key, b in bundles.items():
        if hasattr(b.network, "set_enabled"):
            b.network.set_enabled(key == active)
        else:
            b.network.set_multiplier(1.0 if key == active else 0.0)

"""Optimizers and learning-rate schedules, by the names users pass on the command line.

``--optimizer_type``: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes), ``adafactor``
(transformers), or any importable ``module.Class`` taking ``(params, lr=..., **kwargs)``;
``--optimizer_args key=value ...`` become keyword arguments (values read as Python literals:
``weight_decay=0.01``, ``betas=(0.9,0.99)``, ``relative_step=False``).

``--lr_scheduler``: the schedules of ``transformers.get_scheduler`` by their names, as a multiplier
of the base learning rate (``torch.optim.lr_scheduler.LambdaLR``), with ``W`` warm-up steps (linear
from 0) and ``N`` total steps:

* ``constant``: 1 (warm-up ignored); ``constant_with_warmup``: ``step/W`` then 1;
* ``linear``: warm-up, then ``(N - step)/(N - W)`` down to 0;
* ``cosine``: warm-up, then ``0.5·(1 + cos(π·p))`` with ``p = (step - W)/(N - W)``;
* ``cosine_with_restarts``: warm-up, then cosine restarted ``num_cycles`` times (hard restarts);
* ``polynomial``: warm-up, then ``(1 - p)^power`` (to 0).
"""

from __future__ import annotations

import ast
import importlib
import logging
from typing import Iterable

import torch

__all__ = ["parse_kv_args", "build_optimizer", "build_lr_scheduler", "check_optimizer_type", "check_lr_scheduler",
           "SCHEDULERS"]

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_kv_args(items: Iterable[str] | None, flag: str = "--optimizer_args") -> dict:
    """``["weight_decay=0.01", "betas=(0.9,0.99)"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.99)}``.

    A value that is not a Python literal stays a string (``foo=bar`` -> ``"bar"``).

    Raises:
        ValueError: an item without ``=`` (names the flag and the item).
    """
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag}: '{item}' is not key=value (e.g. {flag} weight_decay=0.01)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _resolve_optimizer_class(name: str):
    key = name.lower()
    if key in ("adamw", "adam_w"):
        return torch.optim.AdamW
    if key in ("adamw8bit", "adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "--optimizer_type adamw8bit needs bitsandbytes: pip install 'wanlora[bnb]' "
                "(or pip install bitsandbytes), or use --optimizer_type adamw"
            ) from None
        return bnb.optim.AdamW8bit
    if key == "adafactor":
        try:
            from transformers.optimization import Adafactor
        except ImportError:
            raise ImportError("--optimizer_type adafactor needs transformers: pip install transformers") from None
        return Adafactor
    if "." in name:
        module, _, cls = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--optimizer_type {name}: cannot import {cls} from {module} ({e})") from None
    raise ValueError(
        f"--optimizer_type {name!r}: use adamw, adamw8bit, adafactor, or a module.Class such as "
        "torch.optim.SGD"
    )


def check_optimizer_type(name: str) -> type:
    """The optimizer class ``--optimizer_type name`` names, without building it (so a typo or a missing
    package is reported before any model loads). Raises as :func:`build_optimizer`."""
    return _resolve_optimizer_class(name)


def build_optimizer(name: str, params, lr: float, optimizer_args: Iterable[str] | dict | None = None):
    """The optimizer ``name`` over ``params`` (tensors or param-group dicts with their own ``lr``).

    Adafactor with a fixed learning rate gets ``relative_step=False, scale_parameter=False``
    unless ``--optimizer_args`` says otherwise (otherwise it ignores ``lr``). torch's AdamW is the
    fused one (``fused=True``) unless ``--optimizer_args`` names ``fused`` or ``foreach``: one kernel
    per step, and it skips a step with non-finite gradients on the device (the trainer's
    ``found_inf``), with no wait for the device.

    Raises:
        ImportError: the optimizer's package is missing (names the pip command).
        ValueError: an unknown name, or arguments the optimizer rejects (named).
    """
    kwargs = dict(optimizer_args) if isinstance(optimizer_args, dict) else parse_kv_args(optimizer_args)
    cls = _resolve_optimizer_class(name)
    if name.lower() == "adafactor":
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
    if cls is torch.optim.AdamW and "foreach" not in kwargs:
        kwargs.setdefault("fused", True)
    try:
        opt = cls(params, lr=lr, **kwargs)
    except TypeError as e:
        raise ValueError(f"--optimizer_type {name} with --optimizer_args {kwargs}: {e}") from None
    log.info("optimizer: %s(lr=%g%s)", cls.__name__, lr, "".join(f", {k}={v}" for k, v in kwargs.items()))
    return opt


def check_lr_scheduler(name: str) -> None:
    """Raise ``ValueError`` (naming the valid ones) when ``--lr_scheduler name`` is unknown."""
    if name not in SCHEDULERS:
        raise ValueError(f"--lr_scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def build_lr_scheduler(name: str, optimizer, warmup_steps: float, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule ``name`` for ``optimizer`` (``transformers.get_scheduler``; module docstring);
    ``warmup_steps`` below 1 is a fraction of ``total_steps``.

    The schedule counts optimizer steps of the run: the trainer steps every LoRA's schedule on
    every global step, so learning rates follow the global step whichever expert was active.

    Raises:
        ValueError: an unknown schedule name (lists the valid ones).
    """
    from transformers import get_scheduler

    check_lr_scheduler(name)
    if 0 < warmup_steps < 1:
        warmup_steps = int(round(warmup_steps * total_steps))
    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs = {"num_cycles": int(num_cycles)}
    elif name == "polynomial":
        if not optimizer.defaults["lr"] > 0:  # every schedule of a zero rate is zero; transformers
            name = "constant"                 # refuses a polynomial whose end rate is not below it
        else:
            kwargs = {"power": float(power), "lr_end": 0.0}
    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_steps),
                         num_training_steps=max(int(total_steps), 1), scheduler_specific_kwargs=kwargs or None)

"""LoRAs at inference: which file goes to which expert, pattern filtering, merge or hook.

``wanlora-generate --lora_weight ... --lora_multiplier ...`` (and ``..._high_noise`` for the A14B
experts). A file's safetensors metadata ``wan.expert`` (``high_noise`` / ``low_noise`` / ``both``,
written by wanlora's trainer) sends it to that expert whatever flag it came under (logged); a file
without it goes to the expert of its flag (``--lora_weight``: the low-noise expert, the one
``--dit`` names; ``--lora_weight_high_noise``: the high-noise expert), or to the only model.

``--include_patterns`` / ``--exclude_patterns``: one regular expression per LoRA (a single one
applies to all), searched in the module name (``lora_unet_blocks_9_cross_attn_k``); a module is
kept when it matches the include pattern (if any) and does not match the exclude pattern (if any).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field


__all__ = ["LoraPlan", "plan_loras", "filter_lora_state_dict", "apply_loras", "EXPERT_KEY"]

logger = logging.getLogger(__name__)

#: metadata key naming the expert a LoRA was trained for
EXPERT_KEY = "wan.expert"


@dataclass
class LoraPlan:
    """One LoRA file and where it goes.

    Attributes:
        path: the ``.safetensors`` file; multiplier: its strength (``--lora_multiplier``).
        experts: ``("high_noise",)``, ``("low_noise",)``, both, or ``(None,)`` for a single model.
        include / exclude: the regular expressions of ``--include_patterns`` / ``--exclude_patterns``.
        reason: why it goes to those experts (metadata, flag, single model), for the log.
        state_dict / metadata: the file's tensors (wanlora's default key layout) and metadata.
    """

    path: str
    multiplier: float
    experts: tuple  # expert names, or (None,) for single-model tasks
    include: str | None = None
    exclude: str | None = None
    reason: str = ""
    state_dict: dict = field(default_factory=dict, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)


def _expand(values: list, n: int, default, name: str) -> list:
    if not values:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} LoRA files; give one per file, or one for all")
    return list(values)


def plan_loras(task, weights, multipliers, weights_high=(), multipliers_high=(), include=None, exclude=None):
    """Read every LoRA file and decide its expert(s) and multiplier.

    Args:
        task: the :class:`wanlora.tasks.Task`.
        weights / multipliers: ``--lora_weight`` files (low-noise expert or the only model) and
            their multipliers (none: 1.0 each; one: for all).
        weights_high / multipliers_high: the same for ``--lora_weight_high_noise``.
        include / exclude: one pattern per file (in the order low then high), or one for all.

    Returns:
        one :class:`LoraPlan` per file, in that order.

    Raises:
        ValueError: multiplier or pattern counts that do not match the files; an invalid pattern; a
            ``wan.expert`` with an unknown value.
        FileNotFoundError / LoraFormatError: unreadable files (from :mod:`wanlora.lora.layouts`).
    """
    from wanlora.lora.layouts import load_lora_file

    weights, weights_high = list(weights or []), list(weights_high or [])
    mults = _expand(list(multipliers or []), len(weights), 1.0, "--lora_multiplier")
    mults_h = _expand(list(multipliers_high or []), len(weights_high), 1.0, "--lora_multiplier_high_noise")
    n = len(weights) + len(weights_high)
    inc = _expand(list(include or []), n, None, "--include_patterns")
    exc = _expand(list(exclude or []), n, None, "--exclude_patterns")
    for pattern in inc:  # fail before reading any file
        _compile(pattern, "--include_patterns")
    for pattern in exc:
        _compile(pattern, "--exclude_patterns")
    plans = []
    items = [(p, m, "low_noise") for p, m in zip(weights, mults)] + [(p, m, "high_noise") for p, m in zip(weights_high, mults_h)]
    for k, (path, mult, flag_expert) in enumerate(items):
        sd, meta = load_lora_file(path)
        declared = meta.get(EXPERT_KEY)
        if not task.has_experts:
            experts, reason = (None,), "single model"
        elif declared in ("high_noise", "low_noise"):
            experts = (declared,)
            reason = f"metadata {EXPERT_KEY}={declared}"
            if declared != flag_expert:
                logger.info("%s: metadata %s=%s, so it goes to the %s expert (given under the %s flag)",
                            path, EXPERT_KEY, declared, declared, flag_expert)
        elif declared == "both":
            experts, reason = ("high_noise", "low_noise"), f"metadata {EXPERT_KEY}=both"
        elif declared in (None, ""):
            experts, reason = (flag_expert,), "flag"
        else:
            raise ValueError(f"{path}: metadata {EXPERT_KEY}={declared!r}; expected high_noise, low_noise or both")
        logger.info("LoRA %s x%g -> %s (%s)", path, mult, "/".join(str(e) for e in experts), reason)
        plans.append(LoraPlan(str(path), float(mult), experts, inc[k], exc[k], reason, sd, meta))
    return plans


def filter_lora_state_dict(sd: dict, include: str | None, exclude: str | None) -> dict:
    """Keep the modules whose name matches ``include`` (if given) and not ``exclude`` (if given).

    ``sd`` keys are ``<module>.<tensor>`` (``lora_unet_blocks_0_self_attn_q.lora_down.weight``);
    the patterns are searched (``re.search``) in ``<module>``. Returns a new dict.

    Raises:
        ValueError: an invalid regular expression.
    """
    if include is None and exclude is None:
        return dict(sd)
    ri = _compile(include, "--include_patterns")
    rx = _compile(exclude, "--exclude_patterns")
    out = {}
    for k, v in sd.items():
        name = k.split(".", 1)[0]
        if ri is not None and not ri.search(name):
            continue
        if rx is not None and rx.search(name):
            continue
        out[k] = v
    return out


def _compile(pattern: str | None, flag: str):
    """``re.compile(pattern)`` (``None`` for no pattern); a bad pattern is a ValueError naming ``flag``."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def apply_loras(pipe, plans: list[LoraPlan], dynamic: bool = False) -> list[dict]:
    """Merge (default) or hook each planned LoRA into ``pipe.dits``. Returns a JSON-able log.

    Dynamic networks are registered in ``pipe.extra_modules[expert]`` so they travel with their DiT.

    Raises:
        ValueError: a LoRA whose modules the DiT lacks, or nothing left after the patterns.
    """
    from wanlora.networks.lora_wan import create_network_from_weights

    log = []
    for plan in plans:
        sd = filter_lora_state_dict(plan.state_dict, plan.include, plan.exclude)
        if not sd:
            raise ValueError(f"{plan.path}: --include_patterns/--exclude_patterns left no module")
        for expert in plan.experts:
            dit = pipe.dits[expert] if expert in pipe.dits else next(iter(pipe.dits.values()))
            net, _ = create_network_from_weights(plan.multiplier, None, None, None, dit, weights_sd=sd,
                                                 for_inference=True)
            p = next(dit.parameters())
            if dynamic:
                net.apply_to(None, dit)
                net.load_weights(sd)
                net.to(device=p.device, dtype=p.dtype)
                net.set_multiplier(plan.multiplier)
                net.requires_grad_(False)
                pipe.extra_modules.setdefault(expert, []).append(net)
            else:
                net.merge_to(None, dit, weights_sd=sd)
            log.append({"path": plan.path, "multiplier": plan.multiplier, "expert": expert,
                        "modules": len({k.split(".", 1)[0] for k in sd}), "mode": "dynamic" if dynamic else "merged",
                        "reason": plan.reason})
    return log

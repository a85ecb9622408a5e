"""LoRAs at inference: which file goes to which expert, pattern filtering, merge or hook.

``wanlora-generate --lora_weight ... --lora_multiplier ...`` (and ``..._high_noise`` for the A14B
experts). A file's safetensors metadata ``wan.expert`` (``high_noise`` / ``low_noise`` / ``both``,
written by wanlora's trainer) sends it to that expert whatever flag it came under (logged); so does
a musubi-tuner file's ``modelspec.timestep_range`` inside one expert's timesteps (``875,1000`` for
T2V A14B: high noise; :func:`wanlora.lora.metadata.expert_for_range`); a file without either goes to the expert of its flag (``--lora_weight``: the low-noise expert, the one
``--dit`` names; ``--lora_weight_high_noise``: the high-noise expert), or to the only model.

``--include_patterns`` / ``--exclude_patterns``: one regular expression per LoRA (a single one
applies to all), with the one meaning training's ``--network_args`` patterns have
(:mod:`wanlora.lora.patterns`): full-matched against the dotted module path
(``blocks.9.cross_attn.k``); a module matching the exclude pattern is dropped unless it matches the
include pattern too (include only re-admits).

``--lora_multiplier``: one value per file, or one value for all files (:func:`per_file_values`,
which ``wanlora-merge-lora`` uses too).

Merging (the default) adds :func:`wanlora.lora.algebra.module_delta` into each weight (LoRA, and
LyCORIS LoHa/LoKr files); ``--lora_dynamic`` hooks a :class:`wanlora.lora.adapter.LoRAAdapterSet`
(LoHa/LoKr: :class:`wanlora.lora.lycoris_hooks.LycorisHooks`) beside the layers instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from wanlora.lora.adapter import LoRAAdapterSet, weight_targets
from wanlora.lora.algebra import merge_module_
from wanlora.lora.layouts import key_to_module, load_lora_file, lora_modules, module_to_key
from wanlora.lora.lycoris_hooks import LycorisHooks
from wanlora.lora.metadata import read_lora_metadata
from wanlora.lora.patterns import compile_patterns, select_modules

__all__ = ["LoraPlan", "per_file_values", "plan_loras", "filter_lora_state_dict", "apply_loras", "EXPERT_KEY",
           "parse_lora_spec"]

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


def _range(r) -> str:
    return ",".join(f"{x:g}" for x in r)


def per_file_values(values, n: int, default, flag: str) -> list:
    """One value per LoRA file from a flag's values: the rule of every LoRA command's per-file flags
    (``--lora_multiplier``, ``--lora_multiplier_high_noise``, ``--include_patterns``, ...).

    None or no value gives ``default`` for each file; one value is used for every file (so
    ``--lora_multiplier 0.5`` with two files means ``[0.5, 0.5]``); otherwise there must be exactly
    one value per file.

    Args:
        values: the flag's values (a list, or None).
        n: the number of LoRA files.
        default: the value of a file the flag does not set (1.0 for multipliers).
        flag: the flag's name, for the message.
    Returns:
        a list of ``n`` values.
    Raises:
        ValueError: more than one value, but not one per file (names the flag and both counts).
    """
    values = list(values or [])
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag}: {len(values)} values for {n} LoRA files; give one per file, or one for all")
    return values


def plan_loras(task, weights, multipliers, weights_high=(), multipliers_high=(), include=None, exclude=None):
    """Read every LoRA file and decide its expert(s) and multiplier.

    Args:
        task: the :class:`wanlora.tasks.Task`.
        weights / multipliers: ``--lora_weight`` files (low-noise expert or the only model) and
            their multipliers (none: 1.0 each; one: for all).
        weights_high / multipliers_high: the same for ``--lora_weight_high_noise``.
        include / exclude: one pattern per file (in the order low then high), or one for all,
            with the rule of :mod:`wanlora.lora.patterns` (an include pattern given without an
            exclude pattern keeps everything, and is warned about).

    Returns:
        one :class:`LoraPlan` per file, in that order.

    Raises:
        ValueError: multiplier or pattern counts that do not match the files; an invalid pattern; a
            ``wan.expert`` with an unknown value.
        FileNotFoundError / LoraFormatError: unreadable files (from :mod:`wanlora.lora.layouts`).
    """
    weights, weights_high = list(weights or []), list(weights_high or [])
    mults = per_file_values(multipliers, len(weights), 1.0, "--lora_multiplier")
    mults_h = per_file_values(multipliers_high, len(weights_high), 1.0, "--lora_multiplier_high_noise")
    n = len(weights) + len(weights_high)
    inc = per_file_values(include, n, None, "--include_patterns")
    exc = per_file_values(exclude, n, None, "--exclude_patterns")
    for pattern in inc:  # fail before reading any file
        compile_patterns(pattern, "--include_patterns")
    for pattern in exc:
        compile_patterns(pattern, "--exclude_patterns")
    for k, (i, x) in enumerate(zip(inc, exc)):
        if i is not None and x is None:
            logger.warning("LoRA file %d: --include_patterns %r alone keeps every module (include patterns only "
                           "re-admit modules an exclude pattern drops); to keep only those modules, add "
                           "--exclude_patterns '.*'", k + 1, i)
    plans = []
    items = [(p, m, "low_noise") for p, m in zip(weights, mults)] + [(p, m, "high_noise") for p, m in zip(weights_high, mults_h)]
    for k, (path, mult, flag_expert) in enumerate(items):
        sd, meta = load_lora_file(path)
        declared = meta.get(EXPERT_KEY)
        source = f"metadata {EXPERT_KEY}={declared}"
        if declared in (None, "") and task.has_experts:  # musubi-tuner files: the trained timestep range
            info = read_lora_metadata(meta, task)
            if info.expert is not None:
                declared = info.expert
                source = (f"metadata modelspec.timestep_range={_range(info.timestep_range)} inside the "
                          f"{declared} expert's timesteps of {task.name}")
        if not task.has_experts:
            experts, reason = (None,), "single model"
        elif declared in ("high_noise", "low_noise"):
            experts = (declared,)
            reason = source
            if declared != flag_expert:
                logger.info("%s: %s, so it goes to the %s expert (given under the %s flag)",
                            path, source, declared, flag_expert)
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
    """The modules of a default-layout LoRA that the patterns keep (:mod:`wanlora.lora.patterns`).

    ``sd`` keys are ``<module>.<tensor>`` (``lora_unet_blocks_0_self_attn_q.lora_down.weight``);
    each pattern is full-matched against the module's dotted path (``blocks.0.self_attn.q``): a
    module matching ``exclude`` is dropped unless it matches ``include`` too. Returns a new dict
    (the same tensors).

    Raises:
        ValueError: an invalid regular expression (naming ``--include_patterns`` /
            ``--exclude_patterns``).
        LoraFormatError: a module name that is not a Wan Linear layer.
    """
    if include is None and exclude is None:
        return dict(sd)
    names = list(dict.fromkeys(k.split(".", 1)[0] for k in sd))
    kept = {n for _, n in select_modules([(key_to_module(n), n) for n in names], exclude, include, flag="")}
    return {k: v for k, v in sd.items() if k.split(".", 1)[0] in kept}


def apply_loras(pipe, plans: list[LoraPlan], dynamic: bool = False) -> list[dict]:
    """Merge (default) or hook each planned LoRA into ``pipe.dits``. Returns a JSON-able log.

    Merging adds ``multiplier · (alpha/rank) · up @ down`` (LoHa/LoKr: their update) into each weight
    in float32 and casts back once (:func:`wanlora.lora.algebra.merge_module_`). Dynamic adapters
    (:class:`wanlora.lora.adapter.LoRAAdapterSet`) are registered in ``pipe.extra_modules[expert]``
    so they travel with their DiT. A DiT with fp8 base weights always gets adapters (a delta merged
    into float8 weights would be rounded away).

    Raises:
        ValueError: a LoRA whose modules the DiT lacks (or of another size), or nothing left after
            the patterns.
    """
    log = []
    for plan in plans:
        sd = filter_lora_state_dict(plan.state_dict, plan.include, plan.exclude)
        if not sd:
            raise ValueError(f"{plan.path}: --include_patterns/--exclude_patterns left no module")
        modules = lora_modules(sd, "default")
        for expert in plan.experts:
            dit = pipe.dits[expert] if expert in pipe.dits else next(iter(pipe.dits.values()))
            hooked = dynamic or any(q.dtype == torch.float8_e4m3fn for q in dit.parameters())
            lycoris = any(e["kind"] != "lora" for e in modules.values())
            if hooked and lycoris:
                p = next(dit.parameters())
                hooks = LycorisHooks(dit, modules, plan.multiplier, source=plan.path)
                hooks.to(device=p.device)
                hooks.attach()
                pipe.extra_modules.setdefault(expert, []).append(hooks)
            elif hooked:
                p = next(dit.parameters())
                adapters = LoRAAdapterSet.from_weights(dit, sd, plan.multiplier, source=plan.path)
                adapters.load_adapter_weights(sd, plan.path)
                adapters.attach()
                adapters.to(device=p.device, dtype=p.dtype)
                adapters.requires_grad_(False)
                adapters.eval()
                pipe.extra_modules.setdefault(expert, []).append(adapters)
            else:
                targets = dict(weight_targets(dit, [module_to_key(m) for m in modules], plan.path))
                for path, e in modules.items():
                    merge_module_(targets[path].weight, e, plan.multiplier)
            log.append({"path": plan.path, "multiplier": plan.multiplier, "expert": expert,
                        "modules": len(modules), "mode": "dynamic" if hooked else "merged",
                        "reason": plan.reason})
    return log


def parse_lora_spec(spec: str, flag: str) -> tuple[str, float]:
    """``PATH[:MULTIPLIER]`` -> ``(path, multiplier)`` (``--sample_lora lightx2v.safetensors:1.0``).

    The text after the last ``:`` is the multiplier when it reads as a number; otherwise the whole
    text is the path (so ``C:\\loras\\x.safetensors`` stays a path) and the multiplier is 1.0.

    Raises:
        ValueError: an empty path or a multiplier that is not finite (names ``flag``).
    """
    path, mult = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            mult = float(tail)
            path = head
        except ValueError:
            pass
    if not path or mult != mult or mult in (float("inf"), float("-inf")):
        raise ValueError(f"{flag} {spec!r}: expected PATH or PATH:MULTIPLIER (e.g. lightning.safetensors:1.0)")
    return path, mult

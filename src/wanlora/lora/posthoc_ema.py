"""Post-hoc EMA: an average of a LoRA's saved step files, as if an EMA had run during training.

Training saves ``NAME-stepXXXXXXXX.safetensors`` every ``--save_every_n_steps``. From those files,
sorted by step ``s_0 < s_1 < ... < s_n = T`` (the LoRA's own optimizer steps, ``ss_steps``), this
module builds the weights an EMA would have had at ``T``, taking the weights between two saves as
those of the later save (file ``i`` stands for the steps ``(s_{i-1}, s_i]``; file 0 also for the
steps before it, the initial weights included). An EMA is a weighted sum ``Σ_k c_k w_k`` of the
weights at every step, so each file gets the sum of the coefficients of its steps:

* **exponential** (``--decay d``; the training EMA of ``--ema_decay`` without warm-up,
  ``e <- d·e + (1-d)·w`` every step): ``c_i = d^(T-s_i) - d^(T-s_{i-1})``, ``c_0 = d^(T-s_0)``.
* **power function** (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
  Diffusion Models" (EDM2), §3.1 and appendix C: ``e <- β_t·e + (1-β_t)·w_t`` with
  ``β_t = (1 - 1/t)^(γ+1)``, which weighs step ``τ`` by ``∝ τ^γ``): ``c_i = (s_i^(γ+1) -
  s_{i-1}^(γ+1)) / T^(γ+1)`` with ``s_{-1} = 0``. ``--sigma_rel σ`` (the EMA length relative to
  training time, EDM2's parameter; 0.05-0.15 typical) gives ``γ`` as the largest real root of
  ``γ³ + 7γ² + (16 - 1/σ²)γ + (12 - 1/σ²) = 0`` (``σ_rel² = (γ+1) / ((γ+2)²(γ+3))``); or give
  ``--gamma`` directly. Unlike the exponential EMA its length grows with the run, so one value
  suits runs of any length.

Both sums are 1. The closer the saves, the closer the result to the EMA a run would have kept
(saved every step it is that EMA exactly, the exponential one started at the first save). The
average is taken per tensor, as training's EMA does (``lora_down`` and ``lora_up`` separately),
in float64; tensors equal in every file (``alpha``, LyCORIS constants) are copied unchanged, and
``alpha`` values that differ between files are refused (files of different runs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

__all__ = ["PosthocEmaError", "sigma_rel_to_gamma", "exponential_ema_coefficients", "power_ema_coefficients",
           "lora_file_step", "posthoc_ema"]

log = logging.getLogger(__name__)

_STEP = re.compile(r"-step(\d+)")


class PosthocEmaError(ValueError):
    """Files that cannot be averaged (the message names the file and the fix)."""


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's exponent ``γ`` of the power-function EMA of relative length ``sigma_rel``: the largest
    real root of ``γ³ + 7γ² + (16 - 1/σ²)γ + (12 - 1/σ²)`` (EDM2 ``sigma_rel_to_gamma``;
    0.05 -> 16.97, 0.10 -> 6.94).

    Raises:
        ValueError: ``sigma_rel`` outside ``(0, 0.2886)`` (``γ > -1`` needs ``σ² < 1/12``).
    """
    if not 0 < sigma_rel < math.sqrt(1 / 12):
        raise ValueError(f"--sigma_rel {sigma_rel}: use a value in (0, 0.288), e.g. 0.05 to 0.15")
    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots.real[abs(roots.imag) < 1e-9].max())


def exponential_ema_coefficients(steps: list[int], decay: float) -> list[float]:
    """The weight of each file of ``steps`` (ascending) in the exponential EMA at ``steps[-1]``
    (module docstring); they sum to 1.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"--decay {decay}: use a value in [0, 1), e.g. 0.999")
    T = steps[-1]
    out = [decay ** (T - steps[0])]
    out += [decay ** (T - s) - decay ** (T - prev) for prev, s in zip(steps, steps[1:])]
    return out


def power_ema_coefficients(steps: list[int], gamma: float) -> list[float]:
    """The weight of each file of ``steps`` (ascending, ``steps[-1] > 0``) in the power-function
    EMA with exponent ``gamma`` at ``steps[-1]`` (module docstring); they sum to 1.

    Raises:
        ValueError: ``gamma <= -1``.
    """
    if not gamma > -1:
        raise ValueError(f"--gamma {gamma}: use a value above -1 (EDM2 uses about 7 to 17)")
    T, p = float(steps[-1]), gamma + 1
    bounds = [0] + list(steps)
    return [(s / T) ** p - (prev / T) ** p for prev, s in zip(bounds, bounds[1:])]


def lora_file_step(path: str | os.PathLike, metadata: dict[str, str]) -> int:
    """The optimizer step of a saved LoRA: its ``ss_steps`` (that LoRA's own steps), else the
    ``-stepNNNNNNNN`` of its name.

    Raises:
        PosthocEmaError: neither is there.
    """
    if metadata.get("ss_steps", "").isdigit():
        return int(metadata["ss_steps"])
    m = _STEP.search(Path(path).name)
    if m:
        return int(m.group(1))
    raise PosthocEmaError(f"{path}: no step in its metadata (ss_steps) or name (-stepNNNNNNNN); give the step "
                          "saves of a wanlora or musubi-tuner run")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def posthoc_ema(files: list[str | os.PathLike], output: str | os.PathLike, *, decay: float | None = None,
                sigma_rel: float | None = None, gamma: float | None = None,
                dtype: torch.dtype | None = None) -> dict:
    """Write the post-hoc EMA of the step files of one LoRA to ``output`` (module docstring).

    Args:
        files: ``.safetensors`` saves of one LoRA (one expert) of one run, any order, any layout
            (the same keys in each).
        output: the file to write (atomically); its metadata is the last file's plus
            ``wan.posthoc_ema`` (JSON: method, parameter, steps, coefficients).
        decay / sigma_rel / gamma: exactly one: the exponential EMA's decay per step, or the
            power-function EMA's relative length or exponent.
        dtype: of the written tensors (default: each input tensor's).
    Returns:
        ``{"steps": [...], "coefficients": [...], "method": ..., ...}`` as recorded.
    Raises:
        PosthocEmaError: fewer than two files, two files of one step, files of different
            experts, EMA files as input, other keys or shapes, different ``alpha``.
        ValueError: no or several of decay / sigma_rel / gamma; a value out of range.
    """
    from wanlora.io_utils import save_safetensors

    if sum(x is not None for x in (decay, sigma_rel, gamma)) != 1:
        raise ValueError("give exactly one of --decay (exponential EMA), --sigma_rel or --gamma (power-function EMA)")
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise PosthocEmaError("give two or more step saves of one LoRA (e.g. out/NAME-step*_high_noise.safetensors)")
    loaded = []
    for p in paths:
        tensors, meta = _read(p)
        if "wan.ema_decay" in meta:
            raise PosthocEmaError(f"{p}: an EMA file already (wan.ema_decay); give the raw step saves")
        loaded.append((lora_file_step(p, meta), p, tensors, meta))
    loaded.sort(key=lambda x: x[0])
    steps = [s for s, *_ in loaded]
    experts = {m.get("wan.expert") for *_, m in loaded}
    if len(experts) > 1:
        raise PosthocEmaError(f"the files are of several experts ({', '.join(sorted(str(e) for e in experts))}); "
                              "average each expert's step saves on its own")
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        names = [p.name for s, p, *_ in loaded if s == dup[0]]
        raise PosthocEmaError(f"{', '.join(names)}: the same step {dup[0]}; give one save per step, of one LoRA "
                              "(one expert) of one run")
    if steps[-1] <= 0:
        raise PosthocEmaError("the last file is of step 0; give saves made during training")
    if decay is not None:
        coeffs, method = exponential_ema_coefficients(steps, decay), {"method": "exponential", "decay": decay}
    else:
        g = sigma_rel_to_gamma(sigma_rel) if sigma_rel is not None else gamma
        coeffs = power_ema_coefficients(steps, g)
        method = {"method": "power", "gamma": g, **({"sigma_rel": sigma_rel} if sigma_rel is not None else {})}

    first_path, first = loaded[0][1], loaded[0][2]
    out: dict[str, torch.Tensor] = {}
    for _, p, tensors, _ in loaded[1:]:
        if tensors.keys() != first.keys():
            diff = sorted(tensors.keys() ^ first.keys())
            raise PosthocEmaError(f"{p}: other keys than {first_path.name} ({len(diff)} differ, e.g. {diff[:2]}); "
                                  "give the saves of one LoRA")
        bad = [k for k in first if tensors[k].shape != first[k].shape]
        if bad:
            raise PosthocEmaError(f"{p}: {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, "
                                  f"{tuple(first[bad[0]].shape)} in {first_path.name}; give the saves of one LoRA")
    for k, t0 in first.items():
        values = [x[2][k] for x in loaded]
        if all(torch.equal(v, t0) for v in values[1:]):
            out[k] = t0 if dtype is None or not t0.is_floating_point() else t0.to(dtype)
            continue
        if k.endswith("alpha"):
            raise PosthocEmaError(f"{k} differs between the files (e.g. {loaded[0][1].name}: {float(t0):g}); give "
                                  "the saves of one run")
        acc = torch.zeros(t0.shape, dtype=torch.float64)
        for c, v in zip(coeffs, values):
            acc += c * v.double()
        out[k] = acc.to(dtype or t0.dtype)
    record = {**method, "steps": steps, "coefficients": coeffs}
    meta = {k: v for k, v in loaded[-1][3].items() if k != "wan.pair_file"}
    meta["wan.posthoc_ema"] = json.dumps(record)
    save_safetensors(out, output, metadata=meta)
    log.info("post-hoc %s EMA of %d saves (steps %d..%d) written to %s", method["method"], len(steps), steps[0],
             steps[-1], output)
    return record

"""Converting a Wan LoRA file to another key layout (the library of ``wanlora-convert-lora``).

Layouts (:mod:`wanlora.lora.layouts`): ``default`` (``lora_unet_*`` down/up/alpha: musubi, ComfyUI,
Wan2GP, and diffusers when every block has all 10 layers), ``comfy`` (``diffusion_model.*``
lora_A/lora_B, alpha folded: ComfyUI, diffusers, Wan2GP; any subset of modules), ``diffusers``
(diffusers' own names, alpha folded: diffusers only). The input layout is detected from its keys.
LyCORIS LoHa/LoKr files convert between ``default`` and ``comfy`` (names only, ``.alpha`` kept).

Expert pairs: an input named ``X_high_noise.safetensors`` (or ``X_low_noise``) brings its partner
along when it exists (``pair=False`` turns that off); a folder as input converts every
``.safetensors`` in it. Output names keep the expert suffix last (:func:`plan_outputs`):

* no output: ``X_<target>_high_noise.safetensors`` next to the input;
* output a folder (exists, or has no ``.safetensors`` suffix): same file names in it;
* output ``Y.safetensors`` with one input: exactly that file; with one pair:
  ``Y_high_noise.safetensors`` and ``Y_low_noise.safetensors`` (an expert suffix on Y is ignored).

Each written file's ``wan.pair_file`` names its partner's new file name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wanlora.io_utils import save_safetensors
from wanlora.lora.algebra import module_rank
from wanlora.lora.layouts import LoraFormatError, from_default, load_lora_file, lora_modules
from wanlora.lora.metadata import (
    check_lora_for_task,
    coverage_warnings,
    expert_file_name,
    partner_path,
    split_expert_name,
    update_metadata_for_layout,
)

__all__ = ["plan_outputs", "convert_lora_file", "convert_lora_files"]

log = logging.getLogger(__name__)


def _expand_inputs(inputs: list[str], pair: bool) -> list[Path]:
    files: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"--input {p}: the folder holds no .safetensors files")
            files += found
        elif p.is_file():
            files.append(p)
            other = partner_path(p) if pair else None
            if other is not None and other.is_file():
                files.append(other)
            elif other is not None:
                log.info("%s: its partner %s does not exist; converting it alone", p, other.name)
        else:
            raise FileNotFoundError(f"--input {p}: no such file or folder")
    seen, out = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def plan_outputs(inputs: list[str], output: str | None, target: str, pair: bool = True
                 ) -> list[tuple[Path, Path]]:
    """``[(input file, output file)]`` for a conversion (naming rules in the module docstring).

    Raises:
        FileNotFoundError: an input that does not exist.
        ValueError: ``--output X.safetensors`` for several files that are not one expert pair, or
            an output that would overwrite its input.
    """
    files = _expand_inputs(inputs, pair)
    plan: list[tuple[Path, Path]] = []
    out = Path(output) if output else None
    if out is None:
        for f in files:
            base, expert = split_expert_name(f)
            plan.append((f, expert_file_name(f"{base}_{target}", expert)))
    elif out.is_dir() or not out.name.endswith(".safetensors"):
        plan = [(f, out / f.name) for f in files]
    elif len(files) == 1:
        plan = [(files[0], out)]
    else:
        experts = [split_expert_name(f) for f in files]
        if len(files) != 2 or {e for _, e in experts} != {"high_noise", "low_noise"} \
                or experts[0][0] != experts[1][0]:
            raise ValueError(
                f"--output {out}: a single file name is only valid for one input or one expert pair "
                f"(got {len(files)} files: {', '.join(f.name for f in files[:4])}); give a folder"
            )
        base, _ = split_expert_name(out)
        plan = [(f, expert_file_name(base, e)) for f, (_, e) in zip(files, experts)]
    for src, dst in plan:
        if src.resolve() == dst.resolve():
            raise ValueError(f"{src}: the output would overwrite the input; choose another --output")
    return plan


def convert_lora_file(src: str | Path, dst: str | Path, target: str, dtype: torch.dtype | None = None,
                      fold_alpha: bool = True, pair_file: str | None = None) -> dict[str, str]:
    """Convert one LoRA file to ``target`` and write it atomically.

    ``target="default"`` keeps the file's alphas (a folded file gets alpha = rank);
    ``"comfy"`` folds alpha into both lora_A and lora_B (``sqrt(alpha/rank)`` each, float32) unless
    ``fold_alpha=False`` (then ``.alpha`` keys stay); ``"diffusers"`` always folds (diffusers
    refuses ``.alpha`` keys in its own layout). ``dtype`` casts the weights after folding. A LyCORIS
    LoHa/LoKr file is renamed only (``lora_unet_<x>.lokr_w1`` <-> ``diffusion_model.<path>.lokr_w1``,
    ``.alpha`` kept: ComfyUI applies ``alpha / r`` to these as LyCORIS does); it has no diffusers layout.

    Returns:
        The metadata written.

    Raises:
        LoraFormatError: LoHa/LoKr to diffusers, DoRA/diff keys, unknown keys (message names the file).
    """
    src, dst = Path(src), Path(dst)
    sd, metadata = load_lora_file(src)
    try:
        mods = lora_modules(sd, "default")
        lycoris = any(e["kind"] != "lora" for e in mods.values())
        fold = not lycoris and (target == "diffusers" or (target == "comfy" and fold_alpha))
        had_alpha = any(e["alpha"] != module_rank(e) for e in mods.values())
        out = from_default(sd, target, fold_alpha=fold, dtype=dtype)
    except LoraFormatError as e:
        raise LoraFormatError(f"{src}: {e}") from None
    ranks = {module_rank(e) for e in mods.values()}
    rank = ranks.pop() if len(ranks) == 1 else None
    md = update_metadata_for_layout(metadata, target, alpha_folded=fold and had_alpha, rank=rank,
                                    pair_file=pair_file)
    if fold and not had_alpha and rank is not None and "ss_network_alpha" in md:
        md["ss_network_alpha"] = str(rank)  # alpha == rank everywhere: nothing to fold, say so
    if md.get("wan.task"):
        try:
            check_lora_for_task(mods.keys(), md["wan.task"])
        except (ValueError, KeyError) as e:
            log.warning("%s: %s", src.name, e)
    if target == "default":
        num_blocks = 1 + max((int(p.split(".")[1]) for p in mods if p.startswith("blocks.")), default=-1)
        for w in coverage_warnings(mods.keys(), num_blocks, emit=False):
            log.warning("%s: %s", dst.name, w)
    save_safetensors(out, dst, metadata=md)
    log.info("%s -> %s (%s, %d modules)", src, dst, target, len(mods))
    return md


def convert_lora_files(inputs: list[str], output: str | None, target: str, dtype: torch.dtype | None = None,
                       fold_alpha: bool = True, pair: bool = True) -> list[Path]:
    """Convert files, folders and expert pairs (:func:`plan_outputs`), each written atomically by
    :func:`convert_lora_file` with ``wan.pair_file`` naming its partner's new name.

    Returns:
        the files written, in order.
    Raises:
        as :func:`plan_outputs` and :func:`convert_lora_file`.
    """
    plan = plan_outputs(inputs, output, target, pair=pair)
    names = {src.resolve(): dst.name for src, dst in plan}
    for src, dst in plan:
        other = partner_path(src)
        pair_file = names.get(other.resolve()) if other is not None and other.exists() else None
        convert_lora_file(src, dst, target, dtype=dtype, fold_alpha=fold_alpha, pair_file=pair_file)
    return [dst for _, dst in plan]

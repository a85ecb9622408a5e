"""Reading checkpoints: single files, shard sets and ``.pth``, memory-mapped.

Shared by every model loader (DiT, VAE, text encoder). Reading never copies a checkpoint into RAM:
safetensors are opened with ``safe_open`` (memory-mapped, one tensor at a time) and ``.pth`` files
with ``torch.load(mmap=True, weights_only=True)``.

Accepted ``path`` forms:

* a ``.safetensors`` file;
* a sharded set: its index ``*.safetensors.index.json`` or the folder holding the shards (the
  official ``high_noise_model/`` and ``low_noise_model/`` folders, with ``config.json`` beside);
* a ``.pth`` / ``.pt`` / ``.bin`` file (``torch.load(weights_only=True)``).

The second half builds the Wan DiT from such a checkpoint (:func:`load_dit`): architecture from
the weight shapes, checked against the ``--task``, constructed on the meta device and assigned
from the memory-mapped tensors so that peak RAM stays near one copy of the weights. Official,
ComfyUI (``model.diffusion_model.`` prefix, scaled fp8) and diffusers (``WanTransformer3DModel``,
the ``transformer/`` folders of the ``-Diffusers`` repositories) key layouts are read; diffusers
names are renamed to the official ones (:func:`diffusers_dit_key`), tensors untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "CheckpointError",
    "check_dit_task",
    "checkpoint_files",
    "config_num_heads",
    "checkpoint_shapes",
    "describe_checkpoint",
    "diffusers_dit_key",
    "official_dit_keys",
    "dit_config_from_state_dict",
    "cast_dit",
    "keeps_float32",
    "load_dit",
    "load_state_dict",
    "load_torch_file",
    "read_metadata",
    "read_config_json",
    "strip_prefix",
]

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, or holding the wrong model."""


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files a checkpoint path stands for, in shard order.

    Raises:
        CheckpointError: the path does not exist, a folder holds no weight files, or an index
            names a shard that is missing.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            return checkpoint_files(indexes[0])
        files = sorted(p.glob("*.safetensors")) or sorted(
            f for s in _TORCH_SUFFIXES for f in p.glob(f"*{s}")
        )
        if not files:
            raise CheckpointError(
                f"{p}: the folder holds no .safetensors, index .json or .pth weights"
            )
        return files
    if p.name.endswith(".json"):
        try:
            weight_map = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{p}: not a safetensors shard index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        files = [p.parent / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{p}: shards named in the index are missing: {missing[:3]}")
        return files
    return [p]


def strip_prefix(keys_to_tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    """Remove the first of ``prefixes`` that every key starts with (e.g. ComfyUI's
    ``model.diffusion_model.``); keys are returned unchanged when no prefix is shared."""
    for prefix in prefixes:
        if keys_to_tensors and all(k.startswith(prefix) for k in keys_to_tensors):
            return {k[len(prefix):]: v for k, v in keys_to_tensors.items()}
    return keys_to_tensors


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_torch_file(f: str | os.PathLike, device: str | torch.device = "cpu", mmap: bool = True):
    """``torch.load(f, weights_only=True)``: tensors and plain containers only, so loading a
    ``.pth`` never runs code; the one reader of ``.pth`` files for every command.

    Raises:
        CheckpointError: one line — a pickle holding other Python objects (named; refused, since
            full unpickling could run code), or a file that is truncated or not a checkpoint.
    """
    try:
        return torch.load(str(f), map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = _GLOBAL.search(str(e))
        what = f" ({m.group(1)})" if m else ""
        raise CheckpointError(
            f"{f}: refused: the file holds pickled Python objects{what}, not only tensors, and loading it could "
            "run code; wanlora reads .pth files as weights only — use the official weights or a .safetensors file"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{f}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {first}); the file is "
            "truncated or not a weights file — download it again"
        ) from None


def _read_safetensors_plain(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``f`` read with plain file reads (no memory map).

    Raises:
        CheckpointError: a damaged header or a file shorter than its header says (the
            :class:`~wanlora.models.safetensors_stream.SafetensorsReader` checks).
    """
    from wanlora.models.safetensors_stream import SafetensorsReader

    try:
        with SafetensorsReader(f) as reader:
            return {k: reader.get(k) for k in reader.keys()}
    except ValueError as e:  # the message names the file and what is wrong with it
        raise CheckpointError(f"{e}; download it again") from None


def _load_one(f: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                return {k: sf.get_tensor(k) for k in sf.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            # safe_open maps the file copy-on-write; a kernel that will not commit that much
            # (a file larger than RAM + swap) refuses the map. Only our own header and length
            # check may call a file damaged: an intact file is read without a map instead.
            out = _read_safetensors_plain(f)
            logger.warning("%s: memory map refused (%s); read with plain file reads instead", f, e)
            return {k: v.to(device) for k, v in out.items()}
    obj = load_torch_file(f, device)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{f}: holds no state dict of tensors")
    return obj


def load_state_dict(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint (memory-mapped where the format allows).

    Args:
        path: a file, shard index or shard folder (see the module docstring).
        device: where tensors are materialized; ``"cpu"`` keeps them memory-mapped.
        prefixes: key prefixes to strip when every key carries one (first match wins).

    Returns:
        ``{key: tensor}`` in the stored dtypes.

    Raises:
        CheckpointError: unreadable, truncated or missing files; a key found in two shards.
    """
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        part = _load_one(f, device)
        dup = out.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: keys also present in another shard: {sorted(dup)[:3]}")
        out.update(part)
    return strip_prefix(out, prefixes)


def checkpoint_shapes(path: str | os.PathLike, prefixes: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor of a checkpoint, read from the safetensors headers (no
    tensor data) or a memory-mapped ``.pth`` (:func:`load_torch_file`): cheap enough to check a
    14B file before loading it.

    Raises:
        CheckpointError: as :func:`load_state_dict`.
    """
    from wanlora.models.safetensors_stream import SafetensorsReader

    out: dict[str, tuple[int, ...]] = {}
    for f in checkpoint_files(path):
        if f.suffix == ".safetensors":
            try:
                with SafetensorsReader(f) as r:
                    out.update({k: r.info(k)[1] for k in r.keys()})
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        else:
            obj = load_torch_file(f)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            out.update({k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)})
    return strip_prefix(out, prefixes)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint (merged over shards; ``{}`` for .pth).

    Reads only the headers (no memory map). Raises CheckpointError for a damaged header."""
    from wanlora.models.safetensors_stream import SafetensorsReader

    meta: dict[str, str] = {}
    for f in checkpoint_files(path):
        if f.suffix == ".safetensors":
            try:
                with SafetensorsReader(f) as reader:
                    meta.update(reader.metadata)
            except ValueError as e:
                raise CheckpointError(f"cannot read the safetensors header: {e}") from None
    return meta


def read_config_json(path: str | os.PathLike) -> dict:
    """The ``config.json`` that official model folders carry beside their shards, or ``{}``.

    ``path`` is the checkpoint (a file or folder); the ``config.json`` is looked for in its folder.
    A file that is not valid JSON (or not a JSON object) is logged as a warning and ignored, so the
    architecture falls back to the weight shapes (``num_heads = dim // 128``).
    """
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
        problem = None if isinstance(data, dict) else f"a JSON {type(data).__name__}, not an object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        data, problem = None, str(e)
    if problem is None:
        return data
    logger.warning("%s: ignored (%s); fix or delete it — num_heads then comes from the safetensors "
                   "metadata or dim // 128", cfg, problem)
    return {}


# ============================================================================================
# The DiT: architecture from weight shapes, checked against the task, meta-device assignment.

_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

#: Parameters kept in float32 whatever ``dtype`` is asked: the official inference keeps fp32
#: weights under bf16 autocast and runs these in fp32 (modulation, time embedding, norms, head).
_FP32_PREFIXES = ("time_embedding.", "time_projection.", "head.")


#: The LayerNorms and FLF2V position embedding of the Wan2.1 CLIP projection ``img_emb``.
_FP32_IMG_EMB = ("img_emb.proj.0.", "img_emb.proj.4.", "img_emb.emb_pos")


def keeps_float32(key: str) -> bool:
    """Whether :func:`load_dit` keeps the parameter ``key`` in float32 (the fp32 islands)."""
    return (key.startswith(_FP32_PREFIXES + _FP32_IMG_EMB) or key.endswith("modulation")
            or ".norm" in key)


def cast_dit(model, dtype, device=None):
    """Put a :class:`~wanlora.models.dit.WanDiT` built in code (random weights: benchmarks, tests)
    in the precision :func:`load_dit` gives: every parameter in ``dtype`` except the float32
    islands (:func:`keeps_float32`). Returns ``model`` (changed in place).

    Args:
        model: the DiT.
        dtype: compute dtype of the Linear / conv weights (float32, bfloat16, float16 or a name
            such as ``"bf16"``).
        device: where the weights go (default: where they are).

    Raises:
        ValueError: an unsupported ``dtype``.
    """
    dtype = _as_dtype(dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(device=device, dtype=torch.float32 if keeps_float32(name) else dtype)
    for b in model.buffers():  # none in the DiT today; keep any on the same device
        b.data = b.data.to(device=device)
    return model


def _as_dtype(dtype) -> torch.dtype:
    from wanlora.run_config import parse_dtype

    d = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if d not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"load_dit: dtype {dtype!r} is not one of float32, bfloat16, float16")
    return d


def describe_checkpoint(sd: dict[str, torch.Tensor]) -> str | None:
    """Name what a state dict holds when it is not an official-layout Wan DiT, else ``None``.

    Recognizes the Wan VAEs, the umT5 encoder (official and Hugging Face layouts), the CLIP
    image encoder of Wan2.1 I2V, LoRA files and diffusers-layout transformers, each with the flag
    that takes it. Wan2.1 I2V/FLF2V DiTs (CLIP ``img_emb``) are DiTs (``None``).
    """
    keys = sd.keys()

    def has(*parts):
        return any(all(p in k for p in parts) for k in keys)

    if has("lora_down") or has("lora_A") or has("lora_up") or has("lora_B"):
        return ("a LoRA file, not a base model; pass the base DiT as --dit and the LoRA with "
                "--lora_weight / --network_weights")
    # umT5 before the VAE: a full encoder-decoder T5 file also has encoder.* and decoder.* keys
    if "token_embedding.weight" in keys or "shared.weight" in keys or has("encoder.block."):
        return "the umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth), not a diffusion model; pass it as --t5"
    if has("decoder.") and (has("encoder.") or has("conv2.")) and "patch_embedding.weight" not in keys:
        z = sd["decoder.conv1.weight"].shape[1] if "decoder.conv1.weight" in keys else None
        kind = {16: "Wan2.1 VAE (Wan2.1_VAE.pth)", 48: "Wan2.2 VAE (Wan2.2_VAE.pth)"}.get(
            z, "Wan VAE (Wan2.1_VAE.pth or Wan2.2_VAE.pth)")
        return f"a {kind}, not a diffusion model; pass it as --vae"
    if has("visual.transformer") or "log_scale" in keys:
        return ("the CLIP image encoder of Wan2.1 I2V-14B / FLF2V-14B, not a diffusion model; pass it "
                "as --clip")
    if has("condition_embedder.") or has("attn1.to_q"):
        return ("a diffusers-layout Wan transformer (WanTransformer3DModel, a transformer/ folder); "
                "pass it as --dit (or --dit_high_noise)")
    if "patch_embedding.weight" not in keys or "head.head.weight" not in keys:
        return "not a Wan DiT (no patch_embedding.weight / head.head.weight keys)"
    if "ref_conv.weight" in keys or has("control_adapter."):
        return ("a Wan2.1-Fun V1.1 Control DiT (ref_conv / control_adapter: reference-image or camera "
                "tokens), which wanlora does not take; use the V1.0 checkpoint "
                "(alibaba-pai/Wan2.1-Fun-1.3B-Control or -14B-Control) with --task t2v-1.3B-FC / t2v-14B-FC / i2v-14B-FC")
    return None


# diffusers ``WanTransformer3DModel`` names -> official names: the inverse of diffusers'
# ``convert_wan_transformer_to_diffusers`` (diffusers/loaders/single_file_utils.py) for the layers
# of the Wan DiTs (T2V, I2V/FLF2V image embedder, TI2V). Top level, then inside ``blocks.N.``.
_DIFFUSERS_TOP = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("patch_embedding.", "patch_embedding."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
)
_DIFFUSERS_BLOCK = (
    ("attn1.to_out.0.", "self_attn.o."), ("attn2.to_out.0.", "cross_attn.o."),
    ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
    ("norm2.", "norm3."),  # the cross-attention norm (diffusers norm2 = official norm3)
    ("scale_shift_table", "modulation"),
)
_DIFFUSERS_ATTN = (("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("add_k_proj.", "k_img."),
                   ("add_v_proj.", "v_img."), ("norm_added_k.", "norm_k_img."),
                   ("norm_q.", "norm_q."), ("norm_k.", "norm_k."), ("o.", "o."))


def _swap(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def diffusers_dit_key(key: str) -> str | None:
    """The official name (``blocks.0.self_attn.q.weight``) of a diffusers ``WanTransformer3DModel``
    key (``blocks.0.attn1.to_q.weight``), or ``None`` for a key the Wan DiTs do not have.

    The inverse of diffusers' ``convert_wan_transformer_to_diffusers``; shapes are the same in
    both layouts (``scale_shift_table`` ``[1, 6, dim]`` = ``modulation``), so tensors are used as
    stored.
    """
    if not key.startswith("blocks."):
        return _swap(key, _DIFFUSERS_TOP)
    _, index, rest = key.split(".", 2)
    rest = _swap(rest, _DIFFUSERS_BLOCK)
    if rest is None:
        return None
    if rest.startswith(("self_attn.", "cross_attn.")):
        attn, _, inner = rest.partition(".")
        inner = _swap(inner, _DIFFUSERS_ATTN)
        if inner is None:
            return None
        rest = f"{attn}.{inner}"
    return f"blocks.{index}.{rest}"


def _is_diffusers_dit(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in keys)


def official_dit_keys(entries: dict) -> dict:
    """``entries`` (``{key: anything}``) with diffusers DiT keys renamed to official ones (unknown
    keys kept, so that the key check reports them); official-layout input is returned unchanged."""
    if not _is_diffusers_dit(entries):
        return entries
    return {(diffusers_dit_key(k) or k): v for k, v in entries.items()}


def _official_name(task) -> str:
    return {
        "t2v-A14B": "Wan2.2 T2V-A14B expert / Wan2.1 T2V-14B DiT",
        "t2v-14B": "Wan2.1 T2V-14B / Wan2.2 T2V-A14B expert DiT",
        "i2v-A14B": "Wan2.2 I2V-A14B expert DiT",
        "ti2v-5B": "Wan2.2 TI2V-5B DiT",
        "t2v-1.3B": "Wan2.1 T2V-1.3B DiT",
        "i2v-14B": "Wan2.1 I2V-14B DiT (480P or 720P, with the CLIP image branch)",
        "flf2v-14B": "Wan2.1 FLF2V-14B DiT (with the CLIP image branch and emb_pos)",
        "t2v-1.3B-FC": "Wan2.1-Fun-1.3B-Control DiT (48 input channels, CLIP image branch)",
        "t2v-14B-FC": "Wan2.1-Fun-14B-Control DiT (48 input channels, CLIP image branch)",
        "i2v-14B-FC": "Wan2.1-Fun-14B-Control DiT (48 input channels, CLIP image branch)",
    }.get(task.name, f"{task.name} DiT")


#: Keys of ComfyUI's fp8 files that are not weights (a marker, activation scales, quant info).
_FP8_EXTRAS = ("scaled_fp8",)
_FP8_EXTRA_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


class _Entry:
    """One stored tensor of a checkpoint: ``dtype``, ``shape`` from the header, ``read()`` a
    fresh CPU tensor (plain file read; ``.pth`` tensors are memory-mapped)."""

    __slots__ = ("dtype", "shape", "_reader", "_key", "_tensor")

    def __init__(self, dtype, shape, reader=None, key=None, tensor=None):
        self.dtype, self.shape = dtype, tuple(shape)
        self._reader, self._key, self._tensor = reader, key, tensor

    def read(self) -> torch.Tensor:
        if self._reader is None:
            return self._tensor
        try:
            return self._reader.get(self._key)
        except ValueError as e:  # the file shrank or ends early
            raise CheckpointError(f"{e}; download it again") from None


def _dit_entries(path, stack: contextlib.ExitStack) -> dict[str, _Entry]:
    """``{key (DiT prefix stripped): _Entry}`` over a checkpoint's files.

    Safetensors files are read tensor by tensor with plain positioned reads — never memory-
    mapped: a copy-on-write map of a file larger than RAM + swap is refused by the kernel, and
    the page cache of plain reads is not charged to the process, so loading holds the converted
    model plus one tensor. The readers close with ``stack``.

    Raises:
        CheckpointError: a damaged or truncated file, a key found in two shards.
    """
    from wanlora.models.safetensors_stream import SafetensorsReader

    entries: dict[str, _Entry] = {}
    for f in checkpoint_files(path):
        if f.suffix == ".safetensors":
            try:
                reader = stack.enter_context(SafetensorsReader(f))
            except ValueError as e:  # the message names the file and the damage
                raise CheckpointError(f"{e}; download it again") from None
            part = {k: _Entry(*reader.info(k), reader=reader, key=k) for k in reader.keys()}
        else:
            part = {k: _Entry(t.dtype, t.shape, tensor=t) for k, t in _load_one(f, "cpu").items()}
        dup = entries.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: keys also present in another shard: {sorted(dup)[:3]}")
        entries.update(part)
    return official_dit_keys(strip_prefix(entries, _DIT_PREFIXES))


def _split_fp8_scales(entries: dict) -> tuple[dict, dict]:
    """Separate ComfyUI fp8 bookkeeping from the weights.

    ``*_fp8_scaled.safetensors`` store ``X.weight`` (float8) with ``X.scale_weight`` (a scalar or
    per-row scale; the newer layout names it ``X.weight_scale``), a ``scaled_fp8`` marker and
    optional activation scales. Returns the weights alone and ``{"X.weight": scale entry}``.
    """
    from wanlora.models.fp8 import fp8_scale_key

    keys = entries.keys()
    scales = {}
    for k in keys:
        sk = fp8_scale_key(k, keys)
        if sk is not None:
            scales[k] = sk
    drop = set(scales.values()) | {k for k in keys if k in _FP8_EXTRAS or k.endswith(_FP8_EXTRA_SUFFIXES)}
    return ({k: v for k, v in entries.items() if k not in drop},
            {k: entries[sk] for k, sk in scales.items()})


def _as_row_scale(scale: torch.Tensor, rows: int, key: str, path) -> torch.Tensor:
    """:func:`wanlora.models.fp8.row_scale` with the file and key named in the error.

    Raises:
        CheckpointError: a block-wise or otherwise shaped scale.
    """
    from wanlora.models.fp8 import row_scale

    try:
        return row_scale(scale, rows)
    except ValueError as e:
        raise CheckpointError(f"{path}: {key}: {e} — use the bf16/fp16 checkpoint instead") from None


def dit_config_from_state_dict(
    sd: dict[str, torch.Tensor], num_heads: int | None = None, text_len: int = 512
):
    """The :class:`~wanlora.models.dit.WanDiTConfig` that a state dict's weight shapes imply.

    Args:
        sd: official-key state dict (prefix already stripped).
        num_heads: from config.json / metadata; ``None`` uses ``dim // 128`` (the head dim of
            every released Wan DiT).

    Raises:
        CheckpointError: the state dict is not a Wan DiT (the message says what it is), or the
            head count cannot be derived.
    """
    from wanlora.models.dit import WanDiTConfig

    what = describe_checkpoint(sd)
    if what is not None:
        raise CheckpointError(f"this checkpoint is {what}")
    pe = sd["patch_embedding.weight"]
    dim, in_channels, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
    try:
        ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0]
        text_dim = sd["text_embedding.0.weight"].shape[1]
        freq_dim = sd["time_embedding.0.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(
            f"the checkpoint lacks {e.args[0]!r}; it is incomplete (a shard missing or cut short) "
            "or not a Wan DiT"
        ) from None
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_channels = sd["head.head.weight"].shape[0] // math.prod(patch)
    # the Wan2.1 I2V-14B / FLF2V-14B image branch: CLIP width from img_emb, FLF2V's emb_pos rows
    image_dim = sd["img_emb.proj.0.weight"].shape[0] if "img_emb.proj.0.weight" in sd else None
    image_pos_len = sd["img_emb.emb_pos"].shape[1] if "img_emb.emb_pos" in sd else None
    if num_heads is None:
        if dim % 128:
            raise CheckpointError(
                f"cannot tell the head count of a DiT with dim {dim} (not a multiple of 128): put "
                "'num_heads' in the config.json beside the weights or in the safetensors metadata"
            )
        num_heads = dim // 128
    return WanDiTConfig(
        dim=dim, ffn_dim=ffn_dim, num_heads=int(num_heads), num_layers=num_layers,
        in_channels=in_channels, out_channels=out_channels, text_dim=text_dim,
        freq_dim=freq_dim, patch_size=patch, text_len=text_len, image_dim=image_dim,
        image_pos_len=image_pos_len,
    )


def config_num_heads(cfg: dict, dim: int | None = None) -> int | None:
    """The DiT head count a ``config.json`` gives: the official ``num_heads`` (with ``dim``), or
    diffusers' ``num_attention_heads`` (with ``attention_head_dim``); ``None`` when it gives none
    or its width disagrees with ``dim`` (when ``dim`` is known)."""
    if cfg.get("num_heads") and (dim is None or cfg.get("dim", dim) == dim):
        return int(cfg["num_heads"])
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int) and (dim is None or heads * head_dim == dim):
        return heads
    return None


def _num_heads(path, dim: int) -> int | None:
    """``num_heads`` from the folder's ``config.json`` (:func:`config_num_heads`), else from the
    safetensors metadata, else ``None`` (the caller uses ``dim // 128``)."""
    heads = config_num_heads(read_config_json(path), dim)
    if heads is not None:
        return heads
    meta = read_metadata(path)
    if meta.get("num_heads"):
        try:
            return int(meta["num_heads"])
        except ValueError:
            raise CheckpointError(
                f"{path}: safetensors metadata num_heads={meta['num_heads']!r} is not an integer"
            ) from None
    return None


def check_dit_task(config, task, path="checkpoint") -> None:
    """Check a DiT architecture against a task; log a notice for a smaller model of the family.

    Raises:
        CheckpointError: channels that belong to another task (the message names the task that
            fits), or sizes that equal another official model's.
    """
    from wanlora.tasks import TASKS, get_task

    task = get_task(task)
    sizes = (config.dim, config.ffn_dim, config.num_layers)
    # CLIP frames the checkpoint's image branch takes: none, 1 (I2V-14B) or 2 (FLF2V's emb_pos)
    clip_frames = 0 if config.image_dim is None else 2 if config.image_pos_len else 1
    io = (config.in_channels, config.out_channels, clip_frames)
    official = [t for t in TASKS.values()
                if (t.in_channels, t.out_channels, t.clip_frames, t.dim, t.ffn_dim, t.num_layers)
                == (*io, *sizes)]
    what = (_official_name(official[0]) if official else
            f"a DiT with dim {config.dim}, ffn_dim {config.ffn_dim}, {config.num_layers} layers")
    what += f" ({config.in_channels} input / {config.out_channels} output channels"
    what += {0: ")", 1: ", CLIP image branch)", 2: ", CLIP image branch with emb_pos)"}[clip_frames]
    if task in official:
        return
    channels_fit = io == (task.in_channels, task.out_channels, task.clip_frames)
    if official or not channels_fit:
        fits = official or [t for t in TASKS.values()
                            if (t.in_channels, t.out_channels, t.clip_frames) == io]
        fix = (f"pass --task {' or --task '.join(t.name for t in fits)}" if fits
               else "no task of this trainer takes it")
        raise CheckpointError(
            f"{path}: this is {what}, but --task {task.name} needs a {_official_name(task)} "
            f"({task.in_channels} input / {task.out_channels} output channels); {fix}, or give "
            f"the {task.name} checkpoint"
        )
    if sizes != (task.dim, task.ffn_dim, task.num_layers) or config.text_dim != task.text_dim:
        logger.warning(
            "%s: %s is %s than the official %s (dim %d, ffn_dim %d, %d layers); loading it as "
            "a model of the same family (e.g. a tiny test model)",
            path, what, "smaller" if config.dim <= task.dim else "larger", task.name,
            task.dim, task.ffn_dim, task.num_layers,
        )


def _fp8_mode(fp8) -> str | None:
    """``None``/``False`` -> None, ``True``/``"base"`` -> ``"base"``, ``"scaled"`` -> ``"scaled"``."""
    if fp8 in (None, False):
        return None
    if fp8 is True or fp8 == "base":
        return "base"
    if fp8 == "scaled":
        return "scaled"
    raise ValueError(f"load_dit: fp8={fp8!r}; use None, 'base' or 'scaled'")


def load_dit(
    path: str | os.PathLike,
    task,
    dtype=torch.float32,
    device: str | torch.device = "cpu",
    attn_mode: str = "sdpa",
    fp8=None,
):
    """Load a Wan DiT from an official, ComfyUI or tiny checkpoint.

    Args:
        path: a ``.safetensors`` file, a shard index ``.json``, a folder of shards (the official
            ``high_noise_model/``, with ``config.json``; a diffusers ``transformer/``) or a
            ``.pth``. A ``model.diffusion_model.`` or ``diffusion_model.`` key prefix is stripped,
            diffusers names are renamed (:func:`diffusers_dit_key`); bf16 / fp16 / fp8_e4m3fn (also
            ComfyUI's scaled fp8, ``scale_weight`` or ``weight_scale``) stored weights are cast.
        task: the ``--task`` name (or :class:`~wanlora.tasks.Task`) the model must fit.
        dtype: compute dtype of the Linear / conv weights (float32, bfloat16, float16; strings
            such as ``"bf16"`` work). Modulation, time embedding, norms and head stay float32.
        device: where the weights go.
        attn_mode: attention backend (:mod:`wanlora.models.attention`).
        fp8: ``None`` (weights in ``dtype``), ``"base"`` (``--fp8_base``: the Linear weights of
            the blocks cast to float8_e4m3fn) or ``"scaled"`` (``--fp8_scaled``: with one float32
            scale per output channel); see :mod:`wanlora.models.fp8`. They compute in ``dtype``.
            A file already stored in fp8 keeps its values (and scales) as they are.

    Returns:
        :class:`~wanlora.models.dit.WanDiT` in eval mode, ``requires_grad`` False on every
        parameter (LoRA adds the trainable ones).

    Safetensors files are read one tensor at a time with plain file reads (never memory-mapped),
    each converted (and quantized) and moved to ``device`` before the next is read: peak host
    memory is the converted model on the host (nothing for a CUDA ``device``) plus one tensor.
    Architecture comes from the weight shapes; ``num_heads`` from the folder's ``config.json``,
    else the safetensors metadata ``num_heads``, else ``dim // 128``.

    Raises:
        CheckpointError: unreadable/truncated files, a file that is not a Wan DiT (VAE, T5, LoRA,
            ...), a DiT of another task, missing or unexpected keys — each message says what the
            file is and what to pass instead.
    """
    from wanlora.models.dit import WanDiT
    from wanlora.models.fp8 import FP8_DTYPE, convert_to_fp8_linears, is_fp8_target, quantize_weight
    from wanlora.tasks import get_task

    task = get_task(task)
    dtype = _as_dtype(dtype)
    mode = _fp8_mode(fp8)
    with contextlib.ExitStack() as stack:
        entries, scales = _split_fp8_scales(_dit_entries(path, stack))
        shapes = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in entries.items()}
        try:
            pe = shapes.get("patch_embedding.weight")
            heads = _num_heads(path, pe.shape[0]) if pe is not None else None
            config = dit_config_from_state_dict(shapes, num_heads=heads)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e} (given as the DiT for --task {task.name})") from None
        check_dit_task(config, task, path)

        with torch.device("meta"):
            model = WanDiT(config, attn_mode=attn_mode)
        stored_fp8 = {k for k, e in entries.items() if e.dtype == FP8_DTYPE}
        if mode is not None:
            # A file already in fp8 keeps its layout: scales exactly where it has them.
            already = any(is_fp8_target(k.rsplit(".", 1)[0]) for k in stored_fp8)
            scaled_layers = ({k.rsplit(".", 1)[0] for k in scales} if already
                             else None)
            convert_to_fp8_linears(model, scaled=(mode == "scaled"), compute_dtype=dtype,
                                   scaled_layers=scaled_layers)
        expected = model.state_dict().keys()
        weights = {k for k in expected if not k.endswith(".weight_scale")}
        missing = sorted(weights - entries.keys())
        unexpected = sorted(entries.keys() - weights)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
            raise CheckpointError(
                f"{path}: {' and '.join(parts)} for a Wan DiT with {config.num_layers} layers; the "
                "checkpoint is incomplete (a shard missing or cut short) or not an official-layout Wan DiT"
            )
        params = dict(model.named_parameters())
        sd: dict[str, torch.Tensor] = {}
        for key in [k for k in entries if k in weights]:  # file order: sequential reads
            t = entries.pop(key).read()
            target = params[key]
            scale = None
            if key in scales:
                scale = _as_row_scale(scales[key].read(), t.shape[0], key, path)
            if target.dtype == FP8_DTYPE:  # an fp8 layer of this model
                module_scaled = key[: -len("weight")] + "weight_scale" in expected
                if t.dtype == FP8_DTYPE:
                    q = t
                    if module_scaled:
                        sd[key[: -len("weight")] + "weight_scale"] = (
                            scale if scale is not None else torch.ones(t.shape[0], 1)).to(device)
                else:
                    q, s = quantize_weight(t.to(device), scaled=module_scaled)
                    if s is not None:
                        sd[key[: -len("weight")] + "weight_scale"] = s
                sd[key] = q.to(device)
            else:
                want = torch.float32 if keeps_float32(key) else dtype
                if scale is not None:  # a scaled fp8 weight loaded at full precision
                    t = t.to(device).float() * scale.to(device)
                sd[key] = t.to(device=device, dtype=want)
            del t
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # inconsistent shapes between blocks: a damaged or mixed checkpoint
        raise CheckpointError(f"{path}: weight shapes do not fit one Wan DiT ({e})") from None
    del sd
    model.requires_grad_(False)
    model.eval()
    logger.info("loaded %s: %s on %s (%s%s)", path, config, device, dtype,
                f", fp8 {mode}" if mode else "")
    return model

"""Tiny random-weight model sets in the official file formats, for tests and demos on a CPU.

``python -m wanlora.tools.tiny --task t2v-A14B --out DIR`` (or :func:`make_tiny`) writes everything one
task needs, laid out and named like the official release, so every command runs end to end on a
17-frame 64x64 clip in seconds:

* A14B tasks: ``DIR/high_noise_model/`` and ``DIR/low_noise_model/``, each with sharded
  ``diffusion_pytorch_model-0000k-of-00002.safetensors``, the
  ``diffusion_pytorch_model.safetensors.index.json`` weight map and a ``config.json`` with the
  official fields (``_class_name``, ``dim``, ``ffn_dim``, ``num_heads``, ``in_dim``, ...);
* TI2V-5B and Wan2.1 T2V-14B: the same shards, index and ``config.json`` directly in ``DIR/``;
* Wan2.1 T2V-1.3B: one ``DIR/diffusion_pytorch_model.safetensors`` + ``config.json`` (as released);
* ``DIR/Wan2.1_VAE.pth`` or ``DIR/Wan2.2_VAE.pth``: the task's VAE, official keys, float32;
* ``DIR/models_t5_umt5-xxl-enc-bf16.pth``: umT5 encoder, official keys, bfloat16;
* Wan2.1 I2V-14B / FLF2V-14B (the DiT with the CLIP image branch, sharded as the release):
  ``DIR/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (the official XLM-RoBERTa-CLIP
  layout: ``visual.*``, a stub ``textual.*``, ``log_scale``; float32) and the same vision weights
  as ComfyUI ships them, ``DIR/clip_vision_h.safetensors`` (transformers key names, float16);
* ``DIR/google/umt5-xxl/``: a real SentencePiece unigram tokenizer (``spiece.model``,
  ``tokenizer_config.json``, ``special_tokens_map.json``) with umT5's special ids;
* ``DIR/manifest.json``: the files and the command-line flags that use them.

Sizes: DiT dim 64, 2 heads of 32, FFN 128, 2 layers, text_dim 32; umT5 d_model 32, 2 layers,
4 heads of 8, d_ff 64, vocabulary = the tokenizer's (~600 pieces trained at make time on
``wanlora/data/tiny_tokenizer_corpus.txt``, English captions and the Chinese default negative
prompt); VAEs at base width 8 (:data:`TINY_VAE`); CLIP ViT width 160 (2 heads of 80, the ViT-H
head width), 2 blocks, patch 14 at 224x224, so it gives the real 257 tokens (:data:`TINY_CLIP`). Values are a pure function of (seed, tensor
name, shape), drawn from a generator per tensor, so they do not depend on any module's init code;
the files are byte-identical for the same seed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import time
from pathlib import Path

import torch

from wanlora.conditioning import BLANK_CLIP_SHAPE, conditioning_for
from wanlora.io_utils import atomic_path, save_safetensors, save_torch_state_dict, write_json
from wanlora.models.clip import CLIP_CHECKPOINT_NAME
from wanlora.models.text_encoder import T5_CHECKPOINT_NAME, TOKENIZER_NAME
from wanlora.tasks import TASKS, VAE_FILES, get_task

__all__ = [
    "make_tiny",
    "write_tokenizer",
    "tiny_t5_state_dict",
    "tiny_dit_state_dict",
    "tiny_vae_state_dict",
    "tiny_clip_state_dict",
    "write_dit_folder",
    "dit_config_json",
    "TINY_DIT",
    "TINY_T5",
    "TINY_VAE",
    "TINY_CLIP",
    "main",
]

#: DiT sizes of every tiny set (head dim 32, so ``num_heads`` must come from config.json).
TINY_DIT = {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2}
#: umT5 sizes of every tiny set (the vocabulary is the tokenizer's).
TINY_T5 = {"d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 64, "num_buckets": 32}
#: VAE widths of the tiny sets (keyword arguments of the VAE model classes).
TINY_VAE = {"wan2.1": {"dim": 8}, "wan2.2": {"dim": 8, "dec_dim": 8}}
#: CLIP vision tower of the tiny Wan2.1 image sets (official: width 1280, 32 blocks, MLP 5120).
TINY_CLIP = {"dim": 160, "num_layers": 2, "mlp_dim": 320, "patch": 14, "image_size": 224, "embed_dim": 32}
#: Target vocabulary of the tiny tokenizer (the trainer may stop a little below it).
TINY_VOCAB = 600

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny_tokenizer_corpus.txt"
T5_FILE = T5_CHECKPOINT_NAME  # the official release's names, where load_text_encoder looks
TOKENIZER_DIR = TOKENIZER_NAME
VAE_FILE = VAE_FILES
CLIP_FILE = CLIP_CHECKPOINT_NAME
CLIP_COMFY_FILE = "clip_vision_h.safetensors"
DIT_SHARDS = 2
_DIFFUSERS_VERSION = "0.33.0"


def _generator(seed: int | str, name: str) -> torch.Generator:
    # One independent stream per (seed, tensor name): adding a tensor never shifts the others.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _random_like(name: str, shape, seed: int | str, std: float | None = None) -> torch.Tensor:
    """Deterministic random values for a weight: norm scales near 1, biases small, matrices and
    convolutions ``N(0, 1/fan_in)`` (activations keep unit scale through the tiny stacks)."""
    g = _generator(seed, name)
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if std is not None:
        return noise * std
    if leaf == "gamma" or ("norm" in name and leaf == "weight" and len(shape) == 1):
        return 1.0 + 0.1 * noise
    if leaf == "bias" or len(shape) <= 1:
        return 0.05 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


# ------------------------------------------------------------------------------------------------
# Tokenizer


def write_tokenizer(folder: str | os.PathLike, vocab_size: int = TINY_VOCAB) -> int:
    """Train a SentencePiece unigram tokenizer with umT5's special ids and write it as a
    Hugging Face tokenizer folder (``spiece.model``, ``tokenizer_config.json``,
    ``special_tokens_map.json``; ``AutoTokenizer.from_pretrained(folder)`` reads it offline).

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no ``<s>`` (as umT5). Training is single-threaded
    and deterministic (same bytes for the same corpus).

    Returns:
        the vocabulary size (pieces in ``spiece.model``).
    """
    import sentencepiece as spm

    folder = Path(folder)
    text = CORPUS.read_text(encoding="utf-8")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    model_bytes = buf.getvalue()
    with atomic_path(folder / "spiece.model") as tmp:
        tmp.write_bytes(model_bytes)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write_json(folder / "special_tokens_map.json", special)
    write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special},
    )
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    return sp.get_piece_size()


# ------------------------------------------------------------------------------------------------
# umT5 encoder (official wan/modules/t5.py T5Encoder key names)


def tiny_t5_state_dict(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       **sizes) -> dict[str, torch.Tensor]:
    """Random umT5 encoder weights under the official key names (``token_embedding.weight``,
    ``blocks.N.attn.{q,k,v,o}.weight``, ``blocks.N.pos_embedding.embedding.weight``,
    ``blocks.N.ffn.{gate.0,fc1,fc2}.weight``, ``blocks.N.norm{1,2}.weight``, ``norm.weight``).

    Scales follow the official ``t5.py: init_weights`` (embedding std 1, q std
    ``(D*D_attn)^-1/2``, ...), so outputs have realistic magnitudes. ``sizes`` override
    :data:`TINY_T5`.
    """
    s = {**TINY_T5, **sizes}
    d, h, dkv, dff = s["d_model"], s["num_heads"], s["d_kv"], s["d_ff"]
    da = h * dkv
    spec: dict[str, tuple[tuple[int, ...], float | None]] = {
        "token_embedding.weight": ((vocab_size, d), 1.0),
    }
    for i in range(s["num_layers"]):
        p = f"blocks.{i}."
        spec[p + "norm1.weight"] = ((d,), None)
        spec[p + "attn.q.weight"] = ((da, d), (d * da) ** -0.5)
        spec[p + "attn.k.weight"] = ((da, d), d**-0.5)
        spec[p + "attn.v.weight"] = ((da, d), d**-0.5)
        spec[p + "attn.o.weight"] = ((d, da), (h * da) ** -0.5)
        spec[p + "norm2.weight"] = ((d,), None)
        spec[p + "ffn.gate.0.weight"] = ((dff, d), d**-0.5)
        spec[p + "ffn.fc1.weight"] = ((dff, d), d**-0.5)
        spec[p + "ffn.fc2.weight"] = ((d, dff), dff**-0.5)
        spec[p + "pos_embedding.embedding.weight"] = ((s["num_buckets"], h), 1.0)
    spec["norm.weight"] = ((d,), None)
    return {k: _random_like(k, shape, seed, std).to(dtype) for k, (shape, std) in spec.items()}


# ------------------------------------------------------------------------------------------------
# DiT


def tiny_dit_state_dict(task: str, seed: int = 0, expert: str | None = None,
                        text_dim: int = TINY_T5["d_model"]) -> dict[str, torch.Tensor]:
    """Random DiT weights (official ``WanModel`` key names, float32) for ``task``'s channels.

    The key set and shapes come from :class:`wanlora.models.dit.WanDiT` built on the meta
    device with :data:`TINY_DIT` sizes; each expert draws its own values.
    """
    from wanlora.models.dit import WanDiT, WanDiTConfig

    t = get_task(task)
    # the CLIP branch reads the tiny CLIP encoder's features; the T2V Fun-Control models read
    # zero features of the official shape (conditioning.BLANK_CLIP_SHAPE), so they keep its width
    width = TINY_CLIP["dim"] if conditioning_for(t).uses_clip else BLANK_CLIP_SHAPE[1]
    image = dict(image_dim=width if t.uses_clip else None,
                 image_pos_len=t.clip_frames * _clip_tokens() if t.clip_frames > 1 else None)
    cfg = WanDiTConfig(in_channels=t.in_channels, out_channels=t.out_channels, text_dim=text_dim,
                       **TINY_DIT, **image)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    tag = f"{seed}:{expert or 'dit'}"
    return {k: _random_like(k, shape, tag, _dit_std(k, shape)) for k, shape in shapes.items()}


def _dit_std(name: str, shape) -> float | None:
    # Modulation tables are added to the time embedding: official init N(0, 1/sqrt(D)).
    if name.endswith("modulation"):
        return shape[-1] ** -0.5
    return None


def dit_config_json(task: str) -> dict:
    """The official ``config.json`` fields (diffusers-style ``WanModel`` config) for a tiny DiT."""
    t = get_task(task)
    model_type = conditioning_for(t).model_type
    return {
        "_class_name": "WanModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "dim": TINY_DIT["dim"],
        "eps": 1e-06,
        "ffn_dim": TINY_DIT["ffn_dim"],
        "freq_dim": 256,
        "in_dim": t.in_channels,
        "model_type": model_type,
        "num_heads": TINY_DIT["num_heads"],
        "num_layers": TINY_DIT["num_layers"],
        "out_dim": t.out_channels,
        "text_len": t.text_len,
    }


def write_dit_folder(folder: str | os.PathLike, sd: dict[str, torch.Tensor], config: dict,
                     shards: int = DIT_SHARDS) -> Path:
    """Write a DiT as the official release does: ``config.json`` plus either one
    ``diffusion_pytorch_model.safetensors`` (``shards=1``) or ``shards`` files
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` with the
    ``diffusion_pytorch_model.safetensors.index.json`` weight map.

    Returns:
        the path the ``--dit`` flag takes: the folder (sharded) or the single file.
    """
    folder = Path(folder)
    keys = sorted(sd)
    meta = {"format": "pt"}
    write_json(folder / "config.json", config)
    if shards == 1:
        path = folder / "diffusion_pytorch_model.safetensors"
        save_safetensors(sd, path, metadata=meta)
        return path
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_safetensors(part, folder / name, metadata=meta)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    write_json(
        folder / "diffusion_pytorch_model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    return folder


# ------------------------------------------------------------------------------------------------
# VAE


def tiny_vae_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random VAE weights (official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` key names, float32)
    at :data:`TINY_VAE` widths; shapes from :func:`wanlora.models.vae.build_vae` on meta.

    Raises:
        KeyError: ``kind`` is not ``"wan2.1"`` or ``"wan2.2"``.
    """
    from wanlora.models.vae import build_vae

    with torch.device("meta"):
        model = build_vae(kind, **TINY_VAE[kind])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {k: _random_like(k, shape, f"{seed}:vae:{kind}") for k, shape in shapes.items()}


# ------------------------------------------------------------------------------------------------
# CLIP image encoder (Wan2.1 I2V-14B / FLF2V-14B)


def _clip_tokens() -> int:
    """CLIP tokens per image of the tiny encoder: class token + (224 / 14)² = 257, as the release."""
    return 1 + (TINY_CLIP["image_size"] // TINY_CLIP["patch"]) ** 2


def tiny_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random XLM-RoBERTa-CLIP weights in the official layout (``wan/modules/clip.py:
    XLMRobertaCLIP``): the full ``visual.*`` tower at :data:`TINY_CLIP` sizes (fused
    ``attn.to_qkv``, ``cls_embedding [1, 1, D]``, ``pos_embedding [1, 257, D]``, bias-free patch
    conv, ``pre_norm``, ``post_norm``, ``head``), a stub text tower and ``log_scale``; float32."""
    c = TINY_CLIP
    d, m = c["dim"], c["mlp_dim"]
    spec: dict[str, tuple] = {
        "visual.patch_embedding.weight": (d, 3, c["patch"], c["patch"]),
        "visual.cls_embedding": (1, 1, d),
        "visual.pos_embedding": (1, _clip_tokens(), d),
        "visual.pre_norm.weight": (d,), "visual.pre_norm.bias": (d,),
        "visual.post_norm.weight": (d,), "visual.post_norm.bias": (d,),
        "visual.head": (d, c["embed_dim"]),
        "textual.token_embedding.weight": (16, c["embed_dim"]),
        "textual.head.0.weight": (c["embed_dim"], c["embed_dim"]),
    }
    for i in range(c["num_layers"]):
        b = f"visual.transformer.{i}."
        spec.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.to_qkv.weight": (3 * d, d), b + "attn.to_qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.0.weight": (m, d), b + "mlp.0.bias": (m,),
            b + "mlp.2.weight": (d, m), b + "mlp.2.bias": (d,),
        })
    tag = f"{seed}:clip"
    sd = {k: _random_like(k, shape, tag, 0.5 if k.endswith(("cls_embedding", "pos_embedding")) else None)
          for k, shape in spec.items()}
    sd["log_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


def comfy_clip_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision weights of :func:`tiny_clip_state_dict` as ComfyUI's ``clip_vision_h.safetensors``
    holds them: transformers names behind ``vision_model.``, ``visual_projection.weight``, float16."""
    from wanlora.models.clip import official_to_hf_state_dict

    sd = {"vision_model." + k: v for k, v in official_to_hf_state_dict(official).items()}
    sd["visual_projection.weight"] = official["visual.head"].t()
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# The set


def make_tiny(task: str, out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write the tiny model set of ``task`` into ``out_dir`` and return its manifest.

    Args:
        task: a ``--task`` name (:data:`wanlora.tasks.TASKS`).
        out_dir: destination folder (created; existing files of a set are overwritten).
        seed: weights are a pure function of (task, seed).

    Returns:
        the manifest written to ``out_dir/manifest.json``::

            {"task": ..., "seed": ..., "files": {role: absolute path},
             "flags": {"--task": task, "--dit": ..., ["--dit_high_noise": ...,]
                       "--vae": ..., "--t5": ..., "--t5_tokenizer": ..., ["--clip": ...]},
             "sizes": {"dit": ..., "t5": ..., "vae": ...}}

        For A14B tasks ``--dit`` is the low-noise expert and ``--dit_high_noise`` the
        high-noise one (the convention of the Wan LoRA tools). The Wan2.1 image tasks add
        ``--clip`` (the official ``.pth``) and ``files["clip_comfyui"]``.

    Raises:
        ValueError: unknown task (the message lists the tasks; :func:`wanlora.tasks.get_task`).
    """
    t = get_task(task)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    tok_dir = out / TOKENIZER_DIR
    vocab = write_tokenizer(tok_dir)
    t5_path = out / T5_FILE
    save_torch_state_dict(tiny_t5_state_dict(vocab, seed), t5_path)

    vae_path = out / VAE_FILE[t.vae]
    save_torch_state_dict(tiny_vae_state_dict(t.vae, seed), vae_path)

    files: dict[str, str] = {}
    flags: dict[str, str] = {"--task": task}
    config = dit_config_json(task)
    if t.experts:
        for expert in t.experts:
            path = write_dit_folder(out / f"{expert}_model", tiny_dit_state_dict(task, seed, expert), config)
            files[f"dit_{expert}"] = str(path)
        flags["--dit"] = files["dit_low_noise"]
        flags["--dit_high_noise"] = files["dit_high_noise"]
    else:
        shards = 1 if task in ("t2v-1.3B", "t2v-1.3B-FC") else DIT_SHARDS  # the 1.3B releases are one file
        path = write_dit_folder(out, tiny_dit_state_dict(task, seed), config, shards=shards)
        files["dit"] = str(path)
        flags["--dit"] = str(path)
    files.update(vae=str(vae_path), t5=str(t5_path), t5_tokenizer=str(tok_dir))
    flags.update({"--vae": str(vae_path), "--t5": str(t5_path), "--t5_tokenizer": str(tok_dir)})
    sizes = {}
    if conditioning_for(t).uses_clip:
        clip_sd = tiny_clip_state_dict(seed)
        clip_path, comfy_path = out / CLIP_FILE, out / CLIP_COMFY_FILE
        save_torch_state_dict(clip_sd, clip_path)
        save_safetensors(comfy_clip_state_dict(clip_sd), comfy_path)
        files.update(clip=str(clip_path), clip_comfyui=str(comfy_path))
        flags["--clip"] = str(clip_path)
        sizes["clip"] = dict(TINY_CLIP)
    manifest = {
        "task": task,
        "seed": seed,
        "files": files,
        "flags": flags,
        "sizes": {"dit": {**TINY_DIT, "text_dim": TINY_T5["d_model"]},
                  "t5": {**TINY_T5, "vocab_size": vocab},
                  "vae": {"kind": t.vae, **TINY_VAE[t.vae]}, **sizes},
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m wanlora.tools.tiny --task T --out DIR [--seed N]``: write one set, print its flags."""
    p = argparse.ArgumentParser(
        prog="python -m wanlora.tools.tiny",
        description="Write a tiny random-weight model set (official file formats) for one task.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="the --task it is for")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--seed", type=int, default=0, help="weights are a pure function of the seed")
    args = p.parse_args(argv)
    start = time.perf_counter()
    manifest = make_tiny(args.task, args.out, seed=args.seed)
    print(f"tiny {args.task} set written to {Path(args.out).resolve()} "
          f"in {time.perf_counter() - start:.1f} s; flags:")
    print(" ".join(f"{k} {v}" for k, v in manifest["flags"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

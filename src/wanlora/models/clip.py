"""The CLIP image encoder of Wan2.1 I2V-14B and FLF2V-14B, as the official pipelines run it.

The official encoder is the visual tower of open-clip's XLM-RoBERTa-Large ViT-H/14
(``wan/modules/clip.py: clip_xlm_roberta_vit_h_14``, called through ``CLIPModel.visual``). The
network here is transformers' :class:`~transformers.CLIPVisionModel`, which computes the same
function once the weights are renamed (``reference/wan21_image_models.md``):

* patch embedding: a Conv2d without bias (the official ``bias=not pre_norm``), a class token
  prepended, a learned position embedding added (no interpolation at 224x224), then the
  pre-norm LayerNorm (transformers' ``pre_layrnorm``);
* pre-norm blocks ``x + attn(LN1(x))``, ``x + mlp(LN2(x))``, LayerNorm eps 1e-5, attention scaled
  by ``1/sqrt(head_dim)``, MLP ``Linear -> GELU -> Linear`` with the **exact** (erf) GELU — the
  ViT-H config passes ``activation='gelu'``, overriding the class's QuickGELU default;
* the output is the hidden state after **all blocks but the last** (``use_31_block=True``), with
  no post-norm and no head: ``[B, 257, 1280]`` at 224x224, patch 14. The model is built with one
  block fewer than the file holds, so the last block is never loaded; the post-norm is loaded
  (transformers' model owns one) but only touches the pooled output, which is not used.

The official fused ``to_qkv`` ``[3D, D]`` is split in q, k, v order (its ``view(b, s, 3, n, d)``),
``cls_embedding [1, 1, D]`` becomes ``class_embedding [D]`` and ``pos_embedding [1, N, D]`` the
``position_embedding`` table ``[N, D]``.

Preprocessing (:func:`preprocess`, the official ``CLIPModel.visual``): each ``[-1, 1]`` image is
resized to 224x224 with ``F.interpolate(mode='bicubic', align_corners=False)`` — no antialias, no
clamp — then mapped to ``[0, 1]`` by ``x * 0.5 + 0.5`` and normalized with the OpenAI CLIP
mean/std. The official inference runs the encoder in float16 (``clip_dtype``) under autocast.

Accepted weight files (:func:`load_clip`):

* the official ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: the whole
  XLM-RoBERTa-CLIP state dict (``visual.*``, ``textual.*``, ``log_scale``); only ``visual.*`` is
  read (memory-mapped, ``torch.load(weights_only=True)``);
* ComfyUI's ``clip_vision_h.safetensors`` and other transformers-layout files
  (``vision_model.embeddings.class_embedding``, ``vision_model.encoder.layers.N.self_attn.q_proj``,
  ..., optionally ``visual_projection.weight``).

Sizes (width, blocks, MLP width, patch, image size) are read from the weight shapes; the head count
from the safetensors metadata ``num_heads`` when present, else ``width // 80`` (ViT-H/14: 16 heads of
80 for width 1280).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

import torch
import torch.nn.functional as F

from wanlora.models.loading import CheckpointError, describe_checkpoint, load_state_dict, read_metadata
from wanlora.tasks import CLIP_FILE

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_CHECKPOINT_NAME",
    "ClipImageEncoder",
    "load_clip",
    "preprocess",
    "official_to_hf_state_dict",
]

logger = logging.getLogger(__name__)

#: OpenAI CLIP normalization (``wan/modules/clip.py: _clip``, non-SigLIP branch).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: File name of the official encoder in the Wan2.1 I2V / FLF2V release folders.
CLIP_CHECKPOINT_NAME = CLIP_FILE
#: Head width of open-clip's ViT-H/14 (1280 / 16 heads); used when the file does not say.
_HEAD_DIM = 80

_OFFICIAL_BLOCK = re.compile(r"^visual\.transformer\.(\d+)\.(.+)$")
_BLOCK_RENAME = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias",
}
_TOP_RENAME = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight", "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight", "visual.post_norm.bias": "post_layernorm.bias",
}
_COMFY = "vision_model."


def preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """Resize and normalize images as the official ``CLIPModel.visual`` does.

    Args:
        images: ``[B, 3, H, W]`` in ``[-1, 1]``, any H, W (float; computed in float32).
        image_size: the encoder's input size (224 for ViT-H/14).

    Returns:
        ``[B, 3, image_size, image_size]`` float32: bicubic ``F.interpolate`` with
        ``align_corners=False`` (no antialias, no clamp), then ``(x * 0.5 + 0.5 - mean) / std``.

    Raises:
        ValueError: not a ``[B, 3, H, W]`` tensor.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP encode: images of shape {tuple(images.shape)}; expected [B, 3, H, W] in [-1, 1]")
    x = F.interpolate(images.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def official_to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the official ``visual.*`` keys to transformers' ``CLIPVisionModel`` names.

    Args:
        sd: the official XLM-RoBERTa-CLIP state dict (``textual.*``, ``log_scale`` and the
            visual ``head`` are dropped).

    Returns:
        ``{key: tensor}`` in the names of transformers' vision tower (``embeddings.…``,
        ``pre_layrnorm.…``, ``encoder.layers.N.…``; ComfyUI's files carry them behind
        ``vision_model.``), with ``to_qkv`` split in q, k, v order, the class token
        flattened to ``[D]`` and the position embedding to ``[N, D]`` (views, no copies).

    Raises:
        CheckpointError: a ``visual.*`` key this mapping does not know.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.startswith("visual.") or key == "visual.head":
            continue
        m = _OFFICIAL_BLOCK.match(key)
        if m:
            i, rest = m.groups()
            base = f"encoder.layers.{i}."
            if rest in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part
            elif rest in _BLOCK_RENAME:
                out[base + _BLOCK_RENAME[rest]] = t
            else:
                raise CheckpointError(f"unknown CLIP block weight {key!r}")
            continue
        if key == "visual.cls_embedding":
            out["embeddings.class_embedding"] = t.reshape(-1)
        elif key == "visual.pos_embedding":
            out["embeddings.position_embedding.weight"] = t.reshape(t.shape[-2], t.shape[-1])
        elif key in _TOP_RENAME:
            out[_TOP_RENAME[key]] = t
        else:
            raise CheckpointError(f"unknown CLIP visual weight {key!r}")
    return out


def _vision_state_dict(raw: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The transformers-layout vision weights of an official or ComfyUI file.

    Raises:
        CheckpointError: the file is not a CLIP vision encoder (names what it looks like).
    """
    if any(k.startswith("visual.transformer.") for k in raw):
        return official_to_hf_state_dict(raw)
    sd = {k[len(_COMFY):]: v for k, v in raw.items() if k.startswith(_COMFY)}
    if not sd:  # a vision tower saved without the "vision_model." prefix
        sd = {k: v for k, v in raw.items()
              if k.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")}
    if "embeddings.class_embedding" not in sd:
        what = describe_checkpoint(raw)
        hint = f"; it looks like {what}" if what and "CLIP" not in what else ""
        raise CheckpointError(
            f"{path}: not a CLIP image encoder (no visual.transformer.* or "
            f"vision_model.embeddings.* keys){hint}; pass {CLIP_CHECKPOINT_NAME} or ComfyUI's "
            "clip_vision_h.safetensors as --clip"
        )
    sd.pop("embeddings.position_ids", None)  # a buffer some exports carry
    return sd


def _vision_config(sd: dict[str, torch.Tensor], num_heads: int | None, path):
    """``CLIPVisionConfig`` of the weights, with one block fewer than stored (the last block is
    never used). Raises CheckpointError for shapes that do not make a ViT."""
    from transformers import CLIPVisionConfig

    try:
        patch = sd["embeddings.patch_embedding.weight"]
        pos = sd["embeddings.position_embedding.weight"]
        fc1 = sd["encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise CheckpointError(f"{path}: CLIP weight {e.args[0]!r} missing; the file is incomplete") from None
    dim, channels, p = patch.shape[0], patch.shape[1], patch.shape[-1]
    grid = round((pos.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != pos.shape[0]:
        raise CheckpointError(f"{path}: CLIP position table of {pos.shape[0]} rows is not 1 + a square grid")
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    if layers < 2:
        raise CheckpointError(f"{path}: a CLIP encoder of {layers} block; Wan uses all blocks but the last")
    if num_heads is None:
        if dim % _HEAD_DIM:
            raise CheckpointError(
                f"{path}: a CLIP vision tower of width {dim}, not the ViT-H/14 (width 1280, heads of "
                f"{_HEAD_DIM}) that Wan2.1 uses; pass {CLIP_CHECKPOINT_NAME} or clip_vision_h.safetensors, "
                "or put 'num_heads' in the safetensors metadata"
            )
        num_heads = dim // _HEAD_DIM
    return CLIPVisionConfig(
        hidden_size=dim, intermediate_size=fc1.shape[0], num_attention_heads=int(num_heads),
        num_hidden_layers=layers - 1, num_channels=channels, image_size=grid * p, patch_size=p,
        hidden_act="gelu", layer_norm_eps=1e-5,
    ), layers


def _identity(sd: dict[str, torch.Tensor], layers: int, dim: int) -> str:
    """``clip-<width>x<blocks>-<12 hex>``: a hash of a few weights rounded to float16 and then to
    bfloat16, so the official float32 ``.pth`` and ComfyUI's float16 copy share an identity (the
    float16 file's values pass the first rounding unchanged)."""
    h = hashlib.sha256()
    for key in ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                "encoder.layers.0.self_attn.q_proj.weight", f"encoder.layers.{layers - 2}.mlp.fc2.weight"):
        t = sd[key].reshape(-1)[:8192].to(torch.float16).to(torch.bfloat16).contiguous().view(torch.int16)
        h.update(key.encode())
        h.update(t.numpy().tobytes())
    return f"clip-{dim}x{layers}-{h.hexdigest()[:12]}"


def _tower(model):
    """The module holding ``embeddings`` / ``encoder`` (``model.vision_model`` in transformers 4,
    the ``CLIPVisionModel`` itself in transformers 5)."""
    return getattr(model, "vision_model", model)


class ClipImageEncoder:
    """The Wan2.1 CLIP image encoder: :func:`preprocess` + the ViT up to its next-to-last block.

    Attributes:
        model: transformers ``CLIPVisionModel`` with one block fewer than the checkpoint (eval,
            no grad).
        image_size: input size of the ViT (224).
        identity: short string naming the weights (``clip-<width>x<blocks>-<hash>``); a latent
            cache made with another identity is stale.
    """

    def __init__(self, model, identity: str):
        self.model = model
        self.identity = identity
        self.image_size = model.config.image_size

    @property
    def device(self) -> torch.device:
        return _tower(self.model).embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return _tower(self.model).embeddings.patch_embedding.weight.dtype

    @property
    def dim(self) -> int:
        """Feature width (1280 for ViT-H/14): the DiT's ``img_emb`` input width."""
        return self.model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: 1 class token + (image_size / patch)² (257)."""
        return 1 + (self.image_size // self.model.config.patch_size) ** 2

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ClipImageEncoder":
        """Move / cast the model in place; returns ``self``."""
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP features of images (``wan/modules/clip.py: CLIPModel.visual``).

        Args:
            images: ``[B, 3, H, W]`` in ``[-1, 1]``, any size (resized to 224x224 inside).

        Returns:
            ``[B, 257, 1280]`` (``[B, num_tokens, dim]``) in float32: the hidden states after all
            blocks but the last, no post-norm; class token first.

        Raises:
            ValueError: not a ``[B, 3, H, W]`` tensor.
        """
        x = preprocess(images.to(self.device), self.image_size).to(self.dtype)
        return self.model(pixel_values=x).last_hidden_state.float()

    __call__ = encode

    def __repr__(self) -> str:
        c = self.model.config
        return (f"ClipImageEncoder(width={c.hidden_size}, blocks used={c.num_hidden_layers}, "
                f"heads={c.num_attention_heads}, image_size={c.image_size}, patch={c.patch_size}, "
                f"dtype={self.dtype}, device={self.device}, identity={self.identity!r})")


def load_clip(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> ClipImageEncoder:
    """Load the Wan2.1 CLIP image encoder from the official ``.pth`` or a ComfyUI safetensors.

    Args:
        path: ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (only ``visual.*`` is
            read) or ``clip_vision_h.safetensors`` (transformers key names).
        dtype: compute dtype of the weights (the official inference uses float16 on the GPU).
        device: where the model lives.

    Returns:
        a :class:`ClipImageEncoder` in eval mode with gradients off.

    Raises:
        CheckpointError: unreadable file, a file that is not a CLIP vision encoder, missing or
            misshapen weights.
    """
    from transformers import CLIPVisionModel

    raw = load_state_dict(path)
    sd = _vision_state_dict(raw, path)
    meta = read_metadata(path)
    heads = int(meta["num_heads"]) if meta.get("num_heads", "").isdigit() else None
    cfg, layers = _vision_config(sd, heads, path)
    last = f"encoder.layers.{layers - 1}."
    sd = {k: v for k, v in sd.items() if not k.startswith(last)}
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    tower = _tower(model)
    expected = tower.state_dict()
    missing = sorted(expected.keys() - sd.keys())
    extra = sorted(sd.keys() - expected.keys())
    if missing or extra:
        raise CheckpointError(
            f"{path}: CLIP vision weights {'missing: ' + str(missing[:4]) if missing else ''}"
            f"{' unexpected: ' + str(extra[:4]) if extra else ''}; the file is incomplete or not "
            "the Wan2.1 CLIP image encoder"
        )
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: CLIP weights of unexpected shape: {wrong[:3]}")
    identity = _identity(sd, layers, cfg.hidden_size)
    tower.load_state_dict({k: sd[k].to(device=device, dtype=dtype) for k in expected}, strict=True, assign=True)
    emb = tower.embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device)[None], persistent=False)
    del raw, sd
    model.eval().requires_grad_(False)
    enc = ClipImageEncoder(model, identity)
    logger.info("loaded %s: %r", path, enc)
    return enc

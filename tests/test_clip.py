"""The Wan2.1 CLIP image encoder: parity with two independent oracles, both file layouts, and the
official preprocessing on real photos.

Oracles (float32, random weights):

* a plain re-statement of the official ``wan/modules/clip.py: VisionTransformer.forward(x,
  use_31_block=True)`` written here from the formula, on the official ``visual.*`` keys (fused
  ``to_qkv``, ``cls_embedding [1,1,D]``, ``pos_embedding [1,N,D]``, exact GELU);
* transformers' full ``CLIPVisionModel`` (every block) on the ComfyUI-layout file, taking the
  next-to-last entry of ``hidden_states`` — the way ComfyUI's ``penultimate_hidden_states`` reads it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wanlora.models import load_clip
from wanlora.models.clip import CLIP_MEAN, CLIP_STD, official_to_hf_state_dict, preprocess
from wanlora.models.loading import CheckpointError

torch.set_num_threads(1)

DIM, HEADS, LAYERS, MLP, PATCH, SIZE = 160, 2, 3, 320, 14, 56


def _official_sd(seed=0, dim=DIM, layers=LAYERS, mlp=MLP, patch=PATCH, size=SIZE):
    """Random weights in the official XLM-RoBERTa-CLIP layout (plus a token text tower entry)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(shape[-1]))

    n = (size // patch) ** 2 + 1
    sd = {
        "visual.patch_embedding.weight": r(dim, 3, patch, patch),
        "visual.cls_embedding": r(1, 1, dim, scale=0.5),
        "visual.pos_embedding": r(1, n, dim, scale=0.5),
        "visual.pre_norm.weight": 1 + r(dim, scale=0.2), "visual.pre_norm.bias": r(dim, scale=0.2),
        "visual.post_norm.weight": 1 + r(dim, scale=0.2), "visual.post_norm.bias": r(dim, scale=0.2),
        "visual.head": r(dim, 64),
        "textual.token_embedding.weight": r(10, 8), "log_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        b = f"visual.transformer.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(dim, scale=0.2), b + "norm1.bias": r(dim, scale=0.2),
            b + "attn.to_qkv.weight": r(3 * dim, dim), b + "attn.to_qkv.bias": r(3 * dim, scale=0.2),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim, scale=0.2),
            b + "norm2.weight": 1 + r(dim, scale=0.2), b + "norm2.bias": r(dim, scale=0.2),
            b + "mlp.0.weight": r(mlp, dim), b + "mlp.0.bias": r(mlp, scale=0.2),
            b + "mlp.2.weight": r(dim, mlp), b + "mlp.2.bias": r(dim, scale=0.2),
        })
    return sd


def _official_visual(sd, x, heads=HEADS):
    """``VisionTransformer.forward(x, use_31_block=True)`` of the official code, restated:
    ``x`` already resized and normalized, ``[B, 3, S, S]``; returns ``[B, N, D]``."""
    v = {k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")}
    layers = 1 + max(int(k.split(".")[1]) for k in v if k.startswith("transformer."))
    dim = v["cls_embedding"].shape[-1]
    x = F.conv2d(x, v["patch_embedding.weight"], stride=v["patch_embedding.weight"].shape[-1])
    x = x.flatten(2).permute(0, 2, 1)
    x = torch.cat([v["cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + v["pos_embedding"]
    x = F.layer_norm(x, (dim,), v["pre_norm.weight"], v["pre_norm.bias"], 1e-5)
    for i in range(layers - 1):  # use_31_block: all blocks but the last
        p = lambda n: v[f"transformer.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (dim,), p("norm1.weight"), p("norm1.bias"), 1e-5)
        b, s, _ = h.shape
        q, k, val = F.linear(h, p("attn.to_qkv.weight"), p("attn.to_qkv.bias")).view(b, s, 3, heads, -1).unbind(2)
        a = torch.softmax((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(dim // heads), -1)
        o = (a @ val.transpose(1, 2)).transpose(1, 2).reshape(b, s, dim)
        x = x + F.linear(o, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (dim,), p("norm2.weight"), p("norm2.bias"), 1e-5)
        h = F.gelu(F.linear(h, p("mlp.0.weight"), p("mlp.0.bias")))  # exact GELU (activation='gelu')
        x = x + F.linear(h, p("mlp.2.weight"), p("mlp.2.bias"))
    return x


def _official_preprocess(images, size):
    """``CLIPModel.visual``'s preprocessing, restated: per image bicubic interpolate, then
    ``mul_(0.5).add_(0.5)``, then torchvision-style ``Normalize`` with the CLIP mean/std."""
    out = []
    for u in images:  # the official loop over videos [C, 1, H, W] -> transpose -> [1, C, H, W]
        out.append(F.interpolate(u[:, None].transpose(0, 1), size=(size, size), mode="bicubic",
                                 align_corners=False))
    x = torch.cat(out).mul(0.5).add(0.5)
    mean = torch.as_tensor(CLIP_MEAN)[:, None, None]
    std = torch.as_tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def _comfy_sd(official):
    """The same weights in the ComfyUI ``clip_vision_h.safetensors`` (transformers) layout, float16
    and contiguous, with a ``visual_projection`` as ComfyUI's file has."""
    sd = {"vision_model." + k: v.contiguous() for k, v in official_to_hf_state_dict(official).items()}
    sd["visual_projection.weight"] = official["visual.head"].t().contiguous()
    return sd


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    official = _official_sd()
    torch.save(official, d / "models_clip_tiny.pth")
    save_file(_comfy_sd(official), str(d / "clip_vision_tiny.safetensors"), metadata={"num_heads": str(HEADS)})
    return d, official


def test_official_pth_matches_official_restatement(files):
    d, official = files
    # the tiny width 160 gives heads of 80 (the ViT-H rule): 2 heads, no metadata needed
    enc = load_clip(d / "models_clip_tiny.pth")
    assert (enc.dim, enc.num_tokens, enc.image_size, enc.model.config.num_attention_heads) == (DIM, 17, SIZE, HEADS)
    assert enc.model.config.num_hidden_layers == LAYERS - 1
    img = torch.rand(3, 3, 37, 91, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = enc.encode(img)
    ref = _official_visual(official, _official_preprocess(img, SIZE))
    assert out.shape == (3, 17, DIM) and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-5


def test_comfy_safetensors_matches_transformers_penultimate_hidden_state(files):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    d, official = files
    enc = load_clip(d / "clip_vision_tiny.safetensors")
    full = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=DIM, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
        image_size=SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-5)).eval()
    tower = getattr(full, "vision_model", full)
    tower.load_state_dict(official_to_hf_state_dict(official), strict=True)
    img = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = full(pixel_values=_official_preprocess(img, SIZE), output_hidden_states=True).hidden_states[-2]
    assert _rel(enc.encode(img), ref) < 1e-5
    # both layouts of the same weights: same features and the same identity
    pth = load_clip(d / "models_clip_tiny.pth")
    assert _rel(enc.encode(img), pth.encode(img)) < 1e-6
    assert enc.identity == pth.identity and enc.identity.startswith(f"clip-{DIM}x{LAYERS}-")


def test_last_block_and_post_norm_unused(files, tmp_path):
    """Changing the last block or the post-norm does not change the features; changing the
    next-to-last block does (the output is the next-to-last block's hidden state)."""
    d, official = files
    img = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(3)) * 2 - 1
    base = load_clip(d / "models_clip_tiny.pth").encode(img)
    for key, changes in ((f"visual.transformer.{LAYERS - 1}.mlp.2.bias", False),
                         ("visual.post_norm.bias", False),
                         (f"visual.transformer.{LAYERS - 2}.mlp.2.bias", True)):
        sd = dict(official)
        sd[key] = sd[key] + 1.0
        torch.save(sd, tmp_path / "x.pth")
        out = load_clip(tmp_path / "x.pth").encode(img)
        assert (not torch.equal(out, base)) == changes, key


@pytest.mark.parametrize("name", ["cat_sunglasses.jpg", "elf_portrait.jpg", "street_portrait.png"])
def test_preprocess_on_real_photos(media_dir, name):
    """Portrait (832x1104) and landscape (1280x720) photos: the library's preprocessing equals the
    official per-image loop bit for bit; the result is 224x224, the full frame, not antialiased."""
    from wanlora.conditioning import image_to_tensor
    from wanlora.video_io import read_image

    img = image_to_tensor(read_image(media_dir / name))
    assert img.min() >= -1 and img.max() <= 1 and img.shape[1:] != (224, 224)
    ours = preprocess(img[None], 224)
    ref = _official_preprocess(img[None], 224)
    assert ours.shape == (1, 3, 224, 224)
    assert torch.equal(ours, ref)
    # the whole photo is squeezed to 224x224 (no crop, no aspect kept) without antialiasing: an
    # antialiased resize of these 3-6x reductions differs clearly
    smooth = F.interpolate(img[None], size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    smooth = (smooth * 0.5 + 0.5 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert (ours - smooth).abs().max() > 0.1
    assert (ours - smooth).abs().mean() < 0.2  # same picture, same framing


def test_not_a_clip_file(tmp_path):
    save_file({"decoder.conv1.weight": torch.zeros(4, 16, 3, 3, 3), "encoder.conv1.weight": torch.zeros(1)},
              str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a CLIP image encoder.*--vae"):
        load_clip(tmp_path / "vae.safetensors")
    sd = _official_sd(dim=96, mlp=192)  # width not a multiple of the ViT-H head width
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not the ViT-H/14"):
        load_clip(tmp_path / "odd.pth")

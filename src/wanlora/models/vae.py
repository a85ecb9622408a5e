"""Loading and running the Wan VAEs: ``load_vae``, the ``WanVAE`` wrapper, kind detection.

``load_vae(path)`` reads an official VAE file — ``Wan2.1_VAE.pth``, ComfyUI's
``wan_2.1_vae.safetensors``, ``Wan2.2_VAE.pth`` or a diffusers ``AutoencoderKLWan`` (the ``vae/``
folder of the ``-Diffusers`` repositories, renamed by :func:`diffusers_vae_to_official`) — detects
which VAE it holds from its weights,
builds the matching model (``vae2_1.WanVAE21Model`` / ``vae2_2.WanVAE22Model``) and wraps it in
:class:`WanVAE`, which works in the DiT's latent space:

* ``encode(video [B, 3, F, H, W] in [-1, 1]) -> z [B, z_dim, 1 + (F-1)/4, H/s, W/s]`` normalized
  per channel, ``z = (mu - mean) / std`` with the official constants, ``mu`` the posterior mean
  (no sampling) — official ``Wan2_1_VAE.encode`` / ``Wan2_2_VAE.encode``;
* ``decode(z) -> video`` inverts the normalization and clamps to [-1, 1] (official ``decode``).

Both stream the clip through the causal temporal chunks (see ``vae_blocks``), so memory depends
on the frame size, not on the clip length. Unlike the official code, a frame count that is not
``4n + 1`` is an error instead of silently dropping the extra frames.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch
from torch import nn

from wanlora.models.loading import CheckpointError, load_state_dict
from wanlora.models.vae2_1 import WanVAE21Model
from wanlora.models.vae2_2 import WanVAE22Model
from wanlora.models.vae_tiling import Tiling, as_tiling, tiled_decode

__all__ = [
    "WanVAE",
    "Tiling",
    "load_vae",
    "build_vae",
    "save_vae_pth",
    "detect_vae_kind",
    "diffusers_vae_to_official",
    "is_diffusers_vae",
    "vae_config_from_state_dict",
    "weights_identity",
    "LATENT_MEAN",
    "LATENT_STD",
    "VAE_KINDS",
]

VAE_KINDS = ("wan2.1", "wan2.2")

# Per-channel latent statistics of the released VAEs (official ``Wan2_1_VAE.__init__`` and
# ``Wan2_2_VAE.__init__``).
LATENT_MEAN = {
    "wan2.1": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
               0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "wan2.2": [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
               0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
               0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
               -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
               0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
}
LATENT_STD = {
    "wan2.1": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
               2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
    "wan2.2": [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
               0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
               0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
               0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
               0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
}

_MODEL = {"wan2.1": WanVAE21Model, "wan2.2": WanVAE22Model}
_PREFIXES = ("first_stage_model.", "vae.")  # wrappers some tools put around the official keys
# Tensors hashed into ``identity`` (small, and touching encoder, latent convs and decoder).
_ID_KEYS = ("encoder.conv1.weight", "encoder.head.2.bias", "conv1.weight", "conv1.bias", "conv2.weight",
            "conv2.bias", "decoder.conv1.bias", "decoder.head.2.weight", "decoder.head.2.bias")


def build_vae(kind: str, dim: int | None = None, z_dim: int | None = None, dec_dim: int | None = None,
              dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2) -> nn.Module:
    """A randomly initialized Wan VAE model whose ``state_dict()`` has the official keys.

    Args:
        kind: ``"wan2.1"`` or ``"wan2.2"``.
        dim: encoder base width (released: 96 for Wan2.1, 160 for Wan2.2; tiny models use e.g. 8).
        z_dim: latent channels (released and expected by the DiTs: 16 / 48).
        dec_dim: Wan2.2 decoder base width (released 256; by default 256 for the released
            ``dim=160`` and ``dim`` otherwise). Ignored for Wan2.1, whose decoder shares ``dim``.
        dim_mult, num_res_blocks: stage layout (released ``(1, 2, 4, 4)``, 2).

    Returns:
        ``WanVAE21Model`` or ``WanVAE22Model`` (float32, CPU, PyTorch default init). Wrap it with
        ``WanVAE(model)`` to encode/decode normalized latents; save it with :func:`save_vae_pth`.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "wan2.1":
        return WanVAE21Model(dim=dim or 96, z_dim=z_dim or 16, dim_mult=dim_mult, num_res_blocks=num_res_blocks)
    if kind == "wan2.2":
        dim = dim or 160
        return WanVAE22Model(dim=dim, dec_dim=dec_dim or (256 if dim == 160 else dim), z_dim=z_dim or 48,
                             dim_mult=dim_mult, num_res_blocks=num_res_blocks)
    raise ValueError(f"build_vae: unknown kind {kind!r}; use one of {VAE_KINDS}")


def save_vae_pth(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` (official keys) as a ``.pth`` file, atomically, like the
    released ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``."""
    from wanlora.io_utils import save_torch_state_dict

    save_torch_state_dict(model.state_dict(), path)


def detect_vae_kind(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """``"wan2.1"`` or ``"wan2.2"`` from the weights of an official-key VAE state dict.

    Wan2.1: ``encoder.conv1`` takes 3 channels and stages are flat (``encoder.downsamples.0.residual``).
    Wan2.2: ``encoder.conv1`` takes 12 (2x2-patchified) channels and stages nest
    (``encoder.downsamples.0.downsamples.0.residual``).

    Raises:
        CheckpointError: the weights are not a Wan VAE; the message says what they look like
            (DiT, umT5, CLIP, a diffusers-format VAE) and which flag takes them.
    """
    w = sd.get("encoder.conv1.weight")
    if w is not None and "conv1.weight" in sd and "decoder.conv1.weight" in sd and w.dim() == 5:
        if w.shape[1] == 3 and "encoder.downsamples.0.residual.0.gamma" in sd:
            return "wan2.1"
        if w.shape[1] == 12 and "encoder.downsamples.0.downsamples.0.residual.0.gamma" in sd:
            return "wan2.2"
    keys = list(sd)
    has = lambda *parts: any(p in k for k in keys for p in parts)  # noqa: E731
    if has("self_attn.q.", "attn1.to_q", "patch_embedding", "condition_embedder"):
        what = "a Wan DiT (diffusion model) checkpoint — pass it as --dit (or --dit_high_noise)"
    elif has("token_embedding.weight", "shared.weight", "SelfAttention", "ffn.gate"):
        what = "a umT5 text-encoder checkpoint — pass it as --t5"
    elif has("visual.", "textual.", "vision_model"):
        what = "a CLIP image-encoder checkpoint (Wan2.1 I2V), which wanlora does not use"
    elif has("encoder.conv_in.", "quant_conv."):
        what = ("a diffusers-format AutoencoderKLWan (vae/diffusion_pytorch_model.safetensors) — pass the "
                "official Wan2.1_VAE.pth / Wan2.2_VAE.pth or ComfyUI's wan_2.1_vae.safetensors instead")
    else:
        what = f"not a Wan VAE (first keys: {keys[:3]})"
    raise CheckpointError(f"{source}: --vae expects the Wan2.1 or Wan2.2 VAE, but this file is {what}")


_DIFFUSERS_VAE_FIXED = (
    ("quant_conv.", "conv1."), ("post_quant_conv.", "conv2."),
    ("encoder.conv_in.", "encoder.conv1."), ("decoder.conv_in.", "decoder.conv1."),
    ("encoder.norm_out.", "encoder.head.0."), ("encoder.conv_out.", "encoder.head.2."),
    ("decoder.norm_out.", "decoder.head.0."), ("decoder.conv_out.", "decoder.head.2."),
)
_DIFFUSERS_RESNET = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                     ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_DIFFUSERS_STAGE = re.compile(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(.+)$")


def _resnet_key(rest: str) -> str | None:
    for old, new in _DIFFUSERS_RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def is_diffusers_vae(sd) -> bool:
    """Whether a VAE state dict (or ``{key: shape}``) has diffusers ``AutoencoderKLWan`` names."""
    return "encoder.conv_in.weight" in sd and "quant_conv.weight" in sd


def diffusers_vae_to_official(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLWan`` state dict (Wan2.1, or Wan2.2 with
    ``is_residual=True``) to the official keys; tensors are used as stored.

    The inverse of diffusers' ``convert_wan_vae_to_diffusers`` (Wan2.1) and of the Wan2.2 layout:
    ``mid_block.resnets.i`` / ``attentions.0`` -> ``middle.2i`` / ``middle.1``; resnets
    ``norm1/conv1/norm2/conv2/conv_shortcut`` -> ``residual.0/2/3/6`` / ``shortcut``. Wan2.1 stages
    are flat lists: ``encoder.down_blocks.n`` -> ``encoder.downsamples.n``, and
    ``decoder.up_blocks.i.resnets.j`` / ``.upsamplers.0`` -> ``decoder.upsamples.k`` numbered
    stage by stage (resnets, then the upsampler). Wan2.2 stages nest:
    ``{down,up}_blocks.i.resnets.j`` -> ``{down,up}samples.i.{down,up}samples.j`` and the stage's
    ``downsampler`` / ``upsampler`` comes after its resnets.

    Raises:
        CheckpointError: a key that fits neither layout (the file is not an AutoencoderKLWan).
    """
    conv_in = sd.get("encoder.conv_in.weight")
    residual = conv_in is not None and conv_in.dim() == 5 and conv_in.shape[1] == 12  # Wan2.2: 2x2-patchified
    stages: dict[tuple[str, int], dict] = {}
    for k in sd:
        m = _DIFFUSERS_STAGE.match(k)
        if m and m.group(3).startswith("resnets."):
            st = stages.setdefault((m.group(1), int(m.group(2))), {"resnets": set()})
            st["resnets"].add(int(m.group(3).split(".")[1]))
        elif m and m.group(3).startswith("upsamplers."):
            stages.setdefault((m.group(1), int(m.group(2))), {"resnets": set()})["sampler"] = True
    offsets, flat = {}, 0  # Wan2.1 decoder: first flat index of each up block
    for (part, i) in sorted(k for k in stages if k[0] == "decoder.up"):
        offsets[i] = flat
        flat += len(stages[(part, i)]["resnets"]) + (1 if stages[(part, i)].get("sampler") else 0)

    def rename(k: str) -> str | None:
        for old, new in _DIFFUSERS_VAE_FIXED:
            if k.startswith(old):
                return new + k[len(old):]
        m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", k)
        if m:
            part, kind, i, rest = m.groups()
            if kind == "attentions":
                return f"{part}.middle.1.{rest}"
            r = _resnet_key(rest)
            return None if r is None else f"{part}.middle.{2 * int(i)}.{r}"
        m = _DIFFUSERS_STAGE.match(k)
        if not m:
            return None
        stage, i, rest = m.group(1), int(m.group(2)), m.group(3)
        inner = stage.split(".")[1]  # "down" / "up"
        n_res = len(stages.get((stage, i), {"resnets": ()})["resnets"])
        if residual:
            if rest.startswith("resnets."):
                _, j, tail = rest.split(".", 2)
                r = _resnet_key(tail)
                return None if r is None else f"{stage}samples.{i}.{inner}samples.{j}.{r}"
            for sampler in (f"{inner}sampler.",):
                if rest.startswith(sampler):
                    return f"{stage}samples.{i}.{inner}samples.{n_res}.{rest[len(sampler):]}"
            return None
        if stage == "encoder.down":
            r = _resnet_key(rest)
            return f"encoder.downsamples.{i}.{r or rest}"
        if rest.startswith("resnets."):
            _, j, tail = rest.split(".", 2)
            r = _resnet_key(tail)
            return None if r is None else f"decoder.upsamples.{offsets[i] + int(j)}.{r}"
        if rest.startswith("upsamplers.0."):
            return f"decoder.upsamples.{offsets[i] + n_res}.{rest[len('upsamplers.0.'):]}"
        return None

    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = rename(k)
        if new is None:
            raise CheckpointError(f"{source}: diffusers VAE key {k!r} has no official counterpart; the file "
                                  "is not a diffusers AutoencoderKLWan of Wan2.1 or Wan2.2")
        out[new] = v
    return out


def vae_config_from_state_dict(sd: dict[str, torch.Tensor], kind: str) -> dict:
    """Constructor arguments (``dim``, ``z_dim``, and ``dec_dim`` for Wan2.2) read from weight shapes;
    the stage layout is the released one (``dim_mult (1, 2, 4, 4)``, 2 residual blocks)."""
    cfg = {"dim": int(sd["encoder.conv1.weight"].shape[0]), "z_dim": int(sd["conv2.weight"].shape[0])}
    if kind == "wan2.2":
        cfg["dec_dim"] = int(sd["decoder.conv1.weight"].shape[0]) // 4
    return cfg


def weights_identity(kind: str, sd: dict[str, torch.Tensor]) -> str:
    """Short name of a VAE's weights: ``"<kind>-<12 hex>"``.

    The hash covers every key and shape plus the values of a few small tensors (``_ID_KEYS``)
    rounded to bfloat16, so the float32 ``.pth`` and a bfloat16 copy of the same weights (ComfyUI's
    file) share an identity while any retrained or different VAE gets another. Latent caches record
    it to detect that they were made with another VAE.
    """
    h = hashlib.sha256(kind.encode())
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    for k in _ID_KEYS:
        if k in sd:
            t = sd[k].detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
            h.update(t.numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:12]}"


class WanVAE:
    """A Wan VAE in the DiT's latent space (normalized latents), float32 by default.

    Attributes:
        model: the ``nn.Module`` (official keys), in eval mode without gradients.
        kind: ``"wan2.1"`` or ``"wan2.2"``.
        z_dim: latent channels (16 / 48 released).
        stride: ``(4, 8, 8)`` or ``(4, 16, 16)``: (time, height, width) compression.
        identity: ``"<kind>-<hash>"`` naming the weights (see :func:`weights_identity`).
        tiling: default decode tiling (``None``: decode whole frames), a :class:`Tiling` or an int.
    """

    def __init__(self, model: nn.Module, identity: str | None = None, tiling: Tiling | int | None = None):
        if not isinstance(model, (WanVAE21Model, WanVAE22Model)):
            raise TypeError(f"WanVAE wraps a WanVAE21Model or WanVAE22Model, not {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.kind: str = model.kind
        self.z_dim: int = model.z_dim
        self.stride: tuple[int, int, int] = tuple(model.stride)
        self.identity: str = identity or weights_identity(self.kind, model.state_dict())
        self.tiling = as_tiling(tiling)
        if self.z_dim == len(LATENT_MEAN[self.kind]):
            mean, std = torch.tensor(LATENT_MEAN[self.kind]), torch.tensor(LATENT_STD[self.kind])
        else:  # a non-released z_dim: identity normalization
            mean, std = torch.zeros(self.z_dim), torch.ones(self.z_dim)
        # The official wrappers keep ``scale = [mean, 1 / std]`` in float32 and multiply by the
        # reciprocal (``WanVAE_.encode``) / divide by it (``decode``); the same here, bit for bit.
        self._mean, self._inv_std = mean, 1.0 / std

    # -- placement ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the weights (float32 as the official wrappers, or bfloat16)."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "WanVAE":
        """Move/cast the model in place; returns ``self``."""
        self.model.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return (f"WanVAE(kind={self.kind!r}, z_dim={self.z_dim}, stride={self.stride}, "
                f"identity={self.identity!r}, dtype={self.dtype}, device={self.device})")

    # -- checks --------------------------------------------------------------------------------
    def check_video(self, video: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``video`` is ``[B, 3, 4n+1, H, W]`` with ``H, W`` multiples of
        the spatial stride."""
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"WanVAE.encode: expected video [B, 3, F, H, W] in [-1, 1], got {shape}; "
                             "an image is a clip of one frame ([B, 3, 1, H, W]: use .unsqueeze(2))")
        f, h, w = video.shape[2:]
        if f % 4 != 1:
            lo, hi = f - (f - 1) % 4, f + (4 - (f - 1) % 4)
            raise ValueError(f"WanVAE.encode: {f} frames; Wan VAEs take 4n+1 frames (1, 5, 9, ..., 81). "
                             f"Trim the clip to {lo} frames or pad it to {hi}")
        s = self.stride[1]
        if h % s or w % s:
            raise ValueError(f"WanVAE.encode: frame size {w}x{h} (WxH) is not a multiple of {s} "
                             f"({self.kind} VAE); resize or crop to {w - w % s}x{h - h % s}")

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"WanVAE.decode: expected latents [B, {self.z_dim}, T, h, w] for the {self.kind} "
                             f"VAE, got {shape}; latents with another channel count come from the other VAE")

    # -- encode / decode -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalized latents of ``video``.

        Args:
            video: ``[B, 3, F, H, W]`` in [-1, 1], ``F = 4n + 1`` (1 for an image), ``H, W``
                multiples of ``stride[1]``. Any float dtype/device; cast to the model's.

        Returns:
            ``[B, z_dim, n + 1, H / s, W / s]`` float32 on the model's device:
            ``(mu - mean) · (1 / std)``, ``mu`` the posterior mean (official
            ``Wan2_1_VAE.encode`` / ``Wan2_2_VAE.encode``).

        Raises:
            ValueError: wrong shape, frame count or frame size (the message names the fix).
        """
        self.check_video(video)
        mu = self.model.encode_raw(video.to(self.device, self.dtype)).float()
        mean, inv_std = self._stats(mu.device)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiling: Tiling | int | None = None) -> torch.Tensor:
        """Video of normalized latents ``z``, clamped to [-1, 1].

        Args:
            z: ``[B, z_dim, T, h, w]`` (as returned by :meth:`encode` or the sampler).
            tiling: spatial tiling for this call (a :class:`Tiling`, a tile size in pixels, or
                ``None`` to use ``self.tiling``); frames smaller than a tile decode whole.

        Returns:
            ``[B, 3, 1 + 4(T - 1), h·s, w·s]`` float32 in [-1, 1] on the model's device: the
            model's decode of ``z / (1 / std) + mean``, clamped (official ``Wan2_1_VAE.decode`` /
            ``Wan2_2_VAE.decode``).

        Raises:
            ValueError: ``z`` is not ``[B, z_dim, T, h, w]`` (latents of the other VAE are named);
                a bad ``tiling`` layout (:meth:`Tiling.check`).
            TypeError: ``tiling`` is neither ``None``, an int nor a :class:`Tiling`.
        """
        self._check_latents(z)
        mean, inv_std = self._stats(self.device)
        raw = (z.to(self.device).float() / inv_std + mean).to(self.dtype)
        tiling = as_tiling(tiling) if tiling is not None else self.tiling
        if tiling is None:
            out = self.model.decode_raw(raw).float()
        else:
            out = tiled_decode(self.model.decode_raw, raw, self.stride[1], tiling)
        return out.clamp_(-1.0, 1.0)

    def _stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1 / std)`` as ``[1, z_dim, 1, 1, 1]`` float32 on ``device``."""
        shape = (1, self.z_dim, 1, 1, 1)
        return self._mean.to(device).view(shape), self._inv_std.to(device).view(shape)


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             tiling: Tiling | int | None = None) -> WanVAE:
    """Load an official Wan VAE file into a :class:`WanVAE`.

    Args:
        path: ``Wan2.1_VAE.pth``, ``wan_2.1_vae.safetensors`` (ComfyUI), ``Wan2.2_VAE.pth``, any
            file/shard set with the official keys (a ``first_stage_model.`` / ``vae.`` prefix is
            stripped), or a diffusers ``AutoencoderKLWan`` (``vae/diffusion_pytorch_model.safetensors``
            or its folder; keys renamed by :func:`diffusers_vae_to_official`). Which VAE it is comes from the weights, not the name.
        dtype: compute dtype (float32 default, as the official wrappers; bfloat16 on GPU).
        device: where the model lives.
        tiling: default decode tiling (see :meth:`WanVAE.decode`).

    Raises:
        CheckpointError: unreadable file; not a Wan VAE (a DiT or T5 file passed as --vae is named
            as such); missing, unexpected or mis-shaped keys.
    """
    sd = load_state_dict(path, prefixes=_PREFIXES)
    diffusers = is_diffusers_vae(sd)
    if diffusers:
        sd = diffusers_vae_to_official(sd, source=str(path))
    try:
        kind = detect_vae_kind(sd, source=str(path))
    except CheckpointError:
        if not diffusers:
            raise
        raise CheckpointError(f"{path}: a diffusers-format AutoencoderKLWan without the layers of the Wan2.1 or "
                              "Wan2.2 VAE (incomplete file or another variant)") from None
    cfg = vae_config_from_state_dict(sd, kind)
    identity = weights_identity(kind, sd)
    with torch.device("meta"):
        model = _MODEL[kind](**cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: looks like the {kind} VAE ({cfg}) but does not match its layout: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} mis-shaped {wrong[:3]}; the file is damaged or a variant wanlora does not know")
    model.load_state_dict(sd, assign=True)
    model.to(device=device, dtype=dtype)
    return WanVAE(model, identity=identity, tiling=tiling)

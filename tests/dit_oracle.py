"""Test helpers shared by the parity tests: random official-layout DiT weights and diffusers'
``WanTransformer3DModel`` built from them (the independent oracle)."""

from __future__ import annotations

import math

import torch

from wanlora.models.dit import WanDiT, WanDiTConfig


def random_dit_state_dict(cfg: WanDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (including those the official init zeroes), in official key names,
    scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        r = torch.randn(shape, generator=g)
        if k.endswith("modulation"):
            sd[k] = 0.3 * r
        elif k == "img_emb.emb_pos":
            sd[k] = 0.5 * r
        elif k.startswith(("img_emb.proj.0.", "img_emb.proj.4.")) and k.endswith("weight"):
            sd[k] = 1.0 + 0.2 * r
        elif len(shape) >= 2:
            sd[k] = r / math.sqrt(math.prod(shape[1:]))
        elif "norm" in k and k.endswith("weight"):
            sd[k] = 1.0 + 0.2 * r
        else:
            sd[k] = 0.2 * r
    return sd


class Float64Sinusoid(torch.nn.Module):
    """The official timestep sinusoid (``wan/modules/model.py: sinusoidal_embedding_1d``: float64,
    cos first, ``ω_i = 10000^(-i/half)``) for the oracle. diffusers' ``Timesteps`` computes the same
    formula in float32, which at t≈1000 moves the angles by ~1e-4 and would hide everything else
    below that noise (``test_dit.py::test_diffusers_float32_sinusoid_is_the_only_difference``
    measures the unpatched oracle)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        omega = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        a = t.double()[:, None] * omega
        return torch.cat([a.cos(), a.sin()], 1).float()


def diffusers_transformer(cfg: WanDiTConfig, official_sd: dict[str, torch.Tensor],
                          float64_sinusoid: bool = True):
    """diffusers' ``WanTransformer3DModel`` with ``official_sd`` converted by diffusers' own
    converter (given a copy: it empties its input), loaded strictly, in eval mode.

    With ``cfg.image_dim`` it is diffusers' Wan2.1 I2V/FLF2V transformer (``image_dim``,
    ``added_kv_proj_dim``, ``pos_embed_seq_len``); its converter leaves FLF2V's ``img_emb.emb_pos``
    unrenamed, so that one key is mapped here to ``condition_embedder.image_embedder.pos_embed``."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    m = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim else None, pos_embed_seq_len=cfg.image_pos_len,
    )
    sd = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in official_sd.items()})
    if "img_emb.emb_pos" in sd:
        sd["condition_embedder.image_embedder.pos_embed"] = sd.pop("img_emb.emb_pos")
    m.load_state_dict(sd, strict=True)
    if float64_sinusoid:
        m.condition_embedder.timesteps_proj = Float64Sinusoid(cfg.freq_dim)
    return m.eval()

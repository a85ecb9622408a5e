"""The Wan DiT: parity with diffusers' WanTransformer3DModel, and the contracts of WanDiT.

The oracle is diffusers' independent implementation (``WanTransformer3DModel``), loaded from the
very same official-key state dict through diffusers' own in-memory converter
(``convert_wan_transformer_to_diffusers``). Every tensor is random — modulation and
``head.head.weight`` included (the official init zeroes the latter, which would hide head bugs).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wanlora.models.dit import WanDiT, WanDiTConfig, apply_rope, rope_split, rope_tables
from dit_oracle import diffusers_transformer, random_dit_state_dict

torch.set_num_threads(1)

TEXT_DIM = 32


IMAGE_DIM = 40  # CLIP feature width of the tiny image models (1280 in the release)


def _config(in_ch=16, out_ch=16, layers=2, image_dim=None, image_pos_len=None):
    return WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=layers, in_channels=in_ch,
                        out_channels=out_ch, text_dim=TEXT_DIM, image_dim=image_dim,
                        image_pos_len=image_pos_len)


def _ours(cfg, sd):
    m = WanDiT(cfg)
    m.load_state_dict(sd, strict=True)
    return m


def _diffusers(cfg, sd):
    pytest.importorskip("diffusers")
    return diffusers_transformer(cfg, sd)


def _rel(a, b):
    """Relative error; the absolute one where the reference is zero (e.g. the gradient of the
    first img_emb LayerNorm's weight for zero CLIP features)."""
    n = b.norm()
    return ((a - b).norm() / (n if n > 0 else 1.0)).item()


# official key -> diffusers key of parameters whose gradients are compared
GRAD_PARAMS = {
    "blocks.0.self_attn.q.weight": "blocks.0.attn1.to_q.weight",
    "blocks.1.cross_attn.v.weight": "blocks.1.attn2.to_v.weight",
    "blocks.1.ffn.0.weight": "blocks.1.ffn.net.0.proj.weight",
    "blocks.0.modulation": "blocks.0.scale_shift_table",
    "blocks.0.norm3.weight": "blocks.0.norm2.weight",
    "blocks.0.self_attn.norm_k.weight": "blocks.0.attn1.norm_k.weight",
    "head.head.weight": "proj_out.weight",
    "head.modulation": "scale_shift_table",
    "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
    "patch_embedding.weight": "patch_embedding.weight",
}


# ... and those of the Wan2.1 image branch
IMAGE_GRAD_PARAMS = {
    "blocks.0.cross_attn.k_img.weight": "blocks.0.attn2.add_k_proj.weight",
    "blocks.1.cross_attn.v_img.bias": "blocks.1.attn2.add_v_proj.bias",
    "blocks.1.cross_attn.norm_k_img.weight": "blocks.1.attn2.norm_added_k.weight",
    "img_emb.proj.0.weight": "condition_embedder.image_embedder.norm1.weight",
    "img_emb.proj.1.weight": "condition_embedder.image_embedder.ff.net.0.proj.weight",
    "img_emb.proj.4.bias": "condition_embedder.image_embedder.norm2.bias",
}


def _parity(cfg, shape, timestep, y_channels=0, seed=0, float32_sinusoid=False, ctx_rows=7, clip_tokens=0,
            blank_clip=False):
    """Forward + backward of both models on the same inputs; returns the relative errors.

    ``clip_tokens``: CLIP tokens per sample for the image models (I2V: one image's, FLF2V: two
    images' — diffusers takes FLF2V's as ``[2B, n, C]``, first and last image of each sample
    consecutive, and regroups them in pairs). ``blank_clip``: zero features (Fun-Control without
    an image)."""
    sd = random_dit_state_dict(cfg, seed)
    ours, ref = _ours(cfg, sd), _diffusers(cfg, sd)
    if float32_sinusoid:
        from diffusers.models.embeddings import Timesteps

        ref.condition_embedder.timesteps_proj = Timesteps(cfg.freq_dim, True, 0)
    g = torch.Generator().manual_seed(seed + 1)
    b, _, f, h, w = shape
    x = torch.randn(shape, generator=g, requires_grad=True)
    y = torch.randn(b, y_channels, f, h, w, generator=g, requires_grad=True) if y_channels else None
    ctx = torch.randn(b, ctx_rows, cfg.text_dim, generator=g, requires_grad=True)  # padded inside
    clip = (torch.randn(b, clip_tokens, cfg.image_dim, generator=g, requires_grad=True)
            if clip_tokens else None)
    if clip is not None and blank_clip:
        clip = torch.zeros_like(clip, requires_grad=True)
    out = ours(x, timestep, ctx, y=y, clip_fea=clip)

    # diffusers: inputs concatenated on channels, context zero-padded to 512 rows by hand,
    # per-frame timesteps expanded per token (its Wan2.2 TI2V `[B, seq_len]` path).
    hidden = torch.cat([x, y], 1) if y is not None else x
    ctx_ref = F.pad(ctx, (0, 0, 0, cfg.text_len - ctx.shape[1]))
    t_ref = timestep
    if timestep.ndim == 2:
        t_ref = timestep.repeat_interleave((h // 2) * (w // 2), dim=1)
    clip_ref = None
    if clip is not None:
        clip_ref = clip.reshape(-1, clip_tokens // 2, cfg.image_dim) if cfg.image_pos_len else clip
    expected = ref(hidden, t_ref, ctx_ref, encoder_hidden_states_image=clip_ref, return_dict=False)[0]

    errs = {"out": _rel(out, expected)}
    probe = torch.randn(out.shape, generator=g)
    leaves = {"x": x, "context": ctx, "y": y, "clip_fea": clip}
    leaves = {k: v for k, v in leaves.items() if v is not None}
    names = {**GRAD_PARAMS, **(IMAGE_GRAD_PARAMS if clip is not None else {})}
    if cfg.image_pos_len:
        names["img_emb.emb_pos"] = "condition_embedder.image_embedder.pos_embed"
    ours_params = dict(ours.named_parameters())
    ref_params = dict(ref.named_parameters())
    pa = [ours_params[k] for k in names]
    pb = [ref_params[v] for v in names.values()]
    ga = torch.autograd.grad((out * probe).sum(), list(leaves.values()) + pa)
    gb = torch.autograd.grad((expected * probe).sum(), list(leaves.values()) + pb)
    for name, a, bb in zip(list(leaves) + list(names), ga, gb):
        errs[name] = _rel(a, bb)
    return errs


def _assert_small(errs, tol=1e-5):
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("shape", [(1, 16, 3, 4, 6), (2, 16, 5, 6, 4)])
def test_t2v_parity_with_diffusers(shape):
    t = torch.tensor([937.0, 12.5][: shape[0]])
    _assert_small(_parity(_config(), shape, t))


@pytest.mark.parametrize("shape", [(1, 16, 3, 6, 4), (2, 16, 1, 4, 8)])
def test_i2v_parity_with_diffusers(shape):
    # Wan2.2 I2V-A14B layout: 36 input channels (x 16 + y 20), no CLIP img_emb.
    t = torch.tensor([901.0, 450.0][: shape[0]])
    _assert_small(_parity(_config(in_ch=36), shape, t, y_channels=20))


@pytest.mark.parametrize("shape", [(1, 16, 3, 6, 4), (2, 16, 2, 4, 4)])
def test_wan21_i2v_clip_parity_with_diffusers(shape):
    # Wan2.1 I2V-14B layout: 36 input channels and the CLIP image branch (img_emb, k_img/v_img).
    t = torch.tensor([990.0, 120.0][: shape[0]])
    cfg = _config(in_ch=36, image_dim=IMAGE_DIM)
    _assert_small(_parity(cfg, shape, t, y_channels=20, clip_tokens=17))


@pytest.mark.parametrize("shape", [(1, 16, 3, 4, 4), (2, 16, 2, 4, 6)])
def test_wan21_flf2v_clip_parity_with_diffusers(shape):
    # Wan2.1 FLF2V-14B layout: as I2V-14B plus the learned emb_pos over 2 x 17 tokens.
    t = torch.tensor([640.0, 8.0][: shape[0]])
    cfg = _config(in_ch=36, image_dim=IMAGE_DIM, image_pos_len=34)
    _assert_small(_parity(cfg, shape, t, y_channels=20, clip_tokens=34))


@pytest.mark.parametrize("blank_clip", [False, True], ids=["with_image", "without_image"])
@pytest.mark.parametrize("shape", [(1, 16, 3, 4, 6), (2, 16, 2, 4, 4)])
def test_fun_control_parity_with_diffusers(shape, blank_clip):
    # Wan2.1-Fun-Control layout (t2v-1.3B-FC, t2v-14B-FC, i2v-14B-FC): 48 input channels (x 16 +
    # control latent 16 + start latent 16) and the CLIP image branch; without an image the
    # features are zeros (VideoX-Fun's pipeline_wan_fun_control.py).
    t = torch.tensor([875.0, 33.0][: shape[0]])
    cfg = _config(in_ch=48, image_dim=IMAGE_DIM)
    _assert_small(_parity(cfg, shape, t, y_channels=32, clip_tokens=17, blank_clip=blank_clip))


def test_clip_fea_required_exactly_by_image_models():
    m = _tiny_model(in_ch=36, image_dim=IMAGE_DIM, image_pos_len=34)
    x, y = torch.randn(1, 16, 1, 2, 2), torch.randn(1, 20, 1, 2, 2)
    t, ctx = torch.tensor([1.0]), torch.randn(1, 3, TEXT_DIM)
    with pytest.raises(ValueError, match="needs clip_fea"):
        m(x, t, ctx, y=y)
    with pytest.raises(ValueError, match=r"takes \[B, 34, 40\] \(first and last frame"):
        m(x, t, ctx, y=y, clip_fea=torch.randn(1, 17, IMAGE_DIM))
    with pytest.raises(ValueError, match="without the CLIP image branch"):
        _tiny_model(in_ch=36)(x, t, ctx, y=y, clip_fea=torch.randn(1, 17, IMAGE_DIM))


def test_image_lora_targets_are_plain_linear():
    m = _tiny_model(in_ch=36, image_dim=IMAGE_DIM)
    for n in ("k_img", "v_img", "q", "k", "v", "o"):
        assert type(m.blocks[0].cross_attn.get_submodule(n)) is torch.nn.Linear, n


@pytest.mark.parametrize("shape", [(1, 48, 3, 4, 6), (2, 48, 5, 2, 4)])
def test_ti2v_per_frame_timestep_parity_with_diffusers(shape):
    # TI2V-5B layout: 48 -> 48 channels; per latent frame timesteps with frame 0 at t = 0.
    b, f = shape[0], shape[2]
    t = torch.tensor([[700.0], [300.0]][:b]).repeat(1, f)
    t[:, 0] = 0.0
    # diffusers takes the per-token [B, L] form, so the time MLP runs on other matrix shapes
    # and rounds differently (~1e-7). With 7 real text rows, 505 identical padded keys make the
    # gradient through cross-attention's query (norm3.weight) a difference of nearly equal terms
    # that amplifies that rounding to ~2e-5; a full 512-row context keeps it well conditioned.
    _assert_small(_parity(_config(in_ch=48, out_ch=48), shape, t, ctx_rows=512))


def test_diffusers_float32_sinusoid_is_the_only_difference():
    # Unpatched oracle: at t = 0 the sinusoid is exact in any precision and the two models agree
    # bit for bit; at t = 937 diffusers' float32 sinusoid leaves a few 1e-6 on the output.
    shape, cfg = (1, 16, 3, 4, 6), _config()
    exact = _parity(cfg, shape, torch.tensor([0.0]), float32_sinusoid=True)
    assert max(exact.values()) == 0.0, exact
    assert _parity(cfg, shape, torch.tensor([937.0]), float32_sinusoid=True)["out"] < 1e-5


def _tiny_model(seed=0, **kw):
    cfg = _config(**kw)
    return _ours(cfg, random_dit_state_dict(cfg, seed))


def _small_inputs(timestep: float):
    """``(x [1, 16, 2, 4, 4], t [1], context [1, 4, TEXT_DIM])`` for the T2V tiny model."""
    return torch.randn(1, 16, 2, 4, 4), torch.tensor([timestep]), torch.randn(1, 4, TEXT_DIM)


def test_batch_with_1d_timestep_equals_single_samples():
    # Regression: the official `t.expand(B, seq_len)` fails (or mixes samples) for B > 1.
    m = _tiny_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 3, 4, 4, generator=g)
    ctx = [torch.randn(n, TEXT_DIM, generator=g) for n in (5, 9, 1)]
    t = torch.tensor([999.0, 500.0, 3.0])
    with torch.no_grad():
        batched = m(x, t, ctx)
        single = torch.cat([m(x[i : i + 1], t[i : i + 1], [ctx[i]]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])


def test_constant_per_frame_timestep_equals_1d():
    m = _tiny_model(in_ch=48, out_ch=48)
    x = torch.randn(2, 48, 3, 4, 2)
    ctx = torch.randn(2, 6, TEXT_DIM)
    t = torch.tensor([640.0, 20.0])
    with torch.no_grad():
        a = m(x, t, ctx)
        b = m(x, t[:, None].repeat(1, 3), ctx)
    # equal up to float32 rounding (the time MLP runs on [B, 3] instead of [B, 1] rows)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_context_padding_list_tensor_and_explicit_zeros_agree():
    # §2: zero-padding to 512 rows happens before text_embedding and is not masked, so explicit
    # zero rows are a no-op while the padded slots still take part in attention.
    m = _tiny_model()
    x = torch.randn(2, 16, 1, 4, 4)
    t = torch.tensor([500.0, 500.0])
    c = torch.randn(2, 5, TEXT_DIM)
    with torch.no_grad():
        a = m(x, t, c)
        b = m(x, t, [c[0], c[1]])
        c512 = m(x, t, F.pad(c, (0, 0, 0, 507)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c512, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exceeds text_len"):
        m(x, t, torch.randn(2, 513, TEXT_DIM))


def test_rope_split_and_adjacent_pair_rotation_match_complex_reference():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(32) == (12, 10, 10)
    d, grid = 128, (3, 2, 5)
    cos, sin = rope_tables(grid, d)
    x = torch.randn(1, math.prod(grid), 2, d, dtype=torch.float64)
    # reference: complex128 polar tables per axis, adjacent pairs as (real, imaginary)
    parts = [torch.polar(torch.ones(n, p // 2, dtype=torch.float64),
                         torch.outer(torch.arange(n, dtype=torch.float64),
                                     10000.0 ** (-torch.arange(0, p, 2, dtype=torch.float64) / p)))
             for n, p in zip(grid, rope_split(d))]
    f, h, w = grid
    table = torch.cat([parts[0][:, None, None].expand(f, h, w, -1), parts[1][None, :, None].expand(f, h, w, -1),
                       parts[2][None, None, :].expand(f, h, w, -1)], -1).reshape(-1, 1, d // 2)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * table).flatten(-2)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    m = _tiny_model()
    x, t, ctx = _small_inputs(321.0)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_gradient_checkpointing(ckpt)
        m(x, t, ctx).square().mean().backward()
        grads.append(m.blocks[0].self_attn.q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_sampling_under_inference_mode_then_training_on_the_same_grid():
    # Regression: the RoPE tables are cached per grid; built under inference_mode they were
    # inference tensors, and the next training step on that grid failed in backward.
    m = _tiny_model()
    x, t, ctx = _small_inputs(300.0)
    with torch.inference_mode():
        ref = m(x, t, ctx)
    w = m.blocks[0].self_attn.q.weight
    w.requires_grad_(True)
    out = m(x, t, ctx)
    out.square().mean().backward()
    assert w.grad is not None
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


def test_lora_targets_are_plain_linear_called_through_forward():
    m = _tiny_model()
    names = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
             "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    calls = []
    for n in names:
        mod = m.blocks[1].get_submodule(n)
        assert type(mod) is torch.nn.Linear, n
        orig = mod.forward
        mod.forward = lambda inp, _o=orig, _n=n: (calls.append(_n), _o(inp))[1]  # LoRA-style patch
    with torch.no_grad():
        m(torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 3, TEXT_DIM))
    assert sorted(set(calls)) == sorted(names)


def test_bfloat16_weights_run_and_stay_close_to_float32():
    m = _tiny_model()
    x, t, ctx = _small_inputs(500.0)
    with torch.no_grad():
        ref = m(x, t, ctx)
        out = m.to(torch.bfloat16)(x, t, ctx)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 3e-2


def test_time_embedding_and_head_stay_float32_under_autocast():
    m = _tiny_model()
    t = torch.tensor([[250.0, 0.0]])
    e, e0 = m._time(t, 1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ea, e0a = m._time(t, 1, 2)
    assert ea.dtype == e0a.dtype == torch.float32
    torch.testing.assert_close(e0a, e0, rtol=0, atol=0)


def test_shape_errors_are_clear():
    m = _tiny_model(in_ch=36)
    with pytest.raises(ValueError, match="I2V models need y"):
        m(torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 3, TEXT_DIM))
    m = _tiny_model()
    with pytest.raises(ValueError, match="timestep"):
        m(torch.randn(1, 16, 3, 2, 2), torch.ones(1, 2), torch.randn(1, 3, TEXT_DIM))


def test_torch_is_an_alias_of_sdpa():
    """``--attn_mode torch`` (the name other Wan tools use, and the one the --help mentions) is sdpa."""
    from wanlora.models.attention import attention, check_attn_mode

    assert check_attn_mode("torch") is None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    assert torch.equal(attention(q, k, v, "torch"), attention(q, k, v, "sdpa"))
    m = _tiny_model()
    m.set_attn_mode("torch")

"""fp8 base weights: load equals the cast / the stored ComfyUI values, dequantization is exact,
the float32 islands keep their dtype, LoRA hooks and gradients work through fp8 layers."""

from __future__ import annotations

import pytest
import torch

from wanlora.io_utils import save_safetensors, write_json
from wanlora.models import load_dit
from wanlora.models.fp8 import (FP8_DTYPE, FP8_MAX, Fp8Linear, dequantize_weight, fp8_targets,
                                is_fp8_target, quantize_weight)
from wanlora.models.loading import keeps_float32

from test_loading import TINY, make_sd

torch.set_num_threads(1)


def _inputs(cfg, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    return x, torch.tensor([400.0]), torch.randn(1, 3, cfg.text_dim, generator=g)


def _write_shards(sd, folder, n=3):
    """The official layout: n shards + ``diffusion_pytorch_model.safetensors.index.json``."""
    folder.mkdir()
    keys = list(sd)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_safetensors(part, folder / name)
        weight_map.update({k: name for k in part})
    write_json(folder / "diffusion_pytorch_model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(folder / "config.json", {"dim": TINY["dim"], "num_heads": TINY["num_heads"]})
    return folder


def test_targets_are_the_ten_block_linears():
    assert is_fp8_target("blocks.12.ffn.2") and is_fp8_target("blocks.0.cross_attn.o")
    for name in ("blocks.0.norm3", "blocks.0.ffn", "text_embedding.0", "head.head", "time_projection.1",
                 "blocks.0.self_attn.norm_q", "blocks.x.ffn.0"):
        assert not is_fp8_target(name), name


def test_fp8_base_load_equals_casting_the_bf16_weights(tmp_path):
    sd, cfg = make_sd(dtype=torch.bfloat16)
    m = load_dit(_write_shards(sd, tmp_path / "low_noise_model"), "t2v-A14B", dtype="bf16", fp8="base")
    linears = dict(fp8_targets(m))
    assert len(linears) == 10 * cfg.num_layers
    state = m.state_dict()
    for k, v in state.items():
        module = k.rsplit(".", 1)[0]
        if module in linears and k.endswith(".weight"):
            assert v.dtype == FP8_DTYPE
            assert torch.equal(v.view(torch.uint8), sd[k].to(FP8_DTYPE).view(torch.uint8)), k
        elif keeps_float32(k):
            assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, sd[k]), k
    assert not any(isinstance(mod, Fp8Linear) and mod.scaled for mod in linears.values())
    assert m.dtype == torch.bfloat16


def test_fp8_scaled_per_channel_scales_and_error_bound(tmp_path):
    sd, cfg = make_sd()
    sd["blocks.0.ffn.0.weight"][3] = 0.0  # an all-zero row gets scale 1, not a division by zero
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    m = load_dit(path, "t2v-A14B", dtype="fp32", fp8="scaled")
    for name, lin in fp8_targets(m):
        w = sd[name + ".weight"]
        amax = w.abs().amax(1, keepdim=True)
        torch.testing.assert_close(lin.weight_scale, torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)),
                                   rtol=0, atol=0)
        assert lin.weight.float().abs().amax() <= FP8_MAX
        deq = lin.dequantized_weight(torch.float32)
        # e4m3: 3 mantissa bits -> relative rounding <= 2^-4 for normals; subnormals step 2^-9
        assert ((deq - w).abs() <= w.abs() * 2**-4 + lin.weight_scale * 2**-9).all(), name
    assert torch.equal(m.blocks[0].ffn[0].weight_scale[3], torch.ones(1))


def test_fp8_forward_equals_the_dequantized_model(tmp_path):
    """float32 compute: an fp8 model and a float model holding q·s give bit-identical outputs and
    input gradients (dequantize-then-matmul, nothing else)."""
    sd, cfg = make_sd()
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    for mode in ("base", "scaled"):
        m8 = load_dit(path, "t2v-A14B", dtype="fp32", fp8=mode)
        deq = {k: v for k, v in m8.state_dict().items() if not k.endswith("weight_scale")}
        for name, lin in fp8_targets(m8):
            deq[name + ".weight"] = lin.dequantized_weight(torch.float32)
        ref = load_dit(path, "t2v-A14B", dtype="fp32")
        ref.load_state_dict(deq)
        x, t, ctx = _inputs(cfg)
        outs = []
        for model in (m8, ref):
            xi = x.clone().requires_grad_(True)
            out = model(xi, t, ctx)
            out.square().mean().backward()
            outs.append((out.detach(), xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("scale_name, per_row", [("scale_weight", False), ("weight_scale", True)])
def test_comfy_fp8_scaled_file_equals_dequantizing_it(tmp_path, scale_name, per_row):
    sd, cfg = make_sd()
    packed, deq = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().amax(1, keepdim=True) / 448.0 if per_row else v.abs().max().reshape(1) / 448.0
            q = (v / scale).to(FP8_DTYPE)
            packed[k], packed[k[: -len("weight")] + scale_name] = q, scale
            deq[k] = q.float() * scale
        else:
            packed[k] = deq[k] = v
    packed["scaled_fp8"] = torch.zeros(2, dtype=FP8_DTYPE)
    packed["blocks.0.ffn.0.scale_input"] = torch.ones(1)
    path = tmp_path / f"wan2.2_t2v_low_noise_14B_fp8_scaled_{scale_name}.safetensors"
    save_safetensors({"model.diffusion_model." + k: v for k, v in packed.items()}, path,
                     metadata={"num_heads": "2"})
    x, t, ctx = _inputs(cfg)
    ref = load_dit(path, "t2v-A14B", dtype="fp32")  # dequantized at full precision
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, deq[k].float(), rtol=0, atol=0)
    m8 = load_dit(path, "t2v-A14B", dtype="fp32", fp8="base")  # kept as stored
    for name, lin in fp8_targets(m8):
        assert torch.equal(lin.weight.view(torch.uint8), packed[name + ".weight"].view(torch.uint8))
        assert lin.weight_scale.shape == (lin.out_features, 1)
    with torch.no_grad():
        torch.testing.assert_close(m8(x, t, ctx), ref(x, t, ctx), rtol=0, atol=0)


def test_comfy_plain_fp8_file(tmp_path):
    sd, cfg = make_sd()
    packed = {k: (v.to(FP8_DTYPE) if is_fp8_target(k.rsplit(".", 1)[0]) and k.endswith("weight") else v)
              for k, v in sd.items()}
    path = tmp_path / "wan2.2_t2v_high_noise_14B_fp8_e4m3fn.safetensors"
    save_safetensors(packed, path, metadata={"num_heads": "2"})
    m8 = load_dit(path, "t2v-A14B", dtype="bf16", fp8="scaled")  # no scales in the file: none made up
    for name, lin in fp8_targets(m8):
        assert not lin.scaled and torch.equal(lin.weight.view(torch.uint8), packed[name + ".weight"].view(torch.uint8))
    m = load_dit(path, "t2v-A14B", dtype="fp32")
    assert torch.equal(m.blocks[1].ffn[2].weight, packed["blocks.1.ffn.2.weight"].float())


def test_lora_hooks_fp8_layers_and_gets_gradients(tmp_path):
    from wanlora.networks.lora_wan import create_network

    sd, cfg = make_sd()
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    grads = {}
    for mode in (None, "scaled"):
        m = load_dit(path, "t2v-A14B", dtype="fp32", fp8=mode)
        torch.manual_seed(0)
        net = create_network(1.0, 4, 4.0, None, None, m)
        net.apply_to(None, m)
        assert len(net.unet_loras if hasattr(net, "unet_loras") else list(net.modules())) > 0
        for p in net.parameters():
            if p.ndim == 2 and p.shape[1] == 4:  # lora_up: make the adapters active
                torch.nn.init.normal_(p, std=0.02)
        net.requires_grad_(True)
        x, t, ctx = _inputs(cfg)
        m(x, t, ctx).square().mean().backward()
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in net.parameters())
    assert grads[None].shape == grads["scaled"].shape and grads[None].abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(grads[None], grads["scaled"], dim=0)
    assert cos > 0.99, cos


def test_quantize_roundtrip_and_saturation():
    w = torch.tensor([[1000.0, -1000.0, 0.5, 0.0]])
    q, s = quantize_weight(w, scaled=False)
    assert s is None and q.float().tolist() == [[448.0, -448.0, 0.5, 0.0]]  # saturates, never NaN
    q, s = quantize_weight(w, scaled=True)
    assert torch.equal(dequantize_weight(q, s, torch.float32)[0, :2], torch.tensor([1000.0, -1000.0]))
    from wanlora.lora.algebra import merge_delta_

    lin = Fp8Linear(4, 1, bias=False, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="--lora_dynamic"):
        merge_delta_(lin.weight.data, torch.zeros(2, 4), torch.zeros(1, 2))

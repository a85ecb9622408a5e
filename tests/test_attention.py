"""The attention dispatcher: every backend against the math definition where it can run, the
layout and precision handed to SDPA, and the training contract (every LoRA module gets a gradient;
SageAttention, which has no backward, is refused)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from wanlora.models import attention as attn_mod
from wanlora.models.attention import ATTN_MODES, TRAINING_ATTN_MODES, attention, check_attn_mode
from wanlora.models.dit import WanDiT, WanDiTConfig

torch.set_num_threads(1)

TEXT_DIM = 32
_CUDA_ONLY = {"cudnn", "flash", "flash3", "sage", "xformers"}


def _unavailable(mode: str) -> str | None:
    """Why ``mode`` cannot run here (None when it can)."""
    module, install = attn_mod._BACKENDS[mode]
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{mode}: {module} is not installed ({install})"
    if mode in _CUDA_ONLY and not torch.cuda.is_available():
        return f"{mode}: its kernels need a CUDA GPU"
    return None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _math(q, k, v):
    """softmax(q kᵀ / sqrt(d)) v per head, float64: ``[B, L, N, d]`` in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2)


def _qkv(dtype, lq=77, lk=50, device="cpu", seed=0):
    """Random ``[2, L, 4, 64]`` q/k/v (self- and cross-attention shapes: Lq != Lk)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, lq, 4, 64), (2, lk, 4, 64), (2, lk, 4, 64)]
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ATTN_MODES)
def test_backend_equals_math_forward_and_backward(mode, dtype):
    reason = _unavailable(mode)
    if reason:
        pytest.skip(reason)
    q, k, v = _qkv(dtype, device=_device())
    ref = _math(q, k, v)
    with torch.no_grad():
        out = attention(q, k, v, mode)
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == dtype
    # float32 through a bf16-only kernel (cudnn/flash/flash3/sage) is computed in bf16, like the official code
    low = dtype == torch.bfloat16 or mode in attn_mod._HALF_ONLY
    tol = 2e-2 if low else 1e-5
    if mode == "sage":
        tol = 5e-2  # 8-bit q·k by design
    assert _rel(out, ref) < tol
    if mode not in TRAINING_ATTN_MODES:
        return
    g_out = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g_out)
    grads = torch.autograd.grad(attention(q, k, v, mode), (q, k, v), g_out.to(dtype))
    for name, g, r in zip("qkv", grads, grads_ref):
        assert _rel(g, r) < (3e-2 if low else 1e-5), name


def test_sdpa_gets_heads_first_inputs_in_the_compute_dtype_without_mask(monkeypatch):
    """SDPA is handed what its flash kernel needs: ``[B, N, L, d]`` with a contiguous last dim
    (views, no copy), one dtype (bf16 for a bf16 DiT: q/k come out of RoPE in float32 and are cast),
    no mask, no dropout; the cudnn path hands contiguous copies."""
    seen = []
    real = attn_mod.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v, args, kwargs))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, in_channels=16, out_channels=16,
                       text_dim=TEXT_DIM)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, TEXT_DIM)
    for weights, autocast in [(torch.bfloat16, False), (torch.float32, True), (torch.float32, False)]:
        seen.clear()
        m = WanDiT(cfg).to(weights)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            m(x, t, ctx)
        want = torch.bfloat16 if weights == torch.bfloat16 or autocast else torch.float32
        assert len(seen) == 2  # self- and cross-attention of the one block
        for (q, k, v, args, kwargs), lk in zip(seen, (8, 512)):
            assert args == () and kwargs == {}
            assert q.shape == (1, 2, 8, 32) and k.shape == v.shape == (1, 2, lk, 32)
            for tensor in (q, k, v):
                assert tensor.stride(-1) == 1 and tensor.dtype == want
    seen.clear()
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        out = attn_mod._sdpa(q, k, v, torch.bfloat16, contiguous=True)
        ref = attn_mod._sdpa(q, k, v, torch.bfloat16)
    assert all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in seen[0][:3])
    assert not seen[1][0].is_contiguous()  # the view path made no copy
    assert torch.equal(out, ref)


def test_sage_is_refused_for_training_with_one_line():
    with pytest.raises(ValueError, match="no backward") as e:
        check_attn_mode("sage", training=True)
    assert "\n" not in str(e.value) and "--attn_mode sdpa" in str(e.value)
    for mode in TRAINING_ATTN_MODES:
        try:
            check_attn_mode(mode, training=True)
        except ImportError as err:  # an uninstalled backend is a different, named error
            assert "install" in str(err)
    # used directly (a library user's training loop): inputs that need a gradient are refused
    # before the kernel runs, so no LoRA silently stops learning
    q, k, v = _qkv(torch.float32)
    with pytest.raises(RuntimeError, match="no backward"):
        attention(q, k, v, "sage")


def test_training_refuses_sage_before_loading_anything(tmp_path):
    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import train

    args = parse_config(["--task", "t2v-1.3B", "--dit", str(tmp_path / "missing.safetensors"),
                       "--dataset_config", str(tmp_path / "missing.toml"), "--output_dir", str(tmp_path / "o"),
                       "--attn_mode", "sage"])

    def never(*a, **k):
        raise AssertionError("the DiT must not be loaded")

    with pytest.raises(ValueError, match="--attn_mode sage has no backward"):
        train(args, dataset=[], load_dit=never)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", TRAINING_ATTN_MODES)
def test_every_lora_module_gets_a_gradient(mode):
    """Under each training backend that runs here, a backward through the DiT reaches both
    matrices of every LoRA module (q/k/v of both attentions included)."""
    reason = _unavailable(mode)
    if reason:
        pytest.skip(reason)
    from wanlora.networks.lora_wan import create_network

    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16, out_channels=16,
                       text_dim=TEXT_DIM)
    dev = _device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    dit = WanDiT(cfg, attn_mode=mode).to(dev, dtype).requires_grad_(False)
    net = create_network(1.0, 4, 4, None, None, dit)
    net.apply_to(None, dit)
    net.to(dev, dtype)
    for lora in net.unet_loras:  # up is zero-initialised, which would zero every down gradient
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, TEXT_DIM)
    dit(x.to(dev), t.to(dev), ctx.to(dev)).square().mean().backward()
    assert len(net.unet_loras) == 10 * cfg.num_layers
    for lora in net.unet_loras:
        for p in (lora.lora_down.weight, lora.lora_up.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, lora.lora_name


def test_missing_backend_names_its_package(monkeypatch):
    with pytest.raises(ValueError, match="sdpa"):
        check_attn_mode("nope")

    def no_module(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(attn_mod.importlib, "import_module", no_module)
    for mode, install in [("flash", "pip install flash-attn"), ("flash3", "hopper/ folder"),
                          ("sage", "pip install sageattention"), ("xformers", "pip install xformers")]:
        with pytest.raises(ImportError, match=install):
            check_attn_mode(mode)
        with pytest.raises(ImportError, match="--attn_mode sdpa"):
            WanDiT(WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, in_channels=16,
                                out_channels=16, text_dim=TEXT_DIM), attn_mode=mode)


def test_cudnn_needs_cuda_and_says_so():
    q, k, v = _qkv(torch.bfloat16)
    with pytest.raises(RuntimeError, match="--attn_mode cudnn needs a CUDA GPU"):
        attention(q.cpu(), k.cpu(), v.cpu(), "cudnn")


"""--fp8_compute: the fp8 matmul path (torch._scaled_mm, per-row scales) against the
dequantize-and-matmul reference on the CPU's _scaled_mm, gradients through LoRA, the refusal on
GPUs without fp8 tensor cores, and a short training run with the flag."""

from __future__ import annotations

import json

import pytest
import torch

from wanlora.models.fp8 import Fp8Linear, quantize_weight, set_fp8_compute
from wanlora.models.fp8_matmul import (E4M3_MAX, Fp8ScaledMatmul, check_fp8_compute, fp8_compute_problem,
                                       quantize_rows)

torch.set_num_threads(1)


def _layer(out_f=48, in_f=64, scaled=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.logspace(-2, 1, out_f)[:, None]  # rows of many magnitudes
    q, s = quantize_weight(w, scaled)
    return w, q, s, torch.randn(out_f, generator=g)


def _deq_rows(q, s):
    return q.double() * s.double()


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [1e-6, -3e-6, 2e-6, 0.0]])
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 1) and s.dtype == torch.float32
    assert s[1].item() == 1.0 and torch.all(q[1].float() == 0)  # an all-zero row: scale 1
    assert torch.equal(q.float().abs().amax(dim=1)[[0, 2]], torch.tensor([E4M3_MAX, E4M3_MAX]))
    rel = ((q.float() * s - x).abs() / x.abs().clamp_min(1e-30))[x != 0]
    assert rel.max() <= 2.0 ** -4  # 3 mantissa bits: round to nearest within half an ulp


@pytest.mark.parametrize("scaled", [True, False], ids=["fp8_scaled", "fp8_base"])
def test_forward_and_input_gradient_equal_the_dequantized_reference(scaled):
    """The fp8 path is exactly the math it claims: per-row quantized activations (and output
    gradients, with the weight's per-channel scale folded in) times the fp8 weight, the scales
    applied to a float32 accumulator, one rounding to bf16 — computed here in float64."""
    w, q, s, bias = _layer(scaled=scaled)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y = Fp8ScaledMatmul.apply(x, q, s, bias, torch.float32)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    sw = torch.ones(48, 1) if s is None else s
    qx, sx = quantize_rows(x.detach().reshape(-1, 64))
    ref = _deq_rows(qx, sx) @ _deq_rows(q, sw).T
    got = y.detach().reshape(-1, 48).double() - bias.double()
    assert torch.allclose(got, ref.to(torch.bfloat16).double(), rtol=2 ** -8, atol=1e-6)

    g = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    qg, sg = quantize_rows(g.reshape(-1, 48) * sw.reshape(1, -1))
    ref_dx = _deq_rows(qg, sg) @ q.double()
    assert torch.allclose(x.grad.reshape(-1, 64).double(), ref_dx.to(torch.bfloat16).double(), rtol=2 ** -8,
                          atol=1e-6)
    # nothing of it reads the device on the host (the scales are computed and applied on the device)
    from test_sync_free import no_host_reads

    with no_host_reads():
        Fp8ScaledMatmul.apply(x, q, s, bias, torch.float32).backward(g)
    # and close to the float weights' matmul: only e4m3 rounding of weights and activations apart
    exact = x.detach() @ w.T + bias
    assert ((y.detach() - exact).norm() / exact.norm()) < 0.05


def test_fp8_linear_switch_and_lora_gradients():
    """set_fp8_compute switches the layers; a LoRA hooked on them gets gradients close to the
    dequantized path's."""
    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.models.fp8 import quantize_linears_
    from wanlora.networks.lora_wan import create_network

    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16, out_channels=16, text_dim=32)
    dit = WanDiT(cfg).requires_grad_(False)
    quantize_linears_(dit, scaled=True, compute_dtype=torch.float32)
    net = create_network(1.0, 4, 4, None, None, dit)
    net.apply_to(None, dit)
    for lora in net.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.02)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), [torch.randn(3, 32, generator=g)]
    grads = {}
    for on in (False, True):
        names = set_fp8_compute(dit, on)
        assert len(names) == 20 and all(m.fp8_matmul == on for m in dit.modules() if isinstance(m, Fp8Linear))
        net.zero_grad(set_to_none=True)
        dit(x, t, ctx).square().mean().backward()
        grads[on] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert all(p.grad is not None for p in net.parameters())
    assert torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0) > 0.99
    assert not torch.equal(grads[False], grads[True])  # really another path


def test_refusals():
    plain = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="no fp8 layers.*--fp8_scaled"):
        set_fp8_compute(plain)
    odd = torch.nn.Module()
    odd.lin = Fp8Linear(24, 16, scaled=True, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="layer lin is 16x24.*multiple of 16"):
        set_fp8_compute(odd)
    assert fp8_compute_problem("cpu") is None


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(ValueError, match=r"--fp8_compute: NVIDIA GeForce RTX 3090 \(compute capability 8.6\) "
                                         r"has no fp8 tensor cores; they need 8.9\+"):
        check_fp8_compute(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_compute(torch.device("cuda", 0))


def test_training_with_fp8_compute(tiny_dir, tmp_path):
    """Two steps of the trainer with --fp8_compute (implies --fp8_scaled): every block Linear runs the
    fp8 matmul, the LoRA learns (finite, changed weights)."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from wanlora.commands.train import parse_config
    from wanlora.training import trainer

    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    config = parse_config(["--task", "t2v-A14B", "--dit", flags["--dit"], "--dataset_config", "unused.toml",
                           "--output_dir", str(tmp_path), "--output_name", "lora", "--network_dim", "4",
                           "--seed", "3", "--max_data_loader_n_workers", "0", "--expert", "low",
                           "--max_train_steps", "2", "--fp8_compute", "--learning_rate", "1e-2"])
    assert config.model.fp8 == "scaled"
    seen = []
    load_dit_and_experts = trainer.load_dit_and_experts

    def spy(*a, **k):
        dit, experts = load_dit_and_experts(*a, **k)
        seen.extend(m.fp8_matmul for m in dit.modules() if isinstance(m, Fp8Linear))
        return dit, experts

    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(1, 16, 2, 4, 4, generator=g), "context": [torch.randn(3, 32, generator=g)],
                "keys": [str(i)]} for i in range(2)]

    class Batches:
        def __len__(self):
            return 2

        def __getitem__(self, pos):
            return batches[pos % 2]

    try:
        trainer.load_dit_and_experts = spy
        state = trainer.train(config, dataset=Batches())
    finally:
        trainer.load_dit_and_experts = load_dit_and_experts
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and all(seen) and len(seen) == 20
    assert state.global_step == 2 and len(state.losses) == 2
    ups = [v for k, v in load_file(tmp_path / "lora.safetensors").items() if "lora_up" in k]
    assert all(torch.isfinite(v).all() for v in ups) and any(v.abs().sum() > 0 for v in ups)

"""The LoRA network (networks/lora.py, networks/lora_wan.py): algebra, files, targets, flags."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from wanlora.networks import lora_wan, resolve_network_module
from wanlora.networks.lora import LoRAModule

torch.set_num_threads(1)

D, FF = 16, 24


class FakeAttn(nn.Module):
    def __init__(self, img: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = nn.LayerNorm(D)
        if img:  # Wan2.1-I2V only
            self.k_img, self.v_img = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.o(torch.tanh(self.norm_q(self.q(x))) * self.k(x) + self.v(x))


class FakeBlock(nn.Module):
    def __init__(self, img: bool = False):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, D))
        self.self_attn, self.cross_attn = FakeAttn(), FakeAttn(img)
        self.norm3 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, FF), nn.GELU(approximate="tanh"), nn.Linear(FF, D))

    def forward(self, x):
        x = x + self.self_attn(x)
        x = x + self.cross_attn(self.norm3(x))
        return x + self.ffn(x)


class FakeWan(nn.Module):
    """The Wan attribute tree (blocks.N.self_attn.q, ..., ffn.0/2) with Linear layers outside the
    blocks that LoRA must leave alone."""

    def __init__(self, layers: int = 2, img: bool = False):
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(FakeBlock(img) for _ in range(layers))
        self.head = nn.Linear(D, D)

    def forward(self, x):
        x = self.text_embedding(x) + self.time_embedding(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FakeWan()


@pytest.fixture
def x():
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))


def _randomize_up(net, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)


def _net(model, dim=4, alpha=2.0, **kw):
    net = lora_wan.create_network(1.0, dim, alpha, None, None, model, **kw)
    net.apply_to(None, model)
    return net


BLOCK_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                 "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def test_targets_are_the_ten_block_linears(model):
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, model)
    expected = [f"blocks.{i}.{t}" for i in range(2) for t in BLOCK_TARGETS]
    assert sorted(net.dotted_names.values()) == sorted(expected)
    assert sorted(net.dotted_names) == sorted("lora_unet_" + n.replace(".", "_") for n in expected)


def test_wan21_i2v_image_cross_attention_targeted_as_musubi_does():
    """Wan2.1 I2V-14B / FLF2V-14B: every Linear of a block, k_img and v_img included (12 per block)."""
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, FakeWan(img=True))
    assert len(net.unet_loras) == 24
    assert sorted(n for n in net.dotted_names.values() if "img" in n) == [
        f"blocks.{i}.cross_attn.{m}" for i in (0, 1) for m in ("k_img", "v_img")]


def test_init_changes_nothing(model, x):
    base = model(x)
    net = _net(model)
    assert torch.equal(model(x), base)
    assert all(torch.count_nonzero(lo.lora_up.weight) == 0 for lo in net.unet_loras)
    assert all(lo.lora_down.weight.abs().sum() > 0 for lo in net.unet_loras)


def test_base_frozen_lora_trains_and_remove_restores(model, x):
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x)
    net = _net(model)
    _randomize_up(net)
    model(x).square().sum().backward()
    assert all(lo.org_module.weight.grad is None for lo in net.unet_loras)
    assert all(lo.lora_up.weight.grad is not None and lo.lora_down.weight.grad is not None
               for lo in net.unet_loras)
    assert not torch.allclose(model(x), base)
    net.remove()
    assert torch.equal(model(x), base)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_merge_equals_dynamic_and_unmerge_restores(model, x):
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    net = _net(model, dim=4, alpha=3.3)
    _randomize_up(net)
    net.set_multiplier(0.7)
    dynamic = model(x)
    net.merge_to()
    assert all(lo.merged for lo in net.unet_loras)
    torch.testing.assert_close(model(x), dynamic, rtol=0, atol=1e-6)
    # the merged delta is multiplier * alpha/rank * up @ down
    lo = net.unet_loras[0]
    delta = lo.org_module.weight - w0[lo_key(net, lo)]
    torch.testing.assert_close(delta, 0.7 * 3.3 / 4 * lo.lora_up.weight @ lo.lora_down.weight,
                               rtol=0, atol=1e-6)
    net.set_multiplier(0.2)  # unmerge removes what was merged, whatever the multiplier now
    net.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)
    net.set_multiplier(0.7)
    torch.testing.assert_close(model(x), dynamic, rtol=0, atol=1e-6)


def lo_key(net, lora):
    return net.dotted_names[lora.lora_name] + ".weight"


def test_multiplier_zero_and_disable_equal_base(model, x):
    base = model(x)
    net = _net(model)
    _randomize_up(net)
    net.set_multiplier(0.0)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    net.set_multiplier(1.0)
    net.set_enabled(False)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_alpha_semantics(model):
    assert lora_wan.create_network(1.0, 4, None, None, None, model).unet_loras[0].scale == 0.25  # musubi default 1
    assert lora_wan.create_network(1.0, 8, 0, None, None, model).unet_loras[0].scale == 1.0  # 0 -> rank
    lo = lora_wan.create_network(1.0, 4, 3.3, None, None, model).unet_loras[0]
    assert lo.scale == 3.3 / 4 and lo.alpha.ndim == 0
    assert lora_wan.create_network(1.0, None, None, None, None, model).unet_loras[0].lora_dim == 4
    lin = nn.Linear(6, 5)
    m = LoRAModule("x", lin, lora_dim=3, alpha=None)
    assert m.lora_down.weight.shape == (3, 6) and m.lora_up.weight.shape == (5, 3) and m.scale == 1.0
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRAModule("c", nn.Conv2d(2, 2, 1))


def test_save_load_round_trip(model, x, tmp_path):
    net = _net(model, dim=4, alpha=3.3)
    _randomize_up(net)
    out = model(x)
    f = tmp_path / "lora.safetensors"
    net.save_weights(f, torch.bfloat16, {"ss_network_dim": "4", "wan.expert": "high_noise"})
    with safe_open(str(f), "pt") as sf:
        keys, md = set(sf.keys()), sf.metadata()
        alpha = sf.get_tensor("lora_unet_blocks_0_self_attn_q.alpha")
        down = sf.get_tensor("lora_unet_blocks_1_ffn_2.lora_down.weight")
        up = sf.get_tensor("lora_unet_blocks_1_ffn_0.lora_up.weight")
    assert keys == set(net.state_dict()) and len(keys) == 20 * 3
    assert {k: md[k] for k in ("ss_network_dim", "wan.expert")} == {"ss_network_dim": "4", "wan.expert": "high_noise"}
    data = f.read_bytes()
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert set(md) == {"ss_network_dim", "wan.expert", "sshs_model_hash", "sshs_legacy_hash"}
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == pytest.approx(3.3, abs=1e-6)
    assert down.shape == (4, FF) and down.dtype == torch.bfloat16 and up.shape == (FF, 4)
    assert not any(f.parent.glob(".*tmp*"))  # atomic write left nothing behind

    net.remove()
    net2 = _net(model, dim=4, alpha=1.0)  # different alpha: loading must restore 3.3
    assert net2.load_weights(f)["wan.expert"] == "high_noise"
    assert net2.unet_loras[0].scale == pytest.approx(3.3 / 4, abs=1e-7)
    for k, v in net.state_dict().items():
        want = v if k.endswith(".alpha") else v.to(torch.bfloat16).float()  # alpha stays float32
        torch.testing.assert_close(net2.state_dict()[k], want, rtol=0, atol=0)
    torch.testing.assert_close(model(x), out, rtol=2e-2, atol=2e-3)  # bf16 weights


def test_save_rejects_non_safetensors(model, tmp_path):
    net = _net(model)
    with pytest.raises(ValueError, match="safetensors"):
        net.save_weights(tmp_path / "lora.pt", None, None)


def test_load_is_strict_and_lists_mismatches(model, tmp_path):
    net = _net(model, dim=4)
    f = tmp_path / "r8.safetensors"
    net.remove()
    other = lora_wan.create_network(1.0, 8, 1.0, None, None, model,
                                    exclude_patterns='[".*ffn.*"]')
    other.save_weights(f, None, None)
    with pytest.raises(ValueError) as e:
        net.load_weights(f)
    msg = str(e.value)
    assert "shape mismatches" in msg and "missing from the file" in msg and "ffn_0" in msg
    assert "--dim_from_weights" in msg


def test_create_network_from_weights_reads_rank_and_alpha(model, x, tmp_path):
    net = _net(model, dim=4, alpha=2.0)
    _randomize_up(net)
    sd = dict(net.state_dict())
    # give one module another rank and alpha, drop another module entirely
    g = torch.Generator().manual_seed(5)
    sd["lora_unet_blocks_0_ffn_0.lora_down.weight"] = torch.randn(2, D, generator=g)
    sd["lora_unet_blocks_0_ffn_0.lora_up.weight"] = torch.randn(FF, 2, generator=g)
    sd["lora_unet_blocks_0_ffn_0.alpha"] = torch.tensor(0.5)
    for s in ("lora_down.weight", "lora_up.weight", "alpha"):
        del sd[f"lora_unet_blocks_1_self_attn_o.{s}"]
    f = tmp_path / "mixed.safetensors"
    from wanlora.io_utils import save_safetensors
    save_safetensors(sd, f)
    net.remove()
    base = model(x)

    n2, wsd = lora_wan.create_network_from_weights(1.0, f, None, None, model, for_inference=True)
    assert len(n2.unet_loras) == 19 and not n2.training
    ranks = {lo.lora_name: (lo.lora_dim, lo.scale) for lo in n2.unet_loras}
    assert ranks["lora_unet_blocks_0_ffn_0"] == (2, 0.25)
    assert ranks["lora_unet_blocks_0_self_attn_q"] == (4, 0.5)
    n2.apply_to(None, model)
    n2.load_weights(wsd)
    dynamic = model(x)
    assert not torch.allclose(dynamic, base)
    n2.merge_to()
    torch.testing.assert_close(model(x), dynamic, rtol=0, atol=1e-5)
    n2.remove()  # unmerges
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-5)

    sd["lora_unet_blocks_7_ffn_0.lora_down.weight"] = torch.zeros(2, D)
    with pytest.raises(ValueError, match="blocks_7_ffn_0"):
        lora_wan.create_network_from_weights(1.0, None, None, None, model, weights_sd=sd)


def test_loads_comfy_layout_through_lora_formats(model, x, tmp_path):
    from wanlora.lora import layouts as lf
    net = _net(model, dim=4, alpha=2.0)
    _randomize_up(net)
    out = model(x)
    f = tmp_path / "comfy.safetensors"
    from wanlora.io_utils import save_safetensors
    save_safetensors(lf.from_default(net.state_dict(), "comfy", fold_alpha=True), f)
    net.remove()
    n2, _ = lora_wan.create_network_from_weights(1.0, f, None, None, model)
    n2.apply_to(None, model)
    n2.load_weights(f)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, count", [
    ({}, 20),
    ({"exclude_patterns": '[".*ffn.*"]'}, 16),
    ({"exclude_patterns": '[".*ffn.*"]', "include_patterns": r'[".*ffn\.0"]'}, 18),
    ({"exclude_patterns": r'[".*cross_attn\..*", "blocks\.0\..*"]'}, 6),  # block 1: self_attn + ffn
    ({"include_patterns": '[".*"]'}, 20),  # include only re-admits; nothing outside the blocks
])
def test_include_exclude_patterns(model, args, count):
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, model, **args)
    assert len(net.unet_loras) == count
    assert all(n.startswith("blocks.") for n in net.dotted_names.values())


def test_bad_network_args():
    m = FakeWan()
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora_wan.create_network(1.0, 4, 1.0, None, None, m, exclude_patterns='["(unclosed"]')
    with pytest.raises(ValueError, match="list of strings"):
        lora_wan.create_network(1.0, 4, 1.0, None, None, m, exclude_patterns="[.*ffn]")
    with pytest.raises(ValueError, match="rank_dropout"):
        lora_wan.create_network(1.0, 4, 1.0, None, None, m, rank_dropout="x")
    with pytest.raises(ValueError, match="no LoRA target"):
        lora_wan.create_network(1.0, 4, 1.0, None, None, m, exclude_patterns='[".*"]')


def test_loraplus_param_groups(model):
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, model, loraplus_lr_ratio="16")
    groups, desc = net.prepare_optimizer_params(unet_lr=1e-4)
    assert desc == ["unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1.6e-3)]
    ups = {id(lo.lora_up.weight) for lo in net.unet_loras}
    assert {id(p) for p in groups[1]["params"]} == ups
    assert len(groups[0]["params"]) == 20 and not ups & {id(p) for p in groups[0]["params"]}
    groups, desc = lora_wan.create_network(1.0, 4, 1.0, None, None, model).prepare_optimizer_params(2e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 2e-4 and len(groups[0]["params"]) == 40
    groups, _ = net.prepare_optimizer_params(1e-4, loraplus_lr_ratio=4.0)  # explicit ratio wins
    assert groups[1]["lr"] == pytest.approx(4e-4)


@pytest.mark.parametrize("kw", [{"neuron_dropout": 0.5}, {"rank_dropout": "0.5"}, {"module_dropout": "0.5"}])
def test_dropout_only_in_train_mode(kw, x):
    torch.manual_seed(0)
    model = FakeWan()
    net = _net(model, **kw)
    _randomize_up(net)
    net.eval()
    ref = model(x)
    net.set_enabled(False)
    base = model(x)
    net.set_enabled(True)
    # eval: deterministic, and equal to the same network without any dropout
    assert torch.equal(model(x), ref) and not torch.allclose(ref, base)
    for lo in net.unet_loras:
        lo.dropout = lo.rank_dropout = lo.module_dropout = None
    assert torch.equal(model(x), ref)
    for lo in net.unet_loras:
        lo.dropout, lo.rank_dropout, lo.module_dropout = net.dropout, net.rank_dropout, net.module_dropout
    net.train()
    torch.manual_seed(3)
    outs = [model(x) for _ in range(4)]
    assert any(not torch.allclose(o, ref) for o in outs)
    net.eval()
    assert torch.equal(model(x), ref)


def test_network_args_parsing():
    a = lora_wan.parse_network_args({"exclude_patterns": '[".*ffn.*"]', "rank_dropout": "0.1",
                                     "loraplus_lr_ratio": "16", "verbose": "True", "conv_dim": "4"})
    assert a["exclude_patterns"] == [".*ffn.*"] and a["rank_dropout"] == 0.1
    assert a["loraplus_lr_ratio"] == 16.0 and a["verbose"] is True and a["include_patterns"] is None
    assert lora_wan.parse_network_args({"include_patterns": ".*ffn.*"})["include_patterns"] == [".*ffn.*"]


def test_resolve_network_module():
    assert resolve_network_module("networks.lora_wan") is lora_wan
    assert resolve_network_module("wanlora.networks.lora_wan") is lora_wan
    with pytest.raises(ValueError, match="lycoris-lora"):
        resolve_network_module("lycoris.kohya_not_installed_here")
    with pytest.raises(ValueError, match="no create_network"):
        resolve_network_module("json")
    with pytest.raises(ValueError, match="no importable module"):
        resolve_network_module("networks.nonexistent")


def test_tiny_real_dit_targets_and_identity():
    from wanlora.models import dit as dit_mod
    cfg = dit_mod.WanDiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, in_channels=4,
                               out_channels=4, text_dim=8, freq_dim=16, text_len=8)
    torch.manual_seed(0)
    dit = dit_mod.WanDiT(cfg).eval()
    net = lora_wan.create_network(1.0, 4, 1.0, None, None, dit)
    assert len(net.unet_loras) == 10 * cfg.num_layers
    assert sorted(net.dotted_names.values()) == sorted(
        f"blocks.{i}.{t}" for i in range(cfg.num_layers) for t in BLOCK_TARGETS)
    g = torch.Generator().manual_seed(0)
    xin = torch.randn(1, 4, 2, 4, 4, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 3, 8, generator=g)
    with torch.no_grad():
        base = dit(xin, t, ctx)
        net.apply_to(None, dit)
        torch.testing.assert_close(dit(xin, t, ctx), base, rtol=0, atol=0)
        _randomize_up(net)
        dynamic = dit(xin, t, ctx)
        assert not torch.allclose(dynamic, base)
        net.merge_to()
        torch.testing.assert_close(dit(xin, t, ctx), dynamic, rtol=1e-5, atol=1e-5)
        net.remove()
        torch.testing.assert_close(dit(xin, t, ctx), base, rtol=1e-5, atol=1e-5)


def test_float32_lora_on_bfloat16_base(x):
    torch.manual_seed(0)
    model = FakeWan().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    net = _net(model)
    assert all(lo.lora_down.weight.dtype == torch.float32 for lo in net.unet_loras)
    _randomize_up(net)
    out = model(xb)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(lo.lora_up.weight.grad is not None for lo in net.unet_loras)
    w0 = net.unet_loras[0].org_module.weight.clone()
    with torch.no_grad():
        net.merge_to()
        merged = model(xb)
        net.unmerge()
    torch.testing.assert_close(merged.float(), out.float(), rtol=0.05, atol=0.05)
    assert net.unet_loras[0].org_module.weight.dtype == torch.bfloat16
    torch.testing.assert_close(net.unet_loras[0].org_module.weight, w0, rtol=1e-2, atol=1e-2)


def test_two_networks_stack_additively(model, x):
    base = model(x)
    a = _net(model, dim=4, alpha=4.0)
    _randomize_up(a, seed=11)
    a.set_enabled(False)
    b = _net(model, dim=2, alpha=2.0)
    _randomize_up(b, seed=12)
    only_b = model(x) - base
    a.set_enabled(True)
    b.set_enabled(False)
    only_a = model(x) - base
    b.set_enabled(True)
    both = model(x) - base
    # the network is nonlinear, so compare merged weights rather than outputs
    la, lb = a.unet_loras[3], b.unet_loras[3]
    w = la.org_module.weight.clone()
    a.merge_to()
    b.merge_to()
    torch.testing.assert_close(la.org_module.weight - w, la.get_weight() + lb.get_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x) - base, both, rtol=0, atol=1e-5)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    b.remove()
    a.remove()
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)

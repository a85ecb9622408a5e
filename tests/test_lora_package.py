"""The LoRA package (wanlora.lora): the one delta formula, the one include/exclude rule, one-way imports."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanlora.lora.adapter import LoRAModule
from wanlora.lora.algebra import fold_alpha, lora_delta, lora_scale, merge_delta_
from wanlora.lora.apply import LoraPlan, apply_loras, filter_lora_state_dict
from wanlora.lora.layouts import delta_weights, key_to_module
from wanlora.lora.patterns import select_modules
from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.networks import lora_wan

torch.set_num_threads(1)

CFG = WanDiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=16)
SRC = Path(__file__).resolve().parents[1] / "src" / "wanlora"


def _factors(seed, out=12, inp=10, rank=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, inp, generator=g).to(dtype), torch.randn(out, rank, generator=g).to(dtype))


# -- algebra ---------------------------------------------------------------------------------


def test_scale_follows_the_kohya_convention():
    assert lora_scale(None, 4) == 1.0 and lora_scale(0, 4) == 1.0, "no alpha / alpha 0 mean alpha = rank"
    assert lora_scale(2.0, 4) == 0.5 and lora_scale(torch.tensor(8.0), 4) == 2.0
    assert lora_scale(3.3, 4) == 3.3 / 4, "a Python float alpha is not rounded to float32"
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora_scale(1.0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_is_m_alpha_over_r_up_down(dtype):
    down, up = _factors(0, dtype=dtype)
    d = lora_delta(down, up, alpha=6.0, multiplier=-0.7)
    assert d.dtype == torch.float32 and d.shape == (12, 10)
    ref = (-0.7 * 6.0 / 3) * (up.double() @ down.double())
    torch.testing.assert_close(d.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(lora_delta(down, up, 6.0, 2.0), 2 * lora_delta(down, up, 6.0, 1.0)), "linear in m"
    with pytest.raises(ValueError, match="not \\[rank, in\\] and \\[out, rank\\]"):
        lora_delta(down, up.T)


def test_delta_in_place_equals_delta_added():
    down, up = _factors(1)
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(2))
    acc = w.clone()
    assert lora_delta(down, up, 1.5, 0.4, out=acc) is acc
    torch.testing.assert_close(acc, w + lora_delta(down, up, 1.5, 0.4), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected float32"):
        lora_delta(down, up, out=w.to(torch.bfloat16))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 0.05)])
def test_merge_unmerge_round_trip(dtype, atol):
    down, up = _factors(3)
    w0 = torch.randn(12, 10, generator=torch.Generator().manual_seed(4)).to(dtype)
    w = w0.clone()
    merge_delta_(w, down, up, 2.0, 0.8)
    assert w.dtype == dtype
    torch.testing.assert_close(w.float(), w0.float() + lora_delta(down, up, 2.0, 0.8), rtol=0, atol=atol)
    merge_delta_(w, down, up, 2.0, -0.8)
    torch.testing.assert_close(w.float(), w0.float(), rtol=0, atol=atol)
    with pytest.raises(ValueError, match="does not fit the weight"):
        merge_delta_(w.T.contiguous(), down, up)


def test_fold_alpha_keeps_the_delta():
    down, up = _factors(5)
    fd, fu = fold_alpha(down, up, 6.0)
    torch.testing.assert_close(lora_delta(fd, fu, None), lora_delta(down, up, 6.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fd.norm() / down.norm(), torch.tensor(math.sqrt(2.0)), rtol=1e-6, atol=0)
    same = fold_alpha(down, up, 3.0)  # alpha == rank: nothing to fold
    assert torch.equal(same[0], down) and torch.equal(same[1], up)


def test_adapter_forward_difference_is_the_delta():
    torch.manual_seed(0)
    lin = nn.Linear(10, 12)
    w0 = lin.weight.detach().clone()
    lora = LoRAModule("lora_unet_x", lin, multiplier=0.6, lora_dim=3, alpha=1.5)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(4, 7, 10)
    lora.apply_to()
    hooked = lin(x)
    with torch.no_grad():
        torch.testing.assert_close(hooked - F.linear(x, w0, lin.bias), x @ lora.get_weight().T,
                                   rtol=1e-5, atol=1e-5)
        ref = lora_delta(lora.lora_down.weight, lora.lora_up.weight, 1.5, 0.6)
        assert torch.equal(lora.get_weight(), ref), "the adapter's merged delta is the algebra's"
        lora.merge()
        torch.testing.assert_close(lin(x), hooked, rtol=1e-5, atol=1e-5)  # merged: the hook adds nothing
        lora.unmerge()
    torch.testing.assert_close(lin.weight.detach(), w0, rtol=0, atol=1e-6)


def test_saved_network_gives_the_same_delta_to_every_reader():
    """The training network's delta and the layout reader's delta of its state dict are one formula."""
    torch.manual_seed(0)
    dit = WanDiT(CFG)
    net = lora_wan.create_network(0.5, 4, 2.0, None, None, dit)
    for lo in net.unet_loras:
        nn.init.normal_(lo.lora_up.weight)
    deltas = delta_weights(net.state_dict(), multiplier=0.5)
    assert len(deltas) == 10 * CFG.num_layers
    for lo in net.unet_loras:
        assert torch.equal(deltas[net.dotted_names[lo.lora_name]], lo.get_weight())


# -- include / exclude -----------------------------------------------------------------------

CASES = [
    (None, None),
    (r".*ffn.*", None),
    (r".*ffn.*", r".*ffn\.0"),
    (r"blocks\.0\..*", r"blocks\.0\.cross_attn\..*"),
    (r".*", r".*self_attn\.(q|k)"),
    (None, r".*cross_attn.*"),  # include alone re-admits nothing: every module stays
    ("ffn", None),  # full match: 'ffn' names no module, so nothing is excluded
]


@pytest.mark.parametrize("exclude, include", CASES)
def test_training_and_generation_select_the_same_modules(exclude, include):
    torch.manual_seed(0)
    dit = WanDiT(CFG)
    full = lora_wan.create_network(1.0, 4, 4.0, None, None, dit)
    for lo in full.unet_loras:
        nn.init.normal_(lo.lora_up.weight, std=0.05)
    sd = {k: v.detach().clone() for k, v in full.state_dict().items()}
    full.remove()

    trained = lora_wan.create_network(1.0, 4, 4.0, None, None, dit,
                                      exclude_patterns=[exclude] if exclude else None,
                                      include_patterns=[include] if include else None)
    training = set(trained.dotted_names.values())
    kept = filter_lora_state_dict(sd, include, exclude)
    generation = {key_to_module(k) for k in kept}
    assert training == generation
    expected = {n for n in (key_to_module(k) for k in sd)
                if not (exclude and re.fullmatch(exclude, n)) or (include and re.fullmatch(include, n))}
    assert training == expected

    # and the weights land the same way: the training network merged == generation's merge
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    trained.merge_to(weights_sd={k: v for k, v in sd.items() if k.split(".")[0] in trained.dotted_names})
    gen = WanDiT(CFG)
    gen.load_state_dict(base)
    pipe = SimpleNamespace(dits={None: gen}, extra_modules={})
    apply_loras(pipe, [LoraPlan("x.safetensors", 1.0, (None,), include, exclude, "test", sd, {})])
    merged = gen.state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base), "the LoRA changes the DiT"
    for name, w in dit.state_dict().items():
        torch.testing.assert_close(merged[name], w, rtol=0, atol=1e-6)


def test_select_modules_rule_and_errors():
    names = [("blocks.0.self_attn.q", 1), ("blocks.0.ffn.0", 2), ("blocks.1.ffn.2", 3)]
    assert select_modules(names, [r".*ffn.*"], [r"blocks\.0\..*"]) == names[:2]
    assert select_modules(names, None, [r"nothing"]) == names
    with pytest.raises(ValueError, match=r"--network_args exclude_patterns '\(' is not a valid regular"):
        select_modules(names, ["("], None)
    with pytest.raises(ValueError, match=r"--include_patterns '\[' is not a valid regular"):
        select_modules(names, None, "[", flag="")


# -- structure -------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_lora_package_imports_point_down_only():
    """networks -> lora, never lora -> networks/training/inference/commands."""
    upward = ("wanlora.networks", "wanlora.training", "wanlora.inference", "wanlora.commands", "networks")
    for f in sorted((SRC / "lora").glob("*.py")):
        bad = sorted(m for m in _imports(f) if m.startswith(upward))
        assert not bad, f"{f.name} imports upward: {bad}"
    networks = Path(__file__).resolve().parents[1] / "networks"
    assert any(m.startswith("wanlora.lora") for m in _imports(networks / "lora.py"))


def test_inference_package_imports_point_down_only():
    """inference -> lora / models / conditioning, never inference -> commands/training (training's
    samples use the pipeline; the generate command calls inference/session.py)."""
    upward = ("wanlora.commands", "wanlora.training", "wanlora.networks", "networks")
    files = sorted((SRC / "inference").glob("*.py"))
    assert any(f.name == "session.py" for f in files)
    for f in files:
        bad = sorted(m for m in _imports(f) if m.startswith(upward))
        assert not bad, f"{f.name} imports upward: {bad}"

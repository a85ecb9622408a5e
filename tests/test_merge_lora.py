"""wanlora-merge-lora: merged output == dynamic LoRA, streaming memory, task/expert refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dit_oracle import random_dit_state_dict

from wanlora.io_utils import save_safetensors, write_json
from wanlora.lora.layouts import BLOCK_LINEARS, from_default, module_to_key
from wanlora.lora.metadata import build_lora_metadata
from wanlora.commands.merge_lora import main
from wanlora.lora.merge import dit_expert_from_path, merge_loras
from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.safetensors_stream import SafetensorsStreamWriter

CFG = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16, out_channels=16,
                   text_dim=32)


def _base(seed=0):
    return random_dit_state_dict(CFG, seed)


def _lora(seed, rank, alpha, dim=CFG.dim, ffn=CFG.ffn_dim):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(CFG.num_layers):
        for layer in BLOCK_LINEARS:
            out, inp = {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}.get(layer, (dim, dim))
            n = module_to_key(f"blocks.{i}.{layer}")
            sd[f"{n}.lora_down.weight"] = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
            sd[f"{n}.lora_up.weight"] = 0.5 * torch.randn(out, rank, generator=g) / math.sqrt(rank)
            sd[f"{n}.alpha"] = torch.tensor(float(alpha))
    return sd


def _sharded(folder, sd, prefix="model.diffusion_model."):
    """Two shards + index + config.json, keys behind a ComfyUI prefix."""
    keys = list(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_safetensors({prefix + k: sd[k] for k in part}, folder / name)
        weight_map.update({prefix + k: name for k in part})
    write_json(folder / "diffusion_pytorch_model.safetensors.index.json", {"weight_map": weight_map})
    write_json(folder / "config.json", {"dim": CFG.dim, "num_heads": CFG.num_heads})
    return folder


def _inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([900.0]),
            torch.randn(1, 5, CFG.text_dim, generator=g))


class _DynamicLoRA:
    """Reference dynamic LoRA (independent of the merge code): forward hooks adding
    ``m · (alpha/r) · up(down(x))`` on the Linear layers."""

    def __init__(self, model, loras):
        self.handles = []
        mods = dict(model.named_modules())
        for sd, mult in loras:
            for k in sd:
                if not k.endswith(".lora_down.weight"):
                    continue
                name = k[: -len(".lora_down.weight")]
                path = name[len("lora_unet_"):]
                target = next(n for n in mods if n.replace(".", "_") == path)
                down, up, alpha = sd[k], sd[name + ".lora_up.weight"], sd[name + ".alpha"].item()
                scale = mult * alpha / down.shape[0]
                self.handles.append(mods[target].register_forward_hook(
                    lambda mod, args, out, d=down, u=up, s=scale: out + s * (args[0] @ d.T @ u.T)))


def test_merged_checkpoint_equals_dynamic_lora(tmp_path):
    base = _base()
    folder = _sharded(tmp_path / "high_noise_model", base)
    l1, l2 = _lora(1, 4, 2.0), _lora(2, 8, 8.0)
    md = build_lora_metadata("t2v-A14B", network_dim=4, network_alpha=2, expert="high_noise")
    save_safetensors(l1, tmp_path / "a_high_noise.safetensors", metadata=md)
    save_safetensors(from_default(l2, "comfy"), tmp_path / "b.safetensors")  # another layout, no metadata
    out = tmp_path / "merged.safetensors"
    assert main(["--dit", str(folder), "--task", "t2v-A14B",
                 "--lora_weight", str(tmp_path / "a_high_noise.safetensors"), str(tmp_path / "b.safetensors"),
                 "--lora_multiplier", "0.7", "-0.3", "--save_merged_model", str(out)]) == 0
    merged = load_file(out)
    assert merged.keys() == base.keys(), "official key names, prefix stripped"
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["num_heads"] == "2" and meta["wan.expert"] == "high_noise"
    assert [r["multiplier"] for r in json.loads(meta["wan.merged_loras"])] == [0.7, -0.3]
    untouched = [k for k in base if not any(f".{x}." in k for x in BLOCK_LINEARS)]
    assert all(torch.equal(merged[k], base[k]) for k in untouched)

    x, t, ctx = _inputs()
    ours = WanDiT(CFG)
    ours.load_state_dict(merged)
    ref = WanDiT(CFG)
    ref.load_state_dict(base)
    _DynamicLoRA(ref, [(l1, 0.7), (l2, -0.3)])
    with torch.no_grad():
        a, b = ours(x, t, ctx), ref(x, t, ctx)
        plain = WanDiT(CFG)
        plain.load_state_dict(base)
        c = plain(x, t, ctx)
    assert (a - c).abs().max() > 1e-3, "the LoRAs change the output"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_merged_checkpoint_equals_the_training_network(tmp_path):
    from wanlora.networks import lora_wan
    base = _base(3)
    save_safetensors(base, tmp_path / "dit.safetensors")
    l1 = _lora(4, 4, 1.0)
    save_safetensors(l1, tmp_path / "l.safetensors")
    out = tmp_path / "m.safetensors"
    merge_loras(tmp_path / "dit.safetensors", [(tmp_path / "l.safetensors", 1.5)], out, "t2v-14B",
                save_dtype=torch.float32)
    ours = WanDiT(CFG)
    ours.load_state_dict(load_file(out))
    ref = WanDiT(CFG)
    ref.load_state_dict(base)
    net, weights = lora_wan.create_network_from_weights(1.5, str(tmp_path / "l.safetensors"), None, None, ref,
                                                        for_inference=True)
    net.apply_to(None, ref)
    net.load_weights(weights)
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), ref(x, t, ctx), atol=1e-5, rtol=1e-5)


def test_save_dtype_and_expert_from_path(tmp_path):
    save_safetensors(_base(), tmp_path / "wan2.2_t2v_low_noise_14B_fp16.safetensors")
    save_safetensors(_lora(1, 4, 4.0), tmp_path / "l.safetensors")
    out = tmp_path / "o.safetensors"
    merge_loras(tmp_path / "wan2.2_t2v_low_noise_14B_fp16.safetensors", [(tmp_path / "l.safetensors", 1.0)],
                out, "t2v-A14B", save_dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in load_file(out).values())
    assert dit_expert_from_path(tmp_path / "wan2.2_t2v_low_noise_14B_fp16.safetensors") == "low_noise"
    assert dit_expert_from_path(tmp_path / "Wan2.2-T2V-A14B" / "high_noise_model") == "high_noise"
    assert dit_expert_from_path(tmp_path / "x.safetensors") is None


def test_refusals_and_force(tmp_path, capsys):
    dit = tmp_path / "low_noise_model"
    dit.mkdir()
    save_safetensors(_base(), dit / "diffusion_pytorch_model.safetensors")
    hi = tmp_path / "s_high_noise.safetensors"
    save_safetensors(_lora(1, 4, 4.0), hi,
                     metadata=build_lora_metadata("t2v-A14B", network_dim=4, network_alpha=4, expert="high_noise"))
    other_task = tmp_path / "five.safetensors"
    save_safetensors(_lora(1, 4, 4.0), other_task, metadata=build_lora_metadata("ti2v-5B", network_dim=4,
                                                                                network_alpha=4))
    big = tmp_path / "big.safetensors"
    save_safetensors(_lora(1, 4, 4.0, dim=96, ffn=192), big)
    out = tmp_path / "o.safetensors"

    def run(lora, *extra):
        return main(["--dit", str(dit), "--task", "t2v-A14B", "--lora_weight", str(lora),
                     "--save_merged_model", str(out), *extra])

    assert run(hi) == 2
    err = capsys.readouterr().err
    assert "high_noise expert" in err and "low_noise" in err and "--force" in err
    assert not out.exists()
    assert run(other_task) == 2
    assert "task ti2v-5B" in capsys.readouterr().err
    assert run(big) == 2
    assert "do not fit the checkpoint" in capsys.readouterr().err
    assert main(["--dit", str(dit), "--task", "i2v-A14B", "--lora_weight", str(hi),
                 "--save_merged_model", str(out), "--expert", "high_noise"]) == 2
    assert "input channels" in capsys.readouterr().err
    # expert unknown: the path says nothing
    plain = tmp_path / "dit.safetensors"
    save_safetensors(_base(), plain)
    assert main(["--dit", str(plain), "--task", "t2v-A14B", "--lora_weight", str(hi),
                 "--save_merged_model", str(out)]) == 2
    assert "--expert high_noise" in capsys.readouterr().err
    assert main(["--dit", str(plain), "--task", "t2v-A14B", "--lora_weight", str(hi),
                 "--save_merged_model", str(out), "--expert", "high_noise"]) == 0

    # a musubi-tuner high-noise file (no wan.* keys): its timestep range names the expert
    musubi = tmp_path / "musubi_high.safetensors"
    save_safetensors(_lora(1, 4, 4.0), musubi, metadata={
        "ss_network_module": "networks.lora_wan", "ss_network_dim": "4", "ss_network_alpha": "4",
        "ss_base_model_version": "wan", "modelspec.timestep_range": "875,1000"})
    out.unlink()
    assert run(musubi) == 2
    err = capsys.readouterr().err
    assert "made for the high_noise expert (modelspec.timestep_range 875,1000)" in err and not out.exists()
    assert main(["--dit", str(plain), "--task", "t2v-A14B", "--lora_weight", str(musubi),
                 "--save_merged_model", str(out)]) == 2
    assert "--expert high_noise" in capsys.readouterr().err
    assert main(["--dit", str(plain), "--task", "t2v-A14B", "--lora_weight", str(musubi),
                 "--save_merged_model", str(out), "--expert", "high_noise"]) == 0

    assert run(hi, "--force") == 0
    assert run(big, "--force") == 0
    assert torch.equal(load_file(out)["blocks.0.self_attn.q.weight"], _base()["blocks.0.self_attn.q.weight"])
    assert run(hi, "--lora_multiplier", "1", "2") == 2


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import psutil
    from wanlora.lora.merge import merge_loras

    def peak():
        # VmHWM: this process's own high-water RSS (ru_maxrss would include the forking parent's RSS)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    before = psutil.Process().memory_info().rss
    merge_loras(sys.argv[1], [(sys.argv[2], 1.0)], sys.argv[3], "t2v-A14B", expert="high_noise")
    print(json.dumps({"before": before, "peak": peak()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_streaming_merge_memory(tmp_path):
    """A ~300 MB checkpoint merges with a peak RSS (whole process, torch included) below 1.5x
    its size, and the merge itself adds little more than a few copies of the largest tensor."""
    dim, n_blocks = 2048, 9  # 9 blocks x ffn.0 [2*dim, dim] fp32 = 32 MiB each, ~302 MB in all
    specs = {f"blocks.{i}.ffn.0.weight": (torch.float32, (2 * dim, dim)) for i in range(n_blocks)}
    ckpt = tmp_path / "high_noise.safetensors"
    g = torch.Generator().manual_seed(0)
    with SafetensorsStreamWriter(ckpt, specs) as w:
        for k in specs:
            w.write(k, torch.randn(2 * dim, dim, generator=g))
    size = ckpt.stat().st_size
    lora = {}
    for i in range(n_blocks):
        n = module_to_key(f"blocks.{i}.ffn.0")
        lora[f"{n}.lora_down.weight"] = torch.randn(8, dim, generator=g)
        lora[f"{n}.lora_up.weight"] = torch.randn(2 * dim, 8, generator=g)
        lora[f"{n}.alpha"] = torch.tensor(8.0)
    save_safetensors(lora, tmp_path / "l.safetensors")
    out = tmp_path / "merged.safetensors"
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt), str(tmp_path / "l.safetensors"), str(out)],
                         capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1",
                                                                           "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["peak"] < 1.5 * size, (m, size)
    assert m["peak"] - m["before"] < 0.5 * size, (m, size)
    # spot check the streamed file
    with safe_open(str(out), framework="pt") as f:
        got = f.get_tensor("blocks.4.ffn.0.weight")
    with safe_open(str(ckpt), framework="pt") as f:
        w0 = f.get_tensor("blocks.4.ffn.0.weight")
    n = module_to_key("blocks.4.ffn.0")
    torch.testing.assert_close(got, w0 + lora[f"{n}.lora_up.weight"] @ lora[f"{n}.lora_down.weight"],
                               atol=1e-4, rtol=1e-5)


def test_tiny_a14b_expert_merge_end_to_end(tiny_dir, tmp_path):
    """Training's network saves a high-noise LoRA; the merge into the tiny official high_noise_model
    shards loads with load_dit and equals the network applied dynamically; the low-noise expert
    refuses it."""
    from wanlora.networks import lora_wan
    from wanlora.models import load_dit

    root = tiny_dir("t2v-A14B")
    high, low = root / "high_noise_model", root / "low_noise_model"
    dit = load_dit(high, "t2v-A14B")
    net = lora_wan.create_network(1.0, 4, 2.0, None, None, dit)
    net.apply_to(None, dit)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lora = tmp_path / "t_high_noise.safetensors"
    net.save_weights(str(lora), torch.float32,
                     build_lora_metadata("t2v-A14B", network_dim=4, network_alpha=2.0, expert="high_noise"))
    out = tmp_path / "merged_high.safetensors"
    assert main(["--dit", str(high), "--task", "t2v-A14B", "--lora_weight", str(lora),
                 "--save_merged_model", str(out)]) == 0
    merged = load_dit(out, "t2v-A14B")
    cfg = merged.config
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    t = torch.tensor([950.0])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, ctx), dit(x, t, ctx), atol=1e-5, rtol=1e-5)
    assert main(["--dit", str(low), "--task", "t2v-A14B", "--lora_weight", str(lora),
                 "--save_merged_model", str(tmp_path / "no.safetensors")]) == 2


def test_one_multiplier_applies_to_every_lora_as_in_generate(tmp_path, capsys):
    """Regression: ``--lora_multiplier 0.5`` with two files meant [0.5, 1.0] in merge but [0.5, 0.5] in
    generate; both now read it through one function (one value for all files)."""
    from wanlora.lora.apply import per_file_values

    assert per_file_values([0.5], 2, 1.0, "--lora_multiplier") == [0.5, 0.5]
    assert per_file_values(None, 2, 1.0, "--lora_multiplier") == [1.0, 1.0]
    with pytest.raises(ValueError, match="--lora_multiplier: 2 values for 3 LoRA files"):
        per_file_values([1.0, 2.0], 3, 1.0, "--lora_multiplier")
    base = _base(5)
    save_safetensors(base, tmp_path / "dit.safetensors")
    for i, name in enumerate(("a", "b")):
        save_safetensors(_lora(10 + i, 4, 4.0), tmp_path / f"{name}.safetensors")
    loras = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    one = tmp_path / "one.safetensors"
    assert main(["--dit", str(tmp_path / "dit.safetensors"), "--task", "t2v-14B", "--lora_weight", *loras,
                 "--lora_multiplier", "0.5", "--save_merged_model", str(one)]) == 0
    with safe_open(str(one), framework="pt") as f:
        assert [r["multiplier"] for r in json.loads(f.metadata()["wan.merged_loras"])] == [0.5, 0.5]
    ref = tmp_path / "ref.safetensors"
    merge_loras(tmp_path / "dit.safetensors", [(loras[0], 0.5), (loras[1], 0.5)], ref, "t2v-14B")
    a, b = load_file(one), load_file(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.ffn.2.weight"], base["blocks.1.ffn.2.weight"])
    assert main(["--dit", str(tmp_path / "dit.safetensors"), "--task", "t2v-14B", "--lora_weight", *loras,
                 "--lora_multiplier", "1", "2", "3", "--save_merged_model", str(one)]) == 2
    assert "--lora_multiplier: 3 values for 2 LoRA files" in capsys.readouterr().err

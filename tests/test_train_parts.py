"""The training loop's parts: flags and --config_file, optimizers and schedules, expert planning
and scheduling, weight swapping, and the flow-matching loss (TI2V first frame)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from wanlora.training import flow
from wanlora.training.experts import (
    ONE_LORA,
    ExpertSchedule,
    ExpertWeights,
    boundary_timestep,
    expert_from_path,
    plan_experts,
)
from wanlora.training.optim import build_lr_scheduler, build_optimizer, parse_kv_args
from wanlora.tasks import get_task
from wanlora.commands.train import ConfigFileError, parse_args
from wanlora.conditioning import conditioning_for
from wanlora.training.trainer import flow_matching_loss

BASE = ["--task", "t2v-A14B", "--dit", "d", "--dataset_config", "ds.toml", "--output_dir", "out"]


# ---- flags and --config_file ------------------------------------------------------------------


def test_config_file_merges_and_command_line_wins(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        'task = "i2v-A14B"\ndit = "models/low_noise_model"\ndataset_config = "ds.toml"\n'
        'output_dir = "out"\nnetwork_dim = 16\nlearning_rate = 2e-4\ngradient_checkpointing = true\n'
        '[network]\nnetwork_args = ["rank_dropout=0.1"]\nnetwork_alpha = 8\n'
    )
    a = parse_args(["--config_file", str(cfg)])
    assert (a.task, a.network_dim, a.learning_rate, a.network_alpha) == ("i2v-A14B", 16, 2e-4, 8.0)
    assert a.gradient_checkpointing is True and a.network_args == ["rank_dropout=0.1"]
    assert str(a.dataset_config) == "ds.toml" and a.output_dir.name == "out"  # paths typed as flags
    b = parse_args(["--config_file", str(cfg), "--network_dim", "4", "--task", "t2v-A14B"])
    assert (b.task, b.network_dim, b.learning_rate) == ("t2v-A14B", 4, 2e-4)  # the command line wins


def test_config_file_unknown_key_and_bad_values_are_named(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text("network_dimm = 16\n")
    with pytest.raises(ConfigFileError, match=r"unknown key 'network_dimm'.*network_dim"):
        parse_args(BASE + ["--config_file", str(cfg)])
    cfg.write_text("gradient_checkpointing = 1\n")
    with pytest.raises(ConfigFileError, match="gradient_checkpointing.*switch"):
        parse_args(BASE + ["--config_file", str(cfg)])
    cfg.write_text('mixed_precision = "fp8"\n')
    with pytest.raises(ConfigFileError, match="mixed_precision.*bf16"):
        parse_args(BASE + ["--config_file", str(cfg)])


def test_missing_required_flags_are_listed():
    with pytest.raises(SystemExit):
        parse_args(["--task", "t2v-A14B"])


# ---- optimizers and schedules -----------------------------------------------------------------


def test_optimizer_args_and_class_path():
    assert parse_kv_args(["weight_decay=0.01", "betas=(0.9,0.99)", "name=foo"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "name": "foo"}
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer("torch.optim.SGD", p, 0.1, ["momentum=0.9"])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    opt = build_optimizer("adamw", p, 0.1, ["weight_decay=0.0"])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="optimizer_type"):
        build_optimizer("nosuch", p, 0.1)
    with pytest.raises(ValueError, match="optimizer_args"):
        build_optimizer("adamw", p, 0.1, ["bogus_arg=1"])


def _multipliers(name, W, N, steps, **kw):
    """The learning-rate multiplier of schedule ``name`` at each of ``steps`` (base lr 1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = build_lr_scheduler(name, opt, W, N, **kw)
    out, at = {}, 0
    for step in sorted(steps):
        while at < step:
            opt.step()
            s.step()
            at += 1
        out[step] = s.get_last_lr()[0]
    return out


def test_lr_schedules():
    W, N = 10, 110
    f = _multipliers("cosine", W, N, [0, 5, W, 60, N])
    assert f[0] == 0 and f[5] == 0.5 and f[W] == 1.0 and f[60] == pytest.approx(0.5) and f[N] == pytest.approx(0)
    assert _multipliers("linear", W, N, [60])[60] == pytest.approx(0.5)
    assert _multipliers("constant", W, N, [0])[0] == 1.0
    assert _multipliers("constant_with_warmup", W, N, [5])[5] == 0.5
    assert _multipliers("polynomial", 0, 100, [50], power=2.0)[50] == pytest.approx(0.25)
    r = _multipliers("cosine_with_restarts", 0, 100, [0, 25, 50], num_cycles=2)
    assert r[0] == 1.0 and r[25] == pytest.approx(0.5) and r[50] == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = build_lr_scheduler("linear", opt, 0.1, 100)  # below 1: a fraction of the steps
    assert s.get_last_lr()[0] == 0.0
    with pytest.raises(ValueError, match="lr_scheduler"):
        build_lr_scheduler("nosuch", opt, 0, 10)


# ---- experts ----------------------------------------------------------------------------------


def test_expert_plans():
    t2v, ti2v = get_task("t2v-A14B"), get_task("ti2v-5B")
    assert expert_from_path("x/wan2.2_t2v_high_noise_14B_fp16.safetensors") == "high_noise"
    assert expert_from_path("MODELS/low_noise_model") == "low_noise"
    assert expert_from_path("dit.safetensors") is None
    p = plan_experts(t2v, "m/low_noise_model")
    assert p.mode == "one" and p.ranges == {"low_noise": (0.0, 875.0)} and "detected" in p.notes[0]
    assert p.file_suffix("low_noise") == "" and p.metadata_expert("low_noise") == "low_noise"
    p = plan_experts(t2v, "LOW", "HIGH")
    assert p.mode == "separate" and p.ranges["high_noise"] == (875.0, 1000.0)
    assert p.file_suffix("high_noise") == "_high_noise" and p.lora_for("low_noise") == "low_noise"
    p = plan_experts(t2v, "LOW", "HIGH", expert_lora="shared")
    assert p.lora_for("high_noise") == ONE_LORA and p.metadata_expert(ONE_LORA) == "both"
    p = plan_experts(get_task("i2v-A14B"), "dit.safetensors", expert="high", timestep_boundary=0.8)
    assert p.ranges == {"high_noise": (800.0, 1000.0)}
    p = plan_experts(t2v, "m/low_noise_model", expert="high")  # flag and path disagree: a warning
    assert p.dit_paths == {"high_noise": "m/low_noise_model"} and not p.notes
    assert p.warnings == ["--expert high_noise but the --dit path m/low_noise_model names low_noise: "
                          "the flag wins; check that the file is the high_noise expert"]
    assert boundary_timestep(t2v, 900) == 900.0 and boundary_timestep(t2v, None) == 875.0
    assert plan_experts(ti2v, "dit").mode == "single"
    with pytest.raises(ValueError, match="--expert high"):
        plan_experts(t2v, "dit.safetensors")
    with pytest.raises(ValueError, match="single model"):
        plan_experts(ti2v, "dit", expert="high")


def test_expert_schedule_matches_the_timestep_law():
    """P(high) = mass above the boundary, so expert draw + in-range sampling = the configured law."""
    s = flow.TimestepDistribution("shift", discrete_flow_shift=5.0)
    p_high = s.mass(875, 1000)
    sched = ExpertSchedule(p_high, switch_every=1, seed=3)
    draws = [sched.expert_at(i) for i in range(4000)]
    freq = draws.count("high_noise") / len(draws)
    assert abs(freq - p_high) < 4 * math.sqrt(p_high * (1 - p_high) / len(draws))
    assert draws[:50] == [ExpertSchedule(p_high, 1, 3).expert_at(i) for i in range(50)]  # stateless
    grouped = ExpertSchedule(0.5, switch_every=4, seed=1)
    seq = [grouped.expert_at(i) for i in range(40)]
    assert all(len(set(seq[k:k + 4])) == 1 for k in range(0, 40, 4))


def test_expert_draw_for_flux_shift_and_ranges_that_starve_an_expert(caplog):
    """flux_shift: P(high) comes from each step's latent size; a --min/--max_timestep range on one
    side of the boundary is refused for two LoRAs (one would never train), a warning when shared."""
    from wanlora.training.experts import expert_of_step, expert_schedule, log

    t2v = get_task("t2v-A14B")
    sep = plan_experts(t2v, "LOW", "HIGH")
    flux = flow.TimestepDistribution("flux_shift")
    sched = expert_schedule(sep, flux, 1, 5)
    assert sched.p_high is None
    with pytest.raises(ValueError, match="give p_high"):
        sched.expert_at(0)
    small, large = {"latents": torch.zeros(1, 16, 2, 16, 16)}, {"latents": torch.zeros(1, 16, 2, 128, 128)}
    p_small, p_large = (flux.with_latent_size(h, h).mass(875, 1000) for h in (16, 128))
    assert p_small < p_large  # more tokens, more shift, more high-noise steps
    for step in range(40):
        assert expert_of_step(sched, sep, flux, step, small) == ExpertSchedule(p_small, 1, 5).expert_at(step)
        assert expert_of_step(sched, sep, flux, step, large) == ExpertSchedule(p_large, 1, 5).expert_at(step)
        # several processes (other buckets) agree on one P(high): the mean over processes
        both = expert_of_step(sched, sep, flux, step, small, lambda p: (p + p_large) / 2)
        assert both == ExpertSchedule((p_small + p_large) / 2, 1, 5).expert_at(step)
    assert ExpertSchedule(0.3, 1, 5).expert_at(7, p_high=1.0) == "high_noise"  # a per-step p_high wins
    assert expert_of_step(None, plan_experts(t2v, "m/low_noise_model"), flux, 0, small) == "low_noise"

    low_only = flow.TimestepDistribution("uniform", max_timestep=800)
    with pytest.raises(ValueError, match="high_noise expert gets no timesteps and its LoRA would never train"):
        expert_schedule(sep, low_only, 1, 0)
    with caplog.at_level("WARNING", logger=log.name):  # the logger expert_schedule writes to
        shared = expert_schedule(plan_experts(t2v, "LOW", "HIGH", expert_lora="shared"), low_only, 1, 0)
    assert shared.p_high == 0.0 and "the shared LoRA trains on the other expert only" in caplog.text
    assert {r.name for r in caplog.records} == {log.name}
    with pytest.raises(ValueError, match="low_noise expert gets no timesteps"):
        expert_schedule(sep, flow.TimestepDistribution("uniform", min_timestep=900), 1, 0)


def test_state_folder_of_the_bundles_replaces_the_old_one(tmp_path):
    """The state folder holds each LoRA's weights, optimizer and schedule in wanlora's own format,
    replaces the previous folder of that name, and leaves no .tmp / .old behind."""
    from types import SimpleNamespace

    from wanlora.training.checkpoint import TrainState, read_train_state, write_state_folder

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bundles = {"high_noise": SimpleNamespace(network=net, optimizer=opt, scheduler=sched)}
    accelerator = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, step=6, scaler=None)
    final = tmp_path / "lora-state"
    final.mkdir()
    (final / "old.bin").write_bytes(b"x")
    layout = {"seed": 3, "loras": {"high_noise": {"rank": 2, "alpha": 2.0}}}
    assert write_state_folder(accelerator, final, TrainState(global_step=3, seed=3), bundles, layout) == final
    assert sorted(p.name for p in final.iterdir()) == [
        "accelerator.safetensors", "lora.high_noise.safetensors", "optimizer.high_noise.safetensors",
        "rng_0.safetensors", "scheduler.high_noise.safetensors", "train_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]  # no .tmp / .old left
    assert read_train_state(final, layout).global_step == 3


@pytest.mark.parametrize("offload", [False, True])
def test_expert_weights_swap_in_place(offload):
    m = torch.nn.Linear(3, 2)
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    w = ExpertWeights(m, "low_noise", {"high_noise": dict(b)}, offload=offload)  # the dict is consumed
    param = m.weight
    assert w.activate("high_noise") and torch.equal(m.weight, b["weight"]) and m.weight is param
    assert not w.activate("high_noise")
    assert w.activate("low_noise") and torch.equal(m.weight, a["weight"]) and torch.equal(m.bias, a["bias"])
    with pytest.raises(ValueError, match="same task"):
        ExpertWeights(m, "low_noise", {"high_noise": {"weight": b["weight"]}})


# ---- the loss ---------------------------------------------------------------------------------


def test_flow_matching_loss_relation_and_ti2v_first_frame():
    x0 = torch.randn(2, 4, 3, 2, 2)
    batch = {"latents": x0, "context": [torch.zeros(1, 8)] * 2}
    sampler = flow.TimestepDistribution("uniform")
    seen = {}

    def oracle(x_t, t, ctx, y, clip_fea):  # predicts the exact target for frames > 0, garbage on frame 0
        seen["x_t"], seen["t"] = x_t, t
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(x0.shape, generator=g)
        v = noise - x0
        v[:, :, 0] = 1e3
        return v

    loss, t = flow_matching_loss(oracle, batch, sampler, 0, 1000, torch.Generator().manual_seed(5), "cpu",
                                 conditioning=conditioning_for("ti2v-5B", first_frame_prob=1.0))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)  # frame 0 is out of the loss
    assert seen["t"].shape == (2, 3) and torch.all(seen["t"][:, 0] == 0)
    assert torch.equal(seen["t"][:, 1], t) and torch.equal(seen["x_t"][:, :, 0], x0[:, :, 0])
    # without the first frame: x_t = (1 - s) x0 + s eps with t = 1000 s, and frame 0 counts
    loss, t = flow_matching_loss(oracle, batch, sampler, 0, 1000, torch.Generator().manual_seed(5), "cpu")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - s) * x0 + s * noise, atol=1e-6)
    assert seen["t"].shape == (2,) and loss.item() > 1e4
    # timesteps stay inside the expert's range
    _, t = flow_matching_loss(oracle, batch, sampler, 875, 1000, torch.Generator().manual_seed(1), "cpu")
    assert torch.all((t >= 875) & (t < 1000))


def test_main_reports_user_errors_without_traceback(tmp_path, capsys, monkeypatch):
    from wanlora.commands.train import main

    monkeypatch.delenv("WANLORA_TRACEBACK", raising=False)
    cfg = tmp_path / "train.toml"
    cfg.write_text("learning_rat = 1e-4\n")
    assert main(BASE + ["--config_file", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanlora-train: error: ") and "unknown key 'learning_rat'" in err
    argv = BASE + ["--dit", str(tmp_path / "missing_low_noise_model"), "--output_dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanlora-train: error: ") and err.count("\n") >= 1 and "Traceback" not in err
    monkeypatch.setenv("WANLORA_TRACEBACK", "1")  # the traceback on request
    with pytest.raises((ValueError, FileNotFoundError)):
        main(argv)


def test_show_timesteps_prints_each_experts_share(capsys):
    from wanlora.commands.train import main

    assert main(["--task", "t2v-A14B", "--dit", "LOW", "--dit_high_noise", "HIGH", "--show_timesteps", "console",
                 "--timestep_sampling", "shift", "--discrete_flow_shift", "5"]) == 0
    out = capsys.readouterr().out
    assert "high_noise: range 875..1000, probability 0.36" in out and "low_noise: range 0..875" in out


def test_show_timesteps_refuses_flux_shift_with_the_reason(capsys):
    from wanlora.commands.train import main

    assert main(["--task", "t2v-A14B", "--dit", "LOW", "--dit_high_noise", "HIGH", "--show_timesteps", "console",
                 "--timestep_sampling", "flux_shift"]) == 2
    assert "flux_shift sampling depends on each batch's latent size" in capsys.readouterr().err


# ---- LoRA module checks (once, before training) -------------------------------------------------


def test_partial_lora_warned_once_and_clip_modules_refused(caplog):
    """exclude_patterns that leave a partial LoRA get diffusers' coverage warning when the network is
    built; Wan2.1-I2V-only modules (k_img) are refused for a Wan2.2 task."""
    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.networks import lora_wan
    from wanlora.training.lora_bundle import check_lora_modules, log

    torch.manual_seed(0)
    dit = WanDiT(WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16, out_channels=16,
                              text_dim=32))
    task = get_task("t2v-A14B")
    full = lora_wan.create_network(1.0, 4, 4, None, None, dit)
    assert check_lora_modules(full, task, 2) == []
    part = lora_wan.create_network(1.0, 4, 4, None, None, dit, exclude_patterns="['.*ffn.*']")
    with caplog.at_level("WARNING", logger=log.name):  # the logger the check writes to
        found = check_lora_modules(part, task, 2, "high_noise")
    assert len(found) == 1 and "layers missing in 2 block(s): ffn.0, ffn.2" in found[0]
    assert "LoRA high_noise: " in caplog.text and "diffusers' loader refuses" in caplog.text
    assert {r.name for r in caplog.records} == {log.name}
    caplog.clear()
    with caplog.at_level("WARNING", logger=log.name):
        check_lora_modules(part, task, 2, warn=False)  # other processes: no duplicate warning
    assert caplog.text == ""

    class ClipLoRA:
        def state_dict(self):
            return {f"lora_unet_blocks_0_cross_attn_k_img.lora_{n}.weight": torch.zeros(4, 4) for n in ("down", "up")}

    with pytest.raises(ValueError, match="Wan2.1-I2V-only modules .*k_img.* exclude them"):
        check_lora_modules(ClipLoRA(), task, 2)

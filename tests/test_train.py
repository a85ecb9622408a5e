"""Training on real media caches with tiny models: both A14B experts (two LoRAs), one I2V expert,
TI2V-5B image-to-video; exact resume; non-finite losses; two CPU processes under torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixed_batches import FixedBatches
from tiny_runs import file_metadata, train_argv
from wanlora.training import flow
from wanlora.training.experts import ExpertSchedule
from wanlora.commands.train import parse_config
from wanlora.training.trainer import NonFiniteLossError, flow_matching_loss, train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after


def _make_caches(task: str, models: Path, work: Path, media_dir: Path, images: bool = True) -> Path:
    """Copy the real clips (and photos) with captions, write dataset.toml (64x64, 17 frames),
    and run the two caching commands with the tiny models. Returns the dataset TOML."""
    from wanlora.commands import cache_latents, cache_text
    from wanlora.tools.demo import write_dataset_toml

    vids, imgs = work / "data" / "videos", work / "data" / "images"
    vids.mkdir(parents=True)
    imgs.mkdir(parents=True)
    for f in sorted(media_dir.iterdir()):
        dst = vids if f.suffix == ".mp4" else imgs if f.suffix in (".jpg", ".png") else None
        if dst is not None:
            shutil.copy(f, dst / f.name)
            shutil.copy(f.with_suffix(".txt"), dst / f"{f.stem}.txt")
    toml = write_dataset_toml(work, vids, imgs if images else None, resolution=(64, 64), frames=17)
    flags = json.loads((models / "manifest.json").read_text())["flags"]
    assert cache_latents.main(["--task", task, "--dataset_config", str(toml), "--vae", flags["--vae"]]) in (0, None)
    assert cache_text.main(["--dataset_config", str(toml), "--t5", flags["--t5"],
                            "--t5_tokenizer", flags["--t5_tokenizer"]]) in (0, None)
    return toml


@pytest.fixture(scope="module")
def setups(tiny_dir, media_dir, tmp_path_factory):
    """``setups(task)`` -> (flags of the tiny model set, dataset TOML with caches), made once."""
    made = {}

    def get(task: str):
        if task not in made:
            models = tiny_dir(task)
            work = tmp_path_factory.mktemp(f"train-{task}")
            toml = _make_caches(task, models, work, media_dir, images=task != "i2v-A14B")
            made[task] = (json.loads((models / "manifest.json").read_text())["flags"], toml)
        return made[task]

    return get


def _args(flags, toml, out: Path, *extra: str):
    return parse_config(train_argv(flags, out, *extra, dataset=toml, dim=8))


def _eval_loss(task, dit_path, lora_file, toml, lo, hi, n_draws=3) -> float:
    """Mean flow-matching loss over every cached batch with fixed noise/timesteps in [lo, hi);
    ``lora_file`` None: the base model."""
    from wanlora.dataset import TrainingDataset
    from wanlora.models import load_dit
    from wanlora.networks.lora_wan import create_network_from_weights

    dit = load_dit(dit_path, task=task)
    if lora_file is not None:
        net, sd = create_network_from_weights(1.0, lora_file, None, None, dit, for_inference=True)
        net.apply_to(None, dit)
        net.load_weights(sd)
    ds = TrainingDataset(toml, task=task, seed=0, shuffle=False)
    sampler = flow.TimestepDistribution("uniform")
    total = []
    with torch.no_grad():
        for i in range(len(ds)):
            for d in range(n_draws):
                g = torch.Generator().manual_seed(1000 * i + d)
                loss, _ = flow_matching_loss(lambda x, t, c, y, clip: dit(x, t, c, y), ds[i], sampler, lo, hi, g, "cpu",
                                             conditioning=ds.conditioning)
                total.append(loss.item())
    return sum(total) / len(total)


def _optimizer_state(state_dir: Path, lora_key: str) -> dict:
    from wanlora.training.state_io import load_state_file

    return load_state_file(state_dir / f"optimizer.{lora_key}.safetensors")["state"]


# ---- both experts -----------------------------------------------------------------------------


def test_t2v_a14b_both_experts_two_loras(setups, tmp_path):
    flags, toml = setups("t2v-A14B")
    out = tmp_path / "out"
    steps = 24
    args = _args(flags, toml, out, "--dit_high_noise", flags["--dit_high_noise"], "--max_train_steps", str(steps),
                 "--timestep_sampling", "uniform", "--timestep_boundary", "0.5", "--save_every_n_steps",
                 str(steps - 1), "--save_state", "--logging_dir", str(tmp_path / "logs"))
    state = train(args)
    experts = [x[1] for x in state.losses]
    assert len(experts) == steps and {"high_noise", "low_noise"} <= set(experts)
    # the expert of each step is the schedule's: P(high) = mass above the boundary (0.5 here)
    sched = ExpertSchedule(0.5, 1, 7)
    assert experts == [sched.expert_at(i) for i in range(steps)]

    # two files, one per expert, self-describing
    files = {e: out / f"lora_{e}.safetensors" for e in ("high_noise", "low_noise")}
    for e, (lo, hi) in (("high_noise", (500, 1000)), ("low_noise", (0, 500))):
        md = file_metadata(files[e])
        assert md["wan.task"] == "t2v-A14B" and md["wan.expert"] == e
        assert [float(x) for x in md["modelspec.timestep_range"].split(",")] == [lo, hi]
        assert md["ss_network_dim"] == "8" and float(md["ss_network_alpha"]) == 8
        assert md["wan.pair_file"] == files["low_noise" if e == "high_noise" else "high_noise"].name
        assert md["wan.base_model_hash"].startswith("quick-sha256:") and md["wan.run_steps"] == str(steps)
        # each expert file counts its own optimizer steps (musubi's ss_steps), not the run's
        assert md["ss_steps"] == str(experts.count(e)) and 0 < experts.count(e) < steps
        # the loss falls on the expert's own range (fixed noise and timesteps, base vs trained)
        dit = flags["--dit_high_noise"] if e == "high_noise" else flags["--dit"]
        before = _eval_loss("t2v-A14B", dit, None, toml, lo, hi)
        after = _eval_loss("t2v-A14B", dit, files[e], toml, lo, hi)
        assert after < 0.9 * before, (e, before, after)

    # only the last step's expert changed between the step-23 save and the final one: the other
    # LoRA's weights and its optimizer state are bit-identical
    active = experts[-1]
    inactive = "low_noise" if active == "high_noise" else "high_noise"
    prev = {e: load_file(out / f"lora-step{steps - 1:08d}_{e}.safetensors") for e in files}
    last = {e: load_file(files[e]) for e in files}
    assert all(torch.equal(prev[inactive][k], last[inactive][k]) for k in last[inactive])
    assert any(not torch.equal(prev[active][k], last[active][k]) for k in last[active])
    s_prev = _optimizer_state(out / f"lora-step{steps - 1:08d}-state", inactive)
    s_last = _optimizer_state(out / "lora-state", inactive)
    assert s_prev.keys() == s_last.keys()
    for k in s_prev:
        assert all(torch.equal(torch.as_tensor(s_prev[k][n]), torch.as_tensor(s_last[k][n])) for n in s_prev[k])
    # TensorBoard has a loss curve per expert
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_resume_continues_as_if_never_stopped(setups, tmp_path):
    flags, toml = setups("t2v-A14B")
    common = ["--dit_high_noise", flags["--dit_high_noise"], "--timestep_sampling", "uniform",
              "--timestep_boundary", "0.5", "--gradient_accumulation_steps", "2", "--max_train_steps", "8",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--network_dropout", "0.1"]
    full = train(_args(flags, toml, tmp_path / "a", *common, "--save_every_n_steps", "2", "--save_state",
                       "--save_last_n_steps", "4"))
    a = tmp_path / "a"
    # keep-last: saves at 2, 4, 6 -> the one at 2 is removed (older than 4 steps at step 6)
    assert not list(a.glob("lora-step00000002*")) and list(a.glob("lora-step00000006_*.safetensors"))
    assert (a / "lora-step00000004-state").is_dir() and not list(a.glob("*.tmp"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(_args(flags, toml, tmp_path / "b", *common, "--resume", str(a / "lora-step00000004-state")))
    assert [tuple(x) for x in resumed.losses] == [tuple(x) for x in full.losses]
    assert resumed.global_step == 8 and resumed.epoch == full.epoch
    for e in ("high_noise", "low_noise"):
        wa, wb = load_file(a / f"lora_{e}.safetensors"), load_file(tmp_path / "b" / f"lora_{e}.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), e
        # per-expert step counts survive the resume
        steps_e = sum(1 for x in full.losses if x[1] == e)
        assert file_metadata(tmp_path / "b" / f"lora_{e}.safetensors")["ss_steps"] == str(steps_e)


# ---- one expert, I2V; TI2V-5B -------------------------------------------------------------------


def test_i2v_a14b_one_expert_detected_from_path(setups, tmp_path, caplog):
    flags, toml = setups("i2v-A14B")
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="wanlora.train"):
        train(_args(flags, toml, out, "--max_train_steps", "16", "--timestep_sampling", "uniform"))
    assert "expert low_noise detected from the --dit path" in caplog.text
    (f,) = out.glob("*.safetensors")
    assert f.name == "lora.safetensors"  # one expert: no suffix
    md = file_metadata(f)
    assert md["wan.task"] == "i2v-A14B" and md["wan.expert"] == "low_noise"
    assert md["modelspec.timestep_range"] == "0,900"
    before = _eval_loss("i2v-A14B", flags["--dit"], None, toml, 0, 900)
    after = _eval_loss("i2v-A14B", flags["--dit"], f, toml, 0, 900)
    assert after < 0.9 * before, (before, after)


def test_ti2v_5b_image_to_video(setups, tmp_path):
    flags, toml = setups("ti2v-5B")
    out = tmp_path / "out"
    state = train(_args(flags, toml, out, "--max_train_steps", "16", "--ti2v_first_frame", "--timestep_sampling",
                        "uniform", "--gradient_checkpointing", "--optimizer_type", "adafactor"))
    assert state.global_step == 16
    md = file_metadata(out / "lora.safetensors")
    assert md["wan.task"] == "ti2v-5B" and md.get("wan.expert", "") in ("", "none")  # single model
    before = _eval_loss("ti2v-5B", flags["--dit"], None, toml, 0, 1000)
    after = _eval_loss("ti2v-5B", flags["--dit"], out / "lora.safetensors", toml, 0, 1000)
    assert after < 0.95 * before, (before, after)


# ---- non-finite losses --------------------------------------------------------------------------


_Batches = FixedBatches  # tests/fixed_batches.py


def test_nonfinite_loss_skips_the_step_then_stops_with_state(tiny_dir, tmp_path, caplog):
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    # one bad batch in four: skipped with a warning, training goes on, weights stay finite
    with caplog.at_level("WARNING", logger="wanlora.train"):
        st = train(_args(flags, "unused.toml", tmp_path / "a", "--expert", "low", "--max_train_steps", "6"),
                   dataset=_Batches(nan_at=(1,)))
    assert st.global_step == 6 and "non-finite loss" in caplog.text
    w = load_file(tmp_path / "a" / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    # every batch bad: stop at the read point that finds --max_nonfinite_steps skipped steps in a row
    # (every step with --log_every_n_steps 1), with the state saved and nothing trained: a skipped
    # step counts as a step (decided on the device, like torch.amp's skipped steps) but changes nothing
    with pytest.raises(NonFiniteLossError, match="state saved"):
        train(_args(flags, "unused.toml", tmp_path / "b", "--expert", "low", "--max_train_steps", "6",
                    "--max_nonfinite_steps", "3", "--log_every_n_steps", "1"), dataset=_Batches(nan_at=range(4)))
    folder = tmp_path / "b" / "lora-nonfinite-state"
    state = json.loads((folder / "train_state.json").read_text())
    assert state["global_step"] == 3 and state["nonfinite_in_row"] == 3 and state["losses"] == []
    lora = load_file(folder / "lora.low_noise.safetensors")
    ups = [v for k, v in lora.items() if "lora_up" in k]
    assert ups and all(torch.count_nonzero(v) == 0 for v in ups)  # as initialized: never updated
    assert all(torch.count_nonzero(v) == 0 for k, v in load_file(folder / "optimizer.low_noise.safetensors").items()
               if "exp_avg" in k or k.endswith("/step"))  # moments and step counts untouched too


# ---- two processes --------------------------------------------------------------------------------

_DDP_SCRIPT = r"""
import json, sys, torch
import torch.distributed as dist
torch.set_num_threads(1)
from wanlora.commands.train import parse_config
from wanlora.training.trainer import train
out, argv = sys.argv[1], sys.argv[2:]
rec = []
def probe(step, epoch, networks):
    sd = {f"{e}.{k}": v.detach().clone() for e, n in networks.items() for k, v in n.state_dict().items()}
    rec.append((step, sum(float(v.double().sum()) for v in sd.values()), sorted(sd)[0]))
    # compare with rank 0 through the process group: equal weights on every rank
    flat = torch.cat([v.flatten().double() for _, v in sorted(sd.items())])
    ref = flat.clone(); dist.broadcast(ref, 0)
    assert torch.equal(flat, ref), f"rank {dist.get_rank()}: LoRA weights differ from rank 0 at step {step}"
rank = int(__import__("os").environ["RANK"])
st = train(parse_config(argv), sample_fn=probe)
assert not dist.is_initialized()  # train() ends by destroying the process group it worked in
json.dump({"losses": st.losses, "probes": rec}, open(f"{out}/rank{rank}.json", "w"))
"""


def test_two_cpu_processes_torchrun(setups, tmp_path, free_port):
    flags, toml = setups("t2v-A14B")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "ddp_probe.py"
    script.write_text(_DDP_SCRIPT)
    argv = ["--task", "t2v-A14B", "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
            "--dataset_config", str(toml), "--output_dir", str(out), "--output_name", "lora",
            "--network_dim", "4", "--learning_rate", "5e-3", "--max_train_steps", "3",  # no --seed: rank 0's
            "--timestep_sampling", "uniform", "--timestep_boundary", "0.5", "--sample_every_n_steps", "1",
            "--max_data_loader_n_workers", "0", "--save_every_n_steps", "2", "--save_state"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(out), *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert len(ranks[0]["probes"]) == 3 and ranks[0]["probes"] == ranks[1]["probes"]
    # the two processes trained on different batches (the data is sharded), yet hold equal LoRAs
    assert [x[3] for x in ranks[0]["losses"]] != [x[3] for x in ranks[1]["losses"]]  # own batches
    assert [x[:3] for x in ranks[0]["losses"]] == [x[:3] for x in ranks[1]["losses"]]  # same experts, mean loss
    assert len({x[1] for x in ranks[0]["probes"]}) == 3  # the weights changed at every step
    # saved once: one file per expert and one state per save, no leftovers
    names = sorted(p.name for p in out.iterdir())
    assert names == ["lora-state", "lora-step00000002-state", "lora-step00000002_high_noise.safetensors",
                     "lora-step00000002_low_noise.safetensors", "lora_high_noise.safetensors",
                     "lora_low_noise.safetensors", "rank0.json", "rank1.json"], names
    st = json.loads((out / "lora-step00000002-state" / "train_state.json").read_text())
    assert st["global_step"] == 2


# ---- other layouts and precisions (synthetic batches, tiny model) --------------------------------


def test_shared_lora_bf16_offload_and_switch_every(tiny_dir, tmp_path):
    """--expert_lora shared: one file for both experts; bf16 autocast, bf16 saves, offloaded expert,
    experts drawn every 2 steps."""
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    st = train(_args(flags, "unused.toml", tmp_path, "--dit_high_noise", flags["--dit_high_noise"],
                     "--expert_lora", "shared", "--mixed_precision", "bf16", "--save_precision", "bf16",
                     "--offload_inactive_dit", "--expert_switch_every", "2", "--timestep_boundary", "0.5",
                     "--max_train_steps", "6", "--seed", "3"),  # a seed whose 3 draws give both experts
               dataset=_Batches())
    experts = [x[1] for x in st.losses]
    assert experts[0::2] == experts[1::2] and set(experts) == {"high_noise", "low_noise"}
    (f,) = tmp_path.glob("*.safetensors")
    assert f.name == "lora.safetensors" and file_metadata(f)["wan.expert"] == "both"
    w = load_file(f)
    assert all(v.dtype == torch.bfloat16 for k, v in w.items() if not k.endswith(".alpha"))


def test_flux_shift_trains_both_experts(tiny_dir, tmp_path):
    """flux_shift with both experts: each step's expert is drawn with the law's mass above the
    boundary at that batch's latent size (it used to fail on a law without a latent size)."""
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    st = train(_args(flags, "unused.toml", tmp_path, "--dit_high_noise", flags["--dit_high_noise"],
                     "--timestep_sampling", "flux_shift", "--max_train_steps", "8"), dataset=_Batches())
    p_high = flow.TimestepDistribution("flux_shift").with_latent_size(4, 4).mass(875, 1000)
    assert [x[1] for x in st.losses] == [ExpertSchedule(p_high, 1, 7).expert_at(i) for i in range(8)]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["lora_high_noise.safetensors",
                                                                      "lora_low_noise.safetensors"]


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    from wanlora.training.optim import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install"):
        build_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3)


def test_epoch_saves_keep_the_last_n(tiny_dir, tmp_path):
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    st = train(_args(flags, "unused.toml", tmp_path, "--expert", "low", "--max_train_epochs", "4",
                     "--save_every_n_epochs", "1", "--save_last_n_epochs", "2", "--save_state",
                     "--gradient_accumulation_steps", "3"), dataset=_Batches(n=4))
    assert st.global_step == 8 and st.epoch == 4  # 4 batches / 3 per step -> 2 steps per epoch
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["lora-000002-state", "lora-000002.safetensors", "lora-000003-state",
                     "lora-000003.safetensors", "lora-state", "lora.safetensors"], names


@pytest.mark.parametrize("expert", ["low", "high"])
def test_start_from_network_weights(tiny_dir, tmp_path, expert):
    """--network_weights (+ --dim_from_weights) loads a LoRA exactly: with lr 0 it comes back unchanged.
    Regression (high): --network_weights was ignored when the one expert trained is the high-noise one."""
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    train(_args(flags, "unused.toml", tmp_path / "a", "--expert", expert, "--max_train_steps", "2",
                "--network_dim", "4", "--network_alpha", "2"), dataset=_Batches())
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    first = tmp_path / "a" / "lora.safetensors"
    train(_args(flags, "unused.toml", tmp_path / "b", "--expert", expert, "--max_train_steps", "1",
                "--network_weights", str(first), "--dim_from_weights", "--learning_rate", "0"),
          dataset=_Batches())
    a, b = load_file(first), load_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)  # a trained, nonzero LoRA
    assert file_metadata(tmp_path / "b" / "lora.safetensors")["ss_network_dim"] == "4"


def test_sampling_during_training_leaves_the_weights_bit_identical(setups, tmp_path):
    """Samples at the first step and every 2 steps go to OUTPUT_DIR/sample/ named by step and
    prompt index, and the LoRAs end bit-identical to a run without sampling (the samplers draw
    from their own generator and restore every random state)."""
    flags, toml = setups("t2v-A14B")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red ball --w 32 --h 32 --f 5 --s 2 --d 1\n"
                       "a blue square --w 32 --h 32 --f 1 --s 2\n")
    common = ("--dit_high_noise", flags["--dit_high_noise"], "--max_train_steps", "4",
              "--timestep_boundary", "0.5", "--network_dropout", "0.1")
    plain = tmp_path / "plain"
    train(_args(flags, toml, plain, *common))
    sampled = tmp_path / "sampled"
    train(_args(flags, toml, sampled, *common, "--sample_prompts", str(prompts),
                "--sample_every_n_steps", "2", "--sample_at_first", "--vae", flags["--vae"],
                "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"], "--logging_dir", str(tmp_path / "tb")))
    # TensorBoard got every sample without moviepy: the video as an animated GIF, the image as PNG
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    ea = EventAccumulator(str(events.parent), size_guidance={"images": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("sample/00")] == [0, 2, 4] == [e.step for e in ea.Images("sample/01")]
    assert ea.Images("sample/00")[0].encoded_image_string[:6] == b"GIF89a"
    assert ea.Images("sample/01")[0].encoded_image_string[:4] == b"\x89PNG"
    for expert in ("high_noise", "low_noise"):
        a = load_file(plain / f"lora_{expert}.safetensors")
        b = load_file(sampled / f"lora_{expert}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    samples = sorted(p.name for p in (sampled / "sample").iterdir() if p.suffix in (".mp4", ".png"))
    steps = sorted({int(n.split("_")[1]) for n in samples})
    assert steps == [0, 2, 4], samples
    assert {n.split("_")[2] for n in samples} == {"00", "01"}
    assert not (plain / "sample").exists()


@pytest.mark.parametrize("extra, match", [
    (("--network_module", "networks.lora_wna"), "--network_module networks.lora_wna"),
    (("--optimizer_type", "adamww"), "--optimizer_type 'adamww'"),
    (("--lr_scheduler", "cosin"), "--lr_scheduler 'cosin'"),
    (("--network_args", "rank_dropout"), "--network_args: 'rank_dropout' is not key=value"),
    (("--weighting_scheme", "sigma_sqr"), "--weighting_scheme 'sigma_sqr'"),
    (("--sample_prompts", "PROMPTS"), "--sample_prompts needs --vae and --t5"),
    (("--sample_prompts", "PROMPTS", "--vae", "nope/Wan2.2_VAE.pth", "--t5", "T5"), "--vae nope/Wan2.2_VAE.pth: no such"),
    (("--sample_prompts", "BAD", "--vae", "T5", "--t5", "T5"), "bad.txt:1: unknown inline option --zz"),
])
def test_flag_typos_fail_before_any_dit_loads(tmp_path, extra, match):
    """Flags used only after the DiT load (minutes at 14B) are checked before it: no DiT, no dataset."""
    (tmp_path / "p.txt").write_text("a cat --w 64 --h 64 --f 5\n")
    (tmp_path / "bad.txt").write_text("a cat --zz 3\n")
    (tmp_path / "t5.pth").write_bytes(b"")
    extra = [{"PROMPTS": str(tmp_path / "p.txt"), "BAD": str(tmp_path / "bad.txt"),
              "T5": str(tmp_path / "t5.pth")}.get(x, x) for x in extra]

    def no_dit(*a, **k):
        raise AssertionError("the DiT was loaded before the flags were checked")

    args = _args({"--task": "ti2v-5B", "--dit": str(tmp_path / "dit.safetensors")}, tmp_path / "none.toml",
                 tmp_path / "out", *extra)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(match)):
        train(args, dataset=object(), load_dit=no_dit)


def test_epoch_samples_include_the_last_epoch(tiny_dir, tmp_path):
    """Regression: --sample_every_n_epochs never sampled after the last epoch."""
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    calls = []
    st = train(_args(flags, "unused.toml", tmp_path, "--expert", "low", "--max_train_epochs", "3",
                     "--sample_every_n_epochs", "1"), dataset=_Batches(n=2),
               sample_fn=lambda step, epoch, networks: calls.append((step, epoch)))
    assert st.global_step == 6 and st.epoch == 3
    assert calls == [(2, 1), (4, 2), (6, 3)]


_COUNTING_NETWORK = '''
from wanlora.networks import lora_wan

CALLS = []


def create_network(*args, **kwargs):
    net = lora_wan.create_network(*args, **kwargs)
    for hook in ("prepare_grad_etc", "on_epoch_start", "on_step_start"):
        original = getattr(net, hook)

        def record(*a, _hook=hook, _original=original):
            CALLS.append(_hook)
            return _original(*a)

        setattr(net, hook, record)
    return net
'''


def test_plug_in_network_hooks_are_called(tiny_dir, tmp_path, monkeypatch):
    """A plug-in network module (the kohya convention, as LyCORIS's) gets its training hooks:
    prepare_grad_etc once, on_epoch_start per epoch, on_step_start per micro-batch."""
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    (tmp_path / "counting_network.py").write_text(_COUNTING_NETWORK)
    monkeypatch.syspath_prepend(str(tmp_path))
    st = train(_args(flags, "unused.toml", tmp_path / "out", "--expert", "low", "--max_train_epochs", "2",
                     "--gradient_accumulation_steps", "2", "--network_module", "counting_network"),
               dataset=_Batches(n=4))
    import counting_network

    assert st.global_step == 4
    calls = counting_network.CALLS
    assert (calls.count("prepare_grad_etc"), calls.count("on_epoch_start"), calls.count("on_step_start")) == (1, 2, 8)
    assert calls[0] == "prepare_grad_etc" and calls[1] == "on_epoch_start"


def test_training_leaves_the_wanlora_log_level_as_it_was():
    """A non-main process logs warnings only while it trains; the level is restored afterwards."""
    import logging

    from wanlora.training.trainer import _only_warnings_unless

    logger = logging.getLogger("wanlora")
    before = logger.level
    with _only_warnings_unless(False):
        assert logger.level == logging.WARNING
    assert logger.level == before
    with _only_warnings_unless(True):
        assert logger.level == before


def test_ckpt_dir_trains_both_experts_and_records_the_files(tiny_dir, tmp_path):
    """--ckpt_dir fills --dit and --dit_high_noise (two LoRAs); each LoRA's metadata names the
    --ckpt_dir and the files it resolved to."""
    d = tiny_dir("t2v-A14B")
    config = parse_config(["--task", "t2v-A14B", "--ckpt_dir", str(d), "--dataset_config", "unused.toml",
                           "--output_dir", str(tmp_path), "--output_name", "lora", "--network_dim", "4",
                           "--seed", "7", "--max_data_loader_n_workers", "0", "--max_train_steps", "2"])
    train(config, dataset=_Batches())
    for expert in ("high_noise", "low_noise"):
        md = file_metadata(tmp_path / f"lora_{expert}.safetensors")
        assert md["wan.expert"] == expert and md["wan.ckpt_dir"] == str(d)
        assert md["wan.dit_high_noise"] == str(d / "high_noise_model") and md["wan.dit"] == str(d / "low_noise_model")

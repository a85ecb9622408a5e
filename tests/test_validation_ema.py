"""Validation loss and EMA of the LoRA weights: deterministic validation values, per expert for
A14B, falling as the LoRA trains on the same data; the EMA file equals the EMA formula applied
to the recorded per-step weights; resume continues the EMA exactly; [[validation_datasets]]
parsed and cached by the caching commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixed_batches import FixedBatches
from tiny_runs import file_metadata, train_argv
from wanlora.commands.train import parse_config
from wanlora.training.ema import LoraEMA, ema_decay_at
from wanlora.training.trainer import train
from wanlora.training.validation_loss import validation_timesteps


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


_Batches = FixedBatches  # tests/fixed_batches.py


def _flags(tiny_dir, task="t2v-A14B"):
    return json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]


def _args(flags, out: Path, *extra: str):
    return parse_config(train_argv(flags, out, *extra, lr="1e-2", seed=5))


# ---- validation loss ----------------------------------------------------------------------------


def test_validation_timesteps_are_evenly_spaced_inside_the_range():
    assert validation_timesteps(0, 1000, 4) == [200, 400, 600, 800]  # sd-scripts' 200, 400, 600, 800
    assert validation_timesteps(875, 1000, 4) == [900, 925, 950, 975]
    assert validation_timesteps(0, 875, 4) == [175, 350, 525, 700]
    with pytest.raises(ValueError, match="validation_timesteps"):
        validation_timesteps(0, 1000, 0)


def test_validation_loss_per_expert_deterministic_and_falling(tiny_dir, tmp_path, caplog):
    """Both A14B experts: each evaluated on its own range; the value at step 0 is the same in two
    runs (same weights), later values fall as the LoRAs train on the same batches, and the
    tracker gets val_loss per expert."""
    flags = _flags(tiny_dir)
    common = ["--dit_high_noise", flags["--dit_high_noise"], "--timestep_boundary", "0.5", "--max_train_steps", "12",
              "--validate_every_n_steps", "6"]
    seen = {}

    def run(name, seed):
        _reset_accelerate()
        from wanlora.training import validation_loss

        orig = validation_loss.ValidationLoss.evaluate

        def spy(self, step):
            out = orig(self, step)
            seen.setdefault(name, []).append((step, out))
            return out

        validation_loss.ValidationLoss.evaluate = spy
        try:
            with caplog.at_level("INFO", logger="wanlora.train"):
                train(_args(flags, tmp_path / name, *common, "--seed", str(seed), "--logging_dir",
                            str(tmp_path / f"logs-{name}")), dataset=_Batches(),
                      validation_dataset=_Batches())
        finally:
            validation_loss.ValidationLoss.evaluate = orig

    run("a", 5)
    run("b", 6)  # another run seed: another training, the same validation noise
    a, b = seen["a"], seen["b"]
    assert [s for s, _ in a] == [0, 6, 12]
    first = a[0][1]
    # boundary 500: high noise at 600, 700, 800, 900; low noise at 100, 200, 300, 400
    assert set(first) == {"val_loss", "val_loss/high_noise", "val_loss/low_noise",
                          *(f"val_loss/t{t}" for t in range(100, 1000, 100) if t != 500)}
    assert first == b[0][1]  # same (initial) weights, same value: the noise is fixed, not the run's
    assert first["val_loss"] == pytest.approx((first["val_loss/high_noise"] + first["val_loss/low_noise"]) / 2)
    for e in ("high_noise", "low_noise"):
        assert a[-1][1][f"val_loss/{e}"] < a[0][1][f"val_loss/{e}"], (e, a)
    assert "validation loss" in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "logs-a").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"val_loss", "val_loss/high_noise", "val_loss/low_noise"} <= set(tags)
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 6, 12]
    assert acc.Scalars("val_loss")[0].value == pytest.approx(first["val_loss"], rel=1e-6)


def test_validation_is_the_same_for_the_same_weights(tiny_dir, tmp_path):
    """Two evaluations of the same weights give the same number, with LoRA dropout on in training
    (validation runs without it) and whatever the random state between them."""
    flags = _flags(tiny_dir)
    from wanlora.training import validation_loss

    pairs = []
    orig = validation_loss.ValidationLoss.evaluate

    def twice(self, step):
        first = orig(self, step)
        torch.rand(7)  # the global random state moves: the value must not
        pairs.append((first, orig(self, step)))
        return first

    validation_loss.ValidationLoss.evaluate = twice
    try:
        train(_args(flags, tmp_path, "--expert", "low", "--max_train_steps", "4", "--validate_every_n_steps", "2",
                    "--network_dropout", "0.5"),
              dataset=_Batches(), validation_dataset=_Batches(n=3, seed=1))
    finally:
        validation_loss.ValidationLoss.evaluate = orig
    assert len(pairs) == 3 and all(a == b for a, b in pairs)
    assert pairs[0][0] != pairs[1][0]  # the weights moved between evaluations
    assert set(pairs[0][0]) == {"val_loss", "val_loss/t175", "val_loss/t350", "val_loss/t525", "val_loss/t700"}


@pytest.mark.parametrize("flags, steps", [
    ((), [0, 4, 8]),  # neither flag: every epoch (4 steps)
    (("--validate_every_n_epochs", "2"), [0, 8]),
    (("--validate_every_n_steps", "3"), [0, 3, 6]),
    (("--validate_every_n_steps", "3", "--validate_every_n_epochs", "1"), [0, 3, 4, 6, 8]),
])
def test_validation_schedule(tiny_dir, tmp_path, flags, steps):
    from wanlora.training import validation_loss

    seen = []
    orig = validation_loss.ValidationLoss.evaluate
    validation_loss.ValidationLoss.evaluate = lambda self, step: seen.append(step) or orig(self, step)
    try:
        train(_args(_flags(tiny_dir), tmp_path, "--expert", "low", "--max_train_steps", "8",
                    "--max_validation_steps", "1", *flags), dataset=_Batches(), validation_dataset=_Batches(n=2))
    finally:
        validation_loss.ValidationLoss.evaluate = orig
    assert seen == steps


# ---- EMA ---------------------------------------------------------------------------------------


def test_ema_decay_schedule():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 10**6) == 0.999 and ema_decay_at(0.9, 0, warmup=False) == 0.9
    with pytest.raises(ValueError, match="--ema_decay"):
        LoraEMA({}, 1.0)


def _record_weights(records):
    def probe(step, epoch, networks):
        records.append((step, {k: {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
                               for k, net in networks.items()}))
    return probe


def test_ema_file_is_the_formula_over_the_recorded_weights(tiny_dir, tmp_path):
    """Both experts, one LoRA each: each EMA follows its own expert's steps; the saved EMA files
    (final and per-step) equal e <- e*d_n + w*(1-d_n) over the weights recorded after every step,
    exactly in float32; the raw files stay the raw weights."""
    flags = _flags(tiny_dir)
    records = []
    out = tmp_path / "out"
    state = train(_args(flags, out, "--dit_high_noise", flags["--dit_high_noise"], "--timestep_boundary", "0.5",
                        "--max_train_steps", "8", "--ema_decay", "0.7", "--sample_every_n_steps", "1",
                        "--sample_at_first", "--save_every_n_steps", "4"),
                  dataset=_Batches(), sample_fn=_record_weights(records))
    experts = [x[1] for x in state.losses]
    assert set(experts) == {"high_noise", "low_noise"}
    assert [s for s, _ in records] == list(range(9))

    def expected(key, upto):
        e = {n: t.clone() for n, t in records[0][1][key].items()}
        n_upd = 0
        for step in range(1, upto + 1):
            if experts[step - 1] != key:
                continue
            d = ema_decay_at(0.7, n_upd, True)
            e = {n: e[n] * d + records[step][1][key][n] * (1 - d) for n in e}
            n_upd += 1
        return e, n_upd

    networks = None
    for tag, upto in (("lora-step00000004", 4), ("lora", 8)):
        for key in ("high_noise", "low_noise"):
            file = out / f"{tag}_ema_{key}.safetensors"
            raw = load_file(out / f"{tag}_{key}.safetensors")
            got = load_file(file)
            assert got.keys() == raw.keys()
            want, n_upd = expected(key, upto)
            # map parameter names to file keys through a network loaded with the EMA file
            if networks is None:
                from wanlora.models import load_dit
                from wanlora.networks.lora_wan import create_network

                dit = load_dit(flags["--dit"], task="t2v-A14B")
                networks = create_network(1.0, 4, 4, None, None, dit)
            networks.load_state_dict(got)
            params = dict(networks.named_parameters())
            for n, t in want.items():
                assert torch.equal(params[n].detach(), t), (tag, key, n)
            md = file_metadata(file)
            assert md["wan.ema_decay"] == "0.7" and md["wan.ema_updates"] == str(n_upd)
            other = "low_noise" if key == "high_noise" else "high_noise"
            assert md["wan.pair_file"] == f"{tag}_ema_{other}.safetensors"
            # the raw file holds the raw weights of that step
            networks.load_state_dict(raw)
            params = dict(networks.named_parameters())
            for n, t in records[upto][1][key].items():
                assert torch.equal(params[n].detach(), t)


def test_resume_continues_the_ema_exactly(tiny_dir, tmp_path):
    flags = _flags(tiny_dir)
    common = ["--dit_high_noise", flags["--dit_high_noise"], "--timestep_boundary", "0.5", "--max_train_steps", "8",
              "--ema_decay", "0.8", "--network_dropout", "0.1"]
    train(_args(flags, tmp_path / "a", *common, "--save_every_n_steps", "3", "--save_state"), dataset=_Batches())
    _reset_accelerate()
    train(_args(flags, tmp_path / "b", *common, "--resume", str(tmp_path / "a" / "lora-step00000003-state")),
          dataset=_Batches())
    for key in ("high_noise", "low_noise"):
        for kind in ("", "_ema"):
            wa = load_file(tmp_path / "a" / f"lora{kind}_{key}.safetensors")
            wb = load_file(tmp_path / "b" / f"lora{kind}_{key}.safetensors")
            assert all(torch.equal(wa[k], wb[k]) for k in wa), (kind, key)
        assert file_metadata(tmp_path / "a" / f"lora_ema_{key}.safetensors")["wan.ema_updates"] == \
            file_metadata(tmp_path / "b" / f"lora_ema_{key}.safetensors")["wan.ema_updates"]


def test_sample_with_ema_sees_the_ema_and_leaves_the_weights(tiny_dir, tmp_path):
    flags = _flags(tiny_dir)
    seen_ema, seen_raw = [], []
    train(_args(flags, tmp_path / "a", "--expert", "low", "--max_train_steps", "3", "--ema_decay", "0.5",
                "--sample_every_n_steps", "1", "--sample_with_ema"),
          dataset=_Batches(), sample_fn=_record_weights(seen_ema))
    _reset_accelerate()
    train(_args(flags, tmp_path / "b", "--expert", "low", "--max_train_steps", "3", "--ema_decay", "0.5",
                "--sample_every_n_steps", "1"), dataset=_Batches(), sample_fn=_record_weights(seen_raw))
    # the trained weights are the same with and without EMA samples (the swap is undone exactly)
    wa, wb = load_file(tmp_path / "a" / "lora.safetensors"), load_file(tmp_path / "b" / "lora.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = load_file(tmp_path / "a" / "lora_ema.safetensors")
    assert any(not torch.equal(ea[k], wa[k]) for k in wa)
    # what the EMA sampler saw at the last step is the EMA file
    from wanlora.models import load_dit
    from wanlora.networks.lora_wan import create_network

    net = create_network(1.0, 4, 4, None, None, load_dit(flags["--dit"], task="t2v-A14B"))
    net.load_state_dict(ea)
    params = dict(net.named_parameters())
    assert all(torch.equal(params[n].detach(), t) for n, t in seen_ema[-1][1]["low_noise"].items())
    assert any(not torch.equal(seen_raw[-1][1]["low_noise"][n], t) for n, t in seen_ema[-1][1]["low_noise"].items())


# ---- [[validation_datasets]] in the dataset TOML --------------------------------------------------


def _media_toml(work: Path, media_dir: Path, *, validation: bool = True, extra: str = "") -> Path:
    """Two photos train, two other photos validate (64x64), captions beside them."""
    import shutil

    folders = {"train": ("cat_sunglasses", "elf_portrait"), "held_out": ("street_portrait",)}
    for folder, stems in folders.items():
        (work / folder).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            (src,) = [p for p in media_dir.iterdir() if p.stem == stem and p.suffix in (".jpg", ".png")]
            shutil.copy(src, work / folder / src.name)
            shutil.copy(src.with_suffix(".txt"), work / folder / f"{stem}.txt")
    text = ('[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\n\n'
            '[[datasets]]\nimage_directory = "train"\ncache_directory = "cache/train"\n\n')
    if validation:
        text += f'[[validation_datasets]]\nimage_directory = "held_out"\ncache_directory = "cache/held_out"\n{extra}\n'
    (work / "dataset.toml").write_text(text)
    return work / "dataset.toml"


def test_validation_datasets_parse_with_the_same_keys(tmp_path, media_dir):
    from wanlora.dataset import DatasetConfigError, load_dataset_config

    toml = _media_toml(tmp_path, media_dir, extra="batch_size = 2\nnum_repeats = 1")
    group = load_dataset_config(toml, "t2v-A14B")
    (v,) = group.validation_datasets
    assert v.name == "validation_datasets[0]" and v.batch_size == 2 and v.resolution == (64, 64)
    assert group.datasets[0].name == "datasets[0]" and group.all_datasets == group.datasets + [v]
    assert group.validation().datasets == [v] and load_dataset_config(
        _media_toml(tmp_path / "b", media_dir, validation=False), "t2v-A14B").validation() is None
    # the checks of [[datasets]] apply, named by the validation entry; a cache folder is one entry's
    text = toml.read_text().replace('cache_directory = "cache/held_out"',
                                    'cache_directory = "cache/train"\nbatch_sise = 1')
    toml.write_text(text)
    with pytest.raises(DatasetConfigError) as e:
        load_dataset_config(toml, "t2v-A14B")
    msg = str(e.value)
    assert "validation_datasets[0].batch_sise: unknown key; did you mean 'batch_size'?" in msg
    assert "validation_datasets[0].cache_directory" in msg and "also used by datasets[0]" in msg


def test_validation_items_are_cached_and_validated_on(tiny_dir, media_dir, tmp_path, caplog):
    """The caching commands cache [[validation_datasets]]; training reports a missing validation
    cache with the command that makes it, then evaluates on the cached items."""
    from wanlora.commands import cache_latents, cache_text
    from wanlora.dataset import MissingCachesError

    flags = _flags(tiny_dir)
    toml = _media_toml(tmp_path, media_dir)
    latent_flags = ["--task", "t2v-A14B", "--dataset_config", str(toml), "--vae", flags["--vae"]]
    assert cache_latents.main(latent_flags) in (0, None)
    held_out = tmp_path / "cache" / "held_out"
    assert len(list(held_out.glob("street_portrait_*.safetensors"))) == 1
    args = parse_config(["--task", "t2v-A14B", "--dit", flags["--dit"], "--expert", "low", "--dataset_config",
                         str(toml), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "4", "--seed", "1",
                         "--max_data_loader_n_workers", "0", "--learning_rate", "1e-2", "--validate_every_n_steps",
                         "4"])
    text_flags = ["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"]]
    assert cache_text.main(text_flags) in (0, None)
    (held_out / "street_portrait_wan_te.safetensors").unlink()  # only the validation item lacks a cache
    with pytest.raises(MissingCachesError, match="wanlora-cache-text") as e:
        train(args, load_dit=lambda *a, **k: pytest.fail("the DiT must not load before the caches are checked"))
    assert "street_portrait" in str(e.value) and "cat_sunglasses" not in str(e.value)
    _reset_accelerate()
    assert cache_text.main(text_flags) in (0, None)
    assert (held_out / "street_portrait_wan_te.safetensors").is_file()
    with caplog.at_level("INFO", logger="wanlora.train"):
        train(args)
    lines = [r.getMessage() for r in caplog.records if "validation loss" in r.getMessage()]
    assert lines[0].startswith("validation loss on 1 batches at timesteps low_noise: 175, 350, 525, 700")
    assert [x.split(":")[0] for x in lines[1:]] == ["step 0", "step 4"]

    # the flag without [[validation_datasets]] fails before the DiT loads
    _reset_accelerate()
    toml.write_text(toml.read_text().split("[[validation_datasets]]")[0])
    with pytest.raises(ValueError, match=r"has no \[\[validation_datasets\]\]; add one"):
        train(args, load_dit=lambda *a, **k: pytest.fail("loaded the DiT"))


# ---- post-hoc EMA (wanlora-ema-lora) -----------------------------------------------------------


def _step_saves(folder: Path, steps, expert="high_noise", seed=0):
    """LoRA-like step files: random down/up per step, one alpha, ss_steps metadata."""
    from wanlora.io_utils import save_safetensors

    g = torch.Generator().manual_seed(seed)
    files, weights = [], []
    for s in steps:
        t = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 8, generator=g),
             "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(8, 4, generator=g),
             "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}
        f = folder / f"lora-step{s:08d}_{expert}.safetensors"
        save_safetensors(t, f, {"ss_steps": str(s), "wan.expert": expert, "wan.pair_file": "x"})
        files.append(f)
        weights.append(t)
    return files, weights


def _simulate(weights, steps, beta):
    """The EMA run step by step in float64 over the piecewise-constant weights (the weights of
    steps (s_{i-1}, s_i] are file i's; the start is file 0's): e <- beta(t) e + (1 - beta(t)) w_t."""
    e = {k: v.double().clone() for k, v in weights[0].items()}
    i = 0
    for t in range(1, steps[-1] + 1):
        while steps[i] < t:
            i += 1
        b = beta(t)
        e = {k: b * e[k] + (1 - b) * weights[i][k].double() for k in e}
    return e


@pytest.mark.parametrize("mode", ["decay", "sigma_rel"])
def test_posthoc_ema_equals_the_ema_run_step_by_step(tmp_path, mode, capsys):
    from wanlora.commands import ema_lora
    from wanlora.lora.posthoc_ema import sigma_rel_to_gamma

    steps = [3, 10, 17, 40]
    files, weights = _step_saves(tmp_path, steps)
    out = tmp_path / "ema.safetensors"
    value = "0.9" if mode == "decay" else "0.15"
    assert ema_lora.main(["--input", *map(str, reversed(files)), f"--{mode}", value, "--output", str(out)]) == 0
    if mode == "decay":
        beta = lambda t: 0.9  # noqa: E731
    else:
        gamma = sigma_rel_to_gamma(0.15)
        beta = lambda t: (1 - 1 / t) ** (gamma + 1)  # noqa: E731  (EDM2's power-function EMA)
    want = _simulate(weights, steps, beta)
    got = load_file(out)
    for k in want:
        assert torch.allclose(got[k].double(), want[k], rtol=0, atol=1e-6), k
    assert got["lora_unet_blocks_0_self_attn_q.alpha"].item() == 4.0
    md = file_metadata(out)
    rec = json.loads(md["wan.posthoc_ema"])
    assert rec["steps"] == steps and sum(rec["coefficients"]) == pytest.approx(1.0)
    assert md["wan.expert"] == "high_noise" and "wan.pair_file" not in md
    assert "step 40:" in capsys.readouterr().out


def test_posthoc_ema_parameters_and_refusals(tmp_path, capsys):
    from wanlora.commands import ema_lora
    from wanlora.lora.posthoc_ema import sigma_rel_to_gamma

    # EDM2's values: sigma_rel 0.05 -> gamma 16.97, 0.10 -> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    high, _ = _step_saves(tmp_path, [5, 10], "high_noise")
    low, _ = _step_saves(tmp_path, [5, 10], "low_noise", seed=1)
    out = str(tmp_path / "o.safetensors")
    cases = [
        ([*map(str, high), "--output", out], "exactly one of --decay"),
        ([*map(str, high), "--decay", "0.9", "--gamma", "7", "--output", out], "exactly one of --decay"),
        ([*map(str, high + low), "--decay", "0.9", "--output", out], "several experts"),
        ([str(high[0]), str(high[0]), "--decay", "0.9", "--output", out], "the same step 5"),
        ([str(high[0]), "--decay", "0.9", "--output", out], "two or more"),
        ([*map(str, high), "--decay", "1.5", "--output", out], "--decay 1.5"),
        ([*map(str, high), "--sigma_rel", "0.5", "--output", out], "--sigma_rel 0.5"),
    ]
    for argv, msg in cases:
        assert ema_lora.main(["--input", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv


# ---- two processes -------------------------------------------------------------------------------

_DDP_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from wanlora.commands.train import parse_config
from wanlora.training import validation_loss
from wanlora.training.trainer import train

class Batches:
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.b = [{"latents": torch.randn(1, 16, 2, 4, 4, generator=g), "context": [torch.randn(3, 32, generator=g)],
                   "keys": [str(i)]} for i in range(n)]
    def __len__(self):
        return len(self.b)
    def __getitem__(self, pos):
        return self.b[pos % len(self.b)]

out, argv = sys.argv[1], sys.argv[2:]
seen = []
orig = validation_loss.ValidationLoss.evaluate
def spy(self, step):
    r = orig(self, step)
    seen.append((step, r))
    return r
validation_loss.ValidationLoss.evaluate = spy
rank = int(__import__("os").environ["RANK"])
train(parse_config(argv), dataset=Batches(4, 0), validation_dataset=Batches(3, 1))
json.dump(seen, open(f"{out}/val{rank}.json", "w"))
"""


@pytest.mark.parametrize("layout", ["ddp", "ulysses", "fsdp"])
def test_validation_under_two_processes_equals_one(tiny_dir, tmp_path, layout, free_port):
    """torchrun, two CPU processes. DDP (both A14B experts, with EMA): the 3 validation batches are
    split 2 + 1 and the sums reduced; --ulysses_size 2: one sequence group evaluates all 3, its
    tokens split; --dit_fsdp: split 2 + 1 and the second rank runs an ignored third forward (the
    sharded DiT's collectives need every rank). Both ranks log the value one process computes on
    the same weights (step 0), and the same values as each other afterwards."""
    import os
    import subprocess
    import sys

    task = "t2v-A14B" if layout == "ddp" else "t2v-1.3B"
    flags = _flags(tiny_dir, task)
    base = ["--task", task, "--dit", flags["--dit"], "--dataset_config", "unused.toml", "--output_dir",
            str(tmp_path / "out"), "--network_dim", "4", "--learning_rate", "1e-2", "--seed", "3",
            "--max_train_steps", "2", "--validate_every_n_steps", "2", "--max_data_loader_n_workers", "0",
            "--ema_decay", "0.9"]
    experts = ["--dit_high_noise", flags["--dit_high_noise"], "--timestep_boundary", "0.5"] if layout == "ddp" else []
    parallel = {"ddp": [], "ulysses": ["--ulysses_size", "2"], "fsdp": ["--dit_fsdp"]}[layout]
    script = tmp_path / "probe.py"
    script.write_text(_DDP_SCRIPT)
    (tmp_path / "out").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    for _ in range(2):  # another process on this shared machine may take the free port first: once more
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                            "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path / "out"),
                            *base, *experts, *parallel], env=env, capture_output=True, text=True, timeout=300)
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"val{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1] and [s for s, _ in ranks[0]] == [0, 2]
    assert "val_loss_ema" in ranks[0][1][1]
    if layout == "ddp":
        assert "val_loss_ema/high_noise" in ranks[0][1][1]
    # one process, same initial weights and validation batches (the script's Batches are _Batches)
    from wanlora.training import validation_loss

    seen = []
    orig = validation_loss.ValidationLoss.evaluate
    validation_loss.ValidationLoss.evaluate = lambda self, step: seen.append(orig(self, step))
    try:
        one = [a if a != str(tmp_path / "out") else str(tmp_path / "one") for a in base + experts]
        train(parse_config(one), dataset=_Batches(4, 0), validation_dataset=_Batches(3, 1))
    finally:
        validation_loss.ValidationLoss.evaluate = orig
    rel = 1e-12 if layout == "ddp" else 1e-5  # split attention sums in another order
    for k, v in ranks[0][0][1].items():
        assert seen[0][k] == pytest.approx(v, rel=rel, abs=0), k


def test_preflight_checks_the_ema_and_validation_flags(tiny_dir, tmp_path):
    from wanlora.commands import preflight as P
    from wanlora.commands.train import parse_args

    flags = _flags(tiny_dir)
    base = ["--task", "t2v-A14B", "--dit", flags["--dit"], "--expert", "low", "--dataset_config", "d.toml",
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(P.PreflightError, match="--sample_with_ema needs --ema_decay"):
        P.preflight_train(parse_args(base + ["--sample_with_ema"]))
    with pytest.raises(P.PreflightError, match=r"--ema_decay 1.0: must be in \[0, 1\)"):
        P.preflight_train(parse_args(base + ["--ema_decay", "1.0"]))
    with pytest.raises(P.PreflightError, match="--validate_every_n_steps 0: must be at least 1"):
        P.preflight_train(parse_args(base + ["--validate_every_n_steps", "0"]))
    P.preflight_train(parse_args(base + ["--ema_decay", "0.999", "--sample_with_ema", "--validate_every_n_steps", "5"]))

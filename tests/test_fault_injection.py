"""Hostile inputs and failures, one test per case (the table in docs/troubleshooting.md §9).

Each case asserts what the user sees (one line, exit status 2 for a command), and that every
file written before the failure is intact. Disk-full is injected as ``OSError(ENOSPC)`` at the
write layer (``safetensors.torch.save_file`` as :mod:`wanlora.io_utils` calls it), and also met for
real on a small tmpfs when the tests run as root; a kill is a real ``SIGKILL`` of a child process
in the middle of a save; a malicious pickle is one whose ``__reduce__`` would create a marker file.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixed_batches import FixedBatches
from wanlora.io_utils import SaveError, save_files, save_safetensors
from wanlora.training.state_io import (StateError, read_state_dir, remove_interrupted_saves, write_state_dir)


class Planted:
    """A pickle that, when unpickled, creates ``marker`` (what a planted file would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _flags(tiny_dir, task="t2v-A14B") -> dict:
    return json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]


def _run(main, argv, capsys) -> tuple[int, str]:
    """Run a command's ``main(argv)`` in-process: (exit status, stderr)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


def _lora(path: Path, md: dict | None = None, bad: float | None = None) -> Path:
    sd = {}
    for i in range(2):
        sd[f"lora_unet_blocks_{i}_self_attn_q.lora_down.weight"] = torch.randn(4, 64) * 0.01
        sd[f"lora_unet_blocks_{i}_self_attn_q.lora_up.weight"] = torch.randn(64, 4) * 0.01
        sd[f"lora_unet_blocks_{i}_self_attn_q.alpha"] = torch.tensor(4.0)
    if bad is not None:
        sd["lora_unet_blocks_1_self_attn_q.lora_up.weight"][0, 0] = bad
    save_safetensors(sd, path, md or {"wan.task": "t2v-A14B"})
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- disk full ---------------------------------------------------------------------------------


def test_disk_full_while_saving_an_expert_pair_writes_both_elsewhere_or_neither(tmp_path, monkeypatch):
    """ENOSPC at the second file of a pair: neither file appears in the output folder (the earlier
    save there is intact), both are written to the emergency folder, and the message says where."""
    import wanlora.io_utils as io

    out, spare = tmp_path / "out", tmp_path / "spare"
    out.mkdir()
    spare.mkdir()
    _lora(out / "lora-step00000010_high_noise.safetensors")
    _lora(out / "lora-step00000010_low_noise.safetensors")
    before = _snapshot(out)
    real = io.save_file
    calls = []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if str(out) in str(filename) and len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io, "save_file", fills_up)
    pair = {out / f"lora_{e}.safetensors": (lambda p, e=e: _lora(p, {"wan.expert": e})) for e in ("high_noise", "low_noise")}
    with pytest.raises(SaveError) as ei:
        save_files(pair, "LoRA weights", fallback_dirs=[spare])
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"cannot save LoRA weights to {out}: no space left on the device")
    assert msg.endswith(f"saved to {spare} instead (lora_high_noise.safetensors, lora_low_noise.safetensors)")
    assert _snapshot(out) == before  # no half pair, no temporary file, the earlier save untouched
    assert {p.name for p in spare.iterdir()} == {"lora_high_noise.safetensors", "lora_low_noise.safetensors"}
    assert load_file(spare / "lora_low_noise.safetensors")  # whole files


def test_disk_full_for_real_on_a_small_tmpfs(mounted_tmpfs, tmp_path):
    """A real full disk (a 96 KiB tmpfs): the state save fails with the free-space line, leaves no
    ``-state.tmp`` folder, and the earlier state on that disk is still resumable."""
    disk = mounted_tmpfs(96)
    small = {"lora": {"w": torch.zeros(1024)}}  # 4 KiB
    write_state_dir(disk / "lora-step1-state", small, {"global_step": 1}, {"seed": 1})
    before = _snapshot(disk)
    big = {"lora": {"w": torch.zeros(64 * 1024)}}  # 256 KiB: does not fit
    with pytest.raises(SaveError) as ei:
        write_state_dir(disk / "lora-step2-state", big, {"global_step": 2}, {"seed": 1})
    assert str(ei.value).startswith(f"cannot save training state to {disk / 'lora-step2-state'}: no space left on "
                                    "the device: free space there")
    assert _snapshot(disk) == before and sorted(p.name for p in disk.iterdir()) == ["lora-step1-state"]
    position, comps, _ = read_state_dir(disk / "lora-step1-state", {"seed": 1})
    assert position == {"global_step": 1} and torch.equal(comps["lora"]["w"], small["lora"]["w"])


# ---- kill during save --------------------------------------------------------------------------

_KILL_DURING_STATE_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from wanlora.training import state_io
    real = state_io.save_safetensors
    def killed_after_the_first(tensors, path, metadata=None):
        real(tensors, path, metadata)
        if "optimizer" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    state_io.save_safetensors = killed_after_the_first
    comps = {"lora": {"w": torch.ones(8)}, "optimizer": {"m": torch.ones(8)}, "scheduler": {"n": 2}}
    state_io.write_state_dir(sys.argv[1], comps, {"global_step": 2}, {"seed": 1})
""")

_KILL_DURING_PAIR_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from wanlora.io_utils import save_files
    out = Path(sys.argv[1])
    def first(p):
        p.write_bytes(b"new high")
    def second(p):
        p.write_bytes(b"new l")
        os.kill(os.getpid(), signal.SIGKILL)
    save_files({out / "lora_high_noise.safetensors": first, out / "lora_low_noise.safetensors": second})
""")


def _killed(script: str, *argv) -> None:
    r = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def test_kill_during_a_state_save_keeps_the_previous_state_resumable(tmp_path):
    final = tmp_path / "lora-state"
    write_state_dir(final, {"lora": {"w": torch.zeros(8)}, "optimizer": {"m": torch.zeros(8)},
                            "scheduler": {"n": 1}}, {"global_step": 1}, {"seed": 1})
    before = _snapshot(final)
    _killed(_KILL_DURING_STATE_SAVE, final)
    assert _snapshot(final) == before  # the folder under the final name is the old, whole state
    assert (tmp_path / "lora-state.tmp").is_dir()  # what the kill left ...
    assert remove_interrupted_saves(tmp_path, "lora") == [tmp_path / "lora-state.tmp"]  # ... the next run removes
    position, comps, _ = read_state_dir(final, {"seed": 1})
    assert position == {"global_step": 1} and torch.equal(comps["lora"]["w"], torch.zeros(8))


def test_kill_during_an_expert_pair_save_leaves_the_earlier_pair(tmp_path):
    for e in ("high_noise", "low_noise"):
        (tmp_path / f"lora_{e}.safetensors").write_bytes(f"old {e}".encode())
    _killed(_KILL_DURING_PAIR_SAVE, tmp_path)
    assert (tmp_path / "lora_high_noise.safetensors").read_bytes() == b"old high_noise"
    assert (tmp_path / "lora_low_noise.safetensors").read_bytes() == b"old low_noise"
    leftovers = remove_interrupted_saves(tmp_path, "lora")
    assert len(leftovers) == 2 and all(p.name.startswith(".lora_") for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_high_noise.safetensors", "lora_low_noise.safetensors"]


# ---- malicious pickles -------------------------------------------------------------------------


@pytest.fixture
def evil_pth(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.weight": Planted(marker)}, path)
    yield path, marker
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.parametrize("loader", ["load_dit", "load_vae", "load_text_encoder", "load_state_dict"])
def test_malicious_pth_on_every_model_flag_is_refused_unrun(evil_pth, loader):
    from wanlora import models
    from wanlora.models.loading import load_state_dict

    path, _ = evil_pth
    fn = {"load_dit": lambda: models.load_dit(path, "t2v-A14B"), "load_vae": lambda: models.load_vae(path),
          "load_text_encoder": lambda: models.load_text_encoder(path, None),
          "load_state_dict": lambda: load_state_dict(path)}[loader]
    with pytest.raises(ValueError) as ei:
        fn()
    assert str(ei.value).startswith(f"{path}: refused: the file holds pickled Python objects (io.open)")
    assert "\n" not in str(ei.value)


def test_malicious_pth_given_to_merge_lora_is_refused_unrun(evil_pth, tmp_path, capsys):
    from wanlora.commands.merge_lora import main

    path, _ = evil_pth
    lora = _lora(tmp_path / "style.safetensors")
    rc, err = _run(main, ["--task", "t2v-1.3B", "--dit", str(path), "--lora_weight", str(lora),
                          "--save_merged_model", str(tmp_path / "m.safetensors")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"wanlora-merge-lora: error: {path}: refused: the file holds pickled Python objects")
    assert not (tmp_path / "m.safetensors").exists()


def test_malicious_pickle_planted_in_a_state_folder_is_refused_unrun(tmp_path):
    folder = write_state_dir(tmp_path / "lora-step00000004-state", {"lora": {"w": torch.zeros(2)}},
                             {"global_step": 4}, {"seed": 1})
    marker = tmp_path / "PWNED"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        with open(folder / name, "wb") as f:
            pickle.dump(Planted(marker), f)
    with pytest.raises(StateError, match="holds custom_checkpoint_0.pkl, random_states_0.pkl, which wanlora did not write"):
        read_state_dir(folder)
    assert not marker.exists()


# ---- silent wrong results ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_lora_is_refused_by_merge_and_convert(tiny_dir, tmp_path, capsys, value):
    from wanlora.commands.convert_lora import main as convert
    from wanlora.commands.merge_lora import main as merge

    lora = _lora(tmp_path / "diverged_low_noise.safetensors", {"wan.task": "t2v-A14B"}, bad=value)
    rc, err = _run(merge, ["--task", "t2v-A14B", "--dit", _flags(tiny_dir)["--dit"], "--lora_weight", str(lora),
                           "--save_merged_model", str(tmp_path / "m.safetensors")], capsys)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"{lora}: 1 of 6 tensors hold NaN or Inf values" in err and not (tmp_path / "m.safetensors").exists()
    rc, err = _run(convert, ["--input", str(lora), "--output", str(tmp_path / "c.safetensors")], capsys)
    assert rc == 2 and "hold NaN or Inf values" in err and not (tmp_path / "c.safetensors").exists()


def test_duplicate_jsonl_line_is_named_and_the_rest_is_cached(tiny_dir, tmp_path, capsys, media_dir):
    from wanlora.commands.cache_latents import main

    img = media_dir / "cat_sunglasses.jpg"
    lines = [json.dumps({"image_path": str(img), "caption": "a cat"}),
             json.dumps({"image_path": str(img), "caption": "a cat again"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.toml").write_text('[general]\nresolution = [64, 64]\n[[datasets]]\nimage_jsonl_file = "m.jsonl"\n'
                                     'cache_directory = "c"\n')
    rc = main(["--task", "t2v-A14B", "--dataset_config", str(tmp_path / "d.toml"), "--vae", _flags(tiny_dir)["--vae"],
               "--no_progress", "--num_workers", "0"])
    out = capsys.readouterr().out
    assert rc == 1  # some items failed: the summary lists them
    assert "2 item(s): 1 cache file(s) written" in out
    (failed,) = [line for line in out.splitlines() if "FAILED" in line]
    assert f"{tmp_path / 'm.jsonl'}:2: cat_sunglasses.jpg is listed again (first on line 1)" in failed
    # a second run: nothing is stale, nothing rewritten
    rc = main(["--task", "t2v-A14B", "--dataset_config", str(tmp_path / "d.toml"), "--vae", _flags(tiny_dir)["--vae"],
               "--no_progress", "--num_workers", "0"])
    assert "0 cache file(s) written, 1 skipped as up to date" in capsys.readouterr().out


# ---- checked before any model loads (commands) ----------------------------------------------------


def _no_model_loads(monkeypatch):
    """Make every model loader fail the test: what follows must be refused before loading."""
    from wanlora import models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the check")

    for name in ("load_dit", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(models, name, loaded)


def _generate_argv(flags, tmp_path, *extra):
    return ["--task", "t2v-A14B", "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
            "--vae", flags["--vae"], "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"],
            "--prompt", "a cat", "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2",
            "--save_path", str(tmp_path / "gen"), *extra]


def test_generate_refuses_wrong_vae_foreign_lora_nan_lora_and_unwritable_output_before_loading(
        tiny_dir, tmp_path, capsys, monkeypatch):
    from wanlora.commands.generate import main

    flags = _flags(tiny_dir)
    _no_model_loads(monkeypatch)
    vae22 = _flags(tiny_dir, "ti2v-5B")["--vae"]
    cases = {
        "wrong VAE": (["--vae", vae22], f"--vae {vae22} is the wan2.2 VAE but task t2v-A14B uses the wan2.1 VAE"),
        "LoRA of another task": (["--lora_weight", str(_lora(tmp_path / "ti2v.safetensors", {"wan.task": "ti2v-5B"}))],
                                 "refusing to apply: " + str(tmp_path / "ti2v.safetensors") + ": made for task ti2v-5B"),
        "NaN LoRA": (["--lora_weight", str(_lora(tmp_path / "nan.safetensors", bad=float("nan")))],
                     "1 of 6 tensors hold NaN or Inf values"),
    }
    (tmp_path / "file").write_text("x")
    cases["--save_path a file"] = (["--save_path", str(tmp_path / "file")],
                                   f"--save_path {tmp_path / 'file'}: is a file, not a folder")
    for name, (extra, expected) in cases.items():
        rc, err = _run(main, _generate_argv(flags, tmp_path, *extra), capsys)
        assert rc == 2 and err.count("\n") == 1 and expected in err, (name, err)
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").iterdir())


def test_read_only_output_is_refused_before_any_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    from wanlora.commands import preflight
    from wanlora.commands.generate import main as generate
    from wanlora.commands.merge_lora import main as merge

    flags = _flags(tiny_dir)
    _no_model_loads(monkeypatch)
    lora = _lora(tmp_path / "style_low_noise.safetensors")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)  # the probe write meets a read-only disk
    rc, err = _run(generate, _generate_argv(flags, tmp_path), capsys)
    assert rc == 2 and err == (f"wanlora-generate: error: --save_path {tmp_path / 'gen'}: cannot write there: the file "
                               "system is read-only: choose a folder on a writable disk\n")
    rc, err = _run(merge, ["--task", "t2v-A14B", "--dit", flags["--dit"], "--lora_weight", str(lora),
                           "--save_merged_model", str(tmp_path / "out" / "m.safetensors")], capsys)
    assert rc == 2 and "cannot write there: the file system is read-only" in err and err.count("\n") == 1


def test_caching_an_empty_dataset_is_an_error_not_success(tiny_dir, tmp_path, capsys):
    from wanlora.commands.cache_latents import main

    (tmp_path / "clips").mkdir()
    (tmp_path / "d.toml").write_text('[[datasets]]\nvideo_directory = "clips"\ncache_directory = "c"\n')
    rc, err = _run(main, ["--task", "t2v-A14B", "--dataset_config", str(tmp_path / "d.toml"),
                          "--vae", _flags(tiny_dir)["--vae"]], capsys)
    assert rc == 2 and "the dataset has no media files (video_directory" in err and err.count("\n") == 1


# ---- no traceback for a user error, on any command -------------------------------------------------

_COMMANDS = {"generate": "wanlora.commands.generate", "merge": "wanlora.commands.merge_lora",
             "convert": "wanlora.commands.convert_lora", "cache-latents": "wanlora.commands.cache_latents",
             "cache-text": "wanlora.commands.cache_text", "train": "wanlora.commands.train"}


def _hostile_cases(tmp: Path, tiny_dir) -> dict[str, tuple[str, list[str]]]:
    """``{case: (command, argv)}``: one bad input each, made in ``tmp``."""
    f = _flags(tiny_dir)
    evil = tmp / "evil.pth"
    torch.save({"w": Planted(tmp / "PWNED")}, evil)
    nan = _lora(tmp / "nan_low_noise.safetensors", bad=float("nan"))
    good = _lora(tmp / "ok_low_noise.safetensors")
    (tmp / "a_file").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "d.toml").write_text(f'[[datasets]]\nimage_directory = "{tmp / "empty"}"\ncache_directory = "{tmp / "c"}"\n')
    gen = ["--task", "t2v-A14B", "--dit", f["--dit"], "--dit_high_noise", f["--dit_high_noise"], "--vae", f["--vae"],
           "--t5", f["--t5"], "--t5_tokenizer", f["--t5_tokenizer"], "--prompt", "a cat", "--video_size", "32", "32",
           "--video_length", "5", "--infer_steps", "1", "--save_path", str(tmp / "gen")]
    merge = ["--task", "t2v-A14B", "--dit", f["--dit"], "--lora_weight", str(good),
             "--save_merged_model", str(tmp / "m.safetensors")]
    train = ["--task", "t2v-A14B", "--dit", f["--dit"], "--dataset_config", str(tmp / "d.toml"),
             "--max_data_loader_n_workers", "0", "--output_dir", str(tmp / "out")]
    return {
        "malicious .pth as --dit (merge)": ("merge", ["--task", "t2v-1.3B", "--dit", str(evil), "--lora_weight",
                                                      str(good), "--save_merged_model", str(tmp / "m2.safetensors")]),
        "malicious .pth as --t5 (generate)": ("generate", [*gen[:8], "--t5", str(evil), *gen[10:]]),
        "malicious .pth as --vae (cache-latents)": ("cache-latents", ["--task", "t2v-A14B", "--dataset_config",
                                                                       str(tmp / "d.toml"), "--vae", str(evil)]),
        "malicious .pth as --t5 (cache-text)": ("cache-text", ["--dataset_config", str(tmp / "d.toml"),
                                                                "--t5", str(evil), "--t5_tokenizer", f["--t5_tokenizer"]]),
        "NaN LoRA (merge)": ("merge", [*merge[:5], str(nan), *merge[6:]]),
        "NaN LoRA (convert)": ("convert", ["--input", str(nan), "--output", str(tmp / "c.safetensors")]),
        "NaN LoRA (generate)": ("generate", [*gen, "--lora_weight", str(nan)]),
        "--save_merged_model is a folder": ("merge", [*merge[:-1], str(tmp)]),
        "--save_path is a file": ("generate", [*gen[:-1], str(tmp / "a_file")]),
        "empty dataset (cache-latents)": ("cache-latents", ["--task", "t2v-A14B", "--dataset_config",
                                                             str(tmp / "d.toml"), "--vae", f["--vae"]]),
        "--gradient_accumulation_steps 0 (train)": ("train", [*train, "--gradient_accumulation_steps", "0"]),
        "--output_dir is a file (train)": ("train", [*train[:-1], str(tmp / "a_file")]),
    }


def test_no_command_prints_a_traceback_for_a_user_error(tiny_dir, tmp_path):
    """Every hostile case, as a user runs it (a fresh process): exit status 2, one line on stderr
    (``<command>: error: ...``), no ``Traceback``, and no planted code run."""
    cases = _hostile_cases(tmp_path, tiny_dir)
    driver = textwrap.dedent("""
        import importlib, io, json, sys, contextlib
        results = {}
        for name, (module, argv) in json.loads(sys.argv[1]).items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    rc = importlib.import_module(module).main(argv)
                except SystemExit as e:
                    rc = e.code
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    rc = "raised"
            results[name] = [rc, err.getvalue()]
        print(json.dumps(results))
    """)
    payload = json.dumps({k: (_COMMANDS[c], argv) for k, (c, argv) in cases.items()})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANLORA_TRACEBACK": "0"}
    r = subprocess.run([sys.executable, "-c", driver, payload], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {}
    for name, (rc, err) in results.items():
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
        if rc != 2 or "Traceback" in err or len(lines) != 1 or ": error: " not in lines[0]:
            bad[name] = (rc, err[-600:])
    assert not bad, json.dumps(bad, indent=1)
    assert not (tmp_path / "PWNED").exists()


def test_the_troubleshooting_table_names_real_tests():
    """docs/troubleshooting.md §9 lists the hostile cases; every test it names exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    table = doc[doc.index("## 9. Hostile inputs"):]
    named = re.findall(r"`(?:tests/(test_\w+)\.py::)?(test_\w+)`", table)
    assert len(named) >= 15
    for module, name in named:
        source = (root / "tests" / f"{module or 'test_fault_injection'}.py").read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"§9 names {module or 'test_fault_injection'}::{name}"


# ---- during training -----------------------------------------------------------------------------


_Batches = partial(FixedBatches, 2)  # tests/fixed_batches.py


def _train_config(flags, out: Path, *extra):
    from wanlora.commands.train import parse_config

    return parse_config(["--task", "t2v-A14B", "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
                         "--dataset_config", "unused.toml", "--output_dir", str(out), "--output_name", "lora",
                         "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--seed", "7",
                         "--max_data_loader_n_workers", "0", "--timestep_boundary", "0.5", *extra])


def test_disk_full_at_a_training_save_keeps_both_expert_loras_elsewhere(tiny_dir, tmp_path, monkeypatch,
                                                                        fresh_accelerate):
    """The final save of a two-expert run meets a full disk at its second file: the output folder keeps
    the earlier step save whole and gets no half pair; both LoRAs of the final weights are in the
    emergency folder; the run ends with one line saying so."""
    import wanlora.io_utils as io
    from wanlora.training.trainer import train

    out, spare = tmp_path / "out", tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setenv("WANLORA_EMERGENCY_DIR", str(spare))
    real = io.save_file

    def full_at_the_final_low_noise(tensors, filename, metadata=None):
        if str(out) in str(filename) and ".lora_low_noise.tmp" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io, "save_file", full_at_the_final_low_noise)
    with pytest.raises(SaveError) as ei:
        train(_train_config(_flags(tiny_dir), out, "--max_train_steps", "4", "--save_every_n_steps", "2"),
              dataset=_Batches())
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"cannot save LoRA weights to {out}: no space left on the device")
    assert msg.endswith(f"saved to {spare} instead (lora_high_noise.safetensors, lora_low_noise.safetensors)")
    assert sorted(p.name for p in out.iterdir()) == ["lora-step00000002_high_noise.safetensors",
                                                     "lora-step00000002_low_noise.safetensors"]
    for e in ("high_noise", "low_noise"):
        final, step2 = load_file(spare / f"lora_{e}.safetensors"), load_file(out / f"lora-step00000002_{e}.safetensors")
        assert final.keys() == step2.keys()


def test_resume_refuses_another_seed_rank_or_a_planted_file_before_the_dit_loads(tiny_dir, tmp_path, capsys,
                                                                                    monkeypatch, fresh_accelerate):
    from accelerate.state import AcceleratorState

    from wanlora.commands.train import main
    from wanlora.training.trainer import train

    flags = _flags(tiny_dir)
    train(_train_config(flags, tmp_path / "a", "--max_train_steps", "2", "--save_state"), dataset=_Batches())
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()  # the first run's progress bar
    state = tmp_path / "a" / "lora-state"
    before = _snapshot(state)
    _no_model_loads(monkeypatch)
    def argv(rank, seed):
        return ["--task", "t2v-A14B", "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
                "--dataset_config", str(tmp_path / "none.toml"), "--output_dir", str(tmp_path / "b"),
                "--network_dim", rank, "--network_alpha", "4", "--seed", seed, "--timestep_boundary", "0.5",
                "--resume", str(state)]

    rc, err = _run(main, argv("8", "8"), capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err == (f"wanlora-train: error: --resume {state}: the run differs from the saved one: seed 7 saved, 8 now; "
                   "rank of LoRA 'high_noise' 4 saved, 8 now; rank of LoRA 'low_noise' 4 saved, 8 now; resume with "
                   "the flags it was saved with, or start a new run\n")
    AcceleratorState._reset_state(reset_partial_state=True)
    marker = tmp_path / "PWNED"
    with open(state / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(Planted(marker), f)
    rc, err = _run(main, argv("4", "7"), capsys)
    assert rc == 2 and "holds custom_checkpoint_0.pkl, which wanlora did not write" in err and not marker.exists()
    os.remove(state / "custom_checkpoint_0.pkl")
    assert _snapshot(state) == before

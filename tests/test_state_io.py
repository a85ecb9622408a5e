"""The training state format: bit-exact round trips, nothing unpickled, foreign files and layout
changes refused in one line, no half state left by a failed save."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from wanlora.io_utils import SaveError
from wanlora.training import state_io
from wanlora.training.state_io import (StateError, decode_state, encode_state, read_state_dir, rng_state,
                                        set_rng_state, write_state_dir)


def _tiny_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Dropout(0.3), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 2))
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randn(4, 6)  # global torch RNG: the RNG state matters for resume
    loss = model(x).pow(2).mean() + float(np.random.rand()) + random.random() * 0
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _components(model, opt, sched):
    return {"lora": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}


def test_optimizer_and_scheduler_state_round_trip_bit_exact():
    model, opt, sched = _tiny_run()
    for _ in range(3):
        _step(model, opt, sched)
    sd = opt.state_dict()
    tree, tensors = encode_state(sd)
    json.dumps(tree)  # JSON-able
    back = decode_state(json.loads(json.dumps(tree)), tensors)
    assert list(back["state"]) == [0, 1, 2, 3]  # integer parameter ids stay integers
    assert back["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples stay tuples
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert v.dtype == back["state"][i][k].dtype and torch.equal(v, back["state"][i][k])
    assert decode_state(*encode_state(sched.state_dict())) == sched.state_dict()
    odd = {"nan": float("nan"), "inf": float("-inf"), "dtype": torch.bfloat16, "none": None,
           "bf": torch.ones(2, dtype=torch.bfloat16)}
    back = decode_state(*encode_state(odd))
    assert np.isnan(back["nan"]) and back["inf"] == float("-inf") and back["dtype"] is torch.bfloat16
    assert back["bf"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="state value /f is a function"):
        encode_state({"f": lambda: 0})


def test_rng_states_restore_the_same_draws():
    s = rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state_io.decode_state(*state_io.encode_state(s)))
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_resume_from_a_state_folder_is_bit_exact(tmp_path):
    layout = {"task": "t2v-A14B", "seed": 3, "loras": {"lora": {"rank": 5, "alpha": 5.0}}, "num_processes": 1}
    model, opt, sched = _tiny_run()
    model.train()
    for _ in range(6):
        _step(model, opt, sched)
    full = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = _tiny_run()
    for _ in range(3):
        _step(model, opt, sched)
    write_state_dir(tmp_path / "s", _components(model, opt, sched), {"global_step": 3}, layout)
    for _ in range(2):  # moves the RNGs on, as a finished run would
        torch.rand(5), np.random.rand(), random.random()

    model, opt, sched = _tiny_run(seed=99)
    position, comps, rng = read_state_dir(tmp_path / "s", layout)
    assert position == {"global_step": 3}
    model.load_state_dict(comps["lora"])
    opt.load_state_dict(comps["optimizer"])
    sched.load_state_dict(comps["scheduler"])
    set_rng_state(rng)
    for _ in range(3):
        _step(model, opt, sched)
    assert all(torch.equal(a, b) for a, b in zip(full, model.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    st = json.loads((tmp_path / "s" / "train_state.json").read_text())
    assert st["format"] == "wanlora-train-state/1" and st["global_step"] == 3
    assert sorted(st["files"]) == ["lora.safetensors", "optimizer.safetensors", "rng_0.safetensors",
                                   "scheduler.safetensors"]


class _Planted:
    """A pickle that, when loaded, writes a marker file (what a malicious state file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _saved(tmp_path):
    model, opt, sched = _tiny_run()
    return write_state_dir(tmp_path / "s", _components(model, opt, sched), {"global_step": 1},
                           {"seed": 1, "loras": {"lora": {"rank": 5, "alpha": 5.0}}})


def test_a_planted_pickle_is_refused_and_never_loaded(tmp_path):
    folder = _saved(tmp_path)
    marker = tmp_path / "PWNED"
    with open(folder / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Planted(marker), f)
    with pytest.raises(StateError) as e:
        read_state_dir(folder)
    msg = str(e.value)
    assert "\n" not in msg and "custom_checkpoint_0.pkl, which wanlora did not write" in msg
    assert not marker.exists()


def test_an_accelerate_pickle_state_is_refused(tmp_path):
    old = tmp_path / "old-state"
    old.mkdir()
    (old / "train_state.json").write_text(json.dumps({"global_step": 4, "seed": 1}))
    marker = tmp_path / "PWNED"
    with open(old / "random_states_0.pkl", "wb") as f:
        pickle.dump(_Planted(marker), f)
    with pytest.raises(StateError, match="older wanlora in accelerate's pickle format.*--network_weights"):
        read_state_dir(old)
    assert not marker.exists()


def test_a_changed_or_missing_file_is_refused(tmp_path):
    folder = _saved(tmp_path)
    with open(folder / "optimizer.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(StateError, match="optimizer.safetensors has .* bytes, .* when saved"):
        read_state_dir(folder)
    os.remove(folder / "optimizer.safetensors")
    with pytest.raises(StateError, match="optimizer.safetensors is missing"):
        read_state_dir(folder)
    with pytest.raises(StateError, match="no train_state.json there"):
        read_state_dir(tmp_path)


def test_a_resume_with_another_seed_rank_or_layout_says_what_differs(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(StateError) as e:
        read_state_dir(folder, {"seed": 2, "loras": {"lora": {"rank": 16, "alpha": 5.0}}})
    msg = str(e.value)
    assert "\n" not in msg
    assert "seed 1 saved, 2 now" in msg and "rank of LoRA 'lora' 5 saved, 16 now" in msg
    with pytest.raises(StateError, match=r"LoRAs \['lora'\] saved, \['high_noise', 'low_noise'\] now"):
        read_state_dir(folder, {"loras": {"high_noise": {"rank": 5}, "low_noise": {"rank": 5}}})
    read_state_dir(folder, {"seed": None, "loras": {"lora": {"rank": 5, "alpha": 5.0}}})  # no --seed: fine


def test_a_failed_state_save_leaves_no_tmp_folder_and_the_old_state(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = state_io.save_safetensors
    calls = []

    def disk_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata)

    monkeypatch.setattr(state_io, "save_safetensors", disk_full)
    model, opt, sched = _tiny_run()
    with pytest.raises(SaveError) as e:
        write_state_dir(folder, _components(model, opt, sched), {"global_step": 2}, {})
    assert str(e.value).startswith(f"cannot save training state to {folder}: no space left on the device: free space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no s.tmp
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_an_error_on_another_process_fails_the_save_on_every_process(tmp_path):
    """The ranks agree after each phase (``gather``): rank 1's failure makes rank 0 raise too,
    with rank 1's message, and remove the temporary folder — nobody waits for a dead rank."""
    seen = []

    def gather(err):  # rank 0's view of a 2-process run whose rank 1 failed writing its RNG file
        seen.append(err)
        return [err, "cannot save training state to X: no space left on the device" if len(seen) == 2 else None]

    with pytest.raises(SaveError, match="^cannot save training state to X: no space left on the device$"):
        write_state_dir(tmp_path / "s", {"lora": {"w": torch.zeros(1)}}, {}, {}, num_processes=2, gather=gather)
    assert seen == [None, None] and list(tmp_path.iterdir()) == []


def test_training_components_round_trip_with_the_accelerator_counter():
    from types import SimpleNamespace

    from wanlora.training.state_io import restore_training_components, training_components

    model, opt, sched = _tiny_run()
    _step(model, opt, sched)
    acc = SimpleNamespace(step=5, scaler=None)
    comps = decode_state(*encode_state(training_components({"high_noise": model}, {"high_noise": opt},
                                                           {"high_noise": sched}, acc)))
    assert sorted(comps) == ["accelerator", "lora.high_noise", "optimizer.high_noise", "scheduler.high_noise"]
    model2, opt2, sched2 = _tiny_run(seed=5)
    acc2 = SimpleNamespace(step=0, scaler=None)
    restore_training_components(comps, {"high_noise": model2}, {"high_noise": opt2}, {"high_noise": sched2}, acc2)
    assert acc2.step == 5 and sched2.state_dict() == sched.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    with pytest.raises(StateError, match="the state has no lora.low_noise"):
        restore_training_components(comps, {"low_noise": model2}, {"low_noise": opt2}, {"low_noise": sched2})

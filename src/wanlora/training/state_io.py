"""Training state on disk, without pickles: safetensors for tensors, JSON for everything else.

A state folder (``OUTPUT_DIR/NAME-stepXXXXXXXX-state``, written by ``--save_state``) holds:

* ``<component>.safetensors`` — one per saved state dict (a LoRA's weights, its optimizer, its
  learning-rate scheduler, the AMP grad scaler, ...): the dict's tensors as safetensors tensors,
  its structure and every non-tensor value as JSON in the header metadata (``wanlora.state``);
* ``rng_<process>.safetensors`` — each process's random number generator states (Python
  ``random``, NumPy, torch CPU and, when initialized, CUDA), the same encoding;
* ``train_state.json`` — written last: the loop's position (``global_step``, ``epoch``,
  ``batch_in_epoch``, ...), ``"format": "wanlora-train-state/1"``, the run's layout (task, seed,
  LoRAs with rank and alpha, expert mode, processes) and ``files``, every file of the folder with
  its size in bytes.

Reading opens safetensors (no code runs) and JSON only; nothing is unpickled. A folder that holds
a file ``train_state.json`` does not list — a planted ``custom_checkpoint_0.pkl``, accelerate's
``random_states_0.pkl`` of an older wanlora — is refused, as is a listed file whose size changed.
Resuming with a layout that differs from the saved one (another ``--seed``, rank, alpha, expert
layout or number of processes) is refused with one line naming every difference.

Folders are written to ``<final>.tmp`` and renamed into place (:func:`write_state_dir`); on a
failure the temporary folder is removed, so a full disk never keeps a half state filling it.
The same role as ``accelerate.Accelerator.save_state`` / ``load_state``, without their pickled
optimizer, scheduler and RNG files (unpickling a file can run code from it).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from wanlora.io_utils import SaveError, save_error, save_safetensors, write_json

__all__ = [
    "STATE_FORMAT",
    "STATE_JSON",
    "StateError",
    "encode_state",
    "decode_state",
    "save_state_file",
    "load_state_file",
    "rng_state",
    "set_rng_state",
    "layout_differences",
    "write_state_dir",
    "training_components",
    "restore_training_components",
    "check_state_dir",
    "read_state_dir",
    "remove_interrupted_saves",
]

STATE_FORMAT = "wanlora-train-state/1"
STATE_JSON = "train_state.json"
_META_KEY = "wanlora.state"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StateError(ValueError):
    """A state folder that cannot be resumed from: not ours, damaged, or saved by another layout."""


# ------------------------------------------------------------------------------------------
# encoding: any state dict -> (JSON tree, {name: tensor})


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a state dict into a JSON-able tree and its tensors.

    Scalars (``None``, ``bool``, ``int``, ``float`` including NaN/inf, ``str``) stay as they are;
    containers become one-key objects that keep their type: ``{"D": [[key, value], ...]}`` (a
    dict, keys of any scalar type, e.g. the optimizer's integer parameter ids), ``{"L": [...]}``
    (list), ``{"U": [...]}`` (tuple); a tensor becomes ``{"T": name}``, ``name`` its path in the
    tree, and is returned in the tensor dict with its dtype and shape unchanged (so a round trip is
    bit-exact). A ``torch.dtype`` becomes ``{"dtype": "float32"}``.

    Raises:
        TypeError: a value of another type (named with its path), which JSON cannot hold.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x, path: str):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach()
            return {"T": path}
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if isinstance(x, dict):
            return {"D": [[enc(k, f"{path}/k{i}"), enc(v, f"{path}/{k}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, (list, tuple)):
            items = [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
            return {"L": items} if isinstance(x, list) else {"U": items}
        if isinstance(x, np.generic):
            return x.item()
        raise TypeError(f"state value {path or '/'} is a {type(x).__name__}, which the state format "
                        "(tensors, numbers, strings, lists, tuples, dicts) cannot hold")

    return enc(obj, ""), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`.

    Raises:
        StateError: a tag it does not know or a tensor name missing from ``tensors``.
    """
    def dec(x):
        if not isinstance(x, dict):
            return x
        if len(x) != 1:
            raise StateError(f"state tree: an object with keys {sorted(x)} is not an encoded value")
        (tag, v), = x.items()
        if tag == "T":
            if v not in tensors:
                raise StateError(f"state tree names tensor {v!r}, which the file does not hold")
            return tensors[v]
        if tag == "D":
            return {dec(k): dec(val) for k, val in v}
        if tag == "L":
            return [dec(i) for i in v]
        if tag == "U":
            return tuple(dec(i) for i in v)
        if tag == "dtype":
            return getattr(torch, v)
        raise StateError(f"state tree: unknown tag {tag!r}")

    return dec(tree)


def save_state_file(path: str | os.PathLike, obj: Any) -> None:
    """Write a state dict as one ``.safetensors`` file (atomically, :func:`wanlora.io_utils.save_safetensors`):
    its tensors as tensors, its tree as JSON in the header metadata."""
    tree, tensors = encode_state(obj)
    save_safetensors(tensors, path, metadata={_META_KEY: json.dumps(tree)})


def load_state_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read a file of :func:`save_state_file` (safetensors only: nothing is unpickled).

    Raises:
        StateError: not a safetensors file, truncated, or not a state file.
    """
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise StateError(f"{path}: cannot read the state file ({e}); it is truncated or damaged") from None
    if _META_KEY not in meta:
        raise StateError(f"{path}: not a wanlora state file (no {_META_KEY} metadata)")
    return decode_state(json.loads(meta[_META_KEY]), tensors)


# ------------------------------------------------------------------------------------------
# random number generators


def rng_state() -> dict:
    """This process's generator states: ``python`` (``random.getstate()``), ``numpy`` (the legacy
    global ``np.random`` state, key array as int64), ``torch`` (CPU, uint8 tensor) and ``cuda``
    (one uint8 tensor per device, only when CUDA is initialized)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators of :func:`rng_state` (CUDA only when both sides have it and the
    device counts agree)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------
# layout


def layout_differences(saved: dict, current: dict) -> list[str]:
    """What differs between the layout a state was saved with and the run's, as phrases.

    Both are flat-ish dicts (``task``, ``seed``, ``mode``, ``num_processes``, ``loras`` =
    ``{lora key: {"rank": int, "alpha": float}}``); a key whose current value is None is not
    compared (e.g. no ``--seed`` given: the saved one is used).
    """
    out = []
    for key, now in current.items():
        if now is None or key not in saved:
            continue
        was = saved[key]
        if key == "loras" and isinstance(was, dict) and isinstance(now, dict):
            if sorted(was) != sorted(now):
                out.append(f"LoRAs {sorted(was) or ['-']} saved, {sorted(now) or ['-']} now")
                continue
            for name in sorted(now):
                for field in sorted(now[name]):
                    a, b = was[name].get(field), now[name][field]
                    if a is not None and b is not None and a != b:
                        out.append(f"{field} of LoRA {name!r} {a} saved, {b} now")
        elif was != now:
            out.append(f"{key} {was} saved, {now} now")
    return out


# ------------------------------------------------------------------------------------------
# folders


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name == Path(STATE_JSON).stem:
        raise ValueError(f"state component name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def write_state_dir(final: str | os.PathLike, components: dict[str, Any], position: dict, layout: dict, *,
                    process_index: int = 0, num_processes: int = 1, is_main: bool = True,
                    gather: Callable[[Any], list] | None = None) -> Path:
    """Write a state folder (module docstring) to ``<final>.tmp`` and rename it to ``final``.

    Args:
        final: the state folder to (re)place.
        components: ``{name: state dict}`` written by the main process as ``name.safetensors``
            (names of letters, digits, ``._-``; identical on every process under data parallelism).
        position: the loop's position, JSON-able (top level of ``train_state.json``).
        layout: what a resume must match (:func:`layout_differences`).
        process_index, num_processes, is_main: this process; every process writes its own
            ``rng_<process_index>.safetensors``.
        gather: with several processes, ``x -> [x of every process]`` (e.g.
            ``lambda x: accelerate.utils.gather_object([x])``); it is also the barrier, and it
            carries each process's error so that all of them raise together instead of waiting
            for one that failed.
    Returns:
        ``final``.
    Raises:
        SaveError: a write failed on any process (one line naming the folder, the cause and the
            fix); the temporary folder is removed and an earlier ``final`` is left as it was.
    """
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    gather = gather or (lambda x: [x])

    def step(fn) -> None:
        """Run ``fn`` (on this process), then agree: every process raises the first error of any."""
        err = None
        try:
            fn()
        except OSError as e:
            err = str(save_error(e, "training state", final))
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            err = f"cannot save training state to {final}: {type(e).__name__}: {e}"
        errors = [x for x in gather(err) if x]
        if errors:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SaveError(errors[0], final)

    def prepare():
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_files():
        save_state_file(tmp / f"rng_{process_index}.safetensors", rng_state())
        if is_main:
            for name, obj in components.items():
                save_state_file(tmp / f"{_check_name(name)}.safetensors", obj)

    def publish():  # every process's RNG file is in before train_state.json lists it
        if is_main:
            names = [f"{n}.safetensors" for n in components] + [f"rng_{i}.safetensors" for i in range(num_processes)]
            files = {n: (tmp / n).stat().st_size for n in names}
            write_json(tmp / STATE_JSON, {**position, "format": STATE_FORMAT, "layout": layout, "files": files})
            if final.exists():
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)

    try:
        step(prepare)
        step(write_files)
        step(publish)
    except BaseException:  # a kill signal, KeyboardInterrupt: no half folder left behind
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def training_components(networks: dict, optimizers: dict, schedulers: dict, accelerator=None) -> dict[str, Any]:
    """The state dicts a resume needs, named for :func:`write_state_dir`: per LoRA key ``k``
    ``lora.k`` (the network's weights, float32 as trained), ``optimizer.k``, ``scheduler.k``; and
    ``accelerator`` (its micro-batch counter ``step``, which places the gradient-accumulation
    window, and the fp16 grad scaler's state or None)."""
    comps: dict[str, Any] = {}
    for key in networks:
        comps[f"lora.{key}"] = networks[key].state_dict()
        comps[f"optimizer.{key}"] = optimizers[key].state_dict()
        comps[f"scheduler.{key}"] = schedulers[key].state_dict()
    if accelerator is not None:
        scaler = getattr(accelerator, "scaler", None)
        comps["accelerator"] = {"step": int(accelerator.step), "scaler": scaler.state_dict() if scaler else None}
    return comps


def restore_training_components(components: dict[str, Any], networks: dict, optimizers: dict, schedulers: dict,
                                accelerator=None) -> None:
    """Load the state dicts of :func:`training_components` back (strictly).

    Raises:
        StateError: a component the run needs is missing from the state.
    """
    for key in networks:
        for kind in ("lora", "optimizer", "scheduler"):
            if f"{kind}.{key}" not in components:
                raise StateError(f"the state has no {kind}.{key} (it holds {sorted(components)})")
        networks[key].load_state_dict(components[f"lora.{key}"])
        optimizers[key].load_state_dict(components[f"optimizer.{key}"])
        schedulers[key].load_state_dict(components[f"scheduler.{key}"])
    acc = components.get("accelerator")
    if accelerator is not None and acc is not None:
        accelerator.step = acc["step"]
        if acc.get("scaler") is not None and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(acc["scaler"])


def check_state_dir(folder: str | os.PathLike, layout: dict | None = None, *,
                    flag: str = "--resume") -> tuple[dict, dict, dict[str, int]]:
    """Check a folder of :func:`write_state_dir` without loading a tensor (cheap: run it before
    any model loads), refusing anything it did not write.

    Args:
        folder: the state folder.
        layout: the current run's layout; any difference from the saved one is refused
            (:func:`layout_differences`).
        flag: the flag named in messages.
    Returns:
        ``(position, saved layout, {file name: size})``; ``position`` is ``train_state.json``
        without ``format``, ``layout`` and ``files``.
    Raises:
        StateError: one line — no ``train_state.json``; a folder of the older pickle format; a file
            the folder should not hold; a listed file missing or of another size; a layout change.
    """
    folder = Path(folder)
    state_file = folder / STATE_JSON
    if not state_file.is_file():
        raise StateError(f"{flag} {folder}: no {STATE_JSON} there; give a folder written by --save_state "
                         "(OUTPUT_DIR/NAME-stepXXXXXXXX-state)")
    try:
        saved = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{flag} {folder}: {STATE_JSON} is not valid JSON ({e}); the state is damaged") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise StateError(
            f"{flag} {folder}: saved by an older wanlora in accelerate's pickle format, which can run code when "
            "loaded, so it is not resumed; start a new run from its LoRA with --network_weights instead")
    files = saved.pop("files", {})
    saved_layout = saved.pop("layout", {})
    saved.pop("format")
    foreign = sorted(p.name for p in folder.iterdir() if p.name != STATE_JSON and p.name not in files)
    if foreign:
        raise StateError(f"{flag} {folder}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                         "which wanlora did not write; a state folder is resumed only as saved — remove "
                         "the file(s) or resume from another save")
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            raise StateError(f"{flag} {folder}: {name} is missing; the state is incomplete — resume from another save")
        if p.stat().st_size != size:
            raise StateError(f"{flag} {folder}: {name} has {p.stat().st_size} bytes, {size} when saved; "
                             "the file was changed or truncated — resume from another save")
    if layout is not None:
        diff = layout_differences(saved_layout, layout)
        if diff:
            raise StateError(f"{flag} {folder}: the run differs from the saved one: {'; '.join(diff)}; resume "
                             "with the flags it was saved with, or start a new run")
    return saved, saved_layout, files


def read_state_dir(folder: str | os.PathLike, layout: dict | None = None, *, process_index: int = 0,
                   flag: str = "--resume") -> tuple[dict, dict[str, Any], dict | None]:
    """Check (:func:`check_state_dir`) and read a folder of :func:`write_state_dir`.

    Args:
        folder, layout, flag: as :func:`check_state_dir`.
        process_index: whose ``rng_<i>.safetensors`` to return (None when that file is absent:
            the run now has more processes — caught by the layout's ``num_processes``).
    Returns:
        ``(position, {component name: state dict}, rng state or None)``.
    Raises:
        StateError: as :func:`check_state_dir`; a file that is not a readable state file.
    """
    folder = Path(folder)
    position, _, files = check_state_dir(folder, layout, flag=flag)
    components = {}
    for name in files:
        stem = name.removesuffix(".safetensors")
        if not stem.startswith("rng_"):
            components[stem] = load_state_file(folder / name)
    rng_name = f"rng_{process_index}.safetensors"
    rng = load_state_file(folder / rng_name) if rng_name in files else None
    return position, components, rng


def remove_interrupted_saves(output_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Remove what a killed save of the run ``stem`` left in ``output_dir``: state folders'
    ``<tag>-state.tmp`` / ``<tag>-state.old`` and the temporary files of atomic writes
    (``.<name>.tmp.*``, :func:`wanlora.io_utils.atomic_path`) whose name starts with ``stem``.
    Complete saves are never touched. Returns the removed paths."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        n = p.name
        partial_state = p.is_dir() and n.startswith(stem) and n.endswith(("-state.tmp", "-state.old"))
        partial_file = p.is_file() and n.startswith(f".{stem}") and ".tmp." in n
        if partial_state or partial_file:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed

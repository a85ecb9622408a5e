"""Run configurations: frozen dataclasses whose fields are the commands' flags.

A command's settings are one frozen dataclass (grouped by concern into nested dataclasses), built
once by the command layer (:mod:`wanlora.commands.args`) from the command line and the TOML
``--config_file``, and passed down; library code reads these objects, never an argparse
``Namespace``.

Each leaf field is one flag of the same name (``--network_dim`` <-> ``network_dim``), declared
with :func:`option`: its default, its help text and, where needed, ``choices``, ``nargs``,
``aliases``, ``metavar``, ``const``, an argparse ``type`` (else taken from the annotation: ``int``,
``float``, ``str``, ``Path``, ``bool`` -> a ``--name`` / ``--no-name`` switch, ``tuple[X, ...]`` ->
a list). A field whose type is a dataclass is a group of flags (an argument group titled by the
field's ``title``).

**Adding a flag** is adding one field to the dataclass of its concern, e.g. in
:class:`wanlora.training.config.ModelConfig`::

    blocks_to_swap: int = option(0, "DiT blocks kept on the CPU and swapped in per step")

The parser, ``--help`` (with the default), the TOML key (with "did you mean" for typos) and the
config object all follow from that line; the code that uses it reads ``config.model.blocks_to_swap``.
A flag shared by several commands (model files, dtype, device, attention) is declared once here
(:class:`ModelFiles`, :func:`device_option`, :func:`attn_option`, :func:`dtype_option`) and
composed into each command's config.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from wanlora.tasks import task_names

__all__ = ["option", "group", "ModelFiles", "DTYPES", "DtypeError", "parse_dtype", "dtype_name", "default_device",
           "device_option", "attn_option", "dtype_option", "CompileOptions", "ulysses_option", "fsdp_option",
           "ParallelOptions"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices: Sequence | Callable[[], Sequence] | None = None,
           nargs: int | str | None = None, const: Any = None, metavar: str | tuple | None = None,
           aliases: Sequence[str] = (), type: Callable[[str], Any] | None = None,
           clears: Sequence[str] = (), repeatable: bool = False) -> Any:
    """A dataclass field that is also a command-line flag ``--<field name>`` (module docstring).

    Args:
        default: the built-in default (shown by ``--help``); a tuple for list flags.
        help: one line for ``--help``.
        choices: allowed values (or a function returning them, called when the parser is built).
        nargs, const, metavar: as ``argparse.add_argument``.
        aliases: further spellings (``--frame_num`` for ``--video_length``).
        type: argparse ``type`` converter; default: from the field's annotation.
        clears: flags whose config-file value this flag, given on the command line, sets back to
            its default (``--max_train_steps`` on the command line beats ``max_train_epochs`` from
            the file, which would otherwise override it).
        repeatable: a list flag that may also be given several times, each adding its values
            (:class:`wanlora.commands.args.Repeat`).
    """
    meta = {"help": help, "choices": choices, "nargs": nargs, "const": const, "metavar": metavar,
            "aliases": tuple(aliases), "type": type, "clears": tuple(clears), "repeatable": repeatable}
    return dataclasses.field(default=default, metadata={"cli": meta})


def group(cls: type, title: str, *, include: Sequence[str] | None = None,
          help: dict[str, str] | None = None, defaults: dict[str, Any] | None = None) -> Any:
    """A dataclass field holding a nested config ``cls``: its flags form the argument group
    ``title``. ``include`` keeps only those of ``cls``'s flags (the others stay at their
    defaults); ``help`` and ``defaults`` replace some flags' help text and command-line default
    for this command."""
    meta = {"title": title, "include": None if include is None else tuple(include), "help": dict(help or {}),
            "defaults": dict(defaults or {})}
    return dataclasses.field(default_factory=cls, metadata={"group": meta})


# ---- dtypes and devices: one map, one default ----------------------------------------------------

class DtypeError(ValueError, argparse.ArgumentTypeError):
    """An unknown dtype name (a ``ValueError`` for the library, an argparse type error on the
    command line)."""


DTYPES = {"fp32": "float32", "float32": "float32", "float": "float32",
          "fp16": "float16", "float16": "float16", "half": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def parse_dtype(name: str):
    """``"bf16"`` / ``"bfloat16"`` / ``"fp16"`` / ``"float16"`` / ``"fp32"`` / ``"float32"`` -> the
    ``torch.dtype`` (the one dtype map of every command; a ``torch.dtype`` passes through).

    Raises:
        DtypeError: any other name (lists the valid ones; argparse reports it as a flag error,
            the config-file reader as a ``ConfigFileError``).
    """
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise DtypeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[key])


parse_dtype.__name__ = "dtype"  # argparse names the type in its error messages


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the short name users type); None -> ``"default"``."""
    if dtype is None:
        return "default"
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    return short.get(str(dtype).removeprefix("torch."), str(dtype))


def default_device(device: str | None = None):
    """``torch.device(device)``, or CUDA when available else the CPU when ``device`` is None (the one
    device default of every command)."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_option(help: str = "where the models run: cuda, cuda:1, cpu (default: cuda when available, else cpu)") -> Any:
    """The ``--device`` field (``None``: :func:`default_device`)."""
    return option(None, help)


def attn_option(help: str = "attention kernel: sdpa (PyTorch picks), cudnn, flash (FlashAttention-2), flash3 "
                              "(FlashAttention-3), xformers, sage (SageAttention); torch = sdpa") -> Any:
    """The ``--attn_mode`` field: the attention kernel of :mod:`wanlora.models.attention`."""
    return option("sdpa", help)


def dtype_option(default=None, help: str = "dtype") -> Any:
    """A dtype field: names as :func:`parse_dtype` (``bf16``, ``float16``, ...), held as a
    ``torch.dtype`` (None: the command's policy, said in ``help``)."""
    return option(default, help, type=parse_dtype, metavar="{fp32,fp16,bf16}")


@dataclass(frozen=True)
class CompileOptions:
    """``--compile`` and its settings (musubi-tuner's flag names): regional compilation of the DiT,
    :meth:`wanlora.models.dit.WanDiT.compile_blocks` (each block compiled once, one graph reused by
    every block and every bucket shape)."""

    compile: bool = option(False, "torch.compile each DiT block (regional compilation; the first steps "
                           "compile, later ones run the fused kernels)")
    compile_backend: str = option("inductor", "torch.compile backend")
    compile_mode: str = option("default", "inductor mode", choices=(
        "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"))
    compile_dynamic: str = option("auto", "dynamic shapes: auto (the token count is symbolic: one graph for "
                                  "every bucket), true (every dimension), false (a graph per bucket shape)",
                                  choices=("auto", "true", "false"))
    compile_fullgraph: bool = option(False, "make a graph break inside a block an error")
    compile_cache_size_limit: int = option(32, "graphs torch.compile keeps per block before running it "
                                           "eagerly (dynamo's recompile_limit)")

    def kwargs(self) -> dict:
        """The keyword arguments of :meth:`~wanlora.models.dit.WanDiT.compile_blocks`."""
        return {"backend": self.compile_backend, "mode": self.compile_mode,
                "dynamic": {"auto": None, "true": True, "false": False}[self.compile_dynamic],
                "fullgraph": self.compile_fullgraph, "recompile_limit": self.compile_cache_size_limit}


@dataclass(frozen=True)
class ModelFiles:
    """The model files of a run (each command shows the ones it uses).

    Paths are strings as given: a file, a shard index ``.json`` or a folder (the loaders resolve
    them, :mod:`wanlora.models.loading`). ``ckpt_dir`` names the model once; the command layer
    fills the file flags a command needs from it before anything reads them
    (:meth:`wanlora.commands.args.CommandLine.parse_namespace`).
    """

    task: str | None = option(None, "which Wan model", choices=task_names)
    ckpt_dir: str | None = option(None, "the model by name: an official or diffusers folder, or a Hugging Face "
                                  "repo id (Wan-AI/Wan2.2-T2V-A14B); fills every model-file flag not given "
                                  "(docs/models.md)")
    dit: str | None = option(None, "DiT checkpoint: a file, a shard index .json or a folder; the "
                             "low-noise expert for the A14B tasks")
    dit_high_noise: str | None = option(None, "A14B: the high-noise expert's checkpoint")
    vae: str | None = option(None, "Wan2.1_VAE.pth (t2v/i2v tasks) or Wan2.2_VAE.pth (ti2v-5B)")
    t5: str | None = option(None, "umT5 encoder checkpoint (models_t5_umt5-xxl-enc-bf16.pth)")
    t5_tokenizer: str | None = option(None, "umT5 tokenizer folder (google/umt5-xxl); default: "
                                      "beside --t5, then the Hugging Face cache")
    clip: str | None = option(None, "CLIP image encoder of i2v-14B / flf2v-14B: "
                              "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors")

    def metadata(self) -> dict[str, str]:
        """``wan.ckpt_dir`` and ``wan.<flag>`` per model file set (after ``--ckpt_dir`` filled
        them), for a run's metadata; ``{}`` without ``--ckpt_dir``."""
        if not self.ckpt_dir:
            return {}
        out = {"wan.ckpt_dir": str(self.ckpt_dir)}
        for name in ("dit", "dit_high_noise", "vae", "t5", "t5_tokenizer", "clip"):
            if getattr(self, name):
                out[f"wan.{name}"] = str(getattr(self, name))
        return out


def ulysses_option() -> Any:
    """The ``--ulysses_size`` field (the official ``generate.py`` flag): ranks per sequence group."""
    return option(1, "sequence parallelism (Ulysses): processes that split each sample's tokens; must divide "
                  "the process count and the DiT's attention heads (docs/distributed.md)")


def fsdp_option() -> Any:
    """The ``--dit_fsdp`` field (the official ``generate.py`` flag): FSDP2 shards of the frozen DiT."""
    return option(False, "shard the frozen DiT's weights over all processes with FSDP2 (docs/distributed.md)")


@dataclass(frozen=True)
class ParallelOptions:
    """How the DiT spreads over the processes of a ``torchrun`` / ``accelerate launch`` run
    (:mod:`wanlora.models.distributed`, ``docs/distributed.md``)."""

    ulysses_size: int = ulysses_option()
    dit_fsdp: bool = fsdp_option()

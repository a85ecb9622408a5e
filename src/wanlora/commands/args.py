"""The command layer every ``wanlora-*`` command shares: run config -> parser -> run config.

A command describes its settings as one frozen dataclass (:mod:`wanlora.run_config`; training's is
:class:`wanlora.training.config.TrainConfig`) and builds its command line with
:class:`CommandLine`::

    cl = CommandLine("wanlora-cache-text", __doc__, CacheTextConfig)
    config = cl.parse(argv, required=("dataset_config", "t5"))   # a CacheTextConfig
    setup_logging(config_verbose)

What every command gets from here, declared once:

* ``--config_file FILE``: a TOML file with any of the command's flags (key = flag name without the
  dashes; keys may sit at the top level or inside ``[tables]``, which only group them). The command
  line wins over the file, the file over the built-in defaults. A key that names no flag is an
  error naming the key, the file and the closest flags ("did you mean"); so is a value of the wrong
  kind. Booleans are TOML ``true``/``false``.
* every boolean flag as a switch with a negative form: ``--sample_at_first`` / ``--no-sample_at_first``
  (a ``no_X`` flag's positive form is ``--X``), so a switch set in a file can be turned off on the
  command line.
* ``--verbose`` (debug logging) and one logging set-up (:func:`setup_logging`).
* ``--help`` that shows every default.
* required flags checked after the file is merged (``missing --dit (on the command line or in
  --config_file)``).

To add a flag, add a field (see :mod:`wanlora.run_config`); nothing here changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from wanlora.commands.musubi import add_musubi_spellings
from wanlora.run_config import dtype_name

__all__ = ["CommandLine", "ConfigFileError", "Switch", "Repeat", "setup_logging", "config_from_namespace"]


class ConfigFileError(ValueError):
    """A ``--config_file`` that cannot be used (unknown key, wrong type, unreadable TOML)."""


class Switch(argparse.Action):
    """A boolean flag with a negative form: ``--name`` sets True, ``--no-name`` False; for a field
    named ``no_X`` the pair is ``--no_X`` (True) / ``--X`` (False)."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        self.negatives = []
        for opt in list(option_strings):
            name = opt[2:]
            self.negatives.append("--" + name[3:] if name.startswith("no_") else "--no-" + name)
        super().__init__(option_strings + self.negatives, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class Repeat(argparse.Action):
    """A list flag that may be given several times (``--sample_lora a.safetensors --sample_lora
    b.safetensors:0.5``) or with several values: its first occurrence on a command line replaces the
    default (or the ``--config_file`` value, as every flag does), later ones add to it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self._namespace = None  # the namespace this parse writes to

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or []) if namespace is self._namespace else []
        self._namespace = namespace
        setattr(namespace, self.dest, items + list(values))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default (also ``None`` and ``False``)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "(default" not in h and action.default is not argparse.SUPPRESS and action.option_strings \
                and action.dest not in ("help", "config_file"):
            d = action.default
            shown = dtype_name(d) if type(d).__name__ == "dtype" else " ".join(map(str, d)) if isinstance(
                d, (list, tuple)) and d else "[]" if isinstance(d, (list, tuple)) else d
            h += f" (default: {shown})".replace("%", "%%")
        return h


# ---- dataclass fields -> argparse ------------------------------------------------------------------

_NO_OVERRIDE = object()

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_group(f: dataclasses.Field) -> bool:
    return "group" in f.metadata


def _leaf_fields(cls, include=None):
    """``[(field, type)]`` of ``cls``'s flags (``include``: only those names)."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "cli" in f.metadata and (include is None or f.name in include):
            out.append((f, hints[f.name]))
    return out


def _add_field(target, f: dataclasses.Field, tp, help_override: str | None, default=_NO_OVERRIDE) -> None:
    meta = f.metadata["cli"]
    kind = _unwrap_optional(tp)
    default = f.default if default is _NO_OVERRIDE else default
    kw: dict[str, Any] = {"dest": f.name, "help": help_override or meta["help"], "default": default}
    flags = [f"--{f.name}", *meta["aliases"]]
    if kind is bool:
        target.add_argument(*flags, action=Switch, default=default, help=kw["help"])
        return
    conv = meta["type"]
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        kw["nargs"] = meta["nargs"] or "*"
        conv = conv or (None if item is str else item)
    else:
        conv = conv or (None if kind is str else kind)
        if meta["nargs"] is not None:
            kw["nargs"] = meta["nargs"]
    if conv is not None:
        kw["type"] = conv
    choices = meta["choices"]
    if callable(choices):
        choices = list(choices())
    if choices is not None:
        kw["choices"] = choices
    if meta["const"] is not None:
        kw["const"] = meta["const"]
    if meta["metavar"] is not None:
        kw["metavar"] = meta["metavar"]
    if meta.get("repeatable"):
        kw["action"] = Repeat
    target.add_argument(*flags, **kw)


def _add_config(parser: argparse.ArgumentParser, cls, title: str | None, include=None, helps=None,
                defaults=None) -> None:
    """Add the flags of config class ``cls`` (recursing into its groups) to ``parser``."""
    leaves = _leaf_fields(cls, include)
    if leaves:
        target = parser.add_argument_group(title) if title else parser
        for f, tp in leaves:
            _add_field(target, f, tp, (helps or {}).get(f.name), (defaults or {}).get(f.name, _NO_OVERRIDE))
    for f in dataclasses.fields(cls):
        if _is_group(f):
            g = f.metadata["group"]
            _add_config(parser, _hints(cls)[f.name], g["title"], g["include"], g["help"], g["defaults"])


def config_from_namespace(cls, ns: argparse.Namespace):
    """Build the frozen config ``cls`` from a parsed namespace (fields by name, lists -> tuples;
    a field the parser does not have keeps its default)."""
    hints = _hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if _is_group(f):
            kw[f.name] = config_from_namespace(hints[f.name], ns)
        elif hasattr(ns, f.name):
            v = getattr(ns, f.name)
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def _clears(cls) -> dict[str, tuple]:
    """``{flag: flags its command-line value clears}`` over ``cls`` and its groups."""
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_group(f):
            out.update(_clears(hints[f.name]))
        elif "cli" in f.metadata and f.metadata["cli"]["clears"]:
            out[f.name] = f.metadata["cli"]["clears"]
    return out


# ---- the command line ------------------------------------------------------------------------------

class CommandLine:
    """The parser of one command, built from its config class ``cls`` (module docstring).

    Args:
        prog: the console script name (``wanlora-train``).
        description: the first paragraph is shown by ``--help``.
        cls: the command's frozen config dataclass.
        title: argument-group title for ``cls``'s own (ungrouped) flags.
    """

    def __init__(self, prog: str, description: str, cls, title: str | None = None):
        self.prog, self.cls = prog, cls
        p = argparse.ArgumentParser(prog=prog, description=(description or "").strip().split("\n\n")[0],
                                    formatter_class=_HelpFormatter)
        p.add_argument("--config_file", type=Path,
                       help="TOML file with any of these flags (key = flag name; the command line wins)")
        p.add_argument("--verbose", action=Switch, default=False, help="debug logging")
        _add_config(p, cls, title)
        add_musubi_spellings(p, prog)  # --sdpa, ... (wanlora.commands.musubi)
        self.parser = p
        self.clears = _clears(cls)

    def error(self, message: str) -> typing.NoReturn:
        """Exit with argparse's usage + ``prog: error: message`` (status 2)."""
        self.parser.error(message)

    def explicit(self, argv: Sequence[str] | None) -> set[str]:
        """The destinations given on the command line itself (not defaults, not the file)."""
        saved = [(a, a.default) for a in self.parser._actions]
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        try:
            ns, _ = self.parser.parse_known_args(argv)
        finally:
            for a, d in saved:
                a.default = d
        return set(vars(ns))

    def parse_namespace(self, argv: Sequence[str] | None = None,
                        required: Sequence[str] = (), ckpt_groups=None) -> argparse.Namespace:
        """Parse ``argv`` over ``--config_file`` over the defaults (module docstring), then fill
        the model-file flags from ``--ckpt_dir`` (:meth:`apply_ckpt_dir`).

        Args:
            ckpt_groups: ``ns -> groups`` (``dit``, ``vae``, ``t5``) the command needs from a
                ``--ckpt_dir``; default: those whose flags the command has.

        Raises:
            SystemExit: argparse errors and missing ``required`` flags (status 2).
            ConfigFileError: see :meth:`load_config_file`.
            ValueError: a ``--ckpt_dir`` that cannot give the files (one line, with the fix).
        """
        pre, _ = self.parser.parse_known_args(argv)
        file_values = {}
        if pre.config_file is not None:
            file_values = self.load_config_file(pre.config_file)
            explicit = self.explicit(argv)
            for flag, cleared in self.clears.items():
                if flag in explicit:
                    for c in cleared:
                        if c not in explicit:
                            file_values.pop(c, None)
        old = {k: self.parser.get_default(k) for k in file_values}
        self.parser.set_defaults(**file_values)
        try:
            ns = self.parser.parse_args(argv)
        finally:
            self.parser.set_defaults(**old)
        self.apply_ckpt_dir(ns, ckpt_groups(ns) if ckpt_groups is not None else None)
        missing = [f"--{k}" for k in required if getattr(ns, k, None) is None]
        if missing:
            self.error(f"missing {', '.join(missing)} (on the command line or in --config_file)")
        return ns

    def apply_ckpt_dir(self, ns: argparse.Namespace, groups=None) -> None:
        """Fill ``ns``'s empty model-file flags from ``ns.ckpt_dir`` (a folder or Hugging Face repo id,
        :func:`wanlora.models.checkpoints.fill_flags`) and print what each resolved to (stderr).

        ``groups`` defaults to the model files this command has flags for; an ``expert`` flag, when
        the command has one and it is set, keeps that A14B expert's DiT in ``--dit``. Flags given
        explicitly win. Nothing happens without ``--ckpt_dir``.

        Raises:
            ValueError: ``--ckpt_dir`` without ``--task``; what :func:`fill_flags` raises.
        """
        if not getattr(ns, "ckpt_dir", None):
            return
        if not getattr(ns, "task", None):
            raise ValueError("--ckpt_dir needs --task (it says which model's files to take from "
                             f"{ns.ckpt_dir})")
        from wanlora.models.checkpoints import fill_flags

        given = {k: getattr(ns, k) for k in ("dit", "dit_high_noise", "vae", "t5", "t5_tokenizer", "clip")
                 if hasattr(ns, k)}
        if groups is None:
            groups = [g for g, flags in (("dit", ("dit",)), ("vae", ("vae",)), ("t5", ("t5", "t5_tokenizer")),
                                         ("clip", ("clip",))) if any(f in given for f in flags)]
        values, resolved = fill_flags(ns.ckpt_dir, ns.task, given, groups, expert=getattr(ns, "expert", None))
        for k, v in values.items():
            setattr(ns, k, v)
        if resolved is not None:
            import sys

            print(f"{self.prog}: {resolved.describe()}", file=sys.stderr, flush=True)

    def parse(self, argv: Sequence[str] | None = None, required: Sequence[str] = ()):
        """:meth:`parse_namespace`, then the frozen config (``self.cls``)."""
        return config_from_namespace(self.cls, self.parse_namespace(argv, required))

    def load_config_file(self, path: Path) -> dict:
        """Read a TOML file into ``{dest: value}``, checked against this command's flags.

        Tables only group keys. Values are converted by the flag's type (a path stays a path, a
        dtype name becomes a ``torch.dtype``); a flag taking a list accepts a list or one value.

        Raises:
            ConfigFileError: unreadable TOML, a key that is no flag (named, with the closest flags),
                a key given twice, or a value of the wrong kind.
        """
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigFileError(f"--config_file {path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigFileError(f"--config_file {path}: not valid TOML ({e})") from None

        flat: dict = {}
        for key, value in data.items():
            items = value.items() if isinstance(value, dict) else [(key, value)]
            where = f"in [{key}]" if isinstance(value, dict) else "top level"
            for k, v in items:
                if k in flat:
                    raise ConfigFileError(f"--config_file {path}: key '{k}' is given twice ({where})")
                flat[k] = v

        actions = {a.dest: a for a in self.parser._actions if a.dest not in ("help", "config_file")}
        out = {}
        for key, value in flat.items():
            dest = key.lstrip("-").replace("-", "_")
            if dest not in actions:
                close = difflib.get_close_matches(dest, actions, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigFileError(f"--config_file {path}: unknown key '{key}' — it is not a {self.prog} "
                                      f"flag{hint} (see `{self.prog} --help`)")
            out[dest] = _file_value(path, key, value, actions[dest])
        return out


def _file_value(path, key: str, value, a: argparse.Action):
    """One TOML value converted and checked as the flag ``a`` would convert its text."""
    where = f"--config_file {path}: '{key}'"
    if isinstance(a, Switch):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where} is a switch; write {key} = true or {key} = false")
        return value
    many = a.nargs in ("*", "+") or isinstance(a.nargs, int)
    if many:
        value = value if isinstance(value, list) else [value]
        if any(isinstance(v, (list, dict)) for v in value):
            raise ConfigFileError(f"{where} takes a list of values")
        if isinstance(a.nargs, int) and len(value) != a.nargs:
            raise ConfigFileError(f"{where} takes {a.nargs} values, got {len(value)}")
        items = value
    elif isinstance(value, (list, dict)):
        raise ConfigFileError(f"{where} takes one value, not {type(value).__name__}")
    else:
        items = [value]
    done = []
    for v in items:
        if a.type is not None:
            try:
                v = a.type(v if not isinstance(v, bool) else str(v).lower())
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigFileError(f"{where} = {v!r} is not a valid "
                                      f"{getattr(a.type, '__name__', 'value')} ({e})") from None
        elif many:
            v = str(v)
        if a.choices is not None and v not in a.choices:
            raise ConfigFileError(f"{where} = {v!r}; use one of {', '.join(map(str, a.choices))}")
        done.append(v)
    return done if many else done[0]


def setup_logging(verbose: bool = False) -> None:
    """The one logging set-up of every command: INFO (DEBUG with ``--verbose``) to stderr as
    ``HH:MM:SS LEVEL logger: message``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

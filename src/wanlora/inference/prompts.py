"""Prompt files: ``--from_file`` (generation), ``--sample_prompts`` (training) and ``--interactive``.

Format (the one the reference Wan LoRA trainer documents): one prompt per line; empty lines and lines
starting with ``#`` are ignored; a line may end with inline options that override the command line
for that prompt::

    A cat walks on the grass. --w 832 --h 480 --f 81 --d 42 --s 20
    A busy city street at night --w 480 --h 832 --g 7.5 --n low quality, blurry

=========  ==========================  =================
option     meaning                     type
=========  ==========================  =================
``--w``    width in pixels             int
``--h``    height in pixels            int
``--f``    frame count (4n+1)          int
``--d``    seed                        int
``--s``    denoising steps             int
``--g``    guidance scale (``--l``)    float
``--fs``   flow shift                  float
``--i``    image path (I2V / TI2V)     path
``--n``    negative prompt             text up to the next option
=========  ==========================  =================

An option's value runs to the next `` --option``, so a negative prompt may contain spaces and
commas. Unknown options and malformed values are errors naming the file and the line number.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["PromptSpec", "PromptFileError", "parse_prompt_line", "read_prompt_file", "INLINE_OPTIONS"]


class PromptFileError(ValueError):
    """A prompt file line that cannot be parsed; the message names the file and the line."""


#: inline option -> (PromptSpec field, converter)
INLINE_OPTIONS = {
    "w": ("width", int),
    "h": ("height", int),
    "f": ("frames", int),
    "d": ("seed", int),
    "s": ("steps", int),
    "g": ("guidance_scale", float),
    "l": ("guidance_scale", float),
    "fs": ("flow_shift", float),
    "i": ("image_path", str),
    "ei": ("end_image_path", str),
    "cn": ("control_path", str),
    "n": ("negative_prompt", str),
}

_OPTION = re.compile(r"(?:^|\s)--([A-Za-z_][A-Za-z0-9_]*)(?=\s|$)")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt with its per-prompt overrides (``None`` = use the command line's value).

    Attributes:
        prompt: the text.
        width, height: pixels; frames: pixel frame count; seed; steps; guidance_scale;
        flow_shift; image_path; end_image_path (the last frame of FLF2V-14B, musubi's ``--ei``);
        negative_prompt; control_path (the control video of the Fun-Control tasks, musubi's ``--cn``).
        line: 1-based line number in its file (0 for prompts not from a file).
    """

    prompt: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    image_path: str | None = None
    negative_prompt: str | None = None
    end_image_path: str | None = None
    control_path: str | None = None
    line: int = 0

    def to_dict(self) -> dict:
        """The fields as a plain (JSON-able) dict."""
        return asdict(self)

    def with_defaults(self, **defaults) -> "PromptSpec":
        """A copy where every ``None`` field takes the value given in ``defaults`` (if any)."""
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None and v is not None}
        return replace(self, **fill)


def parse_prompt_line(text: str, line: int = 0, source: str = "<prompt>") -> PromptSpec | None:
    """Parse one line; ``None`` for an empty or ``#`` comment line.

    Raises:
        PromptFileError: an unknown option, an option without a value, a bad number, or no prompt
            text; the message starts with ``source:line``.
    """
    s = text.strip()
    if not s or s.startswith("#"):
        return None
    where = f"{source}:{line}" if line else source
    matches = list(_OPTION.finditer(s))
    prompt = s[: matches[0].start()].strip() if matches else s
    if not prompt:
        raise PromptFileError(f"{where}: the line has options but no prompt text before them: {s!r}")
    values: dict = {}
    for k, m in enumerate(matches):
        name = m.group(1)
        end = matches[k + 1].start() if k + 1 < len(matches) else len(s)
        raw = s[m.end():end].strip()
        if name not in INLINE_OPTIONS:
            known = " ".join(f"--{o}" for o in INLINE_OPTIONS)
            raise PromptFileError(f"{where}: unknown inline option --{name}; the options are: {known}")
        field, conv = INLINE_OPTIONS[name]
        if not raw:
            raise PromptFileError(f"{where}: option --{name} needs a value")
        try:
            value = conv(raw)
        except ValueError:
            raise PromptFileError(
                f"{where}: option --{name} expects {'an integer' if conv is int else 'a number'}, got {raw!r}"
            ) from None
        if field in ("width", "height", "frames", "steps") and value < 1:
            raise PromptFileError(f"{where}: option --{name} must be positive, got {value}")
        values[field] = value
    return PromptSpec(prompt=prompt, line=line, **values)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """All prompts of a prompt file, in order. Relative ``--i`` / ``--ei`` / ``--cn`` paths that do not
    exist from the current folder are taken relative to the prompt file's folder.

    Raises:
        FileNotFoundError: the file does not exist.
        PromptFileError: a bad line (see :func:`parse_prompt_line`) or a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (check --from_file / --sample_prompts)")
    specs = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        spec = parse_prompt_line(text, n, str(path))
        if spec is None:
            continue
        for field in ("image_path", "end_image_path", "control_path"):
            value = getattr(spec, field)
            if value and not Path(value).is_absolute() and not Path(value).exists():
                alt = path.parent / value
                if alt.exists():
                    spec = replace(spec, **{field: str(alt)})
        specs.append(spec)
    if not specs:
        raise PromptFileError(f"{path}: no prompts found (every line is empty or a # comment)")
    return specs

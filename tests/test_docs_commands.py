"""A newcomer's read: every command line in README.md and docs/ parses with the real command.

Each bash block of the Markdown files is split into command lines (backslash continuations
joined); every line that calls one of our commands is parsed with that command's own argument
parser, so a renamed or removed flag in the code fails here instead of in a user's terminal.
The quick-start recipes themselves are run end to end by tests/test_end_to_end.py.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# console script / module -> module holding build_parser()
COMMANDS = {
    "wanlora-cache-latents": "wanlora.commands.cache_latents",
    "wanlora-cache-text": "wanlora.commands.cache_text",
    "wanlora-train": "wanlora.commands.train",
    "wanlora-generate": "wanlora.commands.generate",
    "wanlora-convert-lora": "wanlora.commands.convert_lora",
    "wanlora-merge-lora": "wanlora.commands.merge_lora",
    "wanlora-ema-lora": "wanlora.commands.ema_lora",
    "wanlora-download": "wanlora.commands.download",
}
MODULES = {
    "wanlora.commands.cache_latents": "wanlora.commands.cache_latents",
    "wanlora.commands.cache_text": "wanlora.commands.cache_text",
    "wanlora.train": "wanlora.commands.train",
    "wanlora.commands.generate": "wanlora.commands.generate",
    "wanlora.commands.convert_lora": "wanlora.commands.convert_lora",
    "wanlora.commands.merge_lora": "wanlora.commands.merge_lora",
    "wanlora.commands.ema_lora": "wanlora.commands.ema_lora",
    "wanlora.commands.download": "wanlora.commands.download",
}


def command_lines(text: str) -> list[str]:
    """Command lines of every ```bash / ```sh / ```shell block, continuations joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if line and not line.startswith("#"):
                lines.append(line.split(" #")[0].strip())
    return lines


def our_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module with build_parser, its arguments) when ``argv`` runs one of our commands."""
    while argv and "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return None
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]], argv[1:]
    if "-m" in argv:
        i = argv.index("-m")
        if i + 1 < len(argv) and argv[i + 1] in MODULES:
            return MODULES[argv[i + 1]], argv[i + 2:]
    return None


def collected() -> list[tuple[str, str, str, list[str]]]:
    cases = []
    for doc in DOCS:
        for line in command_lines(doc.read_text(encoding="utf-8")):
            if "<" in line and ">" in line:  # a syntax template such as `--dit <folder>`
                continue
            try:
                argv = shlex.split(line)
            except ValueError:
                continue
            hit = our_command(argv)
            if hit:
                cases.append((doc.relative_to(ROOT).as_posix(), line, *hit))
    return cases


CASES = collected()


def test_docs_show_commands():
    assert len(CASES) >= 10, "the guide should show the commands it documents"
    assert {c[2] for c in CASES} >= set(COMMANDS.values()) - {"wanlora.commands.merge_lora"}


@pytest.mark.parametrize("doc, line, module, args", CASES,
                         ids=[f"{c[0]}:{i}" for i, c in enumerate(CASES)])
def test_documented_command_parses(doc, line, module, args):
    parser = importlib.import_module(module).build_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}
    unknown = [a.split("=")[0] for a in args
               if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"{doc}: flags the command does not have: {unknown}\n{line}"
    if "..." in args:  # an abbreviated example: its flags exist, the rest is elided
        return
    try:
        parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{doc}: this documented command does not parse (exit {e.code}):\n{line}")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_relative_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    dead = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not dead, f"{doc.relative_to(ROOT)} links to missing files: {dead}"

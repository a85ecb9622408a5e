"""Prompt files (--from_file, --sample_prompts): inline options, comments, errors with line numbers."""

from __future__ import annotations

import pytest

from wanlora.inference.prompts import PromptFileError, PromptSpec, parse_prompt_line, read_prompt_file


def test_inline_options(tmp_path):
    img = tmp_path / "start.png"
    img.write_bytes(b"")
    f = tmp_path / "prompts.txt"
    f.write_text(
        "# a comment\n"
        "\n"
        "A beautiful sunset over mountains --w 832 --h 480 --f 81 --d 42 --s 20\n"
        "A busy city street at night --w 480 --h 832 --g 7.5 --n low quality, blurry --fs 3\n"
        "   # indented comment\n"
        "A cat --i start.png --l 2.5\n",
        encoding="utf-8",
    )
    a, b, c = read_prompt_file(f)
    assert a == PromptSpec("A beautiful sunset over mountains", width=832, height=480, frames=81, seed=42,
                           steps=20, line=3)
    assert b.prompt == "A busy city street at night" and b.negative_prompt == "low quality, blurry"
    assert (b.width, b.height, b.guidance_scale, b.flow_shift, b.line) == (480, 832, 7.5, 3.0, 4)
    assert c.image_path == str(tmp_path / "start.png")  # relative to the prompt file's folder
    assert c.guidance_scale == 2.5 and c.line == 6


def test_defaults_fill_only_missing():
    s = parse_prompt_line("x --s 7").with_defaults(steps=40, seed=3, width=None)
    assert (s.steps, s.seed, s.width) == (7, 3, None)


def test_prompt_with_double_dash_words_is_kept():
    s = parse_prompt_line("a--b test --d 1")
    assert s.prompt == "a--b test" and s.seed == 1


def test_bad_line_names_line_number(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("fine prompt --d 1\n# c\nbad prompt --s twenty\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"p\.txt:3: option --s expects an integer"):
        read_prompt_file(f)


def test_unknown_inline_option_is_an_error(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("ok\nprompt --cfg 3\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r":2: unknown inline option --cfg"):
        read_prompt_file(f)


def test_other_errors(tmp_path):
    with pytest.raises(PromptFileError, match="needs a value"):
        parse_prompt_line("x --w", 5)
    with pytest.raises(PromptFileError, match="no prompt text"):
        parse_prompt_line("--w 64", 1)
    with pytest.raises(PromptFileError, match="must be positive"):
        parse_prompt_line("x --f 0", 1)
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompt_file(empty)
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.txt")

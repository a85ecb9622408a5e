"""wanlora-cache-text with the tiny umT5: one cache per caption, duplicates encoded once, staleness."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wanlora.commands.cache_text import main
from wanlora.dataset.config import load_dataset_config
from wanlora.dataset.text_caching import cache_text

torch.set_num_threads(1)


@pytest.fixture
def setup(tmp_path, media_dir, tiny_dir):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in ("cat_sunglasses.jpg", "elf_portrait.jpg", "street_portrait.png"):
        (imgs / n).symlink_to(media_dir / n)
    (imgs / "cat_sunglasses.txt").write_text("a cat in sunglasses")
    (imgs / "elf_portrait.txt").write_text("\ufeffsame caption")
    (imgs / "street_portrait.txt").write_text("same caption\n")
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nimage_directory = "imgs"\ncache_directory = "cache"\n')
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    return tmp_path, toml, flags


def test_cache_text_layout_and_skip(setup, capsys):
    root, toml, flags = setup
    argv = ["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"],
            "--no_progress", "--batch_size", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 text cache(s) written" in out
    from wanlora.models import load_text_encoder

    te = load_text_encoder(flags["--t5"], tokenizer=flags["--t5_tokenizer"])
    p = root / "cache" / "cat_sunglasses_wan_te.safetensors"
    ctx = load_file(str(p))["context"]
    ref = te.encode(["a cat in sunglasses"])[0].float()
    assert ctx.dtype == torch.float32 and ctx.shape == ref.shape and torch.allclose(ctx, ref, atol=1e-6)
    with safe_open(str(p), "pt") as f:
        m = f.metadata()
    assert m["caption"] == "a cat in sunglasses" and m["text_encoder"] == te.identity
    a = load_file(str(root / "cache/elf_portrait_wan_te.safetensors"))["context"]
    b = load_file(str(root / "cache/street_portrait_wan_te.safetensors"))["context"]
    assert torch.equal(a, b)
    assert main(argv + ["--skip_existing"]) == 0
    assert "0 text cache(s) written, 3 skipped" in capsys.readouterr().out


def test_identical_captions_encoded_once_and_changed_caption_rebuilt(setup):
    root, toml, flags = setup
    from wanlora.models import load_text_encoder

    te = load_text_encoder(flags["--t5"], tokenizer=flags["--t5_tokenizer"])
    seen = []
    real = te.encode
    te.encode = lambda texts: (seen.extend(texts), real(texts))[1]
    cfg = load_dataset_config(toml, "t2v-A14B")
    report = cache_text(cfg, te, batch_size=8, progress=False)
    assert report.cached == 3 and sorted(seen) == ["a cat in sunglasses", "same caption"]
    (root / "imgs/elf_portrait.txt").write_text("a new caption")
    seen.clear()
    report = cache_text(cfg, te, progress=False)
    assert (report.cached, report.skipped, seen) == (1, 2, ["a new caption"])


def test_wrong_t5_file_one_line_exit_2(setup, capsys, monkeypatch):
    """The VAE given as --t5: one line that names it and the flag that takes it, exit 2, no traceback."""
    monkeypatch.delenv("WANLORA_TRACEBACK", raising=False)
    root, toml, flags = setup
    rc = main(["--dataset_config", str(toml), "--t5", flags["--vae"], "--t5_tokenizer", flags["--t5_tokenizer"],
               "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("wanlora-cache-text: error: ") and err.count("\n") == 1, err
    assert "--t5 expects the umT5-XXL encoder" in err and "pass it as --vae" in err
    monkeypatch.setenv("WANLORA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="pass it as --vae"):
        main(["--dataset_config", str(toml), "--t5", flags["--vae"], "--t5_tokenizer", flags["--t5_tokenizer"]])


def test_missing_caption_fails_rest_cached(setup, capsys):
    root, toml, flags = setup
    (root / "imgs/cat_sunglasses.txt").unlink()
    argv = ["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"], "--no_progress"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "cat_sunglasses.jpg: no caption" in out and "2 text cache(s) written" in out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].count("cat_sunglasses.jpg") == 1, failed  # the path once

"""The installable package: the wheel carries the top-level networks/ and dataset/ folders
inside `wanlora`, and nothing generic lands in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_networks_and_dataset(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("wanlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("networks/__init__.py", "networks/lora.py", "networks/lora_wan.py",
                   "dataset/__init__.py"):
        assert f"wanlora/{module}" in names, f"wheel lacks wanlora/{module}"
    assert any(n.startswith("wanlora/data/") for n in names), "tokenizer text is not packaged"
    top = {n.split("/")[0] for n in names if not n.startswith("wanlora-")}
    assert top == {"wanlora"}, f"the wheel installs top-level packages besides wanlora: {top}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("wanlora-cache-latents", "wanlora-cache-text", "wanlora-train",
                   "wanlora-generate", "wanlora-convert-lora", "wanlora-merge-lora", "wanlora-ema-lora"):
        assert script in scripts


def test_network_module_flag_form_resolves():
    from wanlora.networks import resolve_network_module
    import wanlora.networks.lora_wan as lora_wan

    assert resolve_network_module("networks.lora_wan") is lora_wan
    assert resolve_network_module("wanlora.networks.lora_wan") is lora_wan

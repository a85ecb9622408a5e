"""LoKr and LoHa pairs trained here, converted, and loaded by ComfyUI's own LoRA code (CPU).

Trains a LoKr and a LoHa on both experts of the tiny t2v-A14B models (``--network_module
lycoris.kohya``), converts each file with ``wanlora-convert-lora --target comfy``, and for every
file (``lora_unet_*`` as trained, ``diffusion_model.*`` converted) runs the path of ComfyUI's
``LoraLoaderModelOnly``: ``comfy.lora.model_lora_keys_unet`` (the key map, from the expert's state
dict under ``diffusion_model.``), ``comfy.lora_convert.convert_lora``, ``comfy.lora.load_lora``
(counting the keys it leaves unloaded) and ``comfy.lora.calculate_weight`` per patched weight, as
``ModelPatcher`` does (float32). Each patched weight is compared with the weight
``wanlora-merge-lora`` writes for the same file. Prints one markdown row per file.

ComfyUI is not a pip package: give a checkout of it with ``--comfyui``. Its model zoo
(``comfy.model_base``) imports packages a LoRA check does not need (torchvision, ...); the key map
only asks it ``isinstance`` questions for other architectures (there is no Wan branch,
reference/lora_formats.md §5.2), so it is replaced by a module whose classes match nothing.

    python benchmarks/comfyui_lycoris.py --comfyui ~/ComfyUI --work /tmp/comfy_lyco
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from pathlib import Path


def comfy_modules(root: Path):
    """``(comfy.lora, comfy.lora_convert)`` imported from a ComfyUI checkout in CPU mode."""
    sys.path.insert(0, str(root))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()

    class _NoModel:  # no model here is an instance of another architecture
        pass

    def model_class(name):  # comfy.model_base.SD3, .Flux, ... (classes only)
        if name[:1].isupper():
            return _NoModel
        raise AttributeError(name)

    stub = types.ModuleType("comfy.model_base")
    stub.__getattr__ = model_class
    sys.modules["comfy.model_base"] = stub
    comfy.model_base = stub
    import comfy.lora
    import comfy.lora_convert

    return comfy.lora, comfy.lora_convert


class _UnloadedKeys(logging.Handler):
    """Collects ComfyUI's ``lora key not loaded: <key>`` warnings."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded"):
            self.keys.append(msg.split(": ", 1)[1])


def comfy_patched(comfy_lora, comfy_convert, dit_sd: dict, lora_sd: dict, strength: float = 1.0):
    """``({weight key: patched float32 weight}, unloaded LoRA keys)`` by ComfyUI's code."""
    import torch

    class Model:  # what model_lora_keys_unet reads of a ComfyUI BaseModel
        model_config = types.SimpleNamespace(unet_config={})

        def state_dict(self):
            return {"diffusion_model." + k: v for k, v in dit_sd.items()}

    key_map = comfy_lora.model_lora_keys_unet(Model(), {})
    handler = _UnloadedKeys()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy_lora.load_lora(comfy_convert.convert_lora(dict(lora_sd)), key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    out = {}
    for key, adapter in patches.items():
        w = dit_sd[key[len("diffusion_model."):]].to(torch.float32).clone()
        out[key[len("diffusion_model."):]] = comfy_lora.calculate_weight([(strength, adapter, 1.0, None, None)], w, key)
    return out, handler.keys


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (the folder holding comfy/)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args(argv)
    comfy_lora, comfy_convert = comfy_modules(a.comfyui)

    import torch
    from safetensors.torch import load_file

    from wanlora.commands import convert_lora, merge_lora
    from wanlora.commands.train import parse_config
    from wanlora.models import load_dit
    from wanlora.tools.tiny import make_tiny
    from wanlora.training.trainer import train

    torch.set_num_threads(2)
    models = a.work / "models"
    if not (models / "manifest.json").exists():
        make_tiny("t2v-A14B", models)
    flags = json.loads((models / "manifest.json").read_text())["flags"]
    experts = {"high_noise": flags["--dit_high_noise"], "low_noise": flags["--dit"]}

    class Batches:  # cached latents and text contexts of the tiny model's sizes
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.b = [{"latents": torch.randn(1, 16, 2, 4, 4, generator=g),
                       "context": [torch.randn(3, 32, generator=g)], "keys": [str(i)]} for i in range(4)]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.b[i % 4]

    print("| file | expert | keys | not loaded by ComfyUI | weights patched | max abs ΔW | "
          "max abs(ComfyUI - wanlora merge) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for algo, args in (("lokr", ["algo=lokr", "factor=4"]), ("loha", ["algo=loha"])):
        out = a.work / algo
        train(parse_config(["--task", "t2v-A14B", "--dit", experts["low_noise"], "--dit_high_noise",
                            experts["high_noise"], "--dataset_config", "unused.toml", "--output_dir", str(out),
                            "--output_name", algo, "--network_dim", "4", "--network_alpha", "2", "--seed", "3",
                            "--learning_rate", "5e-3", "--max_train_steps", str(a.steps), "--timestep_sampling",
                            "uniform", "--timestep_boundary", "0.5", "--max_data_loader_n_workers", "0",
                            "--network_module", "lycoris.kohya", "--network_args", *args]), dataset=Batches())
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        assert convert_lora.main(["--input", str(out / f"{algo}_high_noise.safetensors"), "--target", "comfy",
                                  "--output", str(out / "comfy")]) == 0
        for expert, dit_path in experts.items():
            merged = out / f"merged_{expert}.safetensors"
            trained = out / f"{algo}_{expert}.safetensors"
            assert merge_lora.main(["--dit", dit_path, "--task", "t2v-A14B", "--lora_weight", str(trained),
                                    "--save_merged_model", str(merged), "--save_dtype", "fp32"]) == 0
            ours = load_file(merged)
            dit_sd = {k: v.detach() for k, v in load_dit(dit_path, "t2v-A14B").state_dict().items()}
            for f in (trained, out / "comfy" / trained.name):
                lora_sd = load_file(f)
                patched, unloaded = comfy_patched(comfy_lora, comfy_convert, dit_sd, lora_sd)
                err = max((patched[k] - ours[k].float()).abs().max().item() for k in patched)
                moved = max((patched[k] - dit_sd[k].float()).abs().max().item() for k in patched)
                print(f"| {f.parent.name}/{f.name} | {expert} | {len(lora_sd)} | {len(unloaded)} | "
                      f"{len(patched)} | {moved:.3g} | {err:.2e} |")


if __name__ == "__main__":
    main()

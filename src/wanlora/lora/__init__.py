"""Everything about a LoRA that is not training (``docs/architecture.md``, "LoRA package").

``algebra`` (the one weight update ``m · (alpha/rank) · up @ down``), ``patterns`` (the one meaning of
include/exclude patterns), ``layouts`` (default / ComfyUI / diffusers keys, the one file reader),
``metadata``, ``adapter`` (hooks beside ``nn.Linear`` layers), ``apply`` (generation), ``merge``
(``wanlora-merge-lora``) and ``convert`` (``wanlora-convert-lora``). ``wanlora.networks`` builds on
this package; nothing here imports ``networks``, ``training``, ``inference`` or ``commands``.
"""

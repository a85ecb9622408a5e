"""The kohya / musubi-tuner network convention on top of :mod:`wanlora.lora.adapter`.

:class:`LoRANetwork` is a :class:`wanlora.lora.adapter.LoRAAdapterSet` (the adapters of one model,
named ``lora_unet_<dotted path with . -> _>`` so that its ``state_dict()`` *is* the kohya/musubi
default LoRA layout, ``reference/lora_formats.md`` §2) plus what a kohya-style trainer calls:
``apply_to``, ``prepare_optimizer_params`` (LoRA+), ``prepare_grad_etc`` / ``on_epoch_start`` /
``on_step_start``, ``merge_to``, ``save_weights`` / ``load_weights``. The flag semantics (alpha
default, neuron/rank/module dropout, LoRA+ ratio, ``create_network`` /
``create_network_from_weights``) follow the convention users know; which modules to target is
decided by an architecture module such as :mod:`wanlora.networks.lora_wan`. The algebra, the hooks,
the layouts and the include/exclude rule live below, in :mod:`wanlora.lora`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from wanlora.lora.adapter import LoRAAdapterSet, LoRAModule, dims_from_weights
from wanlora.lora.layouts import load_lora_file

logger = logging.getLogger(__name__)

__all__ = [
    "LoRAModule",
    "LoRANetwork",
    "read_lora_weights",
    "dims_from_weights",
    "addnet_hashes",
]


class LoRANetwork(LoRAAdapterSet):
    """The adapters of one model (the DiT) with the kohya / musubi network interface.

    Args:
        targets: ``(dotted_name, nn.Linear)`` pairs of the base model to adapt.
        multiplier: run-time strength.
        loraplus_lr_ratio: LoRA+ ratio used by :meth:`prepare_optimizer_params`.
        **kwargs: ``lora_dim``, ``alpha``, ``dropout``, ``rank_dropout``, ``module_dropout``,
            ``modules_dim``, ``modules_alpha``, ``verbose``: as
            :class:`wanlora.lora.adapter.LoRAAdapterSet`.

    ``unet_loras`` (the kohya name) is the adapter list; ``text_encoder_loras`` is always empty.

    Raises:
        ValueError: no target module (names the fix), or two targets with the same name.
    """

    def __init__(self, targets: Sequence[tuple[str, nn.Module]], multiplier: float = 1.0,
                 loraplus_lr_ratio: float | None = None, **kwargs) -> None:
        super().__init__(targets, multiplier, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.text_encoder_loras: list[LoRAModule] = []  # kohya convention; always empty here
        shaped = kwargs.get("modules_dim") is not None
        logger.info("LoRA network: %d modules, rank %s, alpha %s", len(self.adapters),
                    "from weights" if shaped else kwargs.get("lora_dim", 4),
                    "from weights" if shaped else kwargs.get("alpha", 1.0))

    @property
    def unet_loras(self) -> list[LoRAModule]:
        """The adapters (kohya's name for them)."""
        return self.adapters

    # -- application (kohya signatures) -------------------------------------------------------
    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool = False,
                 apply_unet: bool = True) -> None:
        """Hook every adapter beside its base layer and freeze the base layers' parameters
        (:meth:`~wanlora.lora.adapter.LoRAAdapterSet.attach`).

        ``text_encoders``/``unet`` are accepted for the kohya convention; the targets were fixed
        at construction. Text-encoder LoRA is not supported: ``apply_text_encoder=True`` only
        logs a notice. ``apply_unet=False`` applies nothing.
        """
        if apply_text_encoder:
            logger.info("LoRA: text-encoder LoRA is not supported; only the DiT is adapted")
        if apply_unet:
            self.attach()

    def remove(self) -> None:
        """Take the network back off the model (:meth:`~wanlora.lora.adapter.LoRAAdapterSet.detach`)."""
        self.detach()

    restore = remove

    def is_mergeable(self) -> bool:
        """Plain LoRA can always be merged into the base weights."""
        return True

    def merge_to(self, text_encoders=None, unet=None, weights_sd: dict | None = None,
                 dtype: torch.dtype | None = None, device=None, non_blocking: bool = False) -> None:
        """Merge every adapter into its base weight (float32 math, cast back to the base dtype).

        Args:
            weights_sd: optional default-layout state dict loaded first (strict, as
                :meth:`load_weights`); kohya-convention callers pass the weights here.
            text_encoders, unet, dtype, device, non_blocking: accepted for the kohya convention;
                the base weights keep their dtype and device.
        """
        if weights_sd is not None:
            self.load_weights(weights_sd)
        self.merge()

    # -- training hooks of the kohya convention ----------------------------------------------
    def prepare_network(self, args) -> None:
        """Called once after creation (kohya convention); nothing to do."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        """Make the adapters trainable (kohya convention: called with ``(text_encoder, unet)``)."""
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        """Put the adapters in training mode (dropouts on; kohya convention: ``(text_encoder, unet)``)."""
        self.train()

    def on_step_start(self) -> None:
        """Called before each step (kohya convention); nothing to do."""

    def enable_gradient_checkpointing(self) -> None:
        """Adapters hold no activations of their own; checkpointing is the DiT's."""

    def get_trainable_params(self):
        """Every adapter parameter (``lora_down``/``lora_up`` weights)."""
        return self.parameters()

    def set_loraplus_lr_ratio(self, ratio: float | None) -> None:
        """Set the LoRA+ ratio used by :meth:`prepare_optimizer_params` (None: off)."""
        self.loraplus_lr_ratio = ratio

    def prepare_optimizer_params(self, unet_lr: float = 1e-4, loraplus_lr_ratio: float | None = None,
                                 text_encoder_lr=None, **kwargs):
        """Optimizer parameter groups (kohya/musubi convention).

        Args:
            unet_lr: learning rate of the adapters.
            loraplus_lr_ratio: LoRA+ ratio; the ``lora_up`` weights get ``unet_lr * ratio``.
                ``None`` uses the ratio from ``--network_args`` (if any).
        Returns:
            ``(param_groups, descriptions)``: a list of ``{"params": [...], "lr": float}`` dicts —
            one group, or two with LoRA+ (``lora_down`` first, then ``lora_up``) — and a list of
            names per group (``"unet"``, ``"unet plus"``).
        """
        self.requires_grad_(True)
        ratio = self.loraplus_lr_ratio if loraplus_lr_ratio is None else loraplus_lr_ratio
        base, plus = [], []
        for lora in self.adapters:
            for name, p in lora.named_parameters():
                (plus if ratio is not None and name.startswith("lora_up") else base).append(p)
        groups, desc = [], []
        if base:
            groups.append({"params": base, "lr": unet_lr})
            desc.append("unet")
        if plus:
            groups.append({"params": plus, "lr": unet_lr * ratio})
            desc.append("unet plus")
        return groups, desc

    # -- files --------------------------------------------------------------------------------
    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
        """Write the adapters as a default-layout ``.safetensors`` file, atomically.

        Args:
            file: destination path; must end with ``.safetensors``.
            dtype: dtype of ``lora_down``/``lora_up`` (None keeps theirs); ``alpha`` stays
                float32 so a fractional alpha survives exactly as trained.
            metadata: string key/values (``reference/lora_formats.md`` §7.4), or None;
                ``sshs_model_hash``/``sshs_legacy_hash`` are added (:func:`addnet_hashes`).
        Raises:
            ValueError: the suffix is not ``.safetensors`` or a metadata value is not a string.
        """
        from wanlora.io_utils import save_safetensors

        if Path(file).suffix != ".safetensors":
            raise ValueError(f"LoRA file {file}: only .safetensors is written; rename it to *.safetensors")
        md = dict(metadata or {})
        bad = [k for k, v in md.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"LoRA metadata values must be strings; not strings: {bad}")
        sd = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu")
            if k.endswith(".alpha"):
                v = v.float()
            elif dtype is not None:
                v = v.to(dtype)
            sd[k] = v.contiguous()
        md.update(addnet_hashes(sd, md))
        save_safetensors(sd, file, metadata=md)

    def load_weights(self, file_or_sd) -> dict:
        """Load adapter weights, strictly.

        Args:
            file_or_sd: a LoRA file in any layout :func:`read_lora_weights` reads, or a state
                dict in the default layout. A module without ``.alpha`` gets ``alpha = rank``.
        Returns:
            the file's metadata (empty for a state dict).
        Raises:
            ValueError: keys the network lacks, network modules the weights lack, or shape
                mismatches — all listed, with the fix.
        """
        if isinstance(file_or_sd, dict):
            sd, md, src = file_or_sd, {}, "the given state dict"
        else:
            sd, md = read_lora_weights(file_or_sd)
            src = str(file_or_sd)
        self.load_adapter_weights(sd, src)
        return md


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The ``sshs_model_hash`` / ``sshs_legacy_hash`` metadata kohya-style trainers precompute so
    webui-style LoRA managers need not hash the file.

    Computed on the safetensors serialization of ``tensors`` with only the ``ss_*`` metadata
    (the training record; later user metadata must not change the hash): the model hash is the
    SHA-256 of the data section after the header, the legacy hash the first 8 hex digits of the
    SHA-256 of the 64 KiB at byte offset 1 MiB.
    """
    import hashlib

    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")} or None)
    header_len = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header_len:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def read_lora_weights(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file of any layout (default ``lora_unet_*``, ComfyUI ``diffusion_model.*``
    lora_A/B, diffusers-native) as ``(state dict in the default layout, metadata)`` through
    :func:`wanlora.lora.layouts.load_lora_file`.

    Raises:
        FileNotFoundError: the file does not exist (names the flags that take it).
        LoraFormatError: a file no layout describes.
    """
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"LoRA file {file} does not exist; check --network_weights / --lora_weight")
    sd, md = load_lora_file(file)
    return dict(sd), dict(md or {})

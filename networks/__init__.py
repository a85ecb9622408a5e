"""LoRA network modules (installed as ``wanlora.networks``).

``--network_module`` names a module following the kohya ``create_network(...)`` convention;
:func:`resolve_network_module` turns the name into the module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["resolve_network_module", "NETWORK_MODULE_ALIASES"]

NETWORK_MODULE_ALIASES = {
    "networks.lora_wan": "wanlora.networks.lora_wan",
    "lora_wan": "wanlora.networks.lora_wan",
}
"""Names users know from other trainers -> the module here."""


def resolve_network_module(name: str) -> ModuleType:
    """Import the network module that ``--network_module NAME`` names.

    ``networks.lora_wan`` (the form users know from musubi-tuner) and ``wanlora.networks.lora_wan``
    give :mod:`wanlora.networks.lora_wan`; any other importable module with a ``create_network``
    function (``lycoris.kohya``, say) is imported as is.

    Raises:
        ValueError: the module cannot be imported, or has no ``create_network``; the message names
            the module and the fix.
    """
    name = (name or "").strip()
    if not name:
        raise ValueError("--network_module is empty; use --network_module networks.lora_wan")
    target = NETWORK_MODULE_ALIASES.get(name, name)
    if target.startswith("networks.") and target not in NETWORK_MODULE_ALIASES:
        target = "wanlora." + target  # networks.X -> wanlora.networks.X when it exists
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and not (target == missing or target.startswith(missing + ".")):
            raise  # the module exists but one of its own imports is missing: show that error
        hint = " (install LyCORIS: pip install lycoris-lora)" if name.startswith("lycoris") else ""
        raise ValueError(
            f"--network_module {name}: no importable module {target!r}{hint}. Use "
            f"--network_module networks.lora_wan for LoRA, or an installed module that defines "
            f"create_network(multiplier, network_dim, network_alpha, vae, text_encoders, unet, ...)."
        ) from e
    if not callable(getattr(module, "create_network", None)):
        raise ValueError(
            f"--network_module {name}: module {target!r} has no create_network(...) function, so it "
            f"is not a network module; use --network_module networks.lora_wan"
        )
    return module

"""LoRA network modules (installed as ``wanlora.networks``).

``--network_module`` names a module following the kohya ``create_network(...)`` convention;
:func:`resolve_network_module` turns the name into the module, :func:`check_network_args` refuses
the LyCORIS settings whose files wanlora cannot apply, before any model loads.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["resolve_network_module", "check_network_args", "NETWORK_MODULE_ALIASES", "LYCORIS_ALGOS"]

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


LYCORIS_ALGOS = ("lokr", "loha", "locon", "lora")
"""LyCORIS ``algo=`` values whose files wanlora applies, converts and merges (LoKr, LoHa; ``locon``
and ``lora`` give plain ``lora_down``/``lora_up`` modules on Linear layers)."""

_LYCORIS_REFUSED_ARGS = {
    "dora_wd": "DoRA (weight decomposition) rescales the whole weight, which the LoRA tools here do not apply",
    "train_norm": "norm-layer adapters are not Linear LoRA modules",
}
_LYCORIS_FOREIGN_ARGS = ("exclude_patterns", "include_patterns")  # networks.lora_wan's; LyCORIS ignores them


def check_network_args(module_name: str, network_args: dict) -> None:
    """Refuse, before any model loads, LyCORIS settings that make files wanlora cannot apply.

    For ``--network_module lycoris.*`` (``lycoris-lora``'s kohya entry point): ``algo`` must be one of
    :data:`LYCORIS_ALGOS` (default ``lora``, as LyCORIS's), ``dora_wd`` / ``train_norm`` must be off
    (LyCORIS reads any value but ``False`` as on), and ``exclude_patterns`` / ``include_patterns``
    (``networks.lora_wan``'s, which LyCORIS would silently ignore) are refused. Other modules are
    not checked here.

    Args:
        module_name: the ``--network_module`` value.
        network_args: ``--network_args`` parsed (``{"algo": "lokr", "factor": -1}``).
    Raises:
        ValueError: one line naming the argument, why, and the supported choice.
    """
    if not (module_name or "").strip().startswith("lycoris"):
        return
    algo = str(network_args.get("algo", "lora")).strip().lower()
    if algo not in LYCORIS_ALGOS:
        raise ValueError(
            f"--network_args algo={algo}: not supported; wanlora generates with, converts and merges LyCORIS "
            f"{', '.join(LYCORIS_ALGOS)} files only: use algo=lokr or algo=loha (or networks.lora_wan for LoRA)")
    for key in _LYCORIS_FOREIGN_ARGS:
        if key in network_args:
            raise ValueError(
                f"--network_args {key}=...: LyCORIS ignores it (it is networks.lora_wan's); choose LyCORIS's "
                "layers with preset=FILE.toml (exclude_name = [...]: regexes matched from the start of names "
                "like blocks.0.ffn.0)")
    for key, why in _LYCORIS_REFUSED_ARGS.items():
        if key in network_args and str(network_args[key]).strip().lower() != "false":
            raise ValueError(f"--network_args {key}={network_args[key]}: not supported ({why}); drop it")

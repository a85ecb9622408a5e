"""Which LoRA modules to keep: the one meaning of ``exclude_patterns`` / ``include_patterns``.

Training (``--network_args "exclude_patterns=[...]" "include_patterns=[...]"``) and generation
(``--exclude_patterns`` / ``--include_patterns``) use the same rule, musubi-tuner's training rule
(``reference/lora_formats.md`` §2):

* a pattern is a Python regular expression **full-matched** against the dotted module path of the
  DiT, e.g. ``blocks.9.cross_attn.k`` (not the ``lora_unet_blocks_9_cross_attn_k`` key);
* a module matching an exclude pattern is dropped **unless** it also matches an include pattern:
  include patterns only re-admit excluded modules, they never restrict. To keep only some layers,
  exclude everything and re-admit them: ``exclude ".*"``, include ``".*cross_attn.*"``.

(musubi's *generation* script uses another rule — ``re.search`` on ``lora_unet_*`` keys, include
restricting — which wanlora does not follow; ``docs/generation.md`` shows the translation.)
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence, TypeVar

__all__ = ["compile_patterns", "is_selected", "select_modules"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def compile_patterns(patterns: Iterable[str] | str | None, flag: str) -> list[re.Pattern]:
    """Compile module patterns; a bad one is an error naming ``flag`` and the pattern.

    Args:
        patterns: regexes (a single string counts as one); None or empty: no pattern.
        flag: how the user gave them, for the message (``--exclude_patterns``,
            ``--network_args exclude_patterns``).
    Raises:
        ValueError: a pattern is not a valid Python regular expression.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(
                f"{flag} {p!r} is not a valid regular expression ({e}); patterns are Python regexes "
                f"full-matched against dotted module names such as 'blocks.0.self_attn.q'"
            ) from None
    return out


def is_selected(name: str, exclude: Sequence[re.Pattern], include: Sequence[re.Pattern]) -> bool:
    """True when module ``name`` (dotted path, ``blocks.0.self_attn.q``) is kept: it full-matches
    no exclude pattern, or it full-matches an include pattern too."""
    if not any(p.fullmatch(name) for p in exclude):
        return True
    return any(p.fullmatch(name) for p in include)


def select_modules(
    candidates: Sequence[tuple[str, T]],
    exclude_patterns: Iterable[str] | str | None = None,
    include_patterns: Iterable[str] | str | None = None,
    flag: str = "--network_args",
    verbose: bool = False,
) -> list[tuple[str, T]]:
    """Filter ``(dotted_name, item)`` pairs with the rule of this module, keeping their order.

    Args:
        candidates: ``(dotted module path, anything)`` pairs: ``(name, nn.Linear)`` in training,
            ``(name, LoRA tensors)`` in generation.
        exclude_patterns / include_patterns: regexes (or one regex), or None.
        flag: prefix of the flag names in error messages (``--network_args`` gives
            ``--network_args exclude_patterns``; ``""`` gives ``--exclude_patterns``).
        verbose: log every excluded module.
    Returns:
        the kept pairs; an include pattern never adds a pair that is not in ``candidates``.
    Raises:
        ValueError: an invalid regular expression.
    """
    sep = " " if flag else "--"
    excl = compile_patterns(exclude_patterns, f"{flag}{sep}exclude_patterns")
    incl = compile_patterns(include_patterns, f"{flag}{sep}include_patterns")
    kept = []
    for name, item in candidates:
        if is_selected(name, excl, incl):
            kept.append((name, item))
        elif verbose:
            logger.info("LoRA: exclude %s", name)
    return kept

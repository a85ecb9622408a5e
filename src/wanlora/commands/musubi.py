"""musubi-tuner's command-line spellings, so its users' commands run unchanged.

:class:`wanlora.commands.args.CommandLine` calls :func:`add_musubi_spellings` on every parser, after
the command's own flags. Three kinds of musubi flags are added where the command lacks that option
string (a flag a command declares itself always wins, so a feature landing later replaces its entry
here without a clash):

* :data:`SPELLINGS`: a switch that sets one of our flags to a value (``--sdpa`` is
  ``--attn_mode sdpa``); added where the command has the target flag.
* :data:`ACCEPTED`: per command, a musubi flag whose effect is already what we always do (or that
  musubi itself ignores for Wan); parsed, noted in the log, changes nothing.
* :data:`NOT_SUPPORTED`: per command, a musubi feature we lack; the parser exits with status 2 and
  one line ``not supported: --flag ...`` naming our closest equivalent or the issue, instead of
  argparse's bare "unrecognized arguments".

musubi's ``--timestep_sampling`` values we lack are refused by
:class:`wanlora.training.flow.TimestepDistribution` (``MUSUBI_ONLY_METHODS``). To add a spelling,
add an entry to one table; the tests parse musubi's documented commands.
Only the command line knows these spellings; a ``--config_file`` uses our flag names.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["SPELLINGS", "ACCEPTED", "NOT_SUPPORTED", "add_musubi_spellings"]

log = logging.getLogger(__name__)

#: musubi switch -> (our flag's destination, the value it sets)
SPELLINGS: dict[str, tuple[str, object]] = {
    "--sdpa": ("attn_mode", "sdpa"),
    "--flash_attn": ("attn_mode", "flash"),
    "--flash3": ("attn_mode", "flash3"),
    "--xformers": ("attn_mode", "xformers"),
    "--sage_attn": ("attn_mode", "sage"),
}

_TRAIN, _TEXT, _LATENTS, _GENERATE = "wanlora-train", "wanlora-cache-text", "wanlora-cache-latents", "wanlora-generate"
_FP8 = "fp8 weights and block swap are issue 12 (not in this version)"
_KEEP_CACHE = "caches of items no longer in the dataset are never deleted here"

#: command -> {musubi flag: (number of values it takes, what we do instead)}
ACCEPTED: dict[str, dict[str, tuple[int, str]]] = {
    _TEXT: {
        "--num_workers": (1, "captions are read in this process, no loader workers"),
        "--keep_cache": (0, _KEEP_CACHE),
    },
    _LATENTS: {
        "--keep_cache": (0, _KEEP_CACHE),
    },
    _TRAIN: {
        "--guidance_scale": (1, "Wan has no embedded guidance (musubi uses it for HunyuanVideo only); sample "
                                "prompts take their CFG scale from --g / --l"),
        "--vae_dtype": (1, "the VAE only decodes samples during training, in float32"),
        "--use_mask_loss": (0, "masked loss is on for every dataset entry with mask_directory (its masks are "
                               "in the latent caches)"),
    },
}

#: command -> {musubi flag: the one-line reason and our closest equivalent}
NOT_SUPPORTED: dict[str, dict[str, str]] = {
    _TRAIN: {
        "--split_attn": "a batch holds one bucket's equal-length samples, so attention runs on the whole batch; "
                        "for less memory set batch_size = 1 in the dataset TOML",
        "--ddp_timeout": "the process-group timeout is torch.distributed's default; see issue 15",
        "--log_config": "the run's settings are not sent to the tracker; every saved LoRA records them in its "
                        "ss_* metadata (see issue 15)",
        "--scale_weight_norms": "no max-norm regularization of the LoRA weights; use --max_grad_norm "
                                "(gradient clipping), or see issue 15",
        "--num_timestep_buckets": "timesteps are drawn independently per sample (no stratified buckets); "
                                  "see issue 15",
        "--fp8_base": _FP8,
        "--fp8_scaled": _FP8,
        "--blocks_to_swap": _FP8,
        "--metadata_title": "the LoRA's modelspec.title is its file name: set it with --output_name "
                            "(free text: --training_comment, ss_training_comment)",
    },
    _GENERATE: {flag: _FP8 for flag in ("--fp8", "--fp8_scaled", "--fp8_fast", "--fp8_t5", "--blocks_to_swap")},
    _LATENTS: {
        "--vae_cache_cpu": "the VAE keeps its causal frame cache on --device; encode on the CPU with "
                           "--device cpu, or lower the dataset's resolution / target_frames",
    },
}


class _Spelling(argparse.Action):
    """``--sdpa``: sets ``target`` to ``const`` (its own destination never appears)."""

    def __init__(self, option_strings, dest, target=None, const=None, help=None, **kw):
        super().__init__(option_strings, dest, nargs=0, const=const, default=argparse.SUPPRESS, help=help)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.target, self.const)


class _Accepted(argparse.Action):
    """A musubi flag with no effect here: parsed and noted in the log."""

    def __init__(self, option_strings, dest, nargs=0, note="", help=None, **kw):
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS, help=help)
        self.note = note

    def __call__(self, parser, namespace, values, option_string=None):
        log.info("%s: accepted for musubi-tuner command lines, no effect: %s", option_string, self.note)


class _NotSupported(argparse.Action):
    """A musubi flag for a feature we lack: exit 2 with one line naming the equivalent."""

    def __init__(self, option_strings, dest, reason="", help=None, **kw):
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=help)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"not supported: {option_string} (musubi-tuner) — {self.reason}")


def add_musubi_spellings(parser: argparse.ArgumentParser, prog: str) -> None:
    """Add musubi-tuner's spellings to command ``prog``'s ``parser`` (module docstring).

    Spellings go where the parser has their target flag; accepted and unsupported flags by
    command. An option string the parser already has is never added again.
    """
    have = set(parser._option_string_actions)
    dests = {a.dest for a in parser._actions}
    group = parser.add_argument_group("musubi-tuner spellings")
    for flag, (dest, value) in SPELLINGS.items():
        if flag not in have and dest in dests:
            group.add_argument(flag, action=_Spelling, dest=f"_musubi_{flag[2:]}", target=dest, const=value,
                               help=f"= --{dest} {value}")
    for flag, (nargs, note) in ACCEPTED.get(prog, {}).items():
        if flag not in have:
            group.add_argument(flag, action=_Accepted, dest=f"_musubi_{flag[2:]}", nargs=nargs, note=note,
                               help=f"no effect: {note}")
    for flag, reason in NOT_SUPPORTED.get(prog, {}).items():
        if flag not in have:
            group.add_argument(flag, action=_NotSupported, dest=f"_musubi_{flag[2:]}", reason=reason,
                               help=f"not supported: {reason}")

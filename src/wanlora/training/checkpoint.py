"""What a training run writes: LoRA files, training-state folders, and the pruning of old saves.

Names in ``--output_dir`` (``NAME`` = ``--output_name``; an expert suffix ``_high_noise`` /
``_low_noise`` on each LoRA file of a two-LoRA run, :meth:`ExpertPlan.file_suffix`):

==========================  =========================================  ==========================
when                        LoRA file(s)                               state folder (resume)
==========================  =========================================  ==========================
every N steps               ``NAME-step00000200.safetensors``          ``NAME-step00000200-state``
every N epochs              ``NAME-000004.safetensors``                ``NAME-000004-state``
the end                     ``NAME.safetensors``                       ``NAME-state``
non-finite losses           —                                          ``NAME-nonfinite-state``
==========================  =========================================  ==========================

With ``--ema_decay`` every LoRA save also writes the EMA weights (:mod:`wanlora.training.ema`) under
the tag plus ``_ema`` (``NAME_ema.safetensors``, ``NAME-step00000200_ema_high_noise.safetensors``),
in the same all-or-nothing write, and state folders hold the EMA (``ema.<key>``).

A state folder is wanlora's own format (:mod:`wanlora.training.state_io`): each LoRA's weights,
optimizer and schedule, accelerate's step counter and grad scaler, every process's RNG states, as
safetensors with JSON, plus ``train_state.json`` (:class:`TrainState`, the run's layout and the
list of files) — nothing is unpickled on ``--resume``, and a folder holding anything else, or saved
by another seed, rank or expert layout, is refused in one line. It is written to ``FOLDER.tmp`` and
renamed into place once every process has written, so an interrupted save never leaves a half
folder under the final name; a failed save removes the ``.tmp`` folder. LoRA files of one save are
written all or nothing (both experts' files, or neither); when that fails the weights go to an
emergency folder (:func:`wanlora.io_utils.save_files`) and the run stops with one line saying where.
What a killed save leaves behind is removed when the next run starts. ``--save_last_n_*`` prune
older saves after each new one. The LoRA files carry the metadata of
:func:`wanlora.lora.metadata.build_lora_metadata` (task, expert, rank, timestep range, training
options as musubi's ``ss_*`` keys).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from wanlora.io_utils import SaveError, save_files
from wanlora.tasks import Task
from wanlora.training.config import TrainConfig
from wanlora.training.experts import ExpertPlan
from wanlora.training.flow import TimestepDistribution
from wanlora.training.optim import parse_kv_args
from wanlora.training.state_io import (check_state_dir, read_state_dir, remove_interrupted_saves,
                                       restore_training_components, set_rng_state, training_components,
                                       write_state_dir)

__all__ = ["TrainState", "Checkpointer", "read_train_state", "run_layout", "write_state_folder"]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's position, saved as ``train_state.json`` in every state folder.

    ``global_step`` counts optimizer steps taken; ``epoch`` is 0-based; ``batch_in_epoch`` is the
    number of this process's batches already consumed in that epoch.
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0
    nonfinite_in_row: int = 0
    losses: list = field(default_factory=list)  # (step, expert, loss of all processes, this process's)


def run_layout(config: TrainConfig, task: Task, plan: ExpertPlan, seed: int | None, num_processes: int,
               ranks: dict[str, tuple[int | None, float | None]] | None = None) -> dict:
    """What a ``--resume`` must match (:func:`wanlora.training.state_io.layout_differences`): task,
    seed, expert layout, number of processes, each LoRA's rank and alpha.

    ``ranks``: ``{lora key: (rank, alpha)}`` of the built networks; default the flags'
    (:meth:`TrainConfig.lora`; unknown with ``--dim_from_weights``). A None is not compared (no
    ``--seed`` given: the saved one is taken)."""
    if ranks is None:
        alone = len(plan.loras) == 1
        from_file = config.network.dim_from_weights
        ranks = {key: (None, None) if from_file else (config.lora(key, alone).dim, config.lora(key, alone).alpha)
                 for key in plan.loras}
    return {"task": task.name, "seed": seed, "mode": plan.mode, "num_processes": num_processes,
            "loras": {key: {"rank": r, "alpha": None if a is None else float(a)} for key, (r, a) in ranks.items()}}


def read_train_state(folder: str | Path, layout: dict | None = None) -> TrainState:
    """The :class:`TrainState` of a state folder (``--resume``), checked before anything loads:
    nothing but wanlora's own files in it, all of them whole, saved by the same ``layout``
    (:func:`run_layout`).

    Raises:
        StateError: one line (:func:`wanlora.training.state_io.check_state_dir`).
    """
    from dataclasses import fields

    position, _, _ = check_state_dir(folder, layout)
    names = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in position.items() if k in names})


def _gather(accelerator):
    """``x -> [x of every process]`` for :func:`write_state_dir` (None with one process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return lambda x: gather_object([x])


def write_state_folder(accelerator, final: Path, train_state: TrainState, bundles: dict, layout: dict,
                       extra: dict | None = None) -> Path:
    """Write the state folder ``final`` (every process; :func:`wanlora.training.state_io.write_state_dir`)
    of ``bundles`` (:class:`wanlora.training.lora_bundle.LoraBundle` by key) and the ``extra``
    components (``{name: state dict}``, e.g. ``ema.<key>``). Returns ``final``.

    Raises:
        SaveError: on every process when any failed (one line with the fix); ``final`` untouched.
    """
    comps = training_components({k: b.network for k, b in bundles.items()},
                                {k: b.optimizer for k, b in bundles.items()},
                                {k: b.scheduler for k, b in bundles.items()}, accelerator)
    comps.update(extra or {})
    return write_state_dir(final, comps, asdict(train_state), layout, process_index=accelerator.process_index,
                           num_processes=accelerator.num_processes, is_main=accelerator.is_main_process,
                           gather=_gather(accelerator))


class Checkpointer:
    """Writes the run's LoRA files and state folders (module docstring) and prunes old saves.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (the main process writes LoRA files; every
            process takes part in a state save).
        config: the run's settings (``config.saving``; the rest goes into the metadata).
        task, plan, timesteps: what the LoRAs were trained for (metadata).
        max_steps: the run's optimizer steps (saves at the last step are the final save's).
        seed: the run's seed (metadata, state layout).
        bundles: the run's :class:`wanlora.training.lora_bundle.LoraBundle` by LoRA key (state saves).
        ema: the run's :class:`wanlora.training.ema.LoraEMA` (``--ema_decay``), or None.
    """

    def __init__(self, accelerator, config: TrainConfig, task: Task, plan: ExpertPlan,
                 timesteps: TimestepDistribution, max_steps: int, seed: int, bundles: dict, ema=None):
        self.accelerator, self.config, self.task, self.plan, self.ema = accelerator, config, task, plan, ema
        self.timesteps, self.max_steps, self.bundles = timesteps, max_steps, bundles
        self.saving = config.saving
        self.output_dir = Path(config.saving.output_dir)
        self.stem = config.saving.output_name
        self.run_metadata = run_metadata(config, plan, max_steps, accelerator.mixed_precision, seed)
        self.layout = run_layout(config, task, plan, seed, accelerator.num_processes,
                                 {k: b.rank_alpha() for k, b in bundles.items()})
        self._base_hashes: dict = {}
        if accelerator.is_main_process:
            for p in remove_interrupted_saves(self.output_dir, self.stem):
                log.info("removed %s, left by an interrupted save", p.name)

    def lora_files(self, tag: str) -> dict[str, Path]:
        """``{lora key: file}`` of the save ``tag``."""
        return {key: self.output_dir / f"{tag}{self.plan.file_suffix(key)}.safetensors" for key in self.plan.loras}

    def save_loras(self, tag: str, bundles: dict, state: TrainState) -> None:
        """Write every LoRA of ``bundles`` (:class:`wanlora.training.lora_bundle.LoraBundle`) as
        ``tag`` with its metadata, and with ``--ema_decay`` its EMA as ``tag_ema``, all files or
        none (main process; the others wait).

        Raises:
            SaveError: on every process, when the files could not be written (one line: the cause,
                the fix, and the folder the weights were saved to instead).
        """
        self.accelerator.wait_for_everyone()
        error = None
        if self.accelerator.is_main_process:
            from wanlora.lora.metadata import build_lora_metadata

            writers = {}
            saves = [(self.lora_files(tag), None)]
            if self.ema is not None:
                saves.append((self.lora_files(f"{tag}_ema"), self.ema))
            for files, ema, key, file in [(fs, e, k, f) for fs, e in saves for k, f in fs.items()]:
                bundle = bundles[key]
                rank, alpha = bundle.rank_alpha()
                dit_path = self.plan.dit_paths[self.plan.loras[key][0]]
                other = [f.name for k, f in files.items() if k != key]
                md = build_lora_metadata(
                    self.task, network_dim=rank, network_alpha=alpha, expert=self.plan.metadata_expert(key),
                    network_module=self.config.network.network_module,
                    network_args=parse_kv_args(self.config.network.network_args, "--network_args"),
                    title=self.stem, base_model=dit_path, base_model_hash=self._base_hash(dit_path),
                    timestep_range=lora_timestep_range(self.plan, self.timesteps, key),
                    pair_file=other[0] if other else None,
                    extra={**self.run_metadata, "ss_learning_rate": bundle.optimizer.param_groups[0]["initial_lr"],
                           "ss_steps": lora_steps(state, self.plan, key), "wan.run_steps": state.global_step,
                           "ss_epoch": state.epoch, **(ema.metadata(key) if ema else {})},
                )
                network = self.accelerator.unwrap_model(bundle.wrapper).network
                writers[file] = partial(_write_lora, network, self.saving.save_precision, md, ema=ema, key=key)
            try:
                for file in save_files(writers, "LoRA weights"):
                    log.info("saved %s", file)
            except SaveError as e:
                error = str(e)
        errors = [e for e in (_gather(self.accelerator) or (lambda x: [x]))(error) if e]
        if errors:
            raise SaveError(errors[0])

    def save_state(self, tag: str, state: TrainState) -> Path:
        """Write the state folder ``OUTPUT_DIR/{tag}-state`` (every process); returns it."""
        extra = {f"ema.{k}": self.ema.state_dict(k) for k in self.bundles} if self.ema is not None else None
        return write_state_folder(self.accelerator, self.output_dir / f"{tag}-state", state, self.bundles, self.layout,
                                  extra)

    def load_state(self, folder: str | Path) -> TrainState:
        """Restore the LoRAs, optimizers, schedules, accelerate's step counter and this process's
        RNG states from a state folder (every process; the layout is checked again against the
        built networks' ranks); returns its :class:`TrainState`.

        Raises:
            StateError: one line (:func:`wanlora.training.state_io.read_state_dir`).
        """
        from dataclasses import fields

        position, comps, rng = read_state_dir(folder, self.layout, process_index=self.accelerator.process_index)
        b = self.bundles
        restore_training_components(comps, {k: x.network for k, x in b.items()},
                                    {k: x.optimizer for k, x in b.items()}, {k: x.scheduler for k, x in b.items()},
                                    self.accelerator)
        if self.ema is not None:
            for key in b:
                if f"ema.{key}" in comps:
                    self.ema.load_state_dict(key, comps[f"ema.{key}"])
                else:
                    log.warning("%s holds no EMA of LoRA %s (saved without --ema_decay): the EMA starts from the "
                                "resumed weights", folder, key)
                    self.ema.reset(key)
        if rng is not None:
            set_rng_state(rng)
        names = {f.name for f in fields(TrainState)}
        return TrainState(**{k: v for k, v in position.items() if k in names})

    def saves_after_step(self, step: int) -> bool:
        """Whether :meth:`after_step` saves after optimizer step ``step``."""
        every = self.saving.save_every_n_steps
        return bool(every) and step % every == 0 and step < self.max_steps

    def after_step(self, state: TrainState, bundles: dict) -> None:
        """The ``--save_every_n_steps`` save (and pruning) due after optimizer step ``state.global_step``."""
        s = state.global_step
        if self.saves_after_step(s):
            keep = self.saving.save_last_n_steps
            self._save_and_prune(f"{self.stem}-step{s:08d}", s, rf"{re.escape(self.stem)}-step(\d+)", state, bundles,
                                 keep, self.saving.save_last_n_steps_state or keep)

    def after_epoch(self, state: TrainState, bundles: dict) -> None:
        """The ``--save_every_n_epochs`` save (and pruning) due after epoch ``state.epoch`` (1-based
        count of finished epochs)."""
        every, done = self.saving.save_every_n_epochs, state.epoch
        if every and done % every == 0 and state.global_step < self.max_steps:
            keep = self.saving.save_last_n_epochs or 0
            keep_state = self.saving.save_last_n_epochs_state or keep
            self._save_and_prune(f"{self.stem}-{done:06d}", done, rf"{re.escape(self.stem)}-(\d{{6}})", state,
                                 bundles, keep * every, keep_state * every)

    def final(self, state: TrainState, bundles: dict) -> dict[str, Path]:
        """The end-of-training save (``NAME`` files, and the state with ``--save_state`` or
        ``--save_state_on_train_end``); returns the LoRA files."""
        self.save_loras(self.stem, bundles, state)
        if self.saving.save_state or self.saving.save_state_on_train_end:
            self.save_state(self.stem, state)
        return self.lora_files(self.stem)

    def _save_and_prune(self, tag: str, number: int, numbered: str, state: TrainState, bundles: dict,
                        keep: int | None, keep_state: int | None) -> None:
        """Save the LoRAs (and with --save_state the state) as ``tag``; then remove the saves named
        by the regex ``numbered`` (one int group) whose number is ``<= number - keep``."""
        self.save_loras(tag, bundles, state)
        if self.saving.save_state:
            self.save_state(tag, state)
        if self.accelerator.is_main_process and keep:
            prune(self.output_dir, numbered + r"(_ema)?(_high_noise|_low_noise)?\.safetensors",
                  lambda k: k > number - keep)
        if self.accelerator.is_main_process and keep_state:
            prune(self.output_dir, numbered + "-state", lambda k: k > number - keep_state)

    def _base_hash(self, dit_path: str) -> str:
        if dit_path not in self._base_hashes:
            from wanlora.lora.metadata import checkpoint_quick_hash

            try:
                self._base_hashes[dit_path] = checkpoint_quick_hash(dit_path)
            except (OSError, ValueError) as e:  # a test double path, say
                log.debug("no base-model hash for %s: %s", dit_path, e)
                self._base_hashes[dit_path] = ""
        return self._base_hashes[dit_path]


def _write_lora(network, dtype, metadata: dict, path: Path, ema=None, key: str | None = None) -> None:
    """One LoRA file (``network.save_weights``, the kohya convention) at ``path``; with ``ema``
    (:class:`wanlora.training.ema.LoraEMA`) the EMA weights of LoRA ``key``."""
    with ema.applied([key]) if ema is not None else contextlib.nullcontext():
        network.save_weights(str(path), dtype, metadata)


def prune(output_dir: Path, pattern: str, keep) -> None:
    """Remove saves (files or state folders) whose name matches ``pattern`` (one int group) and
    whose number fails ``keep(number)``."""
    rx = re.compile(pattern)
    for p in sorted(output_dir.iterdir()):
        m = rx.fullmatch(p.name)
        if m and not keep(int(m.group(1))):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            log.info("removed old save %s", p.name)


def lora_steps(state: TrainState, plan: ExpertPlan, lora_key) -> int:
    """Optimizer steps the LoRA ``lora_key`` took (``ss_steps``): with one LoRA per expert each
    expert's own steps, not the run's (``wan.run_steps``); counted from ``state.losses``, which
    holds one ``(step, expert, ...)`` per completed step, resumed runs included."""
    return sum(1 for entry in state.losses if plan.lora_for(entry[1]) == lora_key)


def run_metadata(config: TrainConfig, plan: ExpertPlan, max_steps: int, mixed_precision: str, seed: int) -> dict:
    """The training options every saved LoRA records (musubi's ``ss_*`` names,
    ``reference/lora_formats.md`` §2, plus ``wan.expert_lora``), fixed for the run; each save adds
    ``ss_steps`` (that LoRA's own optimizer steps, :func:`lora_steps`), ``wan.run_steps``, ``ss_epoch``
    and the LoRA's ``ss_learning_rate``."""
    o, t = config.optimization, config.timesteps
    return {
        "ss_output_name": config.saving.output_name, "ss_optimizer": o.optimizer_type,
        "ss_lr_scheduler": o.lr_scheduler, "ss_lr_warmup_steps": o.lr_warmup_steps,
        "ss_max_train_steps": max_steps, "ss_gradient_accumulation_steps": o.gradient_accumulation_steps,
        "ss_gradient_checkpointing": bool(config.model.gradient_checkpointing),
        "ss_max_grad_norm": o.max_grad_norm, "ss_mixed_precision": mixed_precision,
        "ss_seed": seed, "ss_timestep_sampling": t.timestep_sampling,
        "ss_sigmoid_scale": t.sigmoid_scale, "ss_discrete_flow_shift": t.discrete_flow_shift,
        "ss_weighting_scheme": t.weighting_scheme, "ss_logit_mean": t.logit_mean,
        "ss_logit_std": t.logit_std, "ss_network_dropout": config.network.network_dropout,
        "ss_training_comment": config.saving.training_comment or "",
        "wan.expert_lora": plan.mode,
        **config.model_files.metadata(),  # wan.ckpt_dir and the files it resolved to
    }


def lora_timestep_range(plan: ExpertPlan, timesteps: TimestepDistribution, lora_key: str) -> tuple[float, float]:
    """The timesteps (0..1000) a LoRA trained on: its experts' ranges cut to ``--min/max_timestep``."""
    served = plan.loras[lora_key]
    a, b = timesteps.range
    return max(min(plan.ranges[e][0] for e in served), a), min(max(plan.ranges[e][1] for e in served), b)

"""The validation loss: the training loss on held-out items, with fixed timesteps and noise.

The items are the ``[[validation_datasets]]`` of the dataset TOML (the keys of ``[[datasets]]``;
``wanlora-cache-latents`` and ``wanlora-cache-text`` cache them with the training entries), read
in a fixed order (no shuffling). An evaluation computes, without gradients, the training loss
(:func:`wanlora.training.trainer.flow_matching_loss`: the same noising, conditioning, target,
mask and ``--weighting_scheme``) of every validation batch at ``--validation_timesteps`` fixed
timesteps per expert, evenly spaced strictly inside the expert's range cut to
``--min_timestep`` / ``--max_timestep`` (sd-scripts' ``train_network.py``: 4 points,
``linspace(min, max, 6)[1:-1]``). With both A14B experts each expert is evaluated on its own
range with its own DiT weights and LoRA (t2v-A14B: low noise 175, 350, 525, 700; high noise 900,
925, 950, 975).

The noise of batch ``b`` comes from :func:`wanlora.training.seeds.stream_generator`
``(--validation_seed, VALIDATION, b)`` — the same at every timestep, every evaluation and (the
seed defaults to 0, not the run's) every run — so two evaluations of the same weights give the
same number and the curve moves only with the weights. sd-scripts instead reseeds the global RNG
with the run's seed, which ties the noise to the run.

Under several processes the batches are split over the data-parallel groups (batch ``b`` on
group ``b mod dp``; with sequence parallelism or FSDP every rank runs the same number of
forwards, padding with ignored repeats) and the sums are reduced over all processes, so the
value does not depend on the process count. Logged at each evaluation, to the log and the
tracker: ``val_loss`` (mean over experts), ``val_loss/<expert>`` and ``val_loss/t<timestep>``;
with ``--ema_decay`` the same with the EMA weights as ``val_loss_ema...``.

When: every ``--validate_every_n_steps`` optimizer steps, every ``--validate_every_n_epochs``
epochs (every epoch when neither is given), and once before the first step of a new run (the
curve's start).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial

import torch

from wanlora.training import seeds
from wanlora.training.lora_bundle import set_active

__all__ = ["FixedTimestep", "ValidationLoss", "validation_timesteps", "build_validation_loss"]

log = logging.getLogger("wanlora.train")


@dataclass(frozen=True)
class FixedTimestep:
    """A timestep "law" that always gives ``t`` (0..1000): the ``sampler`` of
    :func:`wanlora.training.trainer.flow_matching_loss` for a validation evaluation."""

    t: float
    method: str = "fixed"

    def sample(self, n: int, generator: torch.Generator | None = None, lo: float | None = None,
               hi: float | None = None) -> torch.Tensor:
        """``[n]`` float32 on the CPU, all ``t`` (draws nothing from ``generator``)."""
        return torch.full((n,), float(self.t), dtype=torch.float32)


def validation_timesteps(lo: float, hi: float, n: int) -> list[float]:
    """``n`` timesteps evenly spaced strictly inside ``(lo, hi)``: ``linspace(lo, hi, n + 2)[1:-1]``
    (sd-scripts ``train_network.py``).

    Raises:
        ValueError: ``n < 1`` or an empty range.
    """
    if n < 1:
        raise ValueError(f"--validation_timesteps {n}: use 1 or more")
    if not hi > lo:
        raise ValueError(f"validation timesteps: empty range [{lo}, {hi})")
    return [lo + (hi - lo) * (k + 1) / (n + 1) for k in range(n)]


class ValidationLoss:
    """Evaluates and logs the validation loss (module docstring).

    Args:
        dataset: the validation batches, indexable ``dataset[b]`` for ``b < len(dataset)``
            (:class:`wanlora.dataset.TrainingDataset` of the validation entries, ``shuffle=False``).
        plan: the run's :class:`wanlora.training.experts.ExpertPlan` (experts, their ranges, LoRAs).
        timesteps: the run's :class:`wanlora.training.flow.TimestepDistribution` (its
            ``--min_timestep`` / ``--max_timestep`` cut the ranges).
        conditioning: the task's :class:`wanlora.conditioning.Conditioning`.
        config: the run's :class:`wanlora.training.config.TrainConfig` (``validation``, ``timesteps``).
        accelerator: the run's ``accelerate.Accelerator`` (device, autocast, reduction, tracker).
        layout: the run's :class:`wanlora.models.distributed.ParallelLayout`.
        batches_per_epoch: training batches per epoch per process (places the epoch ends).
    """

    def __init__(self, dataset, plan, timesteps, conditioning, config, accelerator, layout, batches_per_epoch: int):
        v = config.validation
        self.dataset, self.plan, self.conditioning, self.accelerator = dataset, plan, conditioning, accelerator
        self.weighting = config.timesteps.weighting_scheme
        self.seed, self.every_steps = v.validation_seed, v.validate_every_n_steps
        self.every_epochs = v.validate_every_n_epochs or (None if v.validate_every_n_steps else 1)
        self.n_batches = len(dataset) if v.max_validation_steps is None else min(v.max_validation_steps, len(dataset))
        self.layout, self.batches_per_epoch = layout, batches_per_epoch
        lo, hi = timesteps.range
        self.timesteps = {e: validation_timesteps(max(a, lo), min(b, hi), v.validation_timesteps)
                          for e, (a, b) in plan.ranges.items() if max(a, lo) < min(b, hi)}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.dit = self.experts = self.bundles = self.ema = None

    def start(self, state, dit, experts, bundles, ema=None) -> None:
        """Bind the run's DiT, :class:`wanlora.training.experts.ExpertWeights`, LoRA bundles and
        EMA (or None); evaluate once when the run starts at step 0."""
        self.dit, self.experts, self.bundles, self.ema = dit, experts, bundles, ema
        if state.global_step == 0:
            self.evaluate(0)

    def after_step(self, state) -> dict[str, float] | None:
        """Evaluate when optimizer step ``state.global_step`` is due (``--validate_every_n_steps``)
        or completed a due epoch (``--validate_every_n_epochs``); returns the logged values or None."""
        step_due = bool(self.every_steps) and state.global_step % self.every_steps == 0
        epoch_end = state.batch_in_epoch >= self.batches_per_epoch
        epoch_due = bool(self.every_epochs) and epoch_end and (state.epoch + 1) % self.every_epochs == 0
        return self.evaluate(state.global_step) if step_due or epoch_due else None

    def evaluate(self, step: int) -> dict[str, float]:
        """One evaluation with the current weights (and the EMA's): logs and returns
        ``{"val_loss": ..., "val_loss/<expert>": ..., "val_loss/t<t>": ..., "val_loss_ema...": ...}``.
        Every process must call it (the sums are reduced over processes)."""
        logs = self._losses("val_loss")
        if self.ema is not None:
            with self.ema.applied():
                logs.update(self._losses("val_loss_ema"))
        set_active(self.bundles, None)  # the loop re-activates its expert's weights and LoRA at its next step
        self.history.append((step, logs))
        parts = ", ".join(f"{k.split('/', 1)[1]} {v:.5f}" for k, v in logs.items()
                          if k.startswith("val_loss/") and not k.startswith("val_loss/t"))
        log.info("step %d: validation loss %.5f%s%s", step, logs["val_loss"], f" ({parts})" if parts else "",
                 f", EMA {logs['val_loss_ema']:.5f}" if "val_loss_ema" in logs else "")
        self.accelerator.log(logs, step=step)
        return logs

    def _batches(self) -> list[int | None]:
        """This process's batch indices; None pads to the same count on every rank where the
        forward has collectives (sequence parallelism, FSDP)."""
        mine = list(range(self.layout.dp_rank, self.n_batches, self.layout.dp_size))
        if self.layout.sp_size > 1 or self.layout.fsdp:
            mine += [None] * (math.ceil(self.n_batches / self.layout.dp_size) - len(mine))
        return mine

    @torch.no_grad()
    def _losses(self, name: str) -> dict[str, float]:
        from accelerate.utils import send_to_device

        from wanlora.training.trainer import flow_matching_loss

        acc, device = self.accelerator, self.accelerator.device
        experts = list(self.timesteps)
        width = max(len(ts) for ts in self.timesteps.values())
        sums = torch.zeros(2, len(experts), width, dtype=torch.float64)  # [loss * samples, samples]
        networks = [b.network for b in self.bundles.values()]
        modes = [n.training for n in networks]
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), acc.autocast():
            for n in networks:
                n.eval()  # no LoRA dropout
            try:
                for i, expert in enumerate(experts):
                    lo, hi = self.plan.ranges[expert]
                    self.experts.activate(expert)
                    lora = self.bundles[self.plan.lora_for(expert)]
                    set_active(self.bundles, lora.key)
                    model_fn = partial(acc.unwrap_model(lora.wrapper), self.dit)  # no DDP: no collectives
                    for b in self._batches():
                        batch = send_to_device(self.dataset[0 if b is None else b], device)
                        weight = 0.0 if b is None else float(batch["latents"].shape[0])
                        for k, t in enumerate(self.timesteps[expert]):
                            g = seeds.stream_generator(self.seed, seeds.VALIDATION, 0 if b is None else b)
                            loss, _ = flow_matching_loss(model_fn, batch, FixedTimestep(t), lo, hi, g, device,
                                                         self.weighting, self.conditioning)
                            sums[0, i, k] += float(loss) * weight
                            sums[1, i, k] += weight
            finally:
                for n, mode in zip(networks, modes):
                    n.train(mode)
        sums = acc.reduce(sums.to(device), reduction="sum").cpu()
        logs, per_expert = {}, []
        for i, expert in enumerate(experts):
            ts = self.timesteps[expert]
            values = sums[0, i, :len(ts)] / sums[1, i, :len(ts)]
            for t, v in zip(ts, values.tolist()):
                logs[f"{name}/t{t:g}"] = v
            per_expert.append(float(values.mean()))
            if len(experts) > 1:
                logs[f"{name}/{expert}"] = per_expert[-1]
        logs[name] = sum(per_expert) / len(per_expert)
        return logs


def build_validation_loss(config, task, plan, timesteps, conditioning, accelerator, layout, batches_per_epoch: int,
                          dataset=None, read_toml: bool = True) -> ValidationLoss | None:
    """The run's :class:`ValidationLoss`, or None when there is nothing to validate on. Built
    before the DiT loads, so a missing cache fails at once.

    Args:
        dataset: validation batches to use instead of the TOML's ``[[validation_datasets]]``
            (tests, benchmarks); same contract as :class:`ValidationLoss`'s.
        read_toml: look for ``[[validation_datasets]]`` in ``--dataset_config`` (False when the
            training batches do not come from it either).
    Raises:
        ValueError: ``--validate_every_n_*`` given but the dataset TOML has no
            ``[[validation_datasets]]`` (names the file and the fix).
        wanlora.dataset.MissingCachesError: validation items without their caches (with the
            caching commands to run).
    """
    v = config.validation
    if dataset is None and read_toml and config.data.dataset_config is not None:
        from wanlora.dataset import TrainingDataset, load_dataset_config

        group = load_dataset_config(config.data.dataset_config, task).validation()
        if group is not None:
            dataset = TrainingDataset(group, task=task, seed=0, shuffle=False)
        elif v.validate_every_n_steps or v.validate_every_n_epochs:
            raise ValueError(f"--validate_every_n_steps/--validate_every_n_epochs: {config.data.dataset_config} has "
                             "no [[validation_datasets]]; add one (same keys as [[datasets]]) and cache it, or drop "
                             "the flag")
    if dataset is None or len(dataset) == 0 or v.max_validation_steps == 0:
        return None
    validator = ValidationLoss(dataset, plan, timesteps, conditioning, config, accelerator, layout, batches_per_epoch)
    log.info("validation loss on %d batches at timesteps %s", validator.n_batches,
             "; ".join(f"{e}: {', '.join(f'{t:g}' for t in ts)}" for e, ts in validator.timesteps.items()))
    return validator

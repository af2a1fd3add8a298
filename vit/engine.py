"""The training step, the epoch loop and evaluation."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vit.metrics import ClassificationMeter

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainState:
    """Where a run is: epoch, optimiser steps taken, and batches done in this epoch."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best_top1: float = -1.0
    skipped_steps: int = 0  # fp16 steps the grad scaler skipped


@dataclass
class StepParts:
    """What one optimiser step needs, besides the batch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler: step_update(num_updates)
    accelerator: object
    loss_fn: Callable
    mixup: Callable | None = None
    ema: object | None = None  # timm ModelEmaV3
    clip_grad: float | None = None
    grad_accum_steps: int = 1
    stop_on_nonfinite: bool = True  # else a step with a non-finite loss is skipped


def cpu_only() -> bool:
    """Whether this machine has no accelerator (GPU, MPS, XPU...).

    Accelerate sets up several CPU processes (gloo) under ``torchrun`` only when told
    ``cpu=True``; without it each process would train alone on the whole data set.
    """
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


def train_one_epoch(
    parts: StepParts,
    loader,
    state: TrainState,
    steps_in_epoch: int,
    max_steps: int | None = None,
    on_step: Callable[[TrainState, dict], bool] | None = None,
) -> None:
    """Train until the epoch's ``steps_in_epoch`` optimiser steps are done.

    ``on_step(state, scalars)`` runs after each optimiser step; returning True stops early
    (a signal arrived, or ``max_steps`` was reached by the caller's reckoning).
    """
    acc = parts.accelerator
    model = parts.model
    model.train()
    accum = parts.grad_accum_steps
    bar = tqdm(
        total=steps_in_epoch,
        initial=state.batch_in_epoch // accum,
        desc=f"epoch {state.epoch}",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    t0, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=acc.device)
    for images, targets in loader:
        images, targets = images.to(acc.device), targets.to(acc.device)
        if parts.mixup is not None:
            images, soft_targets = parts.mixup(images, targets)
        else:
            soft_targets = targets
        last_micro = (state.batch_in_epoch + 1) % accum == 0
        # gradients are synchronised across processes only on the last micro-batch
        with nullcontext() if last_micro else acc.no_sync(model), acc.autocast():
            loss = parts.loss_fn(model(images), soft_targets)
        acc.backward(loss / accum)
        loss_sum += loss.detach()
        seen += images.shape[0] * acc.num_processes
        state.batch_in_epoch += 1
        if not last_micro:
            continue

        # the loss is checked before the update, so a non-finite one never reaches the weights
        mean_loss = acc.reduce(loss_sum, reduction="mean").item() / accum
        loss_sum.zero_()
        lr = current_lr(parts.optimizer)  # the rate of this step
        grad_norm = None
        if math.isfinite(mean_loss):
            if parts.clip_grad is not None and acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(model.parameters(), parts.clip_grad)
            parts.optimizer.step()
            if acc.optimizer_step_was_skipped:
                state.skipped_steps += 1
        else:
            where = f"loss is {mean_loss} at step {state.step + 1} (epoch {state.epoch}, "
            where += f"learning rate {lr:.3g})"
            if parts.stop_on_nonfinite:
                raise NonFiniteLossError(f"{where}; stopping. The last checkpoint is intact.")
            logger.warning(f"{where}; update skipped (train.stop_on_nonfinite=false)")
            state.skipped_steps += 1
        parts.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        parts.scheduler.step_update(num_updates=state.step)
        if parts.ema is not None:
            parts.ema.update(acc.unwrap_model(model), step=state.step)

        elapsed = time.perf_counter() - t0
        scalars = {
            "train/loss": mean_loss,
            "train/lr": lr,
            "train/images_per_sec": seen / max(elapsed, 1e-9),
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        if parts.accelerator.mixed_precision == "fp16" or state.skipped_steps:
            scalars["train/skipped_steps"] = state.skipped_steps
        bar.update(1)
        bar.set_postfix(
            loss=f"{mean_loss:.4f}",
            lr=f"{scalars['train/lr']:.2e}",
            img_s=f"{scalars['train/images_per_sec']:.0f}",
        )
        stop = on_step(state, scalars) if on_step is not None else False
        if stop or state.batch_in_epoch >= steps_in_epoch * accum:
            break
        if max_steps is not None and state.step >= max_steps:
            break
    bar.close()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    accelerator,
    num_classes: int,
    desc: str = "eval",
    class_names: list[str] | None = None,
) -> dict:
    """Metrics over a loader holding this process's shard; sums are added across processes.

    Per-class accuracies are keyed by ``class_names`` (by default the class indices).
    """
    model.eval()
    meter = ClassificationMeter(num_classes, device=accelerator.device)
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process)
    for images, targets in bar:
        images, targets = images.to(accelerator.device), targets.to(accelerator.device)
        with accelerator.autocast():
            logits = model(images)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        meter.update(logits.float(), targets, losses)
    meter.reduce(accelerator)
    return meter.compute(class_names)

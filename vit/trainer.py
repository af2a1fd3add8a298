"""A training run from start to finish: set-up, resume, the epoch loop, checkpoints, logs.

``fit(cfg, resume=False)`` is what ``train.py`` calls. The same code runs in one process or
under ``accelerate launch`` / ``torchrun``; only the main process writes files and logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from vit import checkpoint as ckpt
from vit.build import DataBundle, build_data, build_model, default_workers, model_config
from vit.config import Config, ConfigError, load_config
from vit.engine import StepParts, TrainState, cpu_only, evaluate, train_one_epoch
from vit.loader import eval_loader, train_loader
from vit.optim import build_optimizer, build_scheduler
from vit.visualize import Explanation, explain_dataset, save_explanations

logger = get_logger(__name__)


class StopRequest:
    """Remembers SIGTERM / Ctrl-C so the loop can save a checkpoint before exiting."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced, so Ctrl-C works again after a run."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum


def has_checkpoints(cfg: Config) -> bool:
    """Whether the run folder ``cfg`` names already holds resumable checkpoints."""
    return bool(ckpt.step_checkpoints(Path(cfg.log.output_dir) / cfg.log.name / "checkpoints"))


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """The run folder, checked before any work: writable, and resumable when asked."""
    run_dir = Path(cfg.log.output_dir) / cfg.log.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # one per process under torchrun
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"log.output_dir: cannot write the run folder {run_dir} ({e})") from e
    found = bool(ckpt.step_checkpoints(run_dir / "checkpoints"))
    if resume and not found:
        raise ConfigError(f"--resume: nothing to resume in {run_dir / 'checkpoints'}")
    if resume:
        check_same_model(cfg, run_dir / "config.yaml")
    if not resume and found:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            "name with log.name=NEW_NAME"
        )
    return run_dir


def check_same_model(cfg: Config, saved: Path) -> None:
    """A resumed run keeps the model and data set it was started with: refuse, naming the
    keys, a config whose ``model`` section or ``data.dataset`` differ from the saved one's
    (its weights and optimiser state would not fit)."""
    if not saved.is_file():
        return
    before = load_config(saved)
    # one entry a key, options included (model.options.depth), values as text
    old = flat_hparams(asdict(before.model), "model.")
    new = flat_hparams(asdict(cfg.model), "model.")
    changed = [
        f"{key} is {new.get(key, 'unset')}, was {old.get(key, 'unset')}"
        for key in sorted(old.keys() | new.keys())
        if str(old.get(key, "unset")) != str(new.get(key, "unset"))
    ]
    if cfg.data.dataset != before.data.dataset:
        changed.append(f"data.dataset is {cfg.data.dataset!r}, was {before.data.dataset!r}")
    if changed:
        raise ConfigError(
            f"--resume: the run in {saved.parent} was started with another model or data set "
            f"({'; '.join(changed)}); resume it as it was, or start a new run with "
            "log.name=NEW_NAME"
        )


class Run:
    """One training run: the parts, the state, and how they are saved and restored."""

    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.run_dir = prepare_run_dir(cfg, resume)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.acc = Accelerator(
            cpu=cpu_only(),
            mixed_precision=cfg.train.mixed_precision,
            log_with="tensorboard" if cfg.log.tensorboard else None,
            project_dir=str(self.run_dir),
        )
        set_seed(cfg.train.seed)

        vit_cfg = model_config(cfg.model, num_classes=1)
        img_size = (
            vit_cfg.img_size
            if isinstance(vit_cfg.img_size, tuple)
            else (vit_cfg.img_size, vit_cfg.img_size)
        )
        self.data: DataBundle = build_data(cfg, tuple(img_size), vit_cfg.in_chans)
        self.num_classes = len(self.data.class_names)
        self._write_skipped()

        workers = default_workers(cfg, self.data.img_size)
        rank, world = self.acc.process_index, self.acc.num_processes
        try:
            self.train_loader = train_loader(
                self.data.train, cfg.data.batch_size, cfg.train.seed, rank, world, workers
            )
        except ValueError as e:  # too few images for one global batch
            raise ConfigError(f"data.batch_size: {e}") from None
        self.val_loader = eval_loader(self.data.val, cfg.data.eval_batch_size, rank, world, workers)
        accum = cfg.train.grad_accum_steps
        self.steps_per_epoch = len(self.train_loader) // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.grad_accum_steps: {accum} is more than the {len(self.train_loader)} "
                "batches of an epoch"
            )

        model = build_model(cfg.model, self.num_classes)
        self.num_params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, cfg.optim)
        self.ema = ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None
        if cfg.train.compile:
            model = torch.compile(model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs
        )
        self.mixup, self.loss_fn = self._loss()
        self.state = TrainState()
        self.stop = StopRequest()
        if resume:
            self._restore()

    def _loss(self):
        a = self.cfg.aug
        if a.mixup > 0 or a.cutmix > 0:
            if self.cfg.data.batch_size % 2:
                raise ConfigError("data.batch_size must be even for mixup / cutmix")
            mixup = Mixup(
                mixup_alpha=a.mixup,
                cutmix_alpha=a.cutmix,
                prob=a.mix_prob,
                switch_prob=a.mix_switch_prob,
                label_smoothing=a.label_smoothing,
                num_classes=self.num_classes,
            )
            return mixup, SoftTargetCrossEntropy()
        return None, torch.nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)

    # ------------------------------------------------------------------ saving and restoring

    def _unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def meta(self, **extra) -> dict:
        """What inference needs to rebuild and feed the model, plus where the run was."""
        return {
            "model": self._unwrapped().cfg.to_dict(),
            "img_size": list(self.data.img_size),
            "in_chans": self.data.in_chans,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "crop_pct": self.cfg.aug.eval_crop_pct,
            "class_names": self.data.class_names,
            "dataset": self.cfg.data.dataset,
            "epoch": self.state.epoch,
            "step": self.state.step,
            **extra,
        }

    def _config_yaml(self) -> str:
        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)

    def save_step_checkpoint(self) -> None:
        """A resumable checkpoint of everything; the newest becomes ``checkpoints/last``."""
        if not self.acc.is_main_process:
            return
        scaler = self.acc.scaler
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
            "train_state": asdict(self.state),
        }
        path = ckpt.save_checkpoint(
            ckpt.step_dir(self.ckpt_dir, self.state.step),
            self._unwrapped().state_dict(),
            self.meta(),
            self._config_yaml(),
            training_state,
        )
        ckpt.point_last(self.ckpt_dir, path)
        ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last)

    def _restore(self) -> None:
        found = ckpt.latest_resumable(self.ckpt_dir)
        if found is None:
            raise ConfigError(f"--resume: no usable checkpoint in {self.ckpt_dir}")
        path, ts = found
        model, _ = ckpt.load_model(path)
        self._unwrapped().load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        if ts["scaler"] is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(ts["scaler"])
        if ts["ema"] is not None and self.ema is not None:
            self.ema.module.load_state_dict(ts["ema"])
        ckpt.set_rng_state(ts["rng"])
        self.state = TrainState(**ts["train_state"])
        logger.info(
            f"resumed from {path} at epoch {self.state.epoch}, step {self.state.step}",
            main_process_only=True,
        )

    def _write_skipped(self) -> None:
        if self.data.skipped and self.acc.is_main_process:
            lines = [f"{path}\t{reason}" for path, reason in self.data.skipped]
            (self.run_dir / "skipped_files.tsv").write_text("\n".join(lines) + "\n")
            logger.warning(
                f"{len(lines)} bad image files skipped; listed in "
                f"{self.run_dir / 'skipped_files.tsv'}"
            )

    # ---------------------------------------------------------------------- logging

    def log(self, scalars: dict, step: int) -> None:
        self.acc.log(scalars, step=step)
        if self.acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "epoch": self.state.epoch, **scalars}) + "\n")

    def startup_block(self) -> str:
        import accelerate
        import albumentations
        import timm

        lines = [
            f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}"
            f", accelerate {accelerate.__version__}, albumentations {albumentations.__version__}",
            f"device {self.acc.device}, processes {self.acc.num_processes}, mixed precision "
            f"{self.acc.mixed_precision}",
            f"model {self.cfg.model.name}: {self.num_params / 1e6:.2f}M parameters",
            f"data {self.cfg.data.dataset}: {len(self.data.train)} train, {len(self.data.val)} "
            f"val images, {self.num_classes} classes; {self.steps_per_epoch} steps per epoch",
            f"run folder {self.run_dir}",
            "config:",
            self._config_yaml().rstrip(),
        ]
        return "\n".join(lines)

    # ---------------------------------------------------------------------- the loop

    def _on_step(self, state: TrainState, scalars: dict) -> bool:
        if state.step % self.cfg.log.log_every == 0:
            self.log(scalars, state.step)
        every = self.cfg.train.checkpoint_every_steps
        if every and state.step % every == 0:
            self.save_step_checkpoint()
        flag = torch.tensor(float(self.stop.signal is not None), device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="max").item())

    def evaluate_and_save_best(self) -> dict:
        """Validate the model (and its EMA); keep the best weights in ``checkpoints/best``.

        The winner's rollout of the first validation images goes to TensorBoard each time,
        and into ``checkpoints/best/rollout`` with the weights it explains.
        """
        results = {"model": evaluate(self.model, self.val_loader, self.acc, self.num_classes)}
        if self.ema is not None:
            results["ema"] = evaluate(
                self.ema.module, self.val_loader, self.acc, self.num_classes, desc="eval ema"
            )
        scalars = {}
        for which, r in results.items():
            prefix = "val" if which == "model" else "val_ema"
            scalars.update(
                {
                    f"{prefix}/loss": r["loss"],
                    f"{prefix}/top1": r["top1"],
                    f"{prefix}/top5": r["top5"],
                    f"{prefix}/samples": r["samples"],  # each one counted once
                }
            )
        self.log(scalars, self.state.step)
        which, best = max(results.items(), key=lambda kv: kv[1]["top1"])
        pictures = self.rollout_pictures(which)
        self._log_pictures(pictures)
        if best["top1"] > self.state.best_top1:
            self.state.best_top1 = best["top1"]
            if self.acc.is_main_process:
                ckpt.save_checkpoint(
                    self.ckpt_dir / "best",
                    self._weights(which).state_dict(),
                    self.meta(weights=which, val_top1=best["top1"], val_top5=best["top5"]),
                    self._config_yaml(),
                    extra=lambda folder: _save_pictures(pictures, folder / "rollout"),
                )
        summary = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        logger.info(
            f"epoch {self.state.epoch} step {self.state.step}: {summary}", main_process_only=True
        )
        return results

    def _weights(self, which: str) -> torch.nn.Module:
        return self._unwrapped() if which == "model" else self.ema.module

    def rollout_pictures(self, which: str) -> list[Explanation]:
        """Rollout of the first ``log.rollout_images`` validation images under the ``which``
        weights ("model" or "ema"); on the main process only, elsewhere none."""
        n = min(self.cfg.log.rollout_images, len(self.data.val))
        if n == 0 or not self.acc.is_main_process:
            return []
        # the plain module: no DDP hooks, no compiled graph; explain() gives back its mode
        model = self._weights(which)
        return explain_dataset(model, self.data.val, range(n), self.data.class_names)

    def _log_pictures(self, pictures: list[Explanation]) -> None:
        if not pictures or not self.cfg.log.tensorboard:
            return
        writer = self.acc.get_tracker("tensorboard", unwrap=True)  # a SummaryWriter
        for i, e in enumerate(pictures):
            # one image per tag: the overlays keep each image's own size, so no common batch
            writer.add_image(f"rollout/val_{i:03d}", e.overlay, self.state.step, dataformats="HWC")

    def fit(self) -> dict:
        cfg = self.cfg
        self.acc.init_trackers("tensorboard", config=flat_hparams(cfg.to_dict()))
        if self.acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(self._config_yaml())
        logger.info(self.startup_block(), main_process_only=True)
        self.stop.install()
        parts = StepParts(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            accelerator=self.acc,
            loss_fn=self.loss_fn,
            mixup=self.mixup,
            ema=self.ema,
            clip_grad=cfg.optim.clip_grad,
            grad_accum_steps=cfg.train.grad_accum_steps,
            stop_on_nonfinite=cfg.train.stop_on_nonfinite,
        )
        max_steps = cfg.train.max_steps
        results = {}
        while self.state.epoch < cfg.train.epochs:
            if max_steps is not None and self.state.step >= max_steps:
                break
            sampler = self.train_loader.batch_sampler
            sampler.set_epoch(self.state.epoch, start_batch=self.state.batch_in_epoch)
            train_one_epoch(
                parts, self.train_loader, self.state, self.steps_per_epoch, max_steps, self._on_step
            )
            if self.stop.signal is not None:
                self.save_step_checkpoint()
                logger.warning(
                    f"signal {self.stop.signal}: checkpoint saved at step "
                    f"{self.state.step}; continue with --resume",
                    main_process_only=True,
                )
                self.acc.end_training()
                raise SystemExit(128 + self.stop.signal)
            epoch_done = self.state.batch_in_epoch >= self.steps_per_epoch * parts.grad_accum_steps
            if epoch_done:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            last = self.state.epoch >= cfg.train.epochs or (
                max_steps is not None and self.state.step >= max_steps
            )
            if last or (epoch_done and self.state.epoch % cfg.train.eval_every == 0):
                results = self.evaluate_and_save_best()
            self.save_step_checkpoint()
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return results


def _save_pictures(pictures: list[Explanation], folder: Path) -> None:
    """Titled overlay PNGs, ``.npy`` maps and ``grid.png``, as ``vit rollout`` writes them."""
    if pictures:
        save_explanations(pictures, [f"val_{i:03d}" for i in range(len(pictures))], folder)


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """A flat dict of numbers and strings, as TensorBoard's hparams want."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{key}."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def fit(cfg: Config, resume: bool = False) -> dict:
    """Train as ``cfg`` says; returns the last validation results."""
    run = Run(cfg, resume)
    try:
        return run.fit()
    finally:
        run.stop.uninstall()

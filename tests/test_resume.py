"""Crash safety: resumed runs equal uninterrupted ones bit for bit; damaged checkpoints;
non-finite losses; errors caught before any work."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers_train import (
    REPO,
    read_metrics,
    subprocess_env,
    train,
    train_command,
    write_fashion,
)
from safetensors.torch import load_file

from vit import checkpoint as ckpt

# everything random at once: mixup/cutmix draws (NumPy), random erasing (per-sample
# generators), drop path (torch), EMA; two blocks, as drop path is 0 in a single block
RECIPE = [
    "data.batch_size=8",  # 86 training images: 10 steps an epoch
    "train.epochs=3",
    "train.checkpoint_every_steps=3",
    "train.keep_last=3",
    "train.ema=true",
    "train.ema_decay=0.9",
    "aug.mixup=0.8",
    "aug.cutmix=1.0",
    "aug.label_smoothing=0.1",
    "aug.random_erasing=0.5",
    "model.drop_path_rate=0.2",
    "model.options.depth=2",
    "log.log_every=1",
]
STEPS_PER_EPOCH, TOTAL_STEPS = 10, 30


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fashion"), n_train=96, n_test=11)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """The run never interrupted."""
    out = tmp_path_factory.mktemp("ref")
    assert train(out, "ref", f"data.root={data_root}", *RECIPE) == 0
    return out / "ref"


def recipe(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", *RECIPE]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights and EMA weights."""
    a, b = run / "checkpoints" / "last", reference / "checkpoints" / "last"
    assert ckpt.read_meta(a)["step"] == ckpt.read_meta(b)["step"] == TOTAL_STEPS
    assert (a / ckpt.WEIGHTS).read_bytes() == (b / ckpt.WEIGHTS).read_bytes()
    ema_a = ckpt.load_training_state(a)["ema"]
    ema_b = ckpt.load_training_state(b)["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_b)


def start(out: Path, name: str, data_root: Path) -> subprocess.Popen:
    cmd = train_command(out, name, *recipe(data_root))
    with open(out / f"{name}.log", "w") as log:  # a file: a full pipe would stall the child
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until ``path`` exists (a checkpoint is renamed into place once complete)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def resume_point(run: Path) -> tuple[int, int]:
    """(step, batch in epoch) of the checkpoint a resume would start from."""
    found = ckpt.latest_resumable(run / "checkpoints")
    assert found is not None
    state = found[1]["train_state"]
    return state["step"], state["batch_in_epoch"]


def test_reference_run_keeps_the_last_checkpoints(reference):
    steps = [int(p.name[5:]) for p in ckpt.step_checkpoints(reference / "checkpoints")]
    assert steps == [24, 27, 30]  # keep_last=3 of every 3rd step and each epoch end
    assert (reference / "checkpoints" / "last").resolve().name == "step_000000030"
    losses = [m["train/loss"] for m in read_metrics(reference) if "train/loss" in m]
    assert len(losses) == TOTAL_STEPS


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, data_root, reference):
    proc = start(tmp_path, "killed", data_root)
    # step 12 is two batches into the second epoch
    wait_for(tmp_path / "killed" / "checkpoints" / "step_000000012", proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    step, batch = resume_point(tmp_path / "killed")
    assert 12 <= step < TOTAL_STEPS and batch == step % STEPS_PER_EPOCH != 0, (step, batch)

    assert train(tmp_path, "killed", *recipe(data_root), resume=True) == 0
    assert_same_run(tmp_path / "killed", reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_saves_then_resume_is_bit_identical(sig, tmp_path, data_root, reference):
    proc = start(tmp_path, "stopped", data_root)
    wait_for(tmp_path / "stopped" / "checkpoints" / "step_000000003", proc)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == 128 + sig
    log = (tmp_path / "stopped.log").read_text()
    assert "checkpoint saved at step" in log and "--resume" in log
    step, _ = resume_point(tmp_path / "stopped")
    assert f"checkpoint saved at step {step};" in log  # the newest is the one saved on exit
    assert step < TOTAL_STEPS

    assert train(tmp_path, "stopped", *recipe(data_root), resume=True) == 0
    assert_same_run(tmp_path / "stopped", reference)


def test_resume_mid_accumulation_epoch(tmp_path, data_root):
    """With gradient accumulation a checkpoint sits between micro-batch groups; resuming
    from one in the middle of an epoch (as a kill right after it would) changes nothing."""
    extra = [*recipe(data_root), "data.batch_size=4", "train.grad_accum_steps=2"]
    extra += ["train.epochs=2", "train.keep_last=20"]
    assert train(tmp_path, "whole", *extra) == 0
    assert train(tmp_path, "cut", *extra) == 0
    checkpoints = tmp_path / "cut" / "checkpoints"
    for path in ckpt.step_checkpoints(checkpoints):
        if int(path.name[5:]) > 6:
            shutil.rmtree(path)  # as if killed right after step 6 was saved
    step, batch = resume_point(tmp_path / "cut")
    assert (step, batch) == (6, 12)  # micro-batches of the epoch done
    assert train(tmp_path, "cut", *extra, resume=True) == 0
    a = (checkpoints / "last" / ckpt.WEIGHTS).read_bytes()
    assert a == (tmp_path / "whole" / "checkpoints" / "last" / ckpt.WEIGHTS).read_bytes()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "weights truncated": lambda step: truncate(step / ckpt.WEIGHTS),
    "training state truncated": lambda step: truncate(step / ckpt.STATE),
    "meta missing": lambda step: (step / ckpt.META).unlink(),
    "meta not json": lambda step: (step / ckpt.META).write_text("{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(damage, tmp_path, data_root, reference, caplog):
    """A crash while saving: a half-written temporary folder, a damaged newest checkpoint.
    The one before is used (with a warning naming the bad one) and the run still ends equal."""
    run = tmp_path / "ref"
    shutil.copytree(reference, run, symlinks=True)
    checkpoints = run / "checkpoints"
    partial = checkpoints / ".tmp-step_000000033-12345"  # what a kill inside save leaves
    partial.mkdir()
    (partial / ckpt.WEIGHTS).write_bytes(b"\x00" * 10)
    newest = checkpoints / "step_000000030"
    DAMAGE[damage](newest)

    with caplog.at_level(logging.WARNING, logger="vit.checkpoint"):
        path, state = ckpt.latest_resumable(checkpoints)
    assert path.name == "step_000000027" and state["train_state"]["step"] == 27
    assert "step_000000030" in caplog.text and "unusable" in caplog.text

    assert train(tmp_path, "ref", *recipe(data_root), resume=True) == 0
    assert_same_run(run, reference)
    assert not partial.exists()  # the next save cleared what the crash left


def test_nothing_usable_to_resume(tmp_path, data_root, reference, capsys):
    run = tmp_path / "ref"
    shutil.copytree(reference, run, symlinks=True)
    for step in ckpt.step_checkpoints(run / "checkpoints"):
        truncate(step / ckpt.WEIGHTS)
    assert train(tmp_path, "ref", *recipe(data_root), resume=True) == 2
    assert "no usable checkpoint" in capsys.readouterr().err


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 5, 10, 20):
        ckpt.step_dir(tmp_path, step).mkdir()
    for name in ("best", ".tmp-step_000000030-1", ".old-best-1", f".tmp-best-{os.getpid()}"):
        (tmp_path / name).mkdir()
    ckpt.prune(tmp_path, keep=2)
    kept = sorted(p.name for p in tmp_path.iterdir())
    # a crashed save's folders go; this process's own save in progress stays
    assert kept == [f".tmp-best-{os.getpid()}", "best", "step_000000010", "step_000000020"]


def test_save_replaces_an_existing_folder_whole(tmp_path):
    state = {"w": torch.ones(2)}
    ckpt.save_checkpoint(tmp_path / "c", state, {"model": {}, "a": 1})
    (tmp_path / "c" / "stale.txt").write_text("from the old one")
    ckpt.save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {"model": {}, "a": 2})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [ckpt.META, ckpt.WEIGHTS]
    assert torch.equal(load_file(tmp_path / "c" / ckpt.WEIGHTS)["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left


# -------------------------------------------------------------------- numerical faults


def test_nonfinite_loss_stops_naming_step_and_lr(tmp_path, data_root, capsys):
    extra = ["optim.lr=1e30", "optim.warmup_epochs=0", "train.checkpoint_every_steps=1"]
    assert train(tmp_path, "nan", f"data.root={data_root}", "data.batch_size=8", *extra) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: loss is nan at step 2 .*learning rate 1e\+30", err), err
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert [p.name for p in ckpt.step_checkpoints(checkpoints)] == ["step_000000001"]
    model, meta = ckpt.load_model(checkpoints / "last")
    assert meta["step"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_steps_skipped_when_asked(tmp_path, data_root, monkeypatch):
    """With train.stop_on_nonfinite=false a NaN loss skips its update and is counted."""
    import vit.trainer

    calls = {"n": 0}
    real_loss = vit.trainer.Run._loss

    def nan_on_second_call(self):
        mixup, loss_fn = real_loss(self)

        def loss(logits, targets):
            calls["n"] += 1
            value = loss_fn(logits, targets)
            return value * float("nan") if calls["n"] == 2 else value

        return mixup, loss

    monkeypatch.setattr(vit.trainer.Run, "_loss", nan_on_second_call)
    extra = ["train.stop_on_nonfinite=false", "train.max_steps=3", "log.log_every=1"]
    assert train(tmp_path, "skip", f"data.root={data_root}", "data.batch_size=8", *extra) == 0
    rows = [m for m in read_metrics(tmp_path / "skip") if "train/loss" in m]
    assert [m.get("train/skipped_steps", 0) for m in rows] == [0, 1, 1]
    model, _ = ckpt.load_model(tmp_path / "skip" / "checkpoints" / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------- errors before any work is done


def test_resume_with_nothing_to_resume(tmp_path, data_root, capsys):
    assert train(tmp_path, "new", f"data.root={data_root}", resume=True) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and str(tmp_path / "new") in err


@pytest.mark.parametrize(
    "change, shown",
    [
        ("model.img_size=42", "model.img_size is 42, was None"),
        (
            "model.options.stem_channels=[8,16,32]",
            "model.options.stem_channels is [8, 16, 32], was unset",
        ),
    ],
    ids=["img_size", "stem"],
)
def test_resume_with_another_model_is_refused(
    tmp_path, reference, data_root, capsys, change, shown
):
    # the saved weights and optimiser state would not fit: refused before any work, and the
    # run's saved config stays as it was
    shutil.copytree(reference, tmp_path / "ref", symlinks=True)
    saved = (tmp_path / "ref" / "config.yaml").read_text()
    assert train(tmp_path, "ref", *recipe(data_root), change, resume=True) == 2
    err = capsys.readouterr().err
    assert "was started with another model" in err and shown in err, err
    assert (tmp_path / "ref" / "config.yaml").read_text() == saved


def test_new_run_into_an_existing_run_folder(tmp_path, reference, data_root, capsys):
    shutil.copytree(reference, tmp_path / "ref", symlinks=True)
    assert train(tmp_path, "ref", *recipe(data_root)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ref'} already holds a run" in err and "--resume" in err


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    # the data folder does not exist either: the output folder is checked first
    assert train(blocker, "x", f"data.root={tmp_path / 'nowhere'}") == 2
    err = capsys.readouterr().err
    assert "log.output_dir" in err and str(blocker / "x") in err


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    assert train(tmp_path / "runs", "x", f"data.root={missing}") == 2
    assert str(missing) in capsys.readouterr().err
    extra = ["data.dataset=imagefolder", f"data.root={missing}"]
    assert train(tmp_path / "runs", "y", *extra) == 2
    assert str(missing / "train") in capsys.readouterr().err


def test_empty_validation_split(tmp_path, capsys):
    root = write_fashion(tmp_path / "few", n_train=20, n_test=3)  # two images a class
    assert train(tmp_path / "runs", "x", f"data.root={root}", "data.batch_size=2") == 2
    assert "data.val_fraction: 0.1 of 20 training images" in capsys.readouterr().err


def test_batch_larger_than_the_data(tmp_path, data_root, capsys):
    assert train(tmp_path / "runs", "x", f"data.root={data_root}", "data.batch_size=512") == 2
    assert "lower data.batch_size" in capsys.readouterr().err


class Payload:
    """Unpickling this creates a marker file: a stand-in for running any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_training_state_is_refused(tmp_path, reference, caplog):
    run = tmp_path / "ref"
    shutil.copytree(reference, run, symlinks=True)
    newest = run / "checkpoints" / "step_000000030"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker)}, newest / ckpt.STATE)
    with caplog.at_level(logging.WARNING, logger="vit.checkpoint"):
        path, _ = ckpt.latest_resumable(run / "checkpoints")
    assert path.name == "step_000000027" and "step_000000030" in caplog.text
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(newest / ckpt.STATE, weights_only=False)["optimizer"].close()
    assert marker.exists()


def test_signal_handlers_restored_after_a_run(tmp_path, data_root):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    extra = ["data.batch_size=8", "train.max_steps=1"]
    assert train(tmp_path, "x", f"data.root={data_root}", *extra) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

"""The fit loop every recipe shares: seeding, progress bar, per-epoch metrics, checkpoint/resume.

A recipe hands :func:`fit` a :class:`Recipe` (its model, data and step); the engine owns the
epoch loop, the ``metrics.jsonl`` log, the curves plot and the checkpoint, so that every task
gets the same behaviour: ``--resume`` continues a killed run from its last finished epoch and a
run with the same ``--seed`` repeats.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from training.files import durable_write


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bf16_autocast(disabled: bool) -> bool:
    """Whether a recipe trains under bf16 autocast: unless ``--no-bf16``, where oneDNN has bf16 kernels.

    PyTorch's check asks for AVX-512 (core), not native BF16: on CPUs with native BF16 bf16 trained ~3x
    faster than float32 here; on an AVX2-only CPU (an AMD EPYC without AVX-512) it is emulated and a
    denoiser step ran 12x slower than in float32. AVX-512 without native BF16 was not measured; pass
    ``--no-bf16`` there if an epoch is slow.
    """
    if disabled:
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("bf16 autocast off: this CPU has no bf16 kernels (float32 is faster here)")
        return False
    return True


def start_run(seed: int, threads: int | None) -> None:
    """Every recipe's first step: the thread count (``--threads``; default torch's) and the seed."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)


class Recipe(Protocol):
    """What a task provides to the engine."""

    def train_batches(self, epoch: int) -> Iterable[Any]:
        """The batches of one epoch (seeded by the epoch, so a resumed run sees the same ones)."""

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step; returns metrics averaged into the progress bar."""

    def end_epoch(self, epoch: int) -> None:
        """Hook after the last step of an epoch (e.g. to finalise an EMA)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics after an epoch."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False
    # [first epoch, scheduled epochs] per session: a resume with another --epochs restarts the learning-rate
    # schedule over the new length (a warm restart), which the card must say.
    schedule: list[list[int]] = field(default_factory=list)


class RunningMean:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        self.count += 1
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        return {key: total / max(self.count, 1) for key, total in self.sums.items()}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor of a linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    warmup = max(1, warmup)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _atomic_save(state: dict[str, Any], path: Path) -> None:
    durable_write(path, lambda file: torch.save(state, file))


def _write_log(history: list[dict[str, float]], path: Path) -> None:
    durable_write(path, lambda file: file.write("".join(json.dumps(row) + "\n" for row in history).encode()))


# Options that shape the model or its optimisation: a resumed run must use the checkpoint's. (Epochs, threads and
# evaluation options may change between sessions: a longer --epochs stretches the schedule on purpose.)
RUN_DEFINING = {
    "data_dir", "limit", "limit_per_class", "seed", "batch_size", "lr", "weight_decay", "momentum", "label_smoothing",
    "widths", "depths", "stem", "dim", "dropout", "arch", "mode", "color", "patch", "patches_per_image", "noise_sigma",
    "sigma_max", "reduce", "gray_fraction", "init_from", "metric_loss", "distill_weight", "metric_weight", "margin", "size",
    # how samples are cut and augmented, what the loss weighs, and what the export writes (a review resumed a
    # segmenter at --max-side 200 after training at 96: the manifest said 200)
    "max_side", "crop", "scale", "repeats", "dice_weight", "base", "depth", "max_width", "width",
    "scale_jitter", "epoch_images", "ema_decay", "warmup_epochs", "grayscale", "portrait_sizes", "merge_labels",
    "neck_width", "strides", "mask_fraction", "mask_radius", "clip_fraction", "noisy_dir",
    "box_shift", "box_scale", "arcface_scale", "arcface_margin", "triplet_margin", "contrastive_margin",
    "translate", "cutout", "teacher_cache", "dataset",
    # 0 workers or more draw the augmentations from other random streams
    "workers",
    # what is held out: another split would move held-out images into training
    "val_fraction", "test_fraction", "split", "split_seed", "val_count", "val_people", "image_size",
}  # fmt: skip
DATA_FILES = "data_files"  # a fingerprint of the files under --data-dir (names and sizes), kept with the checkpoint
RECIPE = "recipe"  # the recipe's class
NOISY_FILES = "noisy_files"  # the same for --noisy-dir


def folder_fingerprint(folder: Path) -> str:
    """A hash of every file's relative path and size under ``folder``: a resumed run refuses data that changed
    under the same path (added or removed images would move across the held-out split)."""
    files: list[tuple[str, int]] = []
    pending = [(folder, "")]
    while pending:  # os.scandir: one stat per file (CIFAR-10's 60,000 took 0.3 s here)
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append((Path(entry.path), f"{prefix}{entry.name}/"))
                elif entry.is_file():
                    files.append((prefix + entry.name, entry.stat().st_size))
    digest = hashlib.sha256()
    for name, size in sorted(files):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()[:16]


def run_settings(options: dict[str, Any]) -> dict[str, str]:
    def text(value: Any) -> str:  # a folder given relative one time and absolute the next is the same folder
        if isinstance(value, Path):
            return str(value.resolve())
        if isinstance(value, list | tuple):
            return str([text(item) for item in value])
        return str(value)

    return {key: text(value) for key, value in sorted(options.items()) if key in RUN_DEFINING}


class TrainingStopped(SystemExit):
    """A run that cannot go on (a diverged loss, options that contradict its checkpoint): a one-line reason."""


CHECKPOINT = "checkpoint.pt"


def claim_run_dir(run_dir: Path, resume: bool, init_from: Path | None) -> None:
    """``python -m training`` calls it before any data is read: an earlier run's checkpoint is never replaced
    unasked. A run ``--init-from`` an exported model starts afresh by definition; the earlier run is kept beside it."""
    if resume or not (run_dir / CHECKPOINT).exists():
        return
    if init_from is None:
        raise TrainingStopped(
            f"{run_dir / CHECKPOINT} holds an earlier run of --name {run_dir.name}: continue it with --resume (and its "
            "options), or start afresh under a new --name (or after deleting that folder)"
        )
    kept = run_dir.with_name(f"{run_dir.name}.before-init-from")
    shutil.rmtree(kept, ignore_errors=True)
    run_dir.rename(kept)
    print(f"--init-from starts a new run: the earlier run of --name {run_dir.name} is kept in {kept}")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, weights_only=False)
        if not isinstance(checkpoint, dict) or not {"epoch", "recipe", "torch_rng", "history", "seconds"} <= checkpoint.keys():
            raise ValueError("not a checkpoint of these recipes")
        return checkpoint
    except Exception as error:  # a cut-off zip, a pickle of something else, a file of text...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise TrainingStopped(
            f"{path} does not load ({reason}): start afresh under a new --name, or after deleting that folder"
        ) from None


def fit(
    recipe: Recipe,
    epochs: int,
    run_dir: Path,
    resume: bool = False,
    eval_every: int = 1,
    stop_after: int | None = None,
    options: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``recipe`` for ``epochs`` epochs, logging to and checkpointing in ``run_dir``.

    ``stop_after`` ends the session after that many epochs (of the same ``epochs``-long
    schedule) with the checkpoint kept, for ``resume`` to continue: time-sliced training.
    ``options`` (the command's) are kept with the checkpoint; resuming with other run-defining
    ones is refused. A loss that turns NaN or infinite stops the run, the last checkpoint kept.
    """
    options = options or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    settings = run_settings(options)
    data_dirs = options.get("data_dir")
    folders = [d for d in (data_dirs if isinstance(data_dirs, list) else [data_dirs]) if isinstance(d, Path) and d.is_dir()]
    if folders:  # the detector takes several folders
        settings[DATA_FILES] = " ".join(folder_fingerprint(folder) for folder in folders)
    noisy = options.get("noisy_dir")
    if isinstance(noisy, Path) and noisy.is_dir():  # Noise2Void's own noisy images: the data it trains on
        settings[NOISY_FILES] = folder_fingerprint(noisy)
    settings[RECIPE] = type(recipe).__name__  # a classifier's checkpoint never resumes a segmenter of the same --name
    result, start_epoch = FitResult(), 0
    if resume and checkpoint_path.exists():
        checkpoint = _load_checkpoint(checkpoint_path)
        saved = checkpoint.get("settings") or {}  # older checkpoints lack it, or some keys: those are not compared
        changed = sorted(k for k in settings if k in saved and saved[k] != settings[k])
        if changed:
            was = ", ".join(
                {
                    DATA_FILES: "other files in --data-dir",
                    NOISY_FILES: "other files in --noisy-dir",
                    RECIPE: f"another recipe ({saved[RECIPE]})",
                }.get(k)
                or f"--{k.replace('_', '-')} {saved[k]} (now {settings[k]})"
                for k in changed
            )
            raise TrainingStopped(f"{checkpoint_path} was trained with {was}: resume with the same options or a new --name")
        start_epoch = checkpoint["epoch"] + 1
        if epochs < start_epoch:  # a schedule that ended before now: nothing would train, yet the export would say so
            trained = f"{start_epoch} epoch{'s' if start_epoch > 1 else ''}"
            wanted = f"resume with --epochs {start_epoch} or more, not {epochs}"
            raise TrainingStopped(f"{checkpoint_path} has {trained} trained: {wanted}")
        recipe.load_state_dict(checkpoint["recipe"])
        torch.set_rng_state(checkpoint["torch_rng"])
        # Checkpoints from before schedules were kept: one schedule, assumed of this length.
        schedule = checkpoint.get("schedule") or checkpoint["recipe"].get("schedule") or [[0, epochs]]
        if schedule[-1][1] != epochs:
            schedule = [*schedule, [start_epoch, epochs]]
        result = FitResult(checkpoint["history"], checkpoint["seconds"], schedule=schedule)
        print(f"resumed from {checkpoint_path} after epoch {start_epoch}")
    elif resume:
        print(f"no checkpoint at {checkpoint_path}; starting afresh")
    result.schedule = result.schedule or [[0, epochs]]

    last_epoch = epochs if stop_after is None else min(epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        running = RunningMean()
        batches = recipe.train_batches(epoch)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{epochs}",
            total=len(batches) if isinstance(batches, Sized) else None,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for step, batch in enumerate(bar):
            values = recipe.train_step(batch)
            if not math.isfinite(values.get("loss", 0.0)):
                raise TrainingStopped(
                    f"the training loss became {values['loss']} at epoch {epoch + 1}, step {step + 1}; nothing was exported: "
                    "start again with a lower --lr (without --resume, or under a new --name)"
                )
            running.add(values)
            bar.set_postfix({key: f"{value:.4g}" for key, value in running.means().items()}, refresh=False)
        recipe.end_epoch(epoch)
        row: dict[str, float] = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in running.means().items()}}
        result.seconds += time.perf_counter() - started  # training time only, evaluation excluded
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            row.update({f"val_{k}": v for k, v in recipe.evaluate().items()})
        row["seconds"] = round(result.seconds, 1)
        result.history.append(row)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        _atomic_save(
            {
                "epoch": epoch,
                "recipe": recipe.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": result.history,
                "seconds": result.seconds,
                "settings": settings,
                "schedule": result.schedule,
            },
            checkpoint_path,
        )
        # Rewritten from the checkpoint's history, after it: a run killed between the two writes and resumed
        # logged that epoch twice when rows were appended first.
        _write_log(result.history, run_dir / "metrics.jsonl")
    plot_curves(result.history, run_dir / "curves.png")
    result.finished = len(result.history) >= epochs
    return result


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """One panel per metric name (train and val of the same metric share a panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({key.split("_", 1)[1] for row in history for key in row if key.startswith(("train_", "val_"))})
    if not names:
        return
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for split in ("train", "val"):
            points = [(row["epoch"], row[f"{split}_{name}"]) for row in history if f"{split}_{name}" in row]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", markersize=3, label=split)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

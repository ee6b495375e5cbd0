"""ONNX export behind a numeric parity check, and the model folder the service loads.

``export_onnx`` traces with the dynamo exporter and runs ``onnx.checker``; ``OrtParity`` runs
the exported graph under ONNX Runtime next to PyTorch on real inputs and fails the export when
they disagree; ``write_model_folder`` writes ``model.onnx`` + ``model.json`` + ``card.md`` +
``curves.png`` with the manifest's sha256 taken from the bytes on disk.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.cpus import available_cpus
from service.manifest import Manifest
from service.repository import file_sha256, publish_model_folder
from training.engine import FitResult


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance: the export is refused."""


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: Sequence[str],
    dynamic_spatial: bool = False,
    input_name: str = "input",
) -> None:
    """Export ``module`` (in eval mode, float32) with a dynamic batch axis (and H, W if asked)."""
    module = module.eval().float()
    dims = {0: torch.export.Dim.DYNAMIC}
    if dynamic_spatial:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example.float(),),
            dynamo=True,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_shapes=(dims,),
            verbose=False,
        )
    assert program is not None, "the dynamo exporter returns its program"
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


class OrtParity:
    """Runs PyTorch and ONNX Runtime side by side and tracks the largest absolute difference."""

    def __init__(self, module: torch.nn.Module, onnx_path: Path, tolerance: float) -> None:
        self.module = module.eval().float()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.tolerance = tolerance
        self.max_abs_diff = 0.0
        self.max_abs_output = 0.0

    def run(self, batch: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Both runtimes' outputs for ``batch`` (a float32 NCHW tensor), as numpy arrays."""
        with torch.no_grad():
            reference = self.module(batch.float())
        reference = [t.numpy() for t in (reference if isinstance(reference, (tuple, list)) else (reference,))]
        onnx_outputs = self.session.run(None, {self.input_name: batch.float().numpy()})
        for expected, actual in zip(reference, onnx_outputs, strict=True):
            if expected.shape != actual.shape:  # a broadcast difference would hide a wrong shape
                raise ParityError(f"ONNX Runtime gives an output of shape {list(actual.shape)}, PyTorch {list(expected.shape)}")
            if not (np.isfinite(expected).all() and np.isfinite(actual).all()):
                raise ParityError("the model outputs NaN or infinite values (did the training diverge?)")
            self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(expected - actual))))
            self.max_abs_output = max(self.max_abs_output, float(np.max(np.abs(expected))) if expected.size else 0.0)
        return reference, onnx_outputs

    def check(self) -> None:
        if self.max_abs_diff > self.tolerance:
            message = f"ONNX Runtime differs from PyTorch by {self.max_abs_diff:.3g} > {self.tolerance:g}"
            if self.max_abs_output * 1e-6 > self.tolerance:  # float32 rounding alone differs that much at this size
                message += f"; the outputs reach {self.max_abs_output:.3g}: did the training diverge (retrain with a lower --lr)?"
            raise ParityError(message)


def load_exported_weights(module: torch.nn.Module, folder: Path) -> Manifest:
    """Initialise ``module`` from the graph of an exported model folder (to fine-tune it); its manifest.

    Parameters are matched by name (graph initialisers keep PyTorch's names; a wrapper's ``model.``
    prefix is dropped); every parameter must be found with its shape, or nothing is loaded.
    """
    if any(isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) for layer in module.modules()):
        # The exporter folds batch-norm into the convolutions: the graph no longer holds the training weights.
        raise ValueError(
            f"cannot fine-tune a batch-norm network from {folder}: its export folded the batch-norm into the "
            "convolutions; continue its run from the checkpoint (--resume) instead"
        )
    manifest = Manifest.read(folder)
    weights = {}
    for initializer in onnx.load(str(folder / manifest.file)).graph.initializer:
        name = initializer.name
        while name.startswith("model."):
            name = name.removeprefix("model.")
        weights[name] = torch.from_numpy(onnx.numpy_helper.to_array(initializer).copy())
    state = module.state_dict()
    unlike = [name for name, value in state.items() if name not in weights or weights[name].shape != value.shape]
    if unlike:
        raise ValueError(f"{folder} has no weights of the same shape for {unlike[:3]}: not the same architecture")
    module.load_state_dict({name: weights[name] for name in state})
    return manifest


def git_commit() -> str:
    """The commit the recipe ran from, with ``-dirty`` when the tree had uncommitted changes."""
    try:
        # This repository's commit wherever the command runs from (not the current directory's).
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=repo).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=repo
        ).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """The CPU that trained (wall times compare only on the same one), e.g. "AMD EPYC 7B13, 2 CPUs, AVX2"
    or "AMD EPYC, 2 CPUs, AVX-512 VNNI"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        model, flags = platform.processor() or platform.machine(), set()
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    if vectors and flags & {"avx512_vnni", "avx_vnni"}:  # int8 dot products: INT8 models' speed-up rests on them
        vectors += " VNNI"
    return ", ".join(filter(None, [model, f"{available_cpus()} CPUs", vectors]))  # affinity and cgroup quota


def training_record(command: str, seed: int, data: str, seconds: float, **extra: object) -> dict[str, object]:
    return {
        "command": command,
        "commit": git_commit(),
        "seed": seed,
        "data": data,
        "seconds": round(seconds, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": machine(),
        **extra,
    }


def fit_record(args: argparse.Namespace, fitted: FitResult, data: str | None = None, **extra: object) -> dict[str, object]:
    """``training_record`` of a recipe trained by ``engine.fit`` (its usual arguments plus threads, and the
    schedule's restarts when a resume changed ``--epochs``); ``data`` when it is not the ``--data-dir`` folders."""
    if data is None:
        data = ", ".join(map(str, args.data_dir)) if isinstance(args.data_dir, list) else str(args.data_dir)
    extra = {"epochs": args.epochs, "threads": torch.get_num_threads(), **extra}
    if len(fitted.schedule) > 1:
        extra["schedule"] = fitted.schedule
    return training_record(args.command, args.seed, data, fitted.seconds, **extra)


def schedule_note(schedule: list[list[int]]) -> str:
    """Card wording for a run resumed with another ``--epochs`` (empty for one uninterrupted schedule)."""
    if len(schedule) <= 1:
        return ""
    parts = [
        f"after epoch {start} it was set to {epochs} epochs (`--resume --epochs {epochs}`)" for start, epochs in schedule[1:]
    ]
    return (
        f"- schedule: planned over {schedule[0][1]} epochs; "
        + "; ".join(parts)
        + ": the learning-rate schedule was stretched to the new length from the step reached (the rate jumps to the "
        "longer schedule's value there; see the lr curve where logged).\n"
    )


def provenance(record: dict[str, object]) -> str:
    """The model card's closing lines: how long, where, with which seed, command and commit."""
    schedule = record.get("schedule")
    return (
        (schedule_note(schedule) if isinstance(schedule, list) else "")
        + f"- wall time (training only): {record['seconds']:.0f} s on {record['threads']} CPU threads"
        f" ({record.get('machine', 'machine not recorded')}); seed {record['seed']}.\n"
        f"- command: `{record['command']}`, commit `{record['commit']}`."
    )


def write_model_folder(out_dir: Path, onnx_path: Path, manifest: Manifest, card: str, curves: Path | None) -> None:
    """Place the graph, manifest, card and curves in ``out_dir`` (the sha256 is of the copied file), swapped
    in whole (:func:`service.repository.publish_model_folder`)."""

    def fill(folder: Path) -> None:
        shutil.copyfile(onnx_path, folder / manifest.file)
        manifest.sha256 = file_sha256(folder / manifest.file)
        manifest.write(folder)
        (folder / "card.md").write_text(card)
        if curves is not None and curves.exists():
            shutil.copyfile(curves, folder / "curves.png")

    publish_model_folder(out_dir, fill)


def metrics_table(rows: dict[str, object]) -> str:
    """The scalar metrics as a Markdown table (lists and nested results belong in the card's text, not in a cell)."""
    scalars = {key: value for key, value in rows.items() if not isinstance(value, (list, dict))}
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in scalars.items()
    ]
    return "\n".join(lines)

"""``python -m training <task> [options]``: one recipe per task."""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import shlex
import sys
from pathlib import Path

from service.manifest import MAX_MODEL_NAME, MODEL_NAME

RECIPES = {
    "classifier": "training.classifier",
    "detector": "training.detector",
    "segmenter": "training.segmenter",
    "denoiser": "training.denoiser",
    "face": "training.face",
    "quantize": "training.quantize",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Options' defaults shown (but None, which means unset), and the recipe's docstring as it is written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, list | tuple):  # as typed on a command line, not [PosixPath('...')]
            action = copy.copy(action)
            action.default = " ".join(map(str, action.default))
        return super()._expand_help(action)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, evaluate and export a model.")
    tasks = parser.add_subparsers(dest="task", required=True)
    try:  # the recipes need the training extra (torch, onnx...), which the service's install leaves out
        modules = {task: importlib.import_module(module_name) for task, module_name in RECIPES.items()}
        from training.engine import claim_run_dir
        from training.export import ParityError
    except ModuleNotFoundError as error:
        raise SystemExit(f"error: {error.name} is not installed; training needs: python3 -m pip install -e '.[train]'") from None
    for task, module in modules.items():
        doc = (module.__doc__ or "").strip()
        recipe = tasks.add_parser(
            task,
            help=doc.splitlines()[0],
            description=doc,  # the recipe's docstring: what it trains and the data layout it reads
            formatter_class=HelpFormatter,
        )
        module.add_arguments(recipe)
        for action in recipe._actions:  # the formatter shows the defaults of options with a help text only
            if action.help is None and action.option_strings and action.default not in (None, False):
                action.help = "default: %(default)s"
            if action.dest == "models_dir":  # where the service looks: a new model trained elsewhere was never served
                action.default = Path(os.environ.get("OCELLUS_MODELS_DIR") or action.default)
                action.help = f"{action.help} (default: OCELLUS_MODELS_DIR from the environment, else models/): %(default)s"
    args = parser.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        parser.error(problem)
    for option in ("runs_dir", "models_dir"):  # found before the training, not after it
        folder = getattr(args, option, None)
        if folder is not None and (reason := unwritable(folder)):
            raise SystemExit(f"error: --{option.replace('_', '-')} {folder}: {reason}")
    args.command = "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if all(hasattr(args, option) for option in ("runs_dir", "name", "resume")):  # before any data is read
            claim_run_dir(args.runs_dir / args.name, args.resume, getattr(args, "init_from", None))
        modules[args.task].main(args)
    except KeyboardInterrupt:
        # The last finished epoch's checkpoint is intact (it is replaced atomically).
        raise SystemExit("interrupted; continue from the last finished epoch with the same command and --resume") from None
    except (OSError, ValueError, ParityError) as error:  # unreadable data, a wrong layout, a failed export check
        if os.environ.get("OCELLUS_TRACEBACK"):
            raise
        raise SystemExit(f"error: {error}\n(OCELLUS_TRACEBACK=1 shows where)") from None


# Counts and sizes of at least 1, and those of at least 0 (each recipe has some of them; a list: each of its values).
AT_LEAST_ONE = (
    "image_size", "limit", "limit_per_class", "eval_every", "threads", "stop_after", "crop", "patch", "patches_per_image",
    "repeats", "widths", "width", "base", "dim", "stem", "tile", "max_side", "calibration_images", "test_limit",
    "mask_radius",
)  # fmt: skip
AT_LEAST_ZERO = ("translate", "cutout", "workers", "overlap", "depths", "val_count")
FRACTIONS = ("val_fraction", "test_fraction", "mask_fraction")  # shares strictly between 0 and 1
PROBABILITIES = ("grayscale", "gray_fraction", "clip_fraction")


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with options every recipe shares, checked before any data is read (else None)."""
    for options, least in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for option in options:
            value = getattr(args, option, None)
            for item in value if isinstance(value, list | tuple) else [value]:
                if isinstance(item, int | float) and item < least:
                    return f"--{option.replace('_', '-')} must be at least {least}, not {item}"
    for option in FRACTIONS:
        value = getattr(args, option, None)
        if value is not None and not 0 < value < 1:
            return f"--{option.replace('_', '-')} is a share of the images: between 0 and 1, not {value}"
    for option in ("label_smoothing", "dropout", "momentum"):
        value = getattr(args, option, None)
        if value is not None and not 0 <= value < 1:
            return f"--{option.replace('_', '-')} must be in [0, 1), not {value}"
    for option in PROBABILITIES:
        value = getattr(args, option, None)
        if value is not None and not 0 <= value <= 1:
            return f"--{option.replace('_', '-')} is a probability: in [0, 1], not {value}"
    seconds = getattr(args, "bench_seconds", None)
    if seconds is not None and seconds <= 0:
        return f"--bench-seconds must be positive, not {seconds}"
    for option in ("batch_size", "lr", "epochs"):
        value = getattr(args, option, None)
        may_be_zero = option == "epochs" and getattr(args, "init_from", None) is not None  # evaluate + export as is
        if value is not None and (value < 0 or (value == 0 and not may_be_zero)):
            return f"--{option.replace('_', '-')} must be positive, not {value}"
    name = getattr(args, "name", None)
    if name is not None and not re.fullmatch(MODEL_NAME, name):
        return f"--name {name!r}: letters, digits, '_', '.' and '-' only, starting with a letter or digit (it names a folder)"
    if name is not None and len(name) > MAX_MODEL_NAME:  # (the export refused it, after the whole training)
        return f"--name: at most {MAX_MODEL_NAME} characters, not {len(name)}"
    data = None if getattr(args, "noisy_dir", None) else getattr(args, "data_dir", None)  # noisy photos alone need none
    for folder in data if isinstance(data, list) else [data] if data is not None else []:
        if not Path(folder).is_dir():
            return f"--data-dir {folder}: no such folder (the datasets live in ../shared/datasets)"
    return None


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be made or written in, or None (nothing is made: a refused run leaves no folders)."""
    existing = folder.absolute()
    while not existing.exists():  # the deepest part that exists, where the rest would be made
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


if __name__ == "__main__":
    main()

"""``python -m training <task> [options]``: one recipe per task."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

RECIPES = {
    "classifier": "training.classifier",
    "detector": "training.detector",
    "segmenter": "training.segmenter",
    "denoiser": "training.denoiser",
    "face": "training.face",
    "quantize": "training.quantize",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, evaluate and export a model.")
    tasks = parser.add_subparsers(dest="task", required=True)
    modules = {}
    for task, module_name in RECIPES.items():
        module = importlib.import_module(module_name)
        modules[task] = module
        module.add_arguments(tasks.add_parser(task, help=(module.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    args.command = "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv)
    modules[args.task].main(args)


if __name__ == "__main__":
    main()

"""``python -m service.add_model GRAPH.onnx --name NAME --task TASK [...]``: serve an ONNX graph made elsewhere.

Writes ``models/NAME/`` (a copy of the graph and its manifest, see ``service/manifest.py``) once ONNX
Runtime has run the graph on inputs the manifest describes and its outputs have the shapes the task
needs; the service picks the folder up on start or on ``POST /v1/models/reload``. (Models trained by
the recipes in ``training/`` get their manifests from their own export.)

    python -m service.add_model resnet18.onnx --name resnet18 --task classification \\
        --labels imagenet_classes.txt --size 224 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from service.manifest import (
    ANY_SIZE_TASKS,
    MANIFEST_FILE,
    MODEL_NAME,
    OUTPUT_ROLES,
    RESIZE,
    InputSpec,
    Manifest,
    Task,
    field_errors,
)
from service.repository import declared_name, file_sha256, output_shape_problem, publish_model_folder
from service.runtime import OnnxModel
from service.settings import Settings

SEGMENT_MAX_SIDE = 1024  # a segmenter without its own max_side sees photos at most this large (masks are scaled back)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.add_model", description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path, help="the ONNX file (NCHW float32 input)")
    parser.add_argument("--name", required=True, help="the model's name in requests (?model=NAME) and its folder")
    parser.add_argument("--task", required=True, choices=[task.value for task in Task])
    parser.add_argument("--labels", help="class names: a file with one per line, or a comma-separated list")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="for a graph of free size: the size to feed it"
    )
    parser.add_argument("--color", choices=["RGB", "GRAY"], help="default: from the graph's channel count")
    parser.add_argument("--mean", type=float, nargs="+", help="per channel, on pixels scaled to [0, 1] (default 0)")
    parser.add_argument("--std", type=float, nargs="+", help="per channel, on pixels scaled to [0, 1] (default 1)")
    parser.add_argument("--input", help="the input tensor (default: the graph's only one)")
    parser.add_argument("--output", action="append", default=[], metavar="ROLE=TENSOR", help="e.g. boxes=dets (repeat)")
    parser.add_argument("--default", action="append", default=[], metavar="KEY=VALUE", help="e.g. top_k=3 (JSON values)")
    parser.add_argument(
        "--serving",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="this model's own max_batch_size, max_batch_wait_ms, max_queue or sessions, over OCELLUS_* (repeat)",
    )
    parser.add_argument("--version", default="1")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: OCELLUS_MODELS_DIR or models/")
    parser.add_argument("--replace", action="store_true", help="replace a model folder of that name")
    return parser.parse_args(argv)


def pairs(entries: list[str], what: str) -> dict[str, str]:
    parsed = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what} {entry!r} is not KEY=VALUE")
        parsed[key.strip()] = value.strip()
    return parsed


def json_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: a string


def read_labels(spec: str | None) -> list[str]:
    if not spec:
        return []
    path = Path(spec)
    if not path.is_file() and "," not in spec and (path.suffix or "/" in spec):
        raise ValueError(f"--labels {spec!r}: no such file (or give the names separated by commas)")
    labels = path.read_text().splitlines() if path.is_file() else spec.split(",")
    return [label.strip() for label in labels if label.strip()]


def self_contained_session(graph: Path) -> ort.InferenceSession:
    """The graph loaded from its bytes, as the service loads it, from an empty working directory: a graph whose
    weights lie in a separate file (``model.onnx.data``) is refused here. The model folder gets ``model.onnx``
    alone, and the service would look for that file in its own working directory, outside the sha256 it checks."""
    data = graph.read_bytes()  # before the move: the path may be relative
    with tempfile.TemporaryDirectory() as empty, contextlib.chdir(empty):
        try:
            return ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as error:
            if "external data" not in str(error).lower():  # ONNX Runtime's errors are plain Exceptions: one line
                raise ValueError(f"{graph.name} does not load in ONNX Runtime: {error}") from None
    raise ValueError(
        f"{graph.name} keeps its weights in a separate file; save them inside it first: "
        "onnx.save_model(onnx.load(path), path, save_as_external_data=False)"
    )


def describe(args: argparse.Namespace) -> Manifest:
    """The manifest for ``args.graph``, from the graph's own input and outputs and the options."""
    task = Task(args.task)
    session = self_contained_session(args.graph)
    inputs = {node.name: node for node in session.get_inputs()}
    if args.input is None and len(inputs) != 1:
        raise ValueError(f"the graph has inputs {sorted(inputs)}: name one with --input")
    graph_input = inputs.get(args.input or next(iter(inputs)))
    if graph_input is None:
        raise ValueError(f"the graph has no input {args.input!r} (it has {sorted(inputs)})")
    shape = graph_input.shape
    if graph_input.type != "tensor(float)":
        raise ValueError(f"input {graph_input.name!r} is {graph_input.type}; the service feeds float32 images")
    if len(shape) != 4:
        raise ValueError(f"input {graph_input.name!r} has shape {shape}; the service feeds NCHW images")
    if shape[3] in (1, 3) and shape[1] not in (1, 3):
        raise ValueError(f"input {graph_input.name!r} has shape {shape}, channels last (NHWC); the service feeds NCHW")
    channels = shape[1] if isinstance(shape[1], int) else None
    color = args.color or ("GRAY" if channels == 1 else "RGB")
    if channels not in (None, 1 if color == "GRAY" else 3):
        raise ValueError(f"input {graph_input.name!r} has {channels} channels; {color} images have {3 if color == 'RGB' else 1}")
    fixed = tuple(shape[2:]) if all(isinstance(side, int) for side in shape[2:]) else None
    if task in ANY_SIZE_TASKS:
        if fixed or args.size:
            raise ValueError(f"{task.value} runs on each photo at its own size: export the graph with dynamic height and width")
        size = None
    else:
        size = tuple(args.size) if args.size else fixed
        if size is None:
            raise ValueError(f"{task.value} feeds every photo at one size: the graph's is free, so give --size HEIGHT WIDTH")
        if fixed and size != fixed:
            raise ValueError(f"--size {list(size)}: the graph takes {list(fixed)}")
    if task == Task.face_embedding and color == "GRAY":
        raise ValueError("face crops are RGB (the face pipeline decodes photos in colour): a GRAY embedder cannot serve")
    values = 1 if color == "GRAY" else 3
    mean, std = args.mean or [0.0] * values, args.std or [1.0] * values
    if len(mean) != values or len(std) != values or min(std) <= 0:
        raise ValueError(f"--mean and --std take {values} value(s) for {color} images, std above 0")

    outputs = pairs(args.output, "--output")
    graph_outputs = [node.name for node in session.get_outputs()]
    if not outputs and set(OUTPUT_ROLES[task]) <= set(graph_outputs):  # named like the roles
        outputs = {role: role for role in OUTPUT_ROLES[task]}
    elif not outputs and len(OUTPUT_ROLES[task]) == 1 and len(graph_outputs) == 1:
        outputs = {OUTPUT_ROLES[task][0]: graph_outputs[0]}
    if sorted(outputs) != sorted(OUTPUT_ROLES[task]):
        roles = ", ".join(f"{role}=TENSOR" for role in OUTPUT_ROLES[task])
        raise ValueError(f"{task.value} needs --output {roles} (the graph's outputs: {graph_outputs})")
    defaults = {key: json_value(value) for key, value in pairs(args.default, "--default").items()}
    if task in ANY_SIZE_TASKS and "stride" not in defaults:  # the service pads photos to it
        ort.set_default_logger_severity(4)  # the sizes that fail are expected: no ONNX Runtime error lines
        defaults["stride"] = find_stride(values, OnnxModel(args.graph, graph_input.name, list(outputs.values()), threads=1))

    return Manifest(
        name=args.name,
        task=task,
        version=args.version,
        sha256=file_sha256(args.graph),
        input=InputSpec(
            name=graph_input.name,
            color=color,
            size=size,
            resize=RESIZE.get(task, "none"),
            mean=mean,
            std=std,
            dynamic_batch=not isinstance(shape[0], int),
        ),
        outputs=outputs,
        labels=read_labels(args.labels),
        defaults=defaults,
        # Validated with the manifest, whose errors name serving.<key>.
        serving={key: json_value(value) for key, value in pairs(args.serving, "--serving").items()} if args.serving else None,
        training={"imported_from": str(args.graph.resolve()), "command": "python -m service.add_model " + " ".join(sys.argv[1:])},
    )


STRIDES = (1, 2, 4, 8, 16, 32, 64)


def find_stride(channels: int, model: OnnxModel) -> int:
    """The smallest multiple a graph that runs at any size needs its sides to be (its downsampling)."""
    for stride in STRIDES:
        height, width = -(-67 // stride) * stride, -(-97 // stride) * stride  # odd sizes rounded up to the stride
        try:
            results = model.run(np.zeros((1, channels, height, width), np.float32))
        except Exception:
            continue
        if all(np.asarray(result).shape[2:] == (height, width) for result in results):
            return stride
    raise ValueError(f"the graph gives no output of its input's size at any side multiple of {STRIDES}")


def probe(manifest: Manifest, graph: Path) -> None:
    """Run the graph as the service will (a batch of two; two sizes when any size goes), check its outputs,
    and complete ``manifest`` with what only a run tells.

    A segmenter gets a ``max_side``; a model with classes but no ``--labels`` gets their numbers as labels.
    (A segmenter's or denoiser's ``defaults["stride"]`` was found by :func:`describe`.)
    """
    ort.set_default_logger_severity(4)  # failures are caught and explained here: no ONNX Runtime error lines
    model = OnnxModel(graph, manifest.input.name, list(manifest.outputs.values()), threads=1)
    channels, labels = manifest.input.channels, len(manifest.labels)
    sizes: list[tuple[int, int]]
    if manifest.input.size is not None:
        sizes = [manifest.input.size]
    else:
        stride = manifest.stride
        sizes = [(stride * -(-side // stride), stride * -(-other // stride)) for side, other in ((64, 64), (96, 128))]
    for height, width in sizes:
        try:
            results = model.run(np.zeros((2, channels, height, width), np.float32))
        except Exception as error:
            raise ValueError(f"the graph fails on a [2, {channels}, {height}, {width}] input: {error}") from None
        out = {role: np.asarray(value) for role, value in zip(manifest.outputs, results, strict=True)}
        problem = output_shape_problem(manifest.task, out, (2, channels, height, width), labels)
        if problem:
            shapes = {role: list(value.shape) for role, value in out.items()}
            raise ValueError(f"outputs {shapes} on a [2, {channels}, {height}, {width}] input: {problem}")
    if manifest.task == Task.classification:
        noise = np.random.default_rng(0).standard_normal((2, channels, height, width)).astype(np.float32)
        scores = np.asarray(model.run(noise)[0], np.float64)
        if scores.min() >= 0 and np.allclose(scores.sum(axis=1), 1, atol=1e-3):
            raise ValueError("the output rows already sum to 1 (probabilities): export the logits; the service applies softmax")
    if not manifest.labels and manifest.task in (Task.classification, Task.detection, Task.segmentation):
        role = "scores" if manifest.task == Task.detection else "logits"
        axis = 2 if manifest.task == Task.detection else 1
        manifest.labels = [str(index) for index in range(out[role].shape[axis])]
    if manifest.task == Task.segmentation:
        manifest.defaults.setdefault("max_side", SEGMENT_MAX_SIDE)


def write(manifest: Manifest, graph: Path, models_dir: Path, replace: bool) -> Path:
    """``models_dir/NAME``, swapped in whole (:func:`publish_model_folder`): a reload never sees half a folder."""
    target = models_dir / manifest.name
    if target.exists() and not replace:
        raise ValueError(f"{target} exists: choose another --name, or --replace it")
    folders = [  # the service skips hidden folders (a swap's leftovers): so does this check
        entry.parent
        for entry in models_dir.glob(f"*/{MANIFEST_FILE}")
        if entry.parent != target and not entry.parent.name.startswith(".")
    ]
    others = [folder.name for folder in folders if declared_name(folder) == manifest.name]
    if others:
        raise ValueError(f"folder(s) {others} already serve the name {manifest.name!r}: two folders with one name serve neither")

    def fill(folder: Path) -> None:
        shutil.copyfile(graph, folder / manifest.file)
        manifest.write(folder)

    return publish_model_folder(target, fill)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if not args.graph.is_file():
            raise ValueError(f"{args.graph} is not a file")
        if not re.fullmatch(MODEL_NAME, args.name):
            raise ValueError(f"--name {args.name!r}: letters, digits, '_', '.', '-', starting with a letter or digit")
        manifest = describe(args)
        probe(manifest, args.graph)
        folder = write(manifest, args.graph, args.models_dir or Settings().models_dir, args.replace)
    except (ValueError, OSError) as error:
        raise SystemExit(f"add_model: {field_errors(error) if isinstance(error, ValidationError) else error}") from None
    size = "any size" if manifest.input.size is None else "x".join(map(str, manifest.input.size))
    labels = f"{len(manifest.labels)} labels"
    print(f"{folder}: {manifest.task.value}, {manifest.input.color} {size}, outputs {manifest.outputs}, {labels}")
    print("the service serves it after a start or POST /v1/models/reload")


if __name__ == "__main__":
    main()

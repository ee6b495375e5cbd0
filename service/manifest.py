"""The model manifest (``models/<name>/model.json``): the one contract between training and serving.

Training writes it next to ``model.onnx`` (see ``training/export.py``); the service reads it and
needs nothing else to pre-process inputs, run the graph and post-process outputs.

Fields
------
- ``name``, ``task``, ``version``: identity. ``task`` picks the service's pre/post-processing.
- ``file``, ``sha256``: the ONNX graph beside the manifest; the service refuses a file whose
  hash differs (a half-copied or swapped model must not serve).
- ``input``: tensor name, ``color`` (RGB|GRAY), ``size`` ([H, W], or null for segmentation and
  denoising, which run at each photo's size), ``resize`` (what the service does to reach ``size``, set
  by the task: stretch for classification and faces, letterbox for detection, none; a manifest may
  leave it out or say the same), ``mean``/``std`` per channel
  applied to pixels scaled to [0, 1], layout NCHW (``dynamic_batch`` is informational: the service
  reads the graph's batch axis and runs a fixed batch in slices).
- ``outputs``: role -> tensor name. classification: ``logits`` [N, C]. detection: ``boxes``
  [N, A, 4] x1y1x2y2 in input pixels and ``scores`` [N, A, C]. segmentation: ``logits``
  [N, C, H, W]. denoising: ``image`` [N, C, H, W]. face_embedding: ``embedding`` [N, D].
- ``labels``: class names in output order.
- ``defaults``: per-task serving defaults, typed and range-checked by :class:`Defaults` (which lists
  every key the service reads); segmentation and denoising need ``stride``; ``pad`` and
  ``any_object_score`` only declare what the service does (reflect, sum). Other keys are kept as
  information (``threshold_rule``...).
- ``metrics``: held-out results (dataset, split, numbers), ``training``: how it was made
  (command, commit, seed, data, seconds).
- ``serving`` (optional): this model's own micro-batcher and session settings, over the server's
  ``OCELLUS_*`` ones (:class:`ServingSpec`; Triton keeps these in config.pbtxt, TorchServe per model).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "model.json"


class Task(str, Enum):  # noqa: UP042 (StrEnum would change str() of the task in messages and logs)
    classification = "classification"
    detection = "detection"
    segmentation = "segmentation"
    denoising = "denoising"
    face_embedding = "face_embedding"


# What the service does with each task, so a manifest it cannot serve is refused when it loads (failed in
# /readyz), not with a 500 on every request.
OUTPUT_ROLES: dict[Task, tuple[str, ...]] = {
    Task.classification: ("logits",),
    Task.detection: ("boxes", "scores"),
    Task.segmentation: ("logits",),
    Task.denoising: ("image",),
    Task.face_embedding: ("embedding",),
}
ANY_SIZE_TASKS = (Task.segmentation, Task.denoising)  # run at the photo's own size: the graph must allow it
# How the service brings a photo to a fixed-size graph (detection keeps the aspect ratio; the rest stretch).
Resize = Literal["stretch", "letterbox", "none"]
RESIZE: dict[Task, Resize] = {Task.classification: "stretch", Task.detection: "letterbox", Task.face_embedding: "stretch"}
# Where each task's graph gives its classes: (output role, axis).
CLASS_AXIS = {Task.classification: ("logits", 1), Task.detection: ("scores", 2), Task.segmentation: ("logits", 1)}
MAX_SEGMENT_CLASSES = 256  # label maps are 8-bit PNGs
# Defaults that declare how the service works rather than tune it: only these values are implemented.
DECLARED = {"pad": "reflect", "any_object_score": "sum"}


def field_errors(error: ValidationError, prefix: str = "") -> str:
    """Each wrong field ("input.size.1: Field required"), without pydantic's echo of the whole document."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{'.'.join(map(str, item['loc']))}: {message}" if item["loc"] else message)
    return "; ".join(lines)


Unit = Annotated[float, Field(ge=0, le=1)]
Cosine = Annotated[float, Field(ge=-1, le=1)]
Count = Annotated[int, Field(ge=1)]
# Largest denoising tile, a request's or a manifest's. Peak RSS denoising 2048x2048 in-process (bsd-denoiser-unet):
# 1.1 GB at the default 512 tile, 1.2 GB at 1024, 2.9 GB at 1024 for a colour photo through the gray model.
MAX_TILE = 1024
MAX_INPUT_SIDE = 4096  # a fixed input size's side: the warm-up allocates two samples of it (400 MB at 4096 RGB)
Side = Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)]


class Defaults(BaseModel):
    """The ``defaults`` keys the service reads, by task; a wrong type or range fails the model's load, not
    each request that uses the default. Keys not listed here are kept (information for people)."""

    model_config = ConfigDict(extra="allow")

    top_k: Count | None = Field(None, description="classification: classes returned")
    score_threshold: Unit | None = Field(None, description="detection: lowest box score kept")
    iou_threshold: Unit | None = Field(None, description="detection: NMS overlap")
    max_detections: Count | None = Field(None, description="detection: boxes kept per image")
    any_object_score: str | None = Field(None, description='detection: "sum" of the class scores (declared)')
    face_labels: list[str] | None = Field(None, description='a face detector\'s face classes (default ["face"])')
    stride: Count | None = Field(None, description="segmentation, denoising: the side multiple the graph takes")
    pad: str | None = Field(None, description='segmentation, denoising: "reflect" (declared)')
    max_side: Count | None = Field(None, description="segmentation: the longer side a photo is scaled to")
    tile: Count | None = Field(None, le=MAX_TILE, description="denoising: tile side")
    overlap: int | None = Field(None, ge=0, description="denoising: tile overlap")
    threshold: Cosine | None = Field(None, description="face_embedding: verification cosine threshold")
    far: Unit | None = Field(None, description="face_embedding: the false accept rate measured at threshold")
    identify_threshold: Cosine | None = Field(None, description="face_embedding: identification threshold")
    identify_far: Unit | None = Field(None, description="face_embedding: its false accept rate")
    far_thresholds: dict[Annotated[float, Field(gt=0, le=1)], Cosine] | None = Field(
        None, description="face_embedding: further calibrated points, false accept rate -> threshold (for ?far=)"
    )
    crop_margin: float | None = Field(None, ge=0, le=2, description="face_embedding: margin around a detected box")
    detector: str | None = Field(None, description="face_embedding: the face detector model's name")
    embedding_size: Count | None = Field(None, description="face_embedding: embedding length")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_or_nulls(cls, values: Any) -> Any:
        # JSON's true would pass as 1 (a stride, a top_k), and a null as "unset" to the validator but not to the
        # code that reads the key: typos, never meant. (A null max_side means "never scale down".)
        if isinstance(values, dict):
            for key, value in values.items():
                if key in cls.model_fields and isinstance(value, bool):
                    raise ValueError(f"defaults.{key} is not a boolean (got {value!r})")
                if key in cls.model_fields and value is None and key != "max_side":
                    raise ValueError(f"defaults.{key} is null: give a value or leave the key out")
        return values


class ServingSpec(BaseModel):
    """Per-model overrides of the server-wide batching settings; a key left out takes the server's. Strict: true
    is not a batch size of 1, nor "8" one of 8."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_batch_size: Count | None = Field(None, le=4096, description="OCELLUS_MAX_BATCH_SIZE for this model")
    max_batch_wait_ms: float | None = Field(
        None, ge=0, le=1000, allow_inf_nan=False, description="OCELLUS_MAX_BATCH_WAIT_MS for this model"
    )
    max_queue: Count | None = Field(None, description="OCELLUS_MAX_QUEUE for this model")
    sessions: int | None = Field(None, ge=1, le=64, description="OCELLUS_ORT_SESSIONS for this model")


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB", "GRAY"] = "RGB"
    size: tuple[Side, Side] | None = Field(None, description="[height, width]; null = any size")
    resize: Resize | None = Field(None, description="default: the task's (see RESIZE)")
    mean: list[float] = Field(default_factory=list, description="per channel; default 0 for each")
    std: list[float] = Field(default_factory=list, description="per channel, above 0; default 1 for each")
    dynamic_batch: bool = True

    @property
    def channels(self) -> int:
        return 3 if self.color == "RGB" else 1

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> InputSpec:
        self.mean = self.mean or [0.0] * self.channels
        self.std = self.std or [1.0] * self.channels
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.color} input: mean and std take {self.channels} value(s) each")
        if min(self.std) <= 0:
            raise ValueError("input std must be above 0")
        return self


MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_MODEL_NAME = 128


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = 1
    # Bounded by the gallery's columns (model 200, model_version 100 with "+" and 12 hex digits of the hash): on
    # PostgreSQL a longer one failed every enrollment with a 503.
    name: str = Field(pattern=MODEL_NAME, max_length=MAX_MODEL_NAME)
    task: Task
    version: str = Field(min_length=1, max_length=64)
    # A bare file name in the model's own folder: "../other/model.onnx" or "/etc/passwd" is refused.
    file: str = Field("model.onnx", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: InputSpec
    outputs: dict[str, str]
    labels: list[str] = Field(default_factory=list)
    defaults: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    serving: ServingSpec | None = None

    @model_validator(mode="after")
    def _servable(self) -> Manifest:
        """The outputs, input size, resize and defaults that this task's pre- and post-processing need (the labels
        are checked against the graph's classes when it loads: ``repository._check_classes``)."""
        roles, size = OUTPUT_ROLES[self.task], self.input.size
        if sorted(self.outputs) != sorted(roles):
            raise ValueError(f"{self.task.value} outputs are {list(roles)} (role -> tensor name), not {list(self.outputs)}")
        resize: Resize = RESIZE.get(self.task, "none")  # the task decides it; a manifest may only say the same
        if self.input.resize not in (None, resize):
            raise ValueError(f"{self.task.value} input: the service resizes with {resize!r}, not {self.input.resize!r}")
        self.input.resize = resize
        if self.task in ANY_SIZE_TASKS and size is not None:
            raise ValueError(f"{self.task.value} runs at each photo's own size: input size null")
        if self.task in RESIZE and size is None:
            raise ValueError(f"{self.task.value} needs a fixed input size")
        if self.task == Task.face_embedding and self.input.color != "RGB":
            raise ValueError("face crops are RGB: a face_embedding input is RGB")
        # Typed (4.0 from a JSON tool reads as 4), keys left out stay out.
        try:
            self.defaults = Defaults.model_validate(self.defaults).model_dump(exclude_unset=True)
        except ValidationError as error:
            raise ValueError(field_errors(error, "defaults.")) from None
        if self.task in ANY_SIZE_TASKS and self.defaults.get("stride") is None:
            raise ValueError(f"{self.task.value} needs defaults.stride, the side multiple its graph takes")
        for key, value in DECLARED.items():
            if self.defaults.get(key, value) != value:
                raise ValueError(f"defaults.{key}: the service implements {value!r} only")
        return self

    @property
    def stride(self) -> int:
        """The side multiple a free-size graph takes (1: any size)."""
        return int(self.defaults.get("stride", 1))

    @property
    def weights_version(self) -> str:
        """``version`` plus the graph's hash: what galleries record with each embedding, so retrained
        weights are never compared with older embeddings, even when ``version`` was not bumped."""
        return f"{self.version}+{self.sha256[:12]}"

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        """The folder's manifest; a ValueError naming each wrong field (shown in /readyz) if it is not valid."""
        return cls.parse((model_dir / MANIFEST_FILE).read_text())

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """``text`` as a manifest, or a ValueError naming each wrong field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            raise ValueError(f"{MANIFEST_FILE}: {field_errors(error)}") from None

    def write(self, model_dir: Path) -> None:
        text = self.model_dump_json(indent=2, exclude={"serving"} if self.serving is None else None)
        (model_dir / MANIFEST_FILE).write_text(text + "\n")

"""The model manifest (``models/<name>/model.json``): the one contract between training and serving.

Training writes it next to ``model.onnx`` (see ``training/export.py``); the service reads it and
needs nothing else to pre-process inputs, run the graph and post-process outputs.

Fields
------
- ``name``, ``task``, ``version``: identity. ``task`` picks the service's pre/post-processing.
- ``file``, ``sha256``: the ONNX graph beside the manifest; the service refuses a file whose
  hash differs (a half-copied or swapped model must not serve).
- ``input``: tensor name, ``color`` (RGB|GRAY), ``size`` ([H, W] or null when fully
  convolutional), ``resize`` (stretch|letterbox|none), ``mean``/``std`` applied to pixels
  scaled to [0, 1], layout NCHW with a dynamic batch axis.
- ``outputs``: role -> tensor name. classification: ``logits`` [N, C]. detection: ``boxes``
  [N, A, 4] x1y1x2y2 in input pixels and ``scores`` [N, A, C]. segmentation: ``logits``
  [N, C, H, W]. denoising: ``image`` [N, C, H, W]. face_embedding: ``embedding`` [N, D].
- ``labels``: class names in output order.
- ``defaults``: per-task serving defaults (top_k, thresholds, tile size, face threshold + FAR...).
- ``metrics``: held-out results (dataset, split, numbers), ``training``: how it was made
  (command, commit, seed, data, seconds).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "model.json"


class Task(str, Enum):
    classification = "classification"
    detection = "detection"
    segmentation = "segmentation"
    denoising = "denoising"
    face_embedding = "face_embedding"


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB", "GRAY"] = "RGB"
    size: tuple[int, int] | None = Field(None, description="[height, width]; null = any size")
    resize: Literal["stretch", "letterbox", "none"] = "stretch"
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0])
    dynamic_batch: bool = True

    @property
    def channels(self) -> int:
        return 3 if self.color == "RGB" else 1


MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = 1
    name: str = Field(pattern=MODEL_NAME)
    task: Task
    version: str
    # A bare file name in the model's own folder: "../other/model.onnx" or "/etc/passwd" is refused.
    file: str = Field("model.onnx", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: InputSpec
    outputs: dict[str, str]
    labels: list[str] = Field(default_factory=list)
    defaults: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @property
    def weights_version(self) -> str:
        """``version`` plus the graph's hash: what galleries record with each embedding, so retrained
        weights are never compared with older embeddings, even when ``version`` was not bumped."""
        return f"{self.version}+{self.sha256[:12]}"

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        return cls.model_validate_json((model_dir / MANIFEST_FILE).read_text())

    def write(self, model_dir: Path) -> None:
        (model_dir / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n")

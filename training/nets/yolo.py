"""A small one-stage, anchor-free detector (YOLO/FCOS family) for CPU serving.

Backbone: a space-to-depth stem to stride 4, then stride-2 stages of CSP blocks (``C2f``-style:
half of the channels go through residual bottlenecks, half bypass them, a 1x1 conv fuses both),
giving features at strides 4, 8, 16 and 32. Neck: a top-down FPN that brings the stride-32 context into
the stride-16 and stride-8 maps. Head: on each output scale (8 and 16 by default, so 6-100 px
faces each land on a grid fine enough for them), one 3x3 conv and a 1x1 conv predict at every
cell ``4 + 1 + C`` numbers:

- box: the centre offset from the cell centre, ``1.5 * tanh`` bounded (in cells), and
  ``log(w / stride)``, ``log(h / stride)``;
- objectness (one logit): is there an object centred near this cell;
- class logits (softmax: the classes are mutually exclusive kinds of object).

``forward`` returns what the service consumes: ``boxes [N, A, 4]`` (x1 y1 x2 y2 in input
pixels) and ``scores [N, A, C] = sigmoid(objectness) * softmax(class)``; so the sum of a cell's
class scores is its objectness ("any object"). ``raw`` returns the per-cell predictions the loss
needs, with the cell centres and strides.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation

MAX_LOG_SIZE = 6.0  # exp(6) = 403 strides: no box is larger, and exp() cannot overflow


def conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> Conv2dNormActivation:
    return Conv2dNormActivation(c_in, c_out, kernel, stride, activation_layer=nn.SiLU, inplace=True)


class Bottleneck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, 3), conv(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CSPBlock(nn.Module):
    """Split, run ``depth`` bottlenecks on one half (keeping every intermediate), fuse with a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, depth: int) -> None:
        super().__init__()
        half = max(c_out // 2, 8)
        self.split = conv(c_in, 2 * half, 1)
        self.blocks = nn.ModuleList(Bottleneck(half) for _ in range(depth))
        self.fuse = conv((2 + depth) * half, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.split(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse(torch.cat(parts, 1))


class Backbone(nn.Module):
    """Space-to-depth stem straight to stride 4, then stages at strides 8, 16, 32.

    The stem folds each 2x2 pixel block into channels and convolves with stride 2 (YOLOv5's
    "Focus"): no activation map at stride 2 is ever stored, which is where a small CNN spends
    most of its memory traffic (and CPU time) in training.
    """

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        stem: list[nn.Module] = [nn.PixelUnshuffle(2), conv(12, widths[0], 3, 2)]
        if depths[0]:
            stem.append(CSPBlock(widths[0], widths[0], depths[0]))
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList(
            nn.Sequential(conv(c_in, c_out, 3, 2), CSPBlock(c_out, c_out, depth)) if depth else conv(c_in, c_out, 3, 2)
            for c_in, c_out, depth in zip(widths[:-1], widths[1:], depths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features  # strides 4, 8, 16, 32


class YoloDetector(nn.Module):
    """Backbone + FPN + dense head on the strides in ``strides`` (a subset of 8, 16, 32)."""

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 128, 192),
        depths: tuple[int, ...] = (0, 2, 2, 1),
        neck_width: int = 64,
        strides: tuple[int, ...] = (8, 16),
        image_size: tuple[int, int] = (416, 416),
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError("widths and depths: 4 numbers each (strides 4, 8, 16, 32)")
        if not set(strides) <= {8, 16, 32}:
            raise ValueError("strides must be among 8, 16, 32")
        self.num_classes = num_classes
        self.strides = tuple(sorted(strides))
        self.image_size = image_size
        self.backbone = Backbone(widths, depths)
        # Top-down FPN from stride 32 to the finest output stride.
        self.lateral = nn.ModuleDict({str(s): conv(widths[1 + i], neck_width, 1) for i, s in enumerate((8, 16, 32))})
        self.smooth = nn.ModuleDict({str(s): CSPBlock(2 * neck_width, neck_width, 1) for s in (8, 16) if s >= self.strides[0]})
        self.heads = nn.ModuleDict(
            {
                str(s): nn.Sequential(conv(neck_width, neck_width, 3), nn.Conv2d(neck_width, 5 + num_classes, 1))
                for s in self.strides
            }
        )
        self._init_head()

    def _init_head(self) -> None:
        for head in self.heads.values():
            assert isinstance(head, nn.Sequential)
            last = head[-1]
            assert isinstance(last, nn.Conv2d) and last.bias is not None
            nn.init.normal_(last.weight, std=0.01)
            nn.init.zeros_(last.bias)
            with torch.no_grad():
                last.bias[2:4] = math.log(3.0)  # boxes start ~3 cells wide: a typical face at its scale
                last.bias[4] = -math.log((1 - 0.01) / 0.01)  # objectness starts at 1 %: focal-loss prior

    def features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c4, c8, c16, c32 = self.backbone(x)
        del c4
        maps = {8: c8, 16: c16, 32: c32}
        out: dict[int, torch.Tensor] = {32: self.lateral["32"](c32)}
        for stride in (16, 8):
            if stride < self.strides[0]:
                break
            coarse = F.interpolate(out[stride * 2], scale_factor=2.0, mode="nearest")
            out[stride] = self.smooth[str(stride)](torch.cat([self.lateral[str(stride)](maps[stride]), coarse], 1))
        return {s: out[s] for s in self.strides}

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``predictions [N, A, 5 + C]``, cell ``centres [A, 2]`` (pixels) and ``strides [A]``."""
        predictions, centres, strides = [], [], []
        for stride, feature in self.features(x).items():
            p = self.heads[str(stride)](feature)
            n, c, h, w = p.shape
            predictions.append(p.permute(0, 2, 3, 1).reshape(n, h * w, c))
            ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            centres.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], 1))
            strides.append(torch.full((h * w,), float(stride)))
        return torch.cat(predictions, 1), torch.cat(centres, 0).to(x.device), torch.cat(strides, 0).to(x.device)

    @staticmethod
    def decode_boxes(predictions: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
        """``[N, A, 4+]`` raw box numbers -> x1 y1 x2 y2 in input pixels (float32)."""
        p = predictions[..., :4].float()
        stride = strides[:, None]
        centre = centres + 1.5 * torch.tanh(p[..., :2]) * stride
        size = torch.exp(p[..., 2:4].clamp(max=MAX_LOG_SIZE)) * stride
        return torch.cat([centre - size / 2, centre + size / 2], -1)

    @staticmethod
    def decode_scores(predictions: torch.Tensor) -> torch.Tensor:
        p = predictions.float()
        return torch.sigmoid(p[..., 4:5]) * torch.softmax(p[..., 5:], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predictions, centres, strides = self.raw(x)
        return self.decode_boxes(predictions, centres, strides), self.decode_scores(predictions)

"""A small face embedder for 112x112 crops: a narrow IResNet (the ArcFace papers' backbone) with a GDC head.

Stem (3x3 conv, stride 2) then stages of residual blocks ``BN -> conv3x3(stride) -> BN -> PReLU ->
conv3x3 -> BN`` (+ a 1x1 projection when the shape changes), ending at 7x7. The stride sits in the
first conv (ResNet's place, not IResNet's) to halve the cost of each stage's first block on the CPU.
The head keeps the face's layout instead of averaging it away (crops are centred, so *where* a
feature is matters): MobileFaceNet's global depthwise conv (one 7x7 filter per channel) -> linear
-> BN. :class:`Normalised` wraps it for export with the L2-normalisation inside the graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            _conv3(cin, cout, stride),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            _conv3(cout, cout),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class FaceNet(nn.Module):
    """``[N, 3, 112, 112]`` normalised crops -> ``[N, dim]`` embeddings (not normalised)."""

    def __init__(
        self,
        dim: int = 128,
        widths: tuple[int, ...] = (64, 128, 192),
        depths: tuple[int, ...] = (2, 3, 2),
        stem: int = 32,
        dropout: float = 0.1,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3(3, stem, 2), nn.BatchNorm2d(stem), nn.PReLU(stem))
        layers: list[nn.Module] = []
        cin = stem
        for width, depth in zip(widths, depths, strict=True):
            layers.append(Block(cin, width, 2))
            layers += [Block(width, width, 1) for _ in range(depth - 1)]
            cin = width
        self.stages = nn.Sequential(*layers)
        side = input_size
        for _ in range(1 + len(widths)):  # stride-2 convs with padding 1 round up
            side = (side + 1) // 2
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cin, side, groups=cin, bias=False),  # global depthwise conv: [N, C, 7, 7] -> [N, C, 1, 1]
            nn.BatchNorm2d(cin),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(cin, dim, bias=False),
            nn.BatchNorm1d(dim),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class Normalised(nn.Module):
    """The served graph: unit-length embeddings (cosine similarity is then a dot product).

    With ``flip`` the embedding is that of the face plus that of its mirror image (test-time
    augmentation: a face and its mirror are the same person; one batch of 2N through the net).
    """

    def __init__(self, net: nn.Module, flip: bool = False) -> None:
        super().__init__()
        self.net, self.flip = net, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            both = self.net(torch.cat([x, x.flip(-1)])).float()
            n = x.shape[0]
            return F.normalize(both[:n] + both[n:], dim=1)
        return F.normalize(self.net(x).float(), dim=1)

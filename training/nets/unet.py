"""U-Net (Ronneberger et al., 2015): a contracting path, an expanding path with skip connections.

Each level of the contracting path is two 3x3 conv -> batch-norm -> ReLU blocks followed by a
2x2 max-pool, doubling the width; the expanding path up-samples with a 2x2 transposed
convolution ("up-convolution"), concatenates the same-level features of the contracting path
(the skip connection that brings back the detail lost to pooling) and applies two more 3x3
blocks. A 1x1 convolution gives per-pixel class logits ``[N, C, H, W]``; the per-pixel softmax
lives in the loss and in the service's argmax. Convolutions are padded ("same"), unlike the
paper's valid convolutions, so the output has the input's size whenever H and W are multiples
of :attr:`UNet.stride` (the service pads to that; see ``service/tasks/segmentation.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Up-convolution to the skip's width, concatenation with the skip, two 3x3 blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """``depth`` poolings (output stride ``2**depth``), widths ``base * 2**level`` capped at ``max_width``.

    The cap keeps the file small: the deep levels hold most of the weights but little of the
    compute, and a few hundred training photos cannot feed 512-channel layers anyway.
    """

    def __init__(
        self, in_channels: int, num_classes: int, base: int = 16, depth: int = 4, max_width: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = [min(base * 2**level, max_width) for level in range(depth + 1)]
        self.stride = 2**depth
        self.stem = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        # Dropout at the bottleneck, as in the paper, against over-fitting a few hundred photos.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(self.pool(skips[-1])))
        x = self.dropout(skips.pop())
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)


class FlipAveragedMaps(nn.Module):
    """Test-time augmentation in the graph: the mean of the per-pixel logits of the image and of its mirror,
    mirrored back so that each pixel averages its own two predictions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(-1)).flip(-1)) * 0.5

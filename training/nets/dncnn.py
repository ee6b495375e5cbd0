"""Denoisers: DnCNN (Zhang et al., 2017) and a small U-Net, both residual by default.

By default both learn the *noise* (residual learning): the graph returns ``x - f(x)``, the
clean image, so the exported model's output is what the service sends back. With
``residual=False`` the network predicts the clean image directly, as Noise2Void does: there the
centre pixel is a neighbour's value during training, so a residual skip would only add an
identity the network has to learn to cancel. Pixels are in [0, 1]
(the manifest's mean 0 / std 1); nothing else is normalised.

- :class:`DnCNN`: a plain stack of ``depth`` 3x3 convolutions (conv+ReLU, then conv+BN+ReLU,
  then a last conv), receptive field ``2 * depth + 1`` pixels. Any height and width.
- :class:`DenoiseUNet`: three scales joined by strided convolutions / transposed convolutions
  with additive skips (as DRUNet does, without its residual blocks), so the receptive field
  is large at a fraction of DnCNN's cost per pixel; H and W must be multiples of
  :attr:`DenoiseUNet.stride` (the service reflect-pads).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_relu(in_channels: int, out_channels: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DnCNN(nn.Module):
    stride = 1

    def __init__(self, channels: int = 1, depth: int = 17, width: int = 64, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        layers = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += conv_relu(width, width, bn=True)
        layers.append(nn.Conv2d(width, channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x) if self.residual else self.body(x)


class Stage(nn.Sequential):
    def __init__(self, width: int, blocks: int) -> None:
        super().__init__(*[layer for _ in range(blocks) for layer in conv_relu(width, width, bn=False)])


class DenoiseUNet(nn.Module):
    """``len(widths)`` scales; ``blocks`` conv+ReLU layers per scale on each side of the bottleneck."""

    def __init__(
        self, channels: int = 1, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2, residual: bool = True
    ) -> None:
        super().__init__()
        self.residual = residual
        self.stride = 2 ** (len(widths) - 1)
        self.head = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in range(len(widths) - 1):
            self.down.append(nn.Sequential(Stage(widths[level], blocks), nn.Conv2d(widths[level], widths[level + 1], 2, 2)))
            up = nn.ConvTranspose2d(widths[level + 1], widths[level], 2, 2)
            self.up.append(nn.Sequential(up, Stage(widths[level], blocks)))
        self.body = Stage(widths[-1], 2 * blocks)
        self.tail = nn.Conv2d(widths[0], channels, 3, padding=1, bias=False)

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """The noise (residual) or the clean image (direct)."""
        skips = []
        h = self.head(x)
        for down in self.down:
            skips.append(h)
            h = down(h)
        h = self.body(h)
        for up in reversed(self.up):
            assert isinstance(up, nn.Sequential)  # (transposed conv, stage): for the type checker
            h = up[1](up[0](h) + skips.pop())  # additive skip: cheaper than concatenation, as in DRUNet
        return self.tail(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.estimate(x) if self.residual else self.estimate(x)


def build(arch: str, channels: int, width: int, depth: int, residual: bool = True) -> DnCNN | DenoiseUNet:
    """``dncnn``: ``depth`` layers of ``width``; ``unet``: 3 scales of ``width``, 2x, 4x with ``depth`` convs each."""
    if arch == "dncnn":
        return DnCNN(channels, depth, width, residual)
    if arch == "unet":
        return DenoiseUNet(channels, (width, 2 * width, 4 * width), depth, residual)
    raise ValueError(f"unknown architecture {arch!r}")


def inflate(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source`` weights reshaped to ``target``'s, for a grayscale network's weights in a colour one.

    A layer that reads one channel where the target reads C gets its filters repeated over the C
    inputs and divided by C (it sees their mean); one that writes one channel where the target writes
    C repeats its output. A gray image replicated to C channels then gets the gray network's result in
    every channel, which fine-tuning on colour photos starts from.
    """
    weights = {}
    for name, value in source.items():
        want = target[name].shape
        if value.shape == want:
            weights[name] = value
        elif value.dim() == 4 and value.shape[1] == 1 and value.shape[0] == want[0]:
            weights[name] = value.repeat(1, want[1], 1, 1) / want[1]
        elif value.shape[0] == 1 and value.shape[1:] == want[1:]:
            weights[name] = value.repeat(want[0], *[1] * (value.dim() - 1))
        else:
            raise ValueError(f"cannot fit {name} {tuple(value.shape)} into {tuple(want)}")
    return weights


class DihedralAveraged(nn.Module):
    """Self-ensemble: the mean of ``model``'s outputs over the 8 flips and transpositions of the input,
    each mapped back. The recipes train on those same views, so each is an equally good and partly
    independent estimate; it costs 8 runs of the model (one at a time: memory stays a single run's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        for transposed in (False, True):
            view = x.transpose(2, 3) if transposed else x
            for dims in ((), (2,), (3,), (2, 3)):
                out = self.model(view.flip(dims) if dims else view)
                out = out.flip(dims) if dims else out
                total = total + (out.transpose(2, 3) if transposed else out)
        return total / 8


class Blended(nn.Module):
    """``(1 - weight) * model(x) + weight * x``: a Noise2Void network learns to ignore each pixel's own
    noisy value (it was a neighbour's during training), so its output drops that evidence; blending the
    input back in, with the weight that minimises SURE for the known noise level, restores it (a
    constant-weight form of the posterior step in Laine et al. 2019, "High-Quality Self-Supervised
    Deep Image Denoising")."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        super().__init__()
        self.model = model
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * self.model(x) + self.weight * x

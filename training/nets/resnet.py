"""A small residual CNN for low-resolution classification (CIFAR-sized images).

The layout follows the fast CIFAR-10 recipes (airbench, ResNet-9): a fixed 2x2 "whitening"
convolution initialised from the data's patch statistics, then three stages of
conv -> max-pool -> batch-norm -> GELU followed by a residual conv branch, a global max-pool
and a linear classifier. Weights of the batch-norms are frozen at 1 (only biases learn), which
the fast recipes found to train faster at high learning rates.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    norm.weight.requires_grad_(False)
    return norm


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    # Identity ("dirac") start for the first in_channels filters keeps the signal flowing early on.
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


class ResidualStage(nn.Module):
    """Downsampling conv + pool, then a residual conv branch: ``y = x + GELU(BN(conv(x)))``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = _conv(in_channels, out_channels)
        self.down_norm = _batch_norm(out_channels)
        self.residual = _conv(out_channels, out_channels)
        self.residual_norm = _batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.down_norm(F.max_pool2d(self.down(x), 2)))
        return x + F.gelu(self.residual_norm(self.residual(x)))


class ResidualCNN(nn.Module):
    """Residual classifier; ``forward`` returns logits ``[N, num_classes]``."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (64, 256, 256), logit_scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        stages, in_channels = [], self.whiten.out_channels
        for width in widths:
            stages.append(ResidualStage(in_channels, width))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 stem to the eigenvectors of the patch covariance (``images``: normalised).

        Each eigenvector appears with both signs so that GELU keeps the information.
        """
        h, w = self.whiten.weight.shape[2:]
        patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, 3 * h * w).double()
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, 3, h, w)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())
        self.whiten.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.stages(x)
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.logit_scale


class FlipAveragedLogits(nn.Module):
    """Test-time augmentation baked into the exported graph: mean logits of x and its mirror (class scores
    do not move with the image, so nothing is mirrored back)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[3])))

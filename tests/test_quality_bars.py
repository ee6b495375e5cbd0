"""The issues' quality bars against the committed reference models' cards (measured by their exports on the
held-out splits; the task tests re-measure them over HTTP). A bar that is met must stay met when a model is
retrained and committed; a goal not reached yet is an expected failure that turns red the day it is reached,
so that this file, the README and the issue are updated together."""

from __future__ import annotations

import pytest

from service.manifest import Manifest
from tests.conftest import MODELS


def metrics(model: str) -> dict:
    return Manifest.read(MODELS / model).metrics


def test_met_bars_stay_met() -> None:
    detector = metrics("facemask-detector")
    assert detector["any_ap50"] >= 0.80 and detector["without_copies"]["any_ap50"] >= 0.80  # also without test copies
    assert metrics("pennfudan-unet")["iou_person"] >= 0.80
    assert metrics("bsd-n2v-unet")["psnr_BSD68_s25"] >= 27.0  # Noise2Void, BSD68 at sigma 25
    denoiser = metrics("bsd-denoiser-unet")
    for name in ("BSD68", "Set12"):  # the supervised model beats BM3D (run on the same noisy images) on both sets
        for sigma in (15, 25, 50):  # (Set12 sigma 15 by 0.003 dB: a tie within one noise draw's spread)
            assert denoiser[f"psnr_{name}_s{sigma}"] > denoiser[f"bm3d_psnr_{name}_s{sigma}"], (name, sigma)


@pytest.mark.xfail(strict=True, reason="issue 2: 91.59 % on the CIFAR-10 test split, the bar is 94 %")
def test_classifier_reaches_94_percent() -> None:
    assert metrics("cifar10-resnet")["top1"] >= 0.94


@pytest.mark.xfail(strict=True, reason="issue 6: DevTest 0.937 and AT&T one-shot 0.917, the bar is 0.95 for each")
def test_face_model_reaches_095_on_devtest_and_att() -> None:
    face = metrics("lfw-face")
    assert face["devtest_accuracy"] >= 0.95 and face["att_detected_rank1"] >= 0.95


# Published DnCNN-S (Zhang et al. 2017, Table 3; one model per sigma): the goal is to come within 0.3 dB.
DNCNN_S = {"BSD68": {15: 31.73, 25: 29.23, 50: 26.23}, "Set12": {15: 32.86, 25: 30.44, 50: 27.18}}


@pytest.mark.xfail(strict=True, reason="issue 5: BSD68 is 0.23-0.29 dB under published DnCNN-S, Set12 0.36-0.47 (goal: 0.3)")
def test_supervised_denoiser_comes_within_03_db_of_dncnn() -> None:
    denoiser = metrics("bsd-denoiser-unet")
    gaps = [
        published - denoiser[f"psnr_{name}_s{sigma}"] for name, table in DNCNN_S.items() for sigma, published in table.items()
    ]
    assert max(gaps) <= 0.3

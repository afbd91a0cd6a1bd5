"""Shared fixtures: the tiny random SD-shaped model, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from maskdiffusion.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def segmenter(tiny_model):
    from maskdiffusion import MaskDiffusion

    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=3)
    seg.preset = seg.preset.replace(size=128)
    return seg


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)

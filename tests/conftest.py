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


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process runs use one thread like the subprocesses (OMP_NUM_THREADS=1), for exact equality."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_models():
    """Load each (model, device, dtype, batch size, preset) once for all in-process CLI runs of a module."""
    from maskdiffusion.commands import options

    loaded = {}
    original = options.load_segmenter

    def load(args):
        key = (
            args.model,
            args.device,
            args.dtype,
            args.batch_size,
            getattr(args, "preset", None),
            args.compile,
            args.encoder,
        )
        if key not in loaded:
            loaded[key] = original(args)
        return loaded[key]

    options.load_segmenter = load
    yield
    options.load_segmenter = original


@pytest.fixture(scope="session")
def tiny_family_model(tmp_path_factory):
    """``tiny_family_model(family)``: the folder of that family's tiny random model, built once per session.

    Folders are named ``family0``, ``family1``, ... so that no test can pass because a
    folder's name says what the model is (a Turbo model must be recognised by its contents).
    """
    from maskdiffusion.tiny import build_tiny_model

    built = {}

    def folder(family: str):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp("family"), family=family)
        return built[family]

    return folder


@pytest.fixture
def hub_cached(tmp_path, monkeypatch, tiny_family_model):
    """``hub_cached(family, repo_id)``: a family's tiny model where the hub cache keeps a download of ``repo_id``.

    A fresh cache folder is made the test's hub cache (``huggingface_hub.constants.HF_HUB_CACHE``)
    and the model is placed where a download lands (``models--ORG--NAME/snapshots/REVISION``
    with ``refs/main``), so whatever looks a hub id up cache-first finds it, offline.
    """
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def place(family: str, repo_id: str):
        repo, revision = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
        snapshot = repo / "snapshots" / revision
        shutil.copytree(tiny_family_model(family), snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        return snapshot

    return place


@pytest.fixture(scope="module")
def segmenter_of(tiny_family_model):
    """``segmenter_of(family)``: ``MaskDiffusion.from_pretrained(folder, device="cpu")``, once per family and module."""
    import functools

    from maskdiffusion import MaskDiffusion

    return functools.cache(lambda family: MaskDiffusion.from_pretrained(str(tiny_family_model(family)), device="cpu"))


@pytest.fixture(scope="module")
def pipe_of(tiny_family_model):
    """``pipe_of(family)``: the folder loaded by diffusers' ``DiffusionPipeline``, once per family and module."""
    import functools

    from diffusers import DiffusionPipeline

    return functools.cache(lambda family: DiffusionPipeline.from_pretrained(tiny_family_model(family)))

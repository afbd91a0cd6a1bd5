import dataclasses
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from maskdiffusion import MaskDiffusion, ModelNotFoundError, Preset
from maskdiffusion.loading import (
    ModelCard,
    load_components,
    model_card,
    model_presets,
    pick_device,
    pick_dtype,
    resolve_model_folder,
)


def fake_hub_cache(tiny_model, cache, repo="someorg/tiny-sd"):
    """Lay the tiny model out as huggingface_hub caches a downloaded repo."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(tiny_model, root / "snapshots" / revision)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return repo


def test_hub_id_in_the_local_cache_loads_offline(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = fake_hub_cache(tiny_model, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = resolve_model_folder(repo)
    assert folder.parent.name == "snapshots"
    seg = MaskDiffusion.from_pretrained(repo, device="cpu")
    assert seg.model_id == repo
    assert not seg.unet.training and not any(p.requires_grad for p in seg.unet.parameters())


def test_missing_hub_model_offline_names_the_model_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"(?s)someorg/absent.*not in the local.*hf download"):
        resolve_model_folder("someorg/absent")


def test_model_folder_overrides_presets_with_its_settings_file(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "maskdiffusion.json").write_text('{"presets": {"default": {"size": 128, "attention_factors": [16]}}}')
    presets = model_presets(folder)
    assert presets["default"].size == 128 and presets["default"].attention_factors == (16,)
    assert presets["reference"].size == 512  # untouched
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu")
    assert seg.preset.size == 128


def test_device_and_dtype_names_are_checked():
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_dtype("bfloat16") is torch.bfloat16 and pick_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def settings_folder(tmp_path, content: str | bytes):
    """A folder holding only ``maskdiffusion.json`` (the settings are read before any weights)."""
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    path = folder / "maskdiffusion.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"presets": [{"size": 64}]}', r'"presets" must be an object mapping preset names to .*, not a list'),
        ('{"presets": {"default": [1]}}', r"preset 'default' must be an object of field values, not a list"),
        ('{"presets": {"default": {"size": "big"}}}', r"preset 'default': size must be a whole number .*'big'"),
        ('{"presets": {"default": {"timestep": 1000000}}}', r"preset 'default': timestep .* 0 to 999"),
        ('{"presets": {"default": {"refine_steps": 1000000000}}}', r"refine_steps .* 0 to 100"),
        ('{"presets": {"default": {"size": 8192}}}', r"size must be .* 2048"),
        ('{"presets": {"fast": {"sise": 64}}}', r"preset 'fast': unknown preset field\(s\) 'sise'"),
        ('{"presets": {"default": {"size": NaN}}}', r"size must be a whole number"),
        ("[1, 2]", r"must hold a JSON object .*, not a list"),
        ('{"presets": {"default": {"size": 64,}}}', r"is not valid JSON \(.* at line 1, column"),
        ("[" * 100_000 + "]" * 100_000, r"nests too deeply|not valid JSON"),
        ('{"size": ' + "9" * 5000 + "}", r"is not valid JSON"),
        (b"\xff\xfe{\x00}\x00", r"is not UTF-8 text"),
        ('{"random_weights": "yes"}', r'"random_weights" must be true or false'),
        ('{"vocabulary": ["grass", ""]}', r'"vocabulary" must be a list of non-empty words'),
        ('{"vocabulary": "grass"}', r'"vocabulary" must be a list'),
    ],
)
def test_bad_settings_file_is_a_value_error_naming_the_file(tmp_path, content, message):
    from maskdiffusion.loading import model_card

    folder = settings_folder(tmp_path, content)
    with pytest.raises(ValueError, match=message) as error:
        model_presets(folder)
        model_card(folder)
    assert str(folder / "maskdiffusion.json") in str(error.value)
    known = ", ".join(f.name for f in dataclasses.fields(Preset))  # an unknown field's message lists them
    assert len(str(error.value)) < 300 + len(str(folder)) + len(known)


def test_huge_settings_file_is_refused_unread(tmp_path):
    folder = settings_folder(tmp_path, b"")
    with open(folder / "maskdiffusion.json", "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB, sparse
    with pytest.raises(ValueError, match=r"maskdiffusion\.json' is larger than 1 MiB"):
        model_presets(folder)


def test_settings_notes_are_ignored_and_presets_checked_against_their_base(tmp_path):
    folder = settings_folder(tmp_path, '{"notes": {"any": [1]}, "presets": {"reference": {"background_threshold": 5}}}')
    presets = model_presets(folder)
    assert presets["reference"].background_threshold == 5.0  # dot-product scores: unbounded
    folder = settings_folder(tmp_path / "b", '{"presets": {"default": {"background_threshold": 5}}}')
    with pytest.raises(ValueError, match=r"EM posteriors lie in \[0, 1\]"):  # the default head's scores
        model_presets(folder)


# -- the network: every wait is bounded ---------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in held:
        connection.close()


def test_hub_that_never_answers_ends_in_a_clear_message(silent_server, tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from maskdiffusion.loading import ModelNotFoundError, resolve_model_folder
        try:
            resolve_model_folder("someorg/some-model")
        except ModelNotFoundError as error:
            print(error)
            sys.exit(3)
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": silent_server,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert f"the Hugging Face hub ({silent_server}) did not answer within 2 s" in done.stdout
    assert "someorg/some-model" in done.stdout and "hf download" in done.stdout and "--model" in done.stdout


# -- safetensors only ---------------------------------------------------------------------------------------------


def copy_model(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.mark.parametrize("part, name", [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_pickle_weights_are_refused_outright(tiny_model, tmp_path, part, name):
    from safetensors.torch import load_file

    folder = copy_model(tiny_model, tmp_path)
    weights = folder / part / f"{name}.safetensors"
    torch.save(load_file(weights), folder / part / f"{name}.bin")  # a loadable pickle checkpoint
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match=rf"only {part}/{name}\.bin, a pickle checkpoint: safetensors only"):
        load_components(folder, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelNotFoundError, match=r"safetensors only.*hf download"):
        MaskDiffusion.from_pretrained(str(folder), device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_file_is_named(tiny_model, tmp_path, damage):
    folder = copy_model(tiny_model, tmp_path)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 1000, "empty": b""}[damage])
    with pytest.raises(
        ModelNotFoundError, match=r"weights file .*vae/diffusion_pytorch_model\.safetensors' is damaged"
    ):
        load_components(folder, device=torch.device("cpu"), dtype=torch.float32)


def test_a_part_that_fails_to_load_is_named(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path)
    (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "block_out_channels": 7}')
    with pytest.raises(ModelNotFoundError, match=r"could not load unet from .*unet'"):
        load_components(folder, device=torch.device("cpu"), dtype=torch.float32)


def test_unusable_model_names_are_model_errors():
    with pytest.raises(ModelNotFoundError, match="characters"):
        resolve_model_folder("x" * 10_000)
    with pytest.raises(ModelNotFoundError):
        resolve_model_folder("bad\0name")


# -- the model card -----------------------------------------------------------------------------------------------


def test_model_card_is_read_from_the_settings_file(tiny_model, tmp_path):
    from maskdiffusion.loading import toy_model_path
    from maskdiffusion.toyworld.world import CLASS_NAMES

    assert model_card(tiny_model) == ModelCard(random_weights=True, vocabulary=None)
    toy = model_card(toy_model_path())
    assert not toy.random_weights and toy.vocabulary == tuple(CLASS_NAMES) and toy.attention_calibration
    assert CLASS_NAMES == ("grass", "brick wall", "water", "sand", "circle", "square", "triangle", "star")
    folder = copy_model(tiny_model, tmp_path)
    (folder / "maskdiffusion.json").unlink()
    components = load_components(folder, device=torch.device("cpu"), dtype=torch.float32)
    assert components.card == ModelCard() and components.card.vocabulary is None


def test_toy_model_keeps_its_presets():
    import json

    from maskdiffusion.loading import toy_model_path

    settings = json.loads((toy_model_path() / "maskdiffusion.json").read_text())
    presets = model_presets(toy_model_path())
    for name, fields in settings["presets"].items():
        for field, value in fields.items():
            assert getattr(presets[name], field) == (tuple(value) if isinstance(value, list) else value)


def test_tiny_random_cache_built_before_the_card_gets_it(tmp_path, monkeypatch, tiny_model):
    import json

    from maskdiffusion.tiny import tiny_model_path

    monkeypatch.setenv("MASKDIFFUSION_CACHE", str(tmp_path))
    old = tmp_path / "tiny-random-sd"
    shutil.copytree(tiny_model, old)
    (old / "maskdiffusion.json").write_text('{"presets": {"default": {"size": 128}}}')  # an old cache with overrides
    folder = tiny_model_path()
    assert model_card(folder).random_weights
    assert json.loads((folder / "maskdiffusion.json").read_text())["presets"] == {"default": {"size": 128}}
    (old / "maskdiffusion.json").unlink()  # an old cache without the file
    assert model_card(tiny_model_path()).random_weights


def test_a_part_without_weights_is_named(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path)
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no weights file in text_encoder/: download the \.safetensors"):
        load_components(folder, device=torch.device("cpu"), dtype=torch.float32)


def test_calibration_scales_come_from_the_card_and_unmeasured_words_are_neutral():
    from maskdiffusion.prompts import parse_classes

    card = ModelCard(attention_calibration={"grass": 0.2, "Brick  Wall": 0.05})
    scale = card.class_scale(parse_classes(["grass", "brick wall|wall", "zebra"]))
    neutral = (0.2 * 0.05) ** 0.5  # geometric mean of the measured words
    assert scale.tolist() == pytest.approx([0.2, 0.05, neutral])
    with pytest.raises(ValueError, match="attention_calibration"):
        ModelCard().class_scale(parse_classes(["grass"]))


def test_the_bundled_model_card_lists_its_words_and_their_calibration():
    card = load_components(resolve_model_folder("toy"), device=torch.device("cpu"), dtype=torch.float32).card
    assert card.vocabulary is not None and not card.random_weights
    assert sorted(card.attention_calibration) == sorted(card.vocabulary)
    assert all(0 < value < 1 for value in card.attention_calibration.values())  # mean probability masses


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(tiny_family_model):
    from safetensors.torch import load_file

    from maskdiffusion.loading import ModelTooLargeError, check_memory, weights_bytes

    folder = tiny_family_model("sd3")
    needed = weights_bytes(folder, torch.float32)
    assert set(needed) == {"vae", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    tensors = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    on_disk = sum(t.numel() * 4 for t in tensors.values())
    assert needed["transformer"] == on_disk  # float32 tensors at 4 bytes each
    assert weights_bytes(folder, torch.bfloat16)["transformer"] == on_disk // 2
    check_memory(folder, torch.device("cpu"), torch.float32, free=sum(needed.values()))  # just fits
    message = r"needs 0\.0 GiB .* in float32 \(text_encoder_2 .*but cpu has .*bfloat16"
    with pytest.raises(ModelTooLargeError, match=message):
        check_memory(folder, torch.device("cpu"), torch.float32, free=sum(needed.values()) - 1)


def test_a_model_folder_may_be_given_as_a_path(tiny_model):
    from pathlib import Path

    import numpy as np

    from maskdiffusion import MaskDiffusion

    segmenter = MaskDiffusion.from_pretrained(Path(tiny_model), device="cpu")
    assert segmenter.model_id == str(tiny_model)
    assert segmenter(np.zeros((64, 64, 3), dtype=np.uint8), ["road", "sky"]).labels.shape == (64, 64)

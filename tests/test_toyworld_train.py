"""The toy model's training script on a tiny configuration: it learns, saves and reloads."""

import json

import pytest
import torch

from research.train import TrainConfig, run

TINY = TrainConfig(
    image_size=32,
    num_scenes=32,
    vae_channels=(8, 8),
    vae_steps=30,
    vae_batch=8,
    vae_lr=3e-3,
    unet_channels=(16, 32),
    unet_heads=2,
    text_width=16,
    text_heads=2,
    steps=20,
    batch=8,
    lr=2e-3,
    warmup=5,
    binding_weight=0.5,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toyrun")
    model = run(TINY, out, checkpoint_minutes=60.0, log_every=10)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return out, model, records


def test_a_few_steps_lower_both_losses(tiny_run):
    _, _, records = tiny_run
    vae = [r["rec"] for r in records if r.get("phase") == "vae" and "rec" in r]
    unet = [r["loss"] for r in records if r.get("phase") == "unet" and "loss" in r]
    assert vae[-1] < vae[0]
    assert unet[-1] < unet[0]


def test_binding_margin_is_logged_when_enabled(tiny_run):
    _, _, records = tiny_run
    assert any("margin" in r for r in records if r.get("phase") == "unet")


def test_saved_folder_reloads_with_diffusers_and_transformers(tiny_run):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _, model, _ = tiny_run
    names = {p.name for p in model.iterdir()}
    assert {"vae", "unet", "text_encoder", "tokenizer", "scheduler", "model_index.json", "maskdiffusion.json"} <= names
    assert list(model.glob("*/*.safetensors"))
    vae = AutoencoderKL.from_pretrained(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    text = CLIPTextModel.from_pretrained(model / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    DDIMScheduler.from_pretrained(model / "scheduler")
    ids = tokenizer(
        ["a striped circle on a brick wall"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean * vae.config.scaling_factor
        out = unet(latent, torch.tensor([10]), encoder_hidden_states=text(ids)[0]).sample
    assert latent.shape == (1, 4, 16, 16) and out.shape == latent.shape
    assert vae.config.scaling_factor != 0.18215  # set from the trained latents' spread
    preset = json.loads((model / "maskdiffusion.json").read_text())["preset"]
    assert {"size", "timestep", "attention_factors", "feature_blocks"} <= set(preset)


def test_recommended_settings_are_read_by_the_core_loader(tiny_run):
    from maskdiffusion.loading import model_presets

    _, model, _ = tiny_run
    from research.train import ATTENTION_ONLY_PRESET, RECOMMENDED_PRESET, REFERENCE_PRESET

    presets = model_presets(model)
    for name, written in (("default", RECOMMENDED_PRESET), ("attention-only", ATTENTION_ONLY_PRESET),
                          ("reference", REFERENCE_PRESET)):  # fmt: skip
        for field, value in written.items():
            assert getattr(presets[name], field) == (tuple(value) if isinstance(value, list) else value), (name, field)
    assert presets["attention-only"].scoring == "attention"


def test_rerunning_a_finished_run_resumes_instead_of_restarting(tiny_run):
    out, _, _ = tiny_run
    before = (out / "train_log.jsonl").read_text().count("\n")
    run(TINY, out, checkpoint_minutes=60.0, log_every=10)
    lines = (out / "train_log.jsonl").read_text().splitlines()[before:]
    assert json.loads(lines[0])["resume"] is True
    assert not any(json.loads(line).get("phase") == "vae" and "rec" in json.loads(line) for line in lines)


# -- the caption-only attention priors of session 3 (docs/toyworld.md) -----------------


def test_information_prior_prefers_one_named_class_per_pixel_and_all_classes_used():
    from research.train import pixel_class_information

    classes = torch.zeros(1, 4, 8)  # tokens 1 and 2 name classes 0 and 5
    classes[0, 1, 0] = classes[0, 2, 5] = 1
    crisp = torch.zeros(1, 6, 4)
    crisp[0, :3, 1] = crisp[0, 3:, 2] = 1.0  # half the pixels read each class word
    uniform = torch.full((1, 6, 4), 0.25)
    collapsed = torch.zeros(1, 6, 4)
    collapsed[0, :, 1] = 1.0  # every pixel on the same word
    assert pixel_class_information(crisp, classes).item() == pytest.approx(
        -torch.log(torch.tensor(2.0)).item(), abs=1e-4
    )
    assert pixel_class_information(uniform, classes).item() == pytest.approx(0.0, abs=1e-4)
    assert pixel_class_information(collapsed, classes).item() == pytest.approx(0.0, abs=1e-4)


def test_absent_class_term_penalises_attention_to_classes_the_caption_lacks():
    from research.train import absent_class_mass

    word_class = torch.tensor([0, 1, 1, 2])  # a two-token class 1, like "brick wall"
    present = torch.tensor([[True, False, False]])
    on_present = torch.tensor([10.0, 0.0, 0.0, 0.0]).expand(1, 2, 5, 4)
    on_absent = torch.tensor([0.0, 0.0, 10.0, 0.0]).expand(1, 2, 5, 4)
    assert absent_class_mass(on_present, word_class, present).item() < 1e-3
    assert absent_class_mass(on_absent, word_class, present).item() > 9.0


def test_mosaic_joins_two_scenes_latent_halves_and_names_both_backgrounds():
    import numpy as np

    from maskdiffusion.toyworld.world import BACKGROUNDS, make_scene
    from research.train import mosaic

    first = next(s for s in map(make_scene, range(100)) if s.background == "water")
    second = next(s for s in map(make_scene, range(100)) if s.background == "sand")
    rng = np.random.default_rng(0)
    for _ in range(10):
        x0, caption = mosaic(first, second, (torch.zeros(4, 8, 8), torch.ones(4, 8, 8)), rng, 0.0)
        assert x0.sum().item() == 4 * 8 * 4  # exactly one half comes from each scene
        named = {b for b in BACKGROUNDS if b in caption}
        assert named <= {"water", "sand"}
        assert "water" in caption or any(o.shape in caption for o in first.objects)


def test_word_encoder_options_train_and_keep_positions_at_zero(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(
        TINY,
        steps=6,
        binding_weight=0.0,
        text_layers=0,
        freeze_positions=1,
        p_attributes=0.0,
        class_attention_weight=0.01,
        absent_class_weight=0.01,
        mosaic_fraction=0.5,
    )
    torch.set_num_threads(1)
    run(cfg, tmp_path, checkpoint_minutes=60.0, log_every=3, export=False)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("phase") == "unet" and "loss" in r]
    assert logged and all("prior" in r and "absent" in r for r in logged)
    from research.train import models_from_checkpoint

    _, _, _, text = models_from_checkpoint(tmp_path / "checkpoint.pt")
    assert torch.count_nonzero(text.embeddings.position_embedding.weight) == 0


def test_a_stage_stops_where_asked_and_the_next_continues_it_with_new_settings(tmp_path):
    import dataclasses

    torch.set_num_threads(1)
    first_cfg = dataclasses.replace(TINY, steps=8, binding_weight=0.0, text_layers=0)
    run(first_cfg, tmp_path / "a", checkpoint_minutes=60.0, log_every=2, export=False, stop_at=4)
    first = torch.load(tmp_path / "a" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert first["step"] == 4
    second_cfg = dataclasses.replace(first_cfg, absent_class_weight=0.01)
    run(
        second_cfg,
        tmp_path / "b",
        checkpoint_minutes=60.0,
        log_every=2,
        export=False,
        continue_from=tmp_path / "a" / "checkpoint.pt",
    )
    second = torch.load(tmp_path / "b" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert second["step"] == 8 and second["config"]["absent_class_weight"] == 0.01
    records = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps[0] == 6 and all("absent" in r for r in records if "loss" in r)

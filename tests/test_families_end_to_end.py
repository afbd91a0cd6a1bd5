"""Every model family end to end on its tiny random model: API, CLI and `evaluate` with no layer settings,
SDXL's text conditioning, a model's own noise schedule, and ``MaskDiffusion.from_pipe`` on pipelines in memory.

The folders are diffusers' own saves (``maskdiffusion.tiny``), named so that nothing about a family
can be read from a folder's name; each is built once per session and loaded once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scenes import scene, sky_and_sand_dataset

from maskdiffusion import MaskDiffusion, cli
from maskdiffusion.families import TURBO_TIMESTEP
from maskdiffusion.presets import AUTO
from maskdiffusion.prompts import VocabularyError, parse_classes
from maskdiffusion.text import TextConditioning, build_prompt_batches
from maskdiffusion.tiny import TINY_FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny family -> (detected family, native view size, resolved attention factors, resolved feature blocks)
EXPECTED = {
    "sd1": ("sd1", 128, [32, 64], [1, 2]),
    "sd2-v": ("sd2-v", 192, [32, 64], [1, 2]),
    "three-level": ("sd1", 128, [32], [0, 1]),
    "no-mid": ("distilled", 128, [32], [1, 2]),
    "sdxl": ("sdxl", 256, [32], [0, 1]),
    "sd-turbo": ("sd-turbo", 128, [32, 64], [1, 2]),
    "sdxl-turbo": ("sdxl-turbo", 256, [32], [0, 1]),
}
FAMILIES = list(EXPECTED)
CLASSES = ["sky", "traffic light", "sand|beach"]


def test_every_tiny_family_is_covered():
    assert set(EXPECTED) == set(TINY_FAMILIES)


def as_written(result) -> dict:
    """``result.summary()`` as ``NAME.json`` holds it."""
    return json.loads(json.dumps(result.summary()))


def assert_resolved_layers(settings: dict, family: str) -> None:
    _, size, attention, features = EXPECTED[family]
    assert settings["size"] == size
    assert settings["attention_factors"] == attention
    assert settings["feature_blocks"] == features
    assert all(type(v) is int for v in (*settings["attention_factors"], *settings["feature_blocks"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_api_segments_with_the_default_preset_and_records_the_resolved_layers(family, segmenter_of):
    seg = segmenter_of(family)
    name, size, _, _ = EXPECTED[family]
    assert seg.family.name == name
    assert seg.preset.size == size
    assert seg.preset.timestep == (TURBO_TIMESTEP if "turbo" in family else 250)
    assert all(AUTO not in (p.attention_factors, p.feature_blocks) for p in seg.presets.values())  # resolved once
    result = seg(scene(), classes=CLASSES)
    assert result.labels.shape == (64, 96)
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert np.isfinite(result.scores).all()
    summary = as_written(result)
    assert summary["preset"] == "default"
    assert_resolved_layers(summary["settings"], family)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_segments_every_family_with_no_layer_flags_and_writes_the_layers_used(family, tiny_family_model, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    out = tmp_path / "out"
    args = ["segment", str(image), "--model", str(tiny_family_model(family)), "--classes", ", ".join(CLASSES)]
    assert cli.main([*args, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    written = json.loads((out / "scene.json").read_text())
    assert written["preset"] == "default"
    assert_resolved_layers(written["settings"], family)
    labels = np.asarray(Image.open(out / "scene.labels.png"))
    assert labels.shape == (64, 96)


@pytest.fixture(scope="module")
def sky_and_sand(tmp_path_factory) -> Path:
    return sky_and_sand_dataset(tmp_path_factory.mktemp("data") / "beach")


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_runs_every_family_and_metrics_record_the_resolved_layers(
    family, tiny_family_model, sky_and_sand, tmp_path
):
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "folder", "--root", str(sky_and_sand), "--model", str(tiny_family_model(family))]
    assert cli.main([*args, "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["num_failed"] == 0
    assert_resolved_layers(metrics["settings"]["preset"], family)
    assert metrics["preset"] == metrics["settings"]["preset"]


def test_a_model_is_recognised_by_the_hub_id_it_was_asked_for(hub_cached):
    """An SD-shaped checkpoint whose files do not say Turbo is SD-Turbo when asked for by a hub id that does."""
    hub_cached("sd1", "stabilityai/sd-turbo")
    seg = MaskDiffusion.from_pretrained("stabilityai/sd-turbo", device="cpu", local_files_only=True)
    assert seg.family.name == "sd-turbo"
    assert {p.timestep for p in seg.presets.values()} == {TURBO_TIMESTEP}


# -- SDXL: two tokenizers, two encoders, added conditions -------------------------------------------


@pytest.mark.parametrize("family", ["sdxl", "sdxl-turbo"])
def test_sdxl_class_spans_are_each_tokenizers_own_tokenisation(family, segmenter_of):
    seg = segmenter_of(family)
    vocabulary = parse_classes(["cat", "traffic light", "Eiffel Tower", "fire hydrant|hydrant", "AT&T"])
    batches = build_prompt_batches(seg.tokenizers, vocabulary, " and ")
    assert len(batches) == 2 and batches[0].spans == batches[1].spans
    for tokenizer, batch in zip(seg.tokenizers, batches, strict=True):
        for cls, spans in zip(vocabulary, batch.spans, strict=True):
            for word, span in zip(cls.synonyms, spans, strict=True):
                own = tokenizer(word, add_special_tokens=False).input_ids
                assert batch.input_ids[span.prompt, span.start : span.stop].tolist() == own, (word, tokenizer)
        ids = batch.input_ids[0].tolist()
        end = ids.index(tokenizer.eos_token_id)
        assert set(ids[end + 1 :]) == {tokenizer.pad_token_id}  # each pads with its own token
    assert seg.tokenizers[0].pad_token_id != seg.tokenizers[1].pad_token_id


def test_sdxl_tokenizers_that_split_a_class_differently_are_refused_by_name(segmenter_of):
    import copy

    seg = segmenter_of("sdxl")
    second = copy.deepcopy(seg.tokenizer_2)
    second.add_tokens(["hydrant"])  # one token in the second tokenizer, two in the first
    vocabulary = parse_classes(["cat", "fire hydrant"])
    with pytest.raises(VocabularyError, match="class 'fire hydrant' is tokenised differently"):
        build_prompt_batches([seg.tokenizer, second], vocabulary, " and ")


def test_sdxl_text_conditioning_equals_the_diffusers_pipelines_own(segmenter_of, pipe_of):
    """Penultimate states of both encoders, concatenated, each padded its own way, and the pooled embedding."""
    seg, pipe = segmenter_of("sdxl"), pipe_of("sdxl")
    batches = build_prompt_batches(seg.tokenizers, parse_classes(["sky", "traffic light"]), " and ")
    text = batches[0].texts[0]
    for tokenizer, batch in zip((pipe.tokenizer, pipe.tokenizer_2), batches, strict=True):
        assert tokenizer(text, padding="max_length", max_length=77).input_ids == batch.input_ids[0].tolist()
    ours = seg.encode_prompts(batches)
    hidden, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    assert ours.hidden.shape == hidden.shape == (1, 77, pipe.unet.config.cross_attention_dim)
    torch.testing.assert_close(ours.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_sdxl_pooled_text_and_view_size_reach_the_unet(segmenter_of):
    seg = segmenter_of("sdxl")
    batches = build_prompt_batches(seg.tokenizers, parse_classes(["sky", "sand"]), " and ")
    text = seg.encode_prompts(batches)
    latents = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = seg.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        attention, _ = seg.capture(latents, text, seg.preset)
    finally:
        handle.remove()
    added = seen[0]["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], text.pooled.repeat(2, 1))
    assert added["time_ids"].tolist() == [[256, 256, 0, 0, 256, 256]] * 2  # original size, crop, target size
    other, _ = seg.capture(latents, TextConditioning(text.hidden, text.pooled + 1.0), seg.preset)
    assert not torch.allclose(attention, other, atol=1e-4)  # the pooled embedding changes what the UNet attends


# -- a model's own noise schedule ---------------------------------------------------------------------


def test_v_prediction_model_noises_with_its_own_schedule(tiny_family_model, tmp_path):
    """A t > 0 pass of an sd2-v folder whose schedule is not Stable Diffusion's uses the folder's schedule."""
    from diffusers import DDIMScheduler

    from maskdiffusion.tiny import SD_NOISE_SCHEDULE

    folder = shutil.copytree(tiny_family_model("sd2-v"), tmp_path / "model")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}))
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu")
    assert seg.family.name == "sd2-v" and seg.preset.timestep == 250
    own = DDIMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod
    stable_diffusion = DDIMScheduler(**SD_NOISE_SCHEDULE).alphas_cumprod
    assert not torch.allclose(own, stable_diffusion)
    torch.testing.assert_close(seg.backbone.schedule.alphas_cumprod, own.float(), rtol=0, atol=0)

    batches = build_prompt_batches(seg.tokenizers, parse_classes(["sky", "sand"]), " and ")
    clean = torch.randn((1, 4, 24, 24), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = seg.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        seg.capture(clean, seg.encode_prompts(batches), seg.preset)
    finally:
        handle.remove()
    (sample, timestep), _ = seen[0]
    noise = torch.randn((1, 4, 24, 24), generator=torch.Generator().manual_seed(seg.preset.seed))
    alpha = own[250].float()
    assert timestep == 250
    torch.testing.assert_close(sample, alpha.sqrt() * clean + (1 - alpha).sqrt() * noise)


# -- from_pipe ----------------------------------------------------------------------------------------


def module_state(pipe) -> dict:
    """Every module's training flag, every parameter's requires_grad flag, every module's hooks, per component."""
    state = {}
    for part in ("vae", "unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        state[part] = (
            {name: m.training for name, m in module.named_modules()},
            {name: p.requires_grad for name, p in module.named_parameters()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
        )
    return state


def one_step(pipe) -> torch.Tensor:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe(
        prompt="a beach under the sky",
        num_inference_steps=1,
        height=size,
        width=size,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize(
    ("family", "pipeline"), [("sd1", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")]
)
def test_from_pipe_shares_the_modules_and_leaves_the_pipeline_as_it_was(family, pipeline, tiny_family_model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_family_model(family))  # its own: the test changes its flags
    assert type(pipe).__name__ == pipeline
    pipe.text_encoder.train()  # flags a wrapper must not touch, set unlike a freshly loaded pipeline's
    pipe.vae.requires_grad_(False)
    pipe.unet.conv_in.requires_grad_(False)
    before = one_step(pipe)
    processors = pipe.unet.attn_processors
    state = module_state(pipe)  # after a first call: transformers installs its hidden-state hooks on one

    seg = MaskDiffusion.from_pipe(pipe)
    parts = [
        "vae",
        "unet",
        "text_encoder",
        "tokenizer",
        *(["text_encoder_2", "tokenizer_2"] if family == "sdxl" else []),
    ]
    assert all(getattr(seg, part) is getattr(pipe, part) for part in parts)
    if family != "sdxl":
        assert seg.text_encoder_2 is None and seg.tokenizer_2 is None
    assert seg.family.name == EXPECTED[family][0]
    assert seg.device == pipe.unet.device and seg.dtype == pipe.unet.dtype
    own = pipe.scheduler.alphas_cumprod.float()
    torch.testing.assert_close(seg.backbone.schedule.alphas_cumprod, own, rtol=0, atol=0)
    result = seg(scene(), classes=CLASSES)
    assert result.labels.shape == (64, 96)
    assert_resolved_layers(as_written(result)["settings"], family)

    after_processors = pipe.unet.attn_processors
    assert after_processors.keys() == processors.keys()
    assert all(after_processors[name] is processors[name] for name in processors)
    assert module_state(pipe) == state
    assert torch.equal(one_step(pipe), before)


def test_from_pipe_restores_the_processors_when_a_pass_fails(pipe_of):
    pipe = pipe_of("sd1")
    seg = MaskDiffusion.from_pipe(pipe)
    processors, state = pipe.unet.attn_processors, module_state(pipe)["unet"]

    def fail(*_):
        raise RuntimeError("out of memory (simulated)")

    handle = pipe.unet.down_blocks[-1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            seg(scene(), classes=CLASSES)
    finally:
        handle.remove()
    after = pipe.unet.attn_processors
    assert all(after[name] is processors[name] for name in processors)
    assert module_state(pipe)["unet"] == state  # no capture hook left behind


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pipe_recognises_the_family_and_presets_as_from_pretrained_does(family, pipe_of, segmenter_of):
    seg, wrapped = segmenter_of(family), MaskDiffusion.from_pipe(pipe_of(family))
    assert wrapped.family is seg.family
    assert wrapped.presets == seg.presets

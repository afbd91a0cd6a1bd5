"""The transformer families end to end on their tiny random models: SD3 / SD3.5, FLUX.1 dev / schnell, PixArt-Σ.

Recognised from their folders' own configurations (the folders are named ``family0``, ``family1``,
...), segmented through the API, the CLI, ``evaluate`` and the web request handler with no layer
settings, the layers and map kind written in every record; the text conditioning equals the
diffusers pipelines' own; class token spans are exact in CLIP and T5; ``from_pipe`` leaves each
pipeline as it was. How the captured signals relate to the models' own tensors is in
test_backbone_conformance.py.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scenes import scene, sky_and_sand_dataset

from maskdiffusion import MaskDiffusion, cli, web
from maskdiffusion.families import FAMILIES
from maskdiffusion.prompts import parse_classes
from maskdiffusion.tiny import TRANSFORMER_FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny family -> (backbone kind, attention blocks, feature blocks, the default's class maps); all native at 128 px
EXPECTED = {
    "sd3": ("mmdit", [1, 2, 3], [1, 2, 3], "concept"),  # 4 joint blocks: the three around 3/8 of the depth
    "sd3.5": ("mmdit", [1, 2, 3], [1, 2, 3], "concept"),
    "flux-dev": ("mmdit", [0, 1], [0, 1], "concept"),  # the last (up to) four of its 2 double-stream blocks
    "flux-schnell": ("mmdit", [0, 1], [0, 1], "concept"),
    "pixart-sigma": ("dit", [1], [1, 2], "attention"),  # the middle third of 4 blocks; the two at half depth
}
FAMILY_NAMES = list(EXPECTED)
CLASSES = ["sky", "traffic light", "sand|beach"]
PIPELINES = {
    "sd3": "StableDiffusion3Pipeline",
    "sd3.5": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "pixart-sigma": "PixArtSigmaPipeline",
}


def test_every_tiny_transformer_family_is_covered():
    assert set(EXPECTED) == set(TRANSFORMER_FAMILIES)


def assert_recorded(settings: dict, family: str) -> None:
    """The resolved layers and the map kind of the family's default, as a record holds them."""
    _, attention, features, maps = EXPECTED[family]
    assert settings["size"] == 128
    assert settings["attention_factors"] == [16]  # one token grid: the VAE's 8 x a 2x2 patch
    assert settings["attention_blocks"] == attention
    assert settings["feature_blocks"] == features
    assert settings["class_maps"] == maps
    assert all(type(v) is int for v in (*settings["attention_blocks"], *settings["feature_blocks"]))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_api_segments_with_the_default_preset_and_records_layers_map_kind_and_noise(family, segmenter_of):
    seg = segmenter_of(family)
    assert seg.family.name == family and seg.backbone.kind == EXPECTED[family][0]
    assert seg.transformer is not None and seg.unet is None
    result = seg(scene(), classes=CLASSES)
    assert result.labels.shape == (64, 96)
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert np.isfinite(result.scores).all() and result.attention.shape[0] == 3
    summary = json.loads(json.dumps(result.summary()))
    assert summary["preset"] == "default"
    settings = summary["settings"]
    assert_recorded(settings, family)
    assert settings["family"] == family and settings["backbone"] == EXPECTED[family][0]
    (noise,) = settings["noise"]
    assert noise["timestep"] == seg.preset.timestep
    if family == "pixart-sigma":
        assert noise["schedule"] == "ddpm" and 0 < noise["alpha_bar"] < 1
    else:
        assert noise["schedule"] == "flow-matching" and 0 < noise["sigma"] < 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_named_preset_runs_and_reference_reads_the_attention_weights(family, segmenter_of):
    seg = segmenter_of(family)
    assert set(seg.presets) == {"default", "attention-only", "reference"}
    reference = seg.presets["reference"]
    assert (reference.class_maps, reference.attention_mode, reference.scoring) == ("attention", "exp", "dot")
    assert seg.presets["attention-only"].class_maps == EXPECTED[family][3]
    for name in seg.presets:
        result = seg(scene(), classes=CLASSES, preset=name)
        assert result.labels.shape == (64, 96) and result.preset_name == name


def test_the_noise_levels_match_the_unet_defaults_signal_to_noise_ratio(segmenter_of):
    """The families' timesteps give the signal-to-noise ratio of SD's t = 250 (families.py), in their own schedules."""
    from maskdiffusion.backbones.noise import DDPMSchedule
    from maskdiffusion.tiny import SD_NOISE_SCHEDULE

    alpha = float(DDPMSchedule.from_config(SD_NOISE_SCHEDULE).alphas_cumprod[250])
    target = math.sqrt(alpha / (1 - alpha))
    for family in FAMILY_NAMES:
        seg = segmenter_of(family)
        size = 1024  # the real models' native view: FLUX-dev's shift depends on it
        (level,) = seg.noise_levels(seg.preset, (size, size))
        if "sigma" in level:
            ratio = (1 - level["sigma"]) / level["sigma"]
        else:
            ratio = math.sqrt(level["alpha_bar"] / (1 - level["alpha_bar"]))
        assert ratio == pytest.approx(target, rel=0.01), family


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cli_segments_with_no_layer_flags_and_writes_the_layers_and_map_kind(family, tiny_family_model, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    out = tmp_path / "out"
    args = ["segment", str(image), "--model", str(tiny_family_model(family)), "--classes", ", ".join(CLASSES)]
    assert cli.main([*args, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    written = json.loads((out / "scene.json").read_text())
    assert written["preset"] == "default"
    assert_recorded(written["settings"], family)
    assert np.asarray(Image.open(out / "scene.labels.png")).shape == (64, 96)


@pytest.fixture(scope="module")
def sky_and_sand(tmp_path_factory):
    return sky_and_sand_dataset(tmp_path_factory.mktemp("data") / "beach")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_evaluate_runs_and_metrics_record_the_layers_and_map_kind(family, tiny_family_model, sky_and_sand, tmp_path):
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "folder", "--root", str(sky_and_sand), "--model", str(tiny_family_model(family))]
    assert cli.main([*args, "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["num_failed"] == 0
    assert_recorded(metrics["settings"]["preset"], family)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_web_request_handler_segments_and_says_the_family(family, segmenter_of, tmp_path):
    seg = segmenter_of(family)
    path = tmp_path / "street.png"
    Image.fromarray(scene()).save(path)
    response = web.segment_request(seg, str(path), "sky, road", preset_name="default", size=128, threshold=None)
    assert response.ok, response.message
    assert response.label_map.size == (96, 64)
    maps = "concept outputs" if EXPECTED[family][3] == "concept" else "attention weights"
    assert f"family `{family}` ({EXPECTED[family][0]}, class maps: {maps})" in web.model_info(seg)


def test_the_family_is_read_from_the_configurations_not_the_folder_name(tiny_family_model, tmp_path):
    folder = shutil.copytree(tiny_family_model("flux-dev"), tmp_path / "flux-schnell-sd3")
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    assert MaskDiffusion.from_pretrained(str(folder), device="cpu").family.name == "flux-dev"
    config_file.write_text(json.dumps({**config, "guidance_embeds": False}))  # schnell has no guidance embedding
    assert MaskDiffusion.from_pretrained(str(folder), device="cpu").family.name == "flux-schnell"


# -- options a model does not have are refused by name -------------------------------------------------


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("pixart-sigma", {"class_maps": "concept"}, r"class_maps 'concept': concept streams need joint attention"),
        ("flux-schnell", {"class_maps": "concept", "attention_blocks": (2,)}, r"attention_blocks \[2\].*joint"),
        ("sd3", {"attention_factors": (32,)}, r"attention_factors \(32,\): a transformer's blocks all work on one"),
        ("sd3", {"attention_blocks": (4,)}, r"attention_blocks \[4\] out of range: this model has blocks 0..3"),
        ("flux-dev", {"feature_blocks": (4,)}, r"feature_blocks \[4\] out of range: this model has blocks 0..3"),
        ("pixart-sigma", {"self_attention_factors": (16,)}, r"self_attention_factors \(16,\).*UNet options"),
        ("flux-dev", {"long_vocabulary": "shared-queries"}, r"long_vocabulary 'shared-queries'"),
        ("sd3", {"size": 784}, r"size 784 is past what this model's position embedding covers: at most 768"),
        ("sd3", {"class_maps": "concept", "attention_mode": "exp"}, r"class_maps must be 'attention' with"),
    ],
)
def test_options_the_model_does_not_have_are_refused_naming_the_field(family, changes, message, segmenter_of):
    seg = segmenter_of(family)
    with pytest.raises(ValueError, match=message):
        seg(scene(), classes=CLASSES, preset=seg.preset.replace(**changes))


def test_a_flux_single_stream_block_gives_attention_weights(segmenter_of):
    seg = segmenter_of("flux-schnell")
    preset = seg.presets["reference"].replace(attention_blocks=(2, 3), feature_blocks=(3,))
    result = seg(scene(), classes=CLASSES, preset=preset)
    assert result.labels.shape == (64, 96) and np.isfinite(result.attention).all()


# -- text: the pipelines' own conditioning, exact spans in every tokenizer ------------------------------


def test_sd3_conditioning_equals_the_pipelines_own(segmenter_of, pipe_of):
    seg, pipe = segmenter_of("sd3"), pipe_of("sd3")
    batches = seg.build_prompts(parse_classes(CLASSES), " and ")
    text = batches[0].texts[0]
    ours = seg.encode_prompts(batches)
    hidden, _, pooled, _ = pipe.encode_prompt(text, text, text, device="cpu", do_classifier_free_guidance=False)
    assert ours.hidden.shape == hidden.shape == (1, 77 + 256, pipe.transformer.config.joint_attention_dim)
    torch.testing.assert_close(ours.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_flux_conditioning_equals_the_pipelines_own(segmenter_of, pipe_of):
    seg, pipe = segmenter_of("flux-dev"), pipe_of("flux-dev")
    batches = seg.build_prompts(parse_classes(CLASSES), " and ")
    text = batches[0].texts[0]
    ours = seg.encode_prompts(batches)
    hidden, pooled, text_ids = pipe.encode_prompt(text, text, device="cpu", max_sequence_length=512)
    assert ours.hidden.shape == hidden.shape == (1, 512, pipe.transformer.config.joint_attention_dim)
    torch.testing.assert_close(ours.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)
    assert not text_ids.any()  # FLUX's text position ids are zeros, as the backbone passes them


def test_pixart_conditioning_and_mask_equal_the_pipelines_own(segmenter_of, pipe_of):
    seg, pipe = segmenter_of("pixart-sigma"), pipe_of("pixart-sigma")
    batches = seg.build_prompts(parse_classes(CLASSES), " and ")
    text = batches[0].texts[0]
    ours = seg.encode_prompts(batches)
    hidden, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, device="cpu", clean_caption=False)
    assert ours.hidden.shape == hidden.shape == (1, 300, 64)
    assert torch.equal(ours.mask, mask)
    assert 4 < int(mask.sum()) < 300  # the prompt's tokens and EOS, not the padding
    torch.testing.assert_close(ours.hidden, hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "pixart-sigma"])
def test_every_tokenizers_class_spans_are_its_own_tokenisation_and_the_prompt_is_their_join(family, segmenter_of):
    seg = segmenter_of(family)
    vocabulary = parse_classes(["cat", "traffic light", "Eiffel Tower", "fire hydrant|hydrant", "potted plant"])
    batches = seg.build_prompts(vocabulary, " and ")
    assert (
        len(batches) == {"sd3": 3, "flux-dev": 1, "pixart-sigma": 1}[family]
    )  # FLUX's CLIP gives only a pooled vector
    for tokenizer, batch in zip(seg.tokenizers if family == "sd3" else seg.tokenizers[-1:], batches, strict=True):
        for cls, spans in zip(vocabulary, batch.spans, strict=True):
            for word, span in zip(cls.synonyms, spans, strict=True):
                own = tokenizer(word, add_special_tokens=False).input_ids
                assert batch.input_ids[span.prompt, span.start : span.stop].tolist() == own, (word, tokenizer)
        whole = tokenizer(batch.texts[0], padding="max_length", max_length=batch.input_ids.shape[1]).input_ids
        assert batch.input_ids[0].tolist() == whole  # the prompt's ids are the classes' own ids joined
    if family == "sd3":
        assert batches[0].spans == batches[1].spans  # both CLIPs read the same positions
        assert batches[2].input_ids.shape[1] == 256 and batches[2].input_ids[0, 0] != batches[0].input_ids[0, 0]


def test_a_vocabulary_past_t5s_length_is_split_over_prompts_and_every_class_gets_a_map(segmenter_of):
    seg = segmenter_of("pixart-sigma")  # 300 T5 tokens per prompt
    names = [f"{colour} {thing}" for colour in ("red", "green", "blue", "black", "white") for thing in
             ("chair", "table", "lamp", "door", "window", "bottle", "cup", "plate", "shelf", "sofa", "rug", "vase",
              "bowl", "clock", "mirror", "pillow", "towel", "basket", "bench", "candle")]  # fmt: skip
    batches = seg.build_prompts(parse_classes(names), " and ")
    assert batches[0].num_prompts >= 2 and batches[0].input_ids.shape[1] == 300
    result = seg(scene(), classes=names)
    assert result.attention.shape[0] == len(names) == 100
    assert np.isfinite(result.attention).all() and (result.attention.sum(axis=(1, 2)) > 0).all()


# -- from_pipe ----------------------------------------------------------------------------------------


def one_step(pipe) -> torch.Tensor:
    extra = {"use_resolution_binning": False} if type(pipe).__name__ == "PixArtSigmaPipeline" else {}
    return pipe(
        prompt="a beach under the sky",
        num_inference_steps=1,
        height=128,
        width=128,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images


def hooks_and_flags(pipe) -> dict:
    state = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            state[name] = (
                {n: m.training for n, m in module.named_modules()},
                {n: p.requires_grad for n, p in module.named_parameters()},
                sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
            )
    return state


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "pixart-sigma"])
def test_from_pipe_shares_the_modules_and_leaves_the_pipeline_as_it_was(family, tiny_family_model, segmenter_of):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_family_model(family))
    assert type(pipe).__name__ == PIPELINES[family]
    pipe.vae.train()  # flags a wrapper must not touch (the VAE has no dropout: the pipeline stays deterministic)
    pipe.transformer.requires_grad_(False)
    before = one_step(pipe)
    processors, state = pipe.transformer.attn_processors, hooks_and_flags(pipe)

    seg = MaskDiffusion.from_pipe(pipe)
    parts = [name for name in seg.backbone.parts if getattr(pipe, name, None) is not None]
    assert parts and all(getattr(seg, name) is getattr(pipe, name) for name in [*parts, "vae"])
    assert seg.family is segmenter_of(family).family and seg.presets == segmenter_of(family).presets
    for preset in ("default", "reference"):
        result = seg(scene(), classes=CLASSES, preset=preset)
        assert result.labels.shape == (64, 96)
    after = pipe.transformer.attn_processors
    assert after.keys() == processors.keys() and all(after[name] is processors[name] for name in processors)
    assert hooks_and_flags(pipe) == state
    assert torch.equal(one_step(pipe), before)


def test_a_shared_text_encoder_in_training_mode_gives_no_dropout_and_keeps_its_mode(tiny_family_model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_family_model("pixart-sigma"))
    seg = MaskDiffusion.from_pipe(pipe)
    evaluated = seg(scene(), classes=CLASSES).grid_scores
    pipe.text_encoder.train()  # T5 has dropout 0.1: in training mode every call would differ
    assert pipe.text_encoder.encoder.dropout.p > 0
    for _ in range(2):
        torch.testing.assert_close(seg(scene(), classes=CLASSES).grid_scores, evaluated, rtol=0, atol=0)
    assert all(m.training for m in pipe.text_encoder.modules())


def test_from_pipe_restores_the_processors_when_a_pass_fails(pipe_of):
    pipe = pipe_of("flux-schnell")
    seg = MaskDiffusion.from_pipe(pipe)
    processors, state = pipe.transformer.attn_processors, hooks_and_flags(pipe)["transformer"]

    def fail(*_):
        raise RuntimeError("out of memory (simulated)")

    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            seg(scene(), classes=CLASSES)
    finally:
        handle.remove()
    after = pipe.transformer.attn_processors
    assert all(after[name] is processors[name] for name in processors)
    assert hooks_and_flags(pipe)["transformer"] == state


def test_every_transformer_family_is_in_the_one_registry():
    rows = {name: FAMILIES[name].architecture for name in EXPECTED}
    assert rows == {"sd3": "sd3", "sd3.5": "sd3", "flux-dev": "flux", "flux-schnell": "flux", "pixart-sigma": "pixart"}


def test_cli_flags_choose_the_map_kind_and_blocks(tiny_family_model, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    model = ["--model", str(tiny_family_model("flux-schnell")), "--device", "cpu", "--quiet"]
    args = ["segment", str(image), *model, "--classes", "sky, sand", "--out", str(tmp_path / "out")]
    flags = ["--class-maps", "attention", "--attention-blocks", "1,3", "--feature-blocks", "auto"]
    assert cli.main([*args, *flags]) == 0
    settings = json.loads((tmp_path / "out" / "scene.json").read_text())["settings"]
    assert (settings["class_maps"], settings["attention_blocks"], settings["feature_blocks"]) == (
        "attention",
        [1, 3],
        [0, 1],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--attention-blocks", "1,x"])
    assert exit_info.value.code == 2
    assert "expected comma-separated block indices or 'auto', got '1,x'" in capsys.readouterr().err


def test_the_web_app_segments_an_upload_with_a_transformer(segmenter_of, tmp_path, monkeypatch):
    import gradio

    photo = tmp_path / "beach.png"
    Image.fromarray(scene()).save(photo)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    app = web.build_app(segmenter_of("flux-dev"), examples=[])
    assert isinstance(app, gradio.Blocks)
    segment = next(fn for fn in app.fns.values() if fn.api_name == "segment")
    status, overlay, label_map, *_ = segment.fn({"path": str(photo)}, "sky, sand", "default", 128, None)
    assert "Segmented beach.png (96x64)" in status and overlay is not None and label_map.size == (96, 64)


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True}])
def test_channels_last_and_compile_give_the_plain_labels_on_a_transformer(tiny_family_model, options):
    from agreement import SCORE_TOLERANCE, assert_labels_equal_except_near_ties

    folder = str(tiny_family_model("flux-schnell"))
    plain = MaskDiffusion.from_pretrained(folder, device="cpu")(scene(), CLASSES)
    fast = MaskDiffusion.from_pretrained(folder, device="cpu", **options)(scene(), CLASSES)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=0, atol=SCORE_TOLERANCE)
    assert_labels_equal_except_near_ties(fast.labels, plain.labels, plain.scores)


@pytest.mark.parametrize("family", ["sd3", "pixart-sigma"])
def test_bfloat16_stores_half_weights_and_keeps_the_maps_in_float32(family, tiny_family_model):
    seg = MaskDiffusion.from_pretrained(str(tiny_family_model(family)), device="cpu", dtype="bfloat16")
    assert all(module.dtype == torch.bfloat16 for module in (seg.transformer, seg.vae, *seg.text_encoders))
    result = seg(scene(), CLASSES)
    assert result.scores.dtype == np.float32 and result.attention.dtype == np.float32
    assert np.isfinite(result.scores).all() and np.isfinite(result.attention).all()


@pytest.mark.parametrize(
    ("family", "repo_id"),
    [("sd3", "stabilityai/stable-diffusion-3-medium-diffusers"), ("flux-schnell", "black-forest-labs/FLUX.1-schnell")],
)
def test_a_hub_id_is_found_in_the_local_cache_first(family, repo_id, hub_cached):
    hub_cached(family, repo_id)
    seg = MaskDiffusion.from_pretrained(repo_id, device="cpu", local_files_only=True)
    assert seg.family.name == family and seg.model_id == repo_id


def test_an_uncached_transformer_offline_says_which_files_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from maskdiffusion import ModelNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match=r"(?s)black-forest-labs/FLUX\.1-dev.*hf download.*'transformer/"):
        MaskDiffusion.from_pretrained("black-forest-labs/FLUX.1-dev", device="cpu", local_files_only=True)


def test_a_clip_tokenizer_saved_without_its_context_length_still_gives_77_token_prompts(tiny_family_model, tmp_path):
    folder = shutil.copytree(tiny_family_model("sd3"), tmp_path / "model")
    for part in ("tokenizer", "tokenizer_2"):
        config_file = folder / part / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 10**30}))
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu")
    assert seg.tokenizer.model_max_length == 10**30
    batches = seg.build_prompts(parse_classes(CLASSES), " and ")
    assert [batch.input_ids.shape[1] for batch in batches] == [77, 77, 256]  # the encoders' 77 positions, T5's 256
    assert seg(scene(), classes=CLASSES).labels.shape == (64, 96)

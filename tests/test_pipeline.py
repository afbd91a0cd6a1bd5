import numpy as np
import pytest
import torch
from agreement import SCORE_TOLERANCE, assert_labels_equal_except_near_ties
from PIL import Image

from maskdiffusion import ImageLoadError, MaskDiffusion, Preset, VocabularyError, mask_head
from maskdiffusion.prompts import build_prompts, parse_classes

CLASSES = ["road", "traffic light", "car", "sky"]


def picture(rng, height, width):
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def test_result_shapes_follow_the_input_image(segmenter, rng):
    result = segmenter(picture(rng, 100, 260), CLASSES)
    assert result.classes == CLASSES
    assert result.labels.shape == (100, 260) and result.labels.dtype == np.int64
    assert result.labels.min() >= 0 and result.labels.max() < 4
    assert result.scores.shape == (4, 100, 260) and result.scores.dtype == np.float32
    # the attention grid covers the whole resized image (128 x 320 at 1/16)
    assert result.attention.shape == (4, 128 // 16, 320 // 16)
    # the default preset's maps are softmax probability masses: in [0, 1], at most 1 over classes
    assert result.attention.min() >= 0 and result.attention.sum(axis=0).max() <= 1 + 1e-5
    peaks = segmenter(picture(rng, 100, 260), CLASSES, preset="reference").attention.max(axis=(1, 2))
    assert np.allclose(peaks, 1.0)  # the reference max-normalises each class map
    assert (result.labels == result.scores.argmax(axis=0)).mean() > 0.999


HEAD_OPTIONS = {
    "default": {},
    "reference": "reference",
    "support + confident + product of experts": {
        "refine_steps": 0,
        "class_presence": "support",
        "prototype_cells": "confident",
        "scoring": "poe",
    },
    "hard refinement": {"refinement": "hard", "refine_steps": 2},
}


@pytest.mark.parametrize("option", HEAD_OPTIONS)
def test_batched_equals_one_by_one(segmenter, rng, option):
    # Other batch shapes may change the last bits (other kernels): equal within SCORE_TOLERANCE,
    # labels equal except where two classes tie within it. Every head option keeps it.
    changes = HEAD_OPTIONS[option]
    preset = changes if isinstance(changes, str) else segmenter.preset.replace(**changes)
    images = [picture(rng, 128, 128), picture(rng, 90, 300), picture(rng, 200, 150)]
    together = segmenter.segment_batch(images, CLASSES, preset=preset)
    for image, batched in zip(images, together, strict=True):
        alone = segmenter(image, CLASSES, preset=preset)
        assert alone.absent == batched.absent
        np.testing.assert_allclose(alone.scores, batched.scores, rtol=0, atol=SCORE_TOLERANCE)
        np.testing.assert_allclose(alone.attention, batched.attention, rtol=1e-4, atol=1e-5)
        assert_labels_equal_except_near_ties(batched.labels, alone.labels, alone.scores)


def test_the_tie_tolerant_label_check_catches_real_differences(segmenter, rng):
    result = segmenter(picture(rng, 64, 64), CLASSES)
    wrong = (result.labels + 1) % len(CLASSES)  # what a bug (e.g. shuffled views) would give
    with pytest.raises(AssertionError, match="labels differ"):
        assert_labels_equal_except_near_ties(wrong, result.labels, result.scores)


@pytest.mark.parametrize("option", HEAD_OPTIONS)
def test_every_head_option_is_deterministic(segmenter, rng, option):
    changes = HEAD_OPTIONS[option]
    preset = changes if isinstance(changes, str) else segmenter.preset.replace(**changes)
    image = picture(rng, 96, 128)
    first, second = segmenter(image, CLASSES, preset=preset), segmenter(image, CLASSES, preset=preset)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.grid_scores.numpy(), second.grid_scores.numpy())


def test_same_input_gives_the_same_output(segmenter, rng):
    image = picture(rng, 128, 200)
    noisy = segmenter.preset.replace(timestep=300, seed=7)
    first, second = segmenter(image, CLASSES, preset=noisy), segmenter(image, CLASSES, preset=noisy)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.scores, second.scores)
    clean = segmenter(image, CLASSES)
    assert not np.array_equal(clean.scores, first.scores)  # the timestep really changes the pass


@pytest.mark.parametrize("height, width", [(300, 4000), (4000, 300), (3, 5), (1, 1)])
def test_extreme_sizes_segment_at_the_input_size(segmenter, rng, height, width):
    result = segmenter(picture(rng, height, width), CLASSES)
    assert result.labels.shape == (height, width)
    assert np.isfinite(result.attention).all()


def test_every_class_of_a_long_vocabulary_gets_a_map(segmenter, rng):
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown"]
    things = ["chair", "table", "lamp", "door", "window", "bottle", "cup", "plate", "shelf", "sofa", "rug", "vase"]
    names = [f"{c} {t}" for c in colours for t in things] + ["sky", "road", "traffic light"]
    assert build_prompts(segmenter.tokenizer, parse_classes(names)).num_prompts > 2
    result = segmenter(picture(rng, 64, 64), names)
    assert result.attention.shape[0] == len(names) == 135
    assert np.isfinite(result.attention).all() and (result.attention.max(axis=(1, 2)) > 0).all()
    assert result.scores.shape[0] == 135


def test_long_vocabulary_features_are_the_mean_over_prompt_passes(segmenter):
    names = [f"word{i}" for i in range(40)]
    prompts = build_prompts(segmenter.tokenizer, parse_classes(names))
    assert prompts.num_prompts >= 2
    text = segmenter.encode_prompts(prompts)
    preset = segmenter.preset.replace(size=64)
    latents = segmenter.encode_views(torch.zeros(1, 3, 64, 64))
    _, together = segmenter.capture(latents, text, preset)
    separate = [segmenter.capture(latents, text[p : p + 1], preset)[1] for p in range(prompts.num_prompts)]
    torch.testing.assert_close(together, torch.stack(separate).mean(dim=0), rtol=1e-4, atol=1e-5)


def test_background_threshold_marks_low_scores_as_background(segmenter, rng):
    image = picture(rng, 64, 96)
    plain = segmenter(image, CLASSES)
    best = plain.scores.max(axis=0)
    threshold = float(np.median(best))
    result = segmenter(image, CLASSES, preset=segmenter.preset.replace(background_threshold=threshold))
    low = best < threshold
    assert 0 < low.mean() < 1
    assert (result.labels[low] == -1).all()
    assert (result.labels[~low] == plain.labels[~low]).all()
    assert (np.asarray(result.label_image())[low] == 255).all()
    assert result.pixel_share()["background"] == pytest.approx(low.mean())


def test_background_words_are_scored_as_classes_and_their_pixels_become_background(segmenter, rng):
    # The same prompt either way ("road, car, sky, wall" in that order): the words' pixels are
    # exactly those the plain run gives to "sky" and "wall"; "Car" is a class, so never background.
    image = picture(rng, 96, 128)
    plain = segmenter(image, ["road", "car", "sky", "wall"])
    preset = segmenter.preset.replace(background_words=("sky", "Car", "wall"))
    result = segmenter(image, ["road", "car"], preset=preset)
    assert result.classes == ["road", "car"] and result.attention.shape[0] == 2
    won_by_words = plain.labels >= 2
    assert 0 < won_by_words.mean() < 1
    assert (result.labels == np.where(won_by_words, -1, plain.labels)).all()
    assert result.pixel_share()["background"] == pytest.approx(won_by_words.mean())


@pytest.mark.parametrize("words", [("sky", ""), ("sky|cloud",), "sky", (3,)])
def test_bad_background_words_are_refused_by_name(segmenter, words):
    with pytest.raises(ValueError, match="background_words must be a list of non-empty words"):
        segmenter.preset.replace(background_words=words)


def test_preset_can_be_named_or_given_per_call(segmenter, rng):
    image = picture(rng, 64, 64)
    reference = segmenter(image, CLASSES, preset="reference")
    assert reference.preset.scoring == "dot"
    custom = segmenter(image, CLASSES, preset=Preset(size=64, attention_mode="softmax"))
    assert custom.preset.attention_mode == "softmax" and custom.attention.shape == (4, 4, 4)


def test_bad_settings_and_classes_fail_before_any_model_work(segmenter, rng):
    image = picture(rng, 64, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        segmenter(image, CLASSES, preset=segmenter.preset.replace(size=100))
    with pytest.raises(ValueError, match="factor"):
        segmenter(image, CLASSES, preset=segmenter.preset.replace(attention_factors=(4,)))
    with pytest.raises(ValueError, match="unknown preset"):
        segmenter(image, CLASSES, preset="fastest")
    with pytest.raises(VocabularyError):
        segmenter(image, ["road", "road"])


def test_one_unreadable_image_does_not_lose_the_others(segmenter, rng, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(picture(rng, 64, 80)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    results = segmenter.segment_batch([good, bad, good], CLASSES, errors="return")
    assert isinstance(results[1], ImageLoadError) and "bad.jpg" in str(results[1])
    assert results[0].labels.shape == (64, 80) and results[2].labels.shape == (64, 80)
    with pytest.raises(ImageLoadError):
        segmenter.segment_batch([good, bad], CLASSES)


def test_bfloat16_stores_half_weights_keeps_maps_in_float32_and_mostly_agrees(tiny_model, rng):
    image = picture(rng, 128, 128)
    full = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=128))
    half = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", dtype="bfloat16", preset=Preset(size=128))
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    assert half.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # half precision: NHWC
    a, b = full(image, CLASSES), half(image, CLASSES)
    assert b.scores.dtype == np.float32 and b.attention.dtype == np.float32 and np.isfinite(b.scores).all()
    # random weights leave near-ties: most labels agree (the bundled model's agreement is benchmarked)
    assert (a.labels == b.labels).mean() > 0.8


def test_float16_on_the_cpu_keeps_float32_weights_under_autocast(tiny_model):
    half = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", dtype="float16", preset=Preset(size=64))
    assert half.unet.dtype == torch.float32 and half.precision.dtype == torch.float16
    assert np.isfinite(half(np.zeros((64, 64, 3), np.uint8), CLASSES).scores).all()


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True}])
def test_channels_last_and_compile_give_the_plain_labels(tiny_model, rng, options):
    image = picture(rng, 64, 96)
    plain = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=64))
    fast = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=64), **options)
    a, b = plain(image, CLASSES), fast(image, CLASSES)
    np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=SCORE_TOLERANCE)
    assert_labels_equal_except_near_ties(b.labels, a.labels, a.scores)


def test_save_writes_palette_labels_overlay_and_summary(segmenter, rng, tmp_path):
    result = segmenter(picture(rng, 70, 90), CLASSES)
    paths = result.save(tmp_path / "out", "scene")
    labels = Image.open(paths["labels"])
    assert labels.mode == "P" and labels.size == (90, 70)
    np.testing.assert_array_equal(np.asarray(labels), result.labels)
    overlay = Image.open(paths["overlay"])
    assert overlay.height >= 70 and overlay.width > 90  # legend panel on the right
    assert np.asarray(overlay)[:70, :90].std() > 0  # the image itself is in the top-left corner
    import json

    summary = json.loads(paths["json"].read_text())
    assert [c["name"] for c in summary["classes"]] == CLASSES
    assert summary["settings"]["size"] == 128 and summary["settings"]["device"] == "cpu"
    assert abs(sum(summary["pixel_share"].values()) - 1.0) < 1e-6
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_shared_queries_equal_the_plain_pass_for_one_prompt(segmenter, rng):
    image = picture(rng, 96, 128)
    plain = segmenter(image, CLASSES)
    shared = segmenter(image, CLASSES, preset=segmenter.preset.replace(long_vocabulary="shared-queries"))
    np.testing.assert_array_equal(plain.labels, shared.labels)
    np.testing.assert_allclose(plain.attention, shared.attention, rtol=1e-5, atol=1e-6)


def test_stored_queries_give_the_first_layers_attention_for_another_prompt_exactly(segmenter):
    # down_blocks.0 is the first cross-attention layer: its queries do not depend on the
    # prompt, so attending from stored queries equals running the other prompt through it.
    from maskdiffusion.backbones.unet import UNetCapture

    preset = segmenter.preset.replace(size=64, attention_factors=(8,), attention_factor=8)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    first, second = torch.randn(2, 1, 77, 32, generator=gen)
    capture = UNetCapture(segmenter.unet, segmenter.vae_factor, preset)
    with_first, _ = capture.run(latents, 0, first.expand(2, -1, -1), keep_queries=True)
    with_second, _ = capture.run(latents, 0, second.expand(2, -1, -1))
    attended = with_first.attend(second)
    assert len(attended.attention) == len(with_second.attention) == 3  # down_blocks.0 + two up_blocks.3 layers
    torch.testing.assert_close(attended.attention[0], with_second.attention[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_first.attention[0], with_second.attention[0], atol=1e-3)  # the prompt matters


def test_requery_reuses_the_cached_latents_and_gives_the_same_result(tiny_model, rng):
    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=64), cache_size=2)
    calls = []
    encode = seg.encode_views
    seg.encode_views = lambda views: calls.append(len(views)) or encode(views)
    image = picture(rng, 64, 200)  # 3 views
    first = seg(image, CLASSES)
    again = seg(image, ["road", "sky"])
    assert calls == [3]  # the second query never touched the VAE
    fresh = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=64), cache_size=0)
    np.testing.assert_array_equal(again.labels, fresh(image, ["road", "sky"]).labels)
    np.testing.assert_array_equal(first.labels, fresh(image, CLASSES).labels)
    for _ in range(3):
        seg(picture(rng, 64, 64), CLASSES)
    assert len(seg.latent_cache) == 2  # bounded: least recently used images are dropped
    seg(image, CLASSES)
    assert calls[-1] == 3  # evicted, so encoded again


def test_the_171_coco_stuff_names_each_get_a_map(segmenter, rng):
    from maskdiffusion.datasets import COCOSTUFF171_CLASSES

    assert len(COCOSTUFF171_CLASSES) == 171
    prompts = build_prompts(segmenter.tokenizer, parse_classes(list(COCOSTUFF171_CLASSES)))
    assert prompts.num_prompts > 2 and len(prompts.spans) == 171
    result = segmenter(picture(rng, 64, 64), list(COCOSTUFF171_CLASSES), preset=segmenter.preset.replace(size=64))
    assert result.attention.shape == (171, 4, 4)
    assert np.isfinite(result.attention).all() and (result.attention.max(axis=(1, 2)) > 0).all()


def test_cancel_stops_between_batches_and_keeps_finished_results(segmenter, rng):
    from maskdiffusion import SegmentationCancelled

    images = [picture(rng, 64, 64) for _ in range(5)]  # batch_size 3: two batches of views
    asked, finished = [], []
    with pytest.raises(SegmentationCancelled, match="3 of 5 views"):
        segmenter.segment_batch(
            images, CLASSES, cancel=lambda: asked.append(1) or len(asked) > 1, progress=finished.append
        )
    assert len(asked) == 2 and len(finished) == 3  # the first batch's images were finished and reported
    assert len(segmenter.segment_batch(images, CLASSES, cancel=lambda: False)) == 5


def test_results_name_their_preset(segmenter, rng):
    image = picture(rng, 64, 64)
    assert segmenter(image, CLASSES, preset="reference").preset_name == "reference"
    assert segmenter(image, CLASSES, preset=segmenter.preset.replace(timestep=5)).preset_name == "default"
    assert segmenter(image, CLASSES, preset="reference").summary()["preset"] == "reference"


def test_reference_labels_are_the_plain_dot_product_head_on_max_normalised_attention(segmenter, rng):
    from maskdiffusion.views import resize_maps, upsample_rows

    image = picture(rng, 96, 160)
    result = segmenter.segment_batch([image], CLASSES, preset="reference", keep_features=True)[0]
    attention = torch.from_numpy(result.attention)
    assert torch.allclose(attention.amax(dim=(1, 2)), torch.ones(4))
    grid = resize_maps(attention, tuple(result.features.shape[-2:]))
    scores = mask_head(result.features[None], grid[None], normalize_prototypes=False)[0]
    torch.testing.assert_close(result.grid_scores, scores)
    plain = upsample_rows(scores, result.labels.shape, slice(None)).argmax(dim=0).numpy()
    assert_labels_equal_except_near_ties(result.labels, plain, result.scores)


def test_classes_judged_absent_take_no_pixel_and_are_listed(segmenter, rng):
    names = [*CLASSES, "zebra", "volcano", "harp", "igloo"]
    preset = segmenter.preset.replace(class_presence="support", presence_min_cells=40)
    result = segmenter(picture(rng, 64, 96), names, preset=preset)
    assert result.absent and set(result.absent) < set(names)
    taken = {names[c] for c in np.unique(result.labels)}
    assert not taken & set(result.absent)
    assert result.summary()["absent"] == result.absent


def test_a_vocabulary_is_encoded_once_and_its_prompts_reused(tiny_model, rng):
    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=64))
    calls = []
    handle = seg.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        image = picture(rng, 64, 64)
        first = seg(image, CLASSES)
        again = seg(picture(rng, 64, 64), CLASSES)
        assert len(calls) == 1 and again.labels.shape == (64, 64)  # the second call read the cached prompts
        np.testing.assert_array_equal(seg(image, CLASSES).labels, first.labels)
        seg(image, CLASSES, preset=seg.preset.replace(separator=", "))  # other prompts: encoded anew
        assert len(calls) == 2
    finally:
        handle.remove()

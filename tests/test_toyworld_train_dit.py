"""The toy joint-attention transformer's trainer (research.train_dit) on a tiny configuration: it trains,
resumes, and exports a folder that diffusers and the segmenter both load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from maskdiffusion.text import TextConditioning
from research.train_dit import (
    CHECKPOINT,
    MODEL_DIR,
    DiTConfig,
    absent_mass,
    absent_share,
    main,
    mix_conditioning,
    models_from_checkpoint,
    sample_t,
)

TINY = DiTConfig(
    num_scenes=24, width=32, layers=2, text_width=16, steps=4, batch=4, warmup=2, absent_attention_weight=0.03
)


def tiny_args(out, **changes) -> list[str]:
    values = {**TINY.__dict__, **changes}
    args = ["--out", str(out), "--threads", "1", "--log-every", "1"]
    for name, value in values.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two stages: to step 2 (--stop-at), then the same command without it resumes to the end."""
    out = tmp_path_factory.mktemp("ditrun")
    main([*tiny_args(out), "--stop-at", "2"])
    assert torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)["step"] == 2
    main(tiny_args(out))
    return out


def test_a_run_resumes_its_stages_and_logs_every_step_and_its_attention_terms(tiny_run):
    lines = records(tiny_run)
    steps = [r for r in lines if r.get("phase") == "dit"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert lines.index({"resume": True, "step": 2}) == 2  # after steps 1 and 2, before 3
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["prior"]) and r["absent"] > 0 for r in steps)
    assert any(r.get("absent_attention", 0) > 0 for r in steps)  # vocabulary-conditioned rows (p 0.5, batch 4)
    assert torch.load(tiny_run / CHECKPOINT, map_location="cpu", weights_only=False)["step"] == 4


def test_the_export_loads_in_diffusers_and_segments_with_its_card(tiny_run):
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open

    from maskdiffusion import MaskDiffusion
    from maskdiffusion.toyworld.gate import held_out_scenes
    from maskdiffusion.toyworld.world import CLASS_NAMES

    folder = tiny_run / MODEL_DIR
    card = json.loads((folder / "maskdiffusion.json").read_text())
    assert card["text_length"] == 0 and card["vocabulary"] == list(CLASS_NAMES)
    assert card["notes"]["steps"] == 4 and card["notes"]["train_config"]["layers"] == 2
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as stored:
        names = stored.keys()
        assert {stored.get_tensor(k).dtype for k in names} == {torch.float16}  # half the bytes
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    state = torch.load(tiny_run / CHECKPOINT, map_location="cpu", weights_only=False)
    ema = dict(zip((n for n, _ in transformer.named_parameters()), state["ema"], strict=False))
    name, loaded = next(iter(transformer.named_parameters()))
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, ema[name].half().float())  # the EMA weights, rounded to float16
    segmenter = MaskDiffusion.from_pretrained(str(folder), device="cpu")
    assert segmenter.backbone.kind == "mmdit"
    scene = held_out_scenes(1, stream=3)[0]
    result = segmenter(scene.image, list(CLASS_NAMES))
    assert result.labels.shape == scene.labels.shape


def test_absent_mass_is_low_where_the_named_classes_hold_the_pixels():
    present = torch.tensor([[True, False, False], [False, False, False]])  # image 2 names no class: left out
    on_named = torch.log_softmax(torch.tensor([5.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2), dim=1)
    on_absent = torch.log_softmax(torch.tensor([0.0, 5.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2), dim=1)
    assert absent_mass(on_named, present) < 0.02 < 4.0 < absent_mass(on_absent, present)
    assert absent_mass(on_absent, torch.zeros(2, 3, dtype=torch.bool)) == 0  # no caption names a class


def test_flow_times_are_logit_normal_in_the_open_unit_interval():
    t = sample_t(TINY, 20000, np.random.default_rng(0)).numpy()
    assert t.min() > 0 and t.max() < 1
    logits = np.log(t / (1 - t))
    assert abs(logits.mean() - TINY.logit_mean) < 0.03 and abs(logits.std() - TINY.logit_std) < 0.03


def test_a_run_started_from_another_runs_checkpoint_starts_from_its_ema_weights(tiny_run, tmp_path):
    main([*tiny_args(tmp_path, steps=1, lr=0.0), "--init", str(tiny_run / CHECKPOINT)])  # lr 0: nothing moves
    assert records(tmp_path)[0] == {"init": str(tiny_run / CHECKPOINT), "init_step": 4}
    start = torch.load(tiny_run / CHECKPOINT, map_location="cpu", weights_only=False)
    run = torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=False)
    assert run["step"] == 1 and run["config"]["init"] == str(tiny_run / CHECKPOINT)
    _, models, _ = models_from_checkpoint(tmp_path / CHECKPOINT, use_ema=False)
    weights = [p for module in models.trained() for p in module.parameters()]
    assert len(weights) == len(start["ema"]) == len(run["ema"])
    for weight, ema, run_ema in zip(weights, start["ema"], run["ema"], strict=True):
        torch.testing.assert_close(weight, ema)
        torch.testing.assert_close(run_ema, ema)
    name, weight = next(models.transformer.named_parameters())
    assert not torch.equal(weight, start["transformer"][name])  # the EMA, not the raw weights


def test_vocabulary_conditioned_rows_replace_the_captions_rows_and_only_those():
    captions = TextConditioning(hidden=torch.randn(3, 5, 4), pooled=torch.randn(3, 2))
    prompt = TextConditioning(hidden=torch.randn(1, 5, 4), pooled=torch.randn(1, 2))
    mixed = mix_conditioning(captions, prompt, torch.tensor([True, False, True]))
    assert torch.equal(mixed.hidden[1], captions.hidden[1]) and torch.equal(mixed.pooled[1], captions.pooled[1])
    for row in (0, 2):
        assert torch.equal(mixed.hidden[row], prompt.hidden[0]) and torch.equal(mixed.pooled[row], prompt.pooled[0])


def test_absent_share_is_low_where_attention_to_class_tokens_goes_to_the_named_classes():
    tokens = torch.zeros(2, 4, 3)
    tokens[:, 1, 0] = tokens[:, 2, 1] = tokens[:, 3, 2] = 1  # token 0 is no class (e.g. the start token)
    present = torch.tensor([[True, False, False], [True, False, True]])
    named = torch.tensor([0.6, 0.38, 0.01, 0.01]).expand(2, 5, 4)  # most on token 0, which does not count
    absent = torch.tensor([0.6, 0.01, 0.38, 0.01]).expand(2, 5, 4)
    assert absent_share(named, tokens, present) < 0.05 < 1.0 < absent_share(absent, tokens, present)
    assert absent_share(named[:0], tokens[:0], present[:0]) == 0  # no rows


def test_the_grid_scores_every_setting_on_a_held_out_stream_and_writes_its_winners_as_presets(tiny_run, tmp_path):
    from maskdiffusion import MaskDiffusion
    from research import grid

    with pytest.raises(SystemExit):
        grid.main(["--model", str(tiny_run / MODEL_DIR), "--stream", "0", "--out", str(tmp_path / "g.json")])
    args = ["--model", str(tiny_run / MODEL_DIR), "--scenes", "2", "--top", "1", "--out", str(tmp_path / "g.json")]
    grid.main([*args, "--presets", str(tmp_path / "presets.json")])
    report = json.loads((tmp_path / "g.json").read_text())
    attention = [r for r in report["rows"] if r["stage"] == "attention"]
    head = [r for r in report["rows"] if r["stage"] == "head"]
    sets = grid.block_sets(TINY.layers)
    assert len(attention) == 2 * len(grid.TIMESTEPS) * len(sets) and len(head) == 4 * len(sets)
    assert all(0 <= r["mIoU"] <= 100 for r in report["rows"]) and report["stream"] == 3
    assert [r["mIoU"] for r in head] == sorted((r["mIoU"] for r in head), reverse=True)
    presets = json.loads((tmp_path / "presets.json").read_text())
    assert presets["default"] == head[0]["preset"] and presets["attention-only"] == attention[0]["preset"]
    model = tmp_path / "model"
    shutil.copytree(tiny_run / MODEL_DIR, model)
    card = json.loads((model / "maskdiffusion.json").read_text())
    (model / "maskdiffusion.json").write_text(json.dumps({**card, "presets": presets}))
    loaded = MaskDiffusion.from_pretrained(str(model), device="cpu").presets
    assert json.loads(json.dumps(loaded["default"].to_dict())) == head[0]["preset"]


def test_the_demo_puts_a_trained_toy_world_folder_beside_the_bundled_model(tiny_run, tmp_path, capsys):
    from maskdiffusion import cli

    folder = str(tiny_run / MODEL_DIR)
    args = ["demo", "--out", str(tmp_path / "demo"), "--scenes", "2", "--device", "cpu", "--model", "toy"]
    assert cli.main([*args, "--model", folder]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = lines[next(i for i, line in enumerate(lines) if "mIoU (%) over" in line) + 1]
    assert header.split() == ["toy", folder]  # one column each, in the order asked, apart
    other = tmp_path / "other"
    shutil.copytree(tiny_run / MODEL_DIR, other)
    card = json.loads((other / "maskdiffusion.json").read_text())
    (other / "maskdiffusion.json").write_text(json.dumps({**card, "vocabulary": ["cat", "dog"]}))
    for bad, message in ((other, "is not a toy-world model"), (tmp_path, "nor a model folder")):
        with pytest.raises(SystemExit):
            cli.main([*args, "--model", str(bad)])
        assert message in capsys.readouterr().err

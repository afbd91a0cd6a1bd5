"""`maskdiffusion evaluate` end to end on the tiny model: metrics, resume, refusal, protocols, scale-out.

Fresh Python processes pay ~10 s of CPU importing diffusers, so the file starts only two
kinds of them: the run killed mid-way (started in the background by a fixture, so that
its start-up overlaps other tests) and the two spawned workers of the 2-process run. Other
kill points are simulated in-process by the same fault-injection hook, raising an
exception where the real run is SIGKILLed: nothing is written on the way out, so the
RUN_DIR is left exactly as a kill leaves it. For the same reason the in-process runs share
loaded models (``options.load_segmenter`` is memoised per model settings); everything after
loading is the command's own path.

Every run here uses one torch thread (in-process and in the subprocesses), so runs that
should agree can be compared exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from interrupt import stop_evaluations_after
from PIL import Image
from scipy.io import savemat
from sklearn.metrics import confusion_matrix

from maskdiffusion import MaskDiffusion, cli, evaluation
from maskdiffusion.commands import evaluate as evaluate_command
from maskdiffusion.commands import options
from maskdiffusion.datasets import build_dataset
from maskdiffusion.evaluation import eval_shape, evaluate, read_image, resize_nearest
from maskdiffusion.runstate import RunDirError

CLASSES = ["road", "sky|heaven", "car"]
IMAGE_SIZES = {
    "img0": (48, 64),
    "img1": (64, 48),
    "img2": (40, 72),
    "img3": (56, 56),
    "img4": (48, 80),
    "img5": (64, 64),
}
CORRUPT = "img2_corrupt"  # sorts between img2 and img3: it shares a group with img2
SAMPLE_IDS = sorted([*IMAGE_SIZES, CORRUPT])


pytestmark = pytest.mark.usefixtures("one_torch_thread", "shared_models")


def make_folder_dataset(root: Path) -> Path:
    """A `folder` data set: 6 small images of three regions (road / sky / car), 255 in a corner,
    and one corrupt image file with a valid label."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    colours = np.array([(90, 90, 90), (100, 160, 250), (200, 30, 30)])
    for name, (height, width) in IMAGE_SIZES.items():
        label = np.zeros((height, width), np.uint8)
        label[: height // 2] = 1
        label[height // 2 :, width // 2 :] = 2
        image = colours[label] + rng.integers(-20, 20, (height, width, 3))
        label[0, :4] = 255
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
    (root / "images" / f"{CORRUPT}.png").write_bytes(b"this is not a PNG file")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labels" / f"{CORRUPT}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "toy")


def base_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate", "--dataset", "folder", "--root", str(data), "--model", str(model), "--size", "64",
        "--device", "cpu", "--batch-size", "2", "--save-every", "2", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def run_cli(args: list[str]) -> tuple[int, dict | None]:
    code = cli.main(args)
    metrics_file = Path(args[args.index("--out") + 1]) / "metrics.json"
    return code, json.loads(metrics_file.read_text()) if metrics_file.is_file() else None


def results_of(metrics: dict) -> dict:
    """Everything but the run's timing/process facts: what must not depend on how the run went."""
    return {key: value for key, value in metrics.items() if key != "runtime"}


def read_label(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def read_prediction(path: Path) -> np.ndarray:
    raw = np.asarray(Image.open(path)).astype(np.int64)
    return np.where(raw == 255, -1, raw)


@pytest.fixture(scope="module")
def killed_run(data, tiny_model, tmp_path_factory):
    """A `python -m maskdiffusion evaluate` that SIGKILLs itself after handling 3 images
    (two-image groups, checkpoint every 2: it dies after group 2 is scored, before it is saved)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = (out.parent / "log.txt").open("w")
    killer = Path(__file__).with_name("interrupt.py")
    process = subprocess.Popen(
        [sys.executable, str(killer), "3", *base_args(data, tiny_model, out)], env=env, stdout=log, stderr=log
    )
    yield process, out
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()


def uninterrupted(data, model, out, *extra):
    code, metrics = run_cli(base_args(data, model, out, "--save-predictions", "--figures", "3", *extra))
    assert code == 0
    return out, metrics


UNSUPERVISED = ("--mode", "unsupervised")
PER_IMAGE = ("--mode", "unsupervised", "--clustering", "per-image")


@pytest.fixture(scope="module")
def reference_run(data, tiny_model, tmp_path_factory):
    """An uninterrupted open-vocabulary run that keeps every prediction."""
    return uninterrupted(data, tiny_model, tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def dataset_run(data, tiny_model, tmp_path_factory):
    """An uninterrupted unsupervised run, dataset-level clustering (raw cluster predictions kept)."""
    return uninterrupted(data, tiny_model, tmp_path_factory.mktemp("dataset") / "run", *UNSUPERVISED)


@pytest.fixture(scope="module")
def per_image_run(data, tiny_model, tmp_path_factory):
    """An uninterrupted unsupervised run, per-image clustering (matched predictions kept)."""
    return uninterrupted(data, tiny_model, tmp_path_factory.mktemp("per-image") / "run", *PER_IMAGE)


def test_two_processes_give_the_single_process_metrics_exactly(data, tiny_model, tmp_path, killed_run, dataset_run):
    # killed_run is requested only to start that subprocess now, overlapping this test.
    # Dataset-level clustering uses every exchange: pooled features gathered, centroids
    # broadcast, counts all-reduced, failures gathered.
    _, single = dataset_run
    code, double = run_cli(base_args(data, tiny_model, tmp_path / "two", *UNSUPERVISED, "--num-processes", "2"))
    assert code == 0
    assert double["runtime"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("state.*.json")) == [
        "state.rank0of2.json",
        "state.rank1of2.json",
    ]
    assert results_of(double) == results_of(single)


def test_metrics_json_holds_the_scores_settings_model_and_version(reference_run, tiny_model, data):
    _, metrics = reference_run
    from maskdiffusion import __version__

    assert set(metrics["per_class_iou"]) == {"road", "sky", "car"}
    assert metrics["num_images"] == 6 and metrics["num_failed"] == 1
    assert metrics["model"] == str(tiny_model) and metrics["version"] == __version__
    assert metrics["dataset"] == "folder" and metrics["split"] == "val" and metrics["root"] == str(data.resolve())
    assert metrics["mode"] == "open-vocab" and metrics["protocol"] == "open-vocab"
    assert metrics["eval_size"] == "original" and metrics["limit"] is None
    assert metrics["preset"]["size"] == 64
    assert metrics["settings"]["images_per_batch"] == 2
    assert all(isinstance(v, int) for row in metrics["confusion_matrix"] for v in row)


def test_metrics_agree_with_sklearn_on_the_saved_predictions(reference_run, data):
    out, metrics = reference_run
    truth, predicted = [], []
    for name in IMAGE_SIZES:
        label = read_label(data / "labels" / f"{name}.png")
        prediction = read_prediction(out / "predictions" / f"{name}.png")
        keep = label != 255
        truth.append(label[keep]), predicted.append(prediction[keep])
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    expected = confusion_matrix(truth, predicted, labels=[0, 1, 2])
    assert np.array_equal(np.asarray(metrics["confusion_matrix"]), expected)
    hits = np.diag(expected)
    union = expected.sum(0) + expected.sum(1) - hits
    assert metrics["mIoU"] == pytest.approx(100 * np.mean(hits / union))
    assert metrics["pixel_accuracy"] == pytest.approx(100 * hits.sum() / expected.sum())
    for index, name in enumerate(["road", "sky", "car"]):
        assert metrics["per_class_iou"][name] == pytest.approx(100 * hits[index] / union[index])


def test_saved_predictions_are_the_segmenters_own_labels(reference_run, data, tiny_model):
    out, _ = reference_run
    segmenter = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=2)
    preset = segmenter.presets["default"].replace(size=64)
    for group in [SAMPLE_IDS[i : i + 2] for i in range(0, len(SAMPLE_IDS), 2)]:  # the run's image groups
        paths = [data / "images" / f"{name}.png" for name in group]
        results = segmenter.segment_batch(paths, CLASSES, preset=preset, errors="return")
        for name, result in zip(group, results, strict=True):
            if name == CORRUPT:
                assert not (out / "predictions" / f"{name}.png").exists()
            else:
                assert np.array_equal(read_prediction(out / "predictions" / f"{name}.png"), result.labels)


def test_report_chart_and_figures_are_written(reference_run):
    out, metrics = reference_run
    report = (out / "report.md").read_text()
    assert "| 0 | road |" in report and "![per-class IoU](per_class_iou.png)" in report
    assert f"{metrics['mIoU']:.2f}" in report and CORRUPT in report
    assert Image.open(out / "per_class_iou.png").format == "PNG"
    # the first 3 samples are img0, img1, img2: three figures, each wider than its 3 panels
    for name in ("img0", "img1", "img2"):
        figure = Image.open(out / "figures" / f"{name}.png")
        assert figure.width > 3 * IMAGE_SIZES[name][1]
        assert f"figures/{name}.png" in report


def test_unreadable_image_is_reported_and_counted_not_fatal(reference_run):
    _, metrics = reference_run
    assert metrics["num_failed"] == 1
    assert metrics["failed"][0]["id"] == CORRUPT
    assert "cannot read image" in metrics["failed"][0]["reason"]
    assert metrics["num_pixels"] == sum(h * w - 4 for h, w in IMAGE_SIZES.values())  # 4 ignored pixels each


def test_run_killed_mid_way_resumes_to_the_metrics_of_an_uninterrupted_run(killed_run, reference_run, data, tiny_model):
    process, out = killed_run
    assert process.wait(timeout=300) == -signal.SIGKILL
    state = json.loads((out / "state.rank0of1.json").read_text())
    assert state["done"] == ["img0", "img1"]  # group 2 was scored but not yet saved
    assert not (out / "metrics.json").exists()
    code, resumed = run_cli(base_args(data, tiny_model, out))
    assert code == 0 and resumed["runtime"]["resumed"]
    assert results_of(resumed) == results_of(reference_run[1])


class Killed(Exception):
    """Stands for SIGKILL in-process (nothing handles it, nothing is written on the way out)."""


@pytest.mark.parametrize(
    ("straight", "extra", "kill_points"),
    [
        # two-image groups, checkpoints every 2 images; the counts are per (re)start
        ("reference_run", (), (3, 3)),
        # pass 1 pools 7 images, pass 2 scores 6: killed in pass 1, then in pass 2 twice
        ("dataset_run", UNSUPERVISED, (4, 7, 3)),
        ("per_image_run", PER_IMAGE, (3,)),
    ],
    ids=["open-vocab", "dataset-clustering", "per-image-clustering"],
)
def test_runs_killed_at_any_point_end_with_the_same_metrics(
    straight, extra, kill_points, data, tiny_model, tmp_path, monkeypatch, request
):
    out = tmp_path / "interrupted"
    for point in kill_points:  # each restart is killed again further on
        with monkeypatch.context() as patch:
            stop_evaluations_after(patch, point, Killed)
            with pytest.raises(Killed):
                cli.main(base_args(data, tiny_model, out, *extra))
        assert not (out / "metrics.json").exists()
    code, resumed = run_cli(base_args(data, tiny_model, out, *extra))
    assert code == 0
    assert results_of(resumed) == results_of(request.getfixturevalue(straight)[1])


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes_to_the_same_metrics(
    reference_run, data, tiny_model, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "interrupted"

    with monkeypatch.context() as patch:
        stop_evaluations_after(patch, 3, KeyboardInterrupt)  # Ctrl-C where the killed run dies: group 2 scored
        assert cli.main(base_args(data, tiny_model, out)) == 130
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert [line for line in error.splitlines() if "interrupted" in line] == [
        f"interrupted; 2 image(s) checkpointed in {out}; run the same command again to resume"
    ]
    code, resumed = run_cli(base_args(data, tiny_model, out))
    assert code == 0 and resumed["runtime"]["resumed"]
    assert results_of(resumed) == results_of(reference_run[1])


def test_run_dir_with_other_settings_is_refused(reference_run, data, tiny_model, capsys):
    out, _ = reference_run
    before = (out / "metrics.json").read_text()
    code = cli.main(base_args(data, tiny_model, out, "--eval-size", "16"))
    assert code == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "eval_size: original (in RUN_DIR) vs 16 (now)" in error
    assert (out / "metrics.json").read_text() == before


def test_non_empty_folder_that_is_not_a_run_is_refused(data, tiny_model, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(base_args(data, tiny_model, tmp_path)) == 2
    assert "not an evaluation run folder" in capsys.readouterr().err


def test_resume_with_another_process_count_is_refused(reference_run, data, tiny_model):
    out, _ = reference_run
    dataset = build_dataset("folder", data)
    segmenter = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=2)
    preset = segmenter.presets["default"].replace(size=64)
    with pytest.raises(RunDirError, match="started with 1 process"):
        # the same settings, but as shard 0 of a 2-process job
        evaluation.Evaluation(
            dataset, segmenter, out_dir=out, preset=preset, mode="open-vocab", clusters=None, clustering="dataset",
            limit=None, save_every=2, eval_size=None, figures=3, progress=False,
            comm=_FakeComm(), save_predictions=True, pool_size=100_000, seed=0,
        ).run()  # fmt: skip


class _FakeComm:
    """Rank 0 of 2 without a process group: enough to reach the RUN_DIR check."""

    rank, world_size, is_main = 0, 2, True

    def broadcast(self, value):
        return value


def test_scores_at_eval_size_count_the_resized_label_pixels(data, tiny_model, tmp_path):
    code, metrics = run_cli(base_args(data, tiny_model, tmp_path / "run", "--eval-size", "16", "--save-predictions"))
    assert code == 0 and metrics["eval_size"] == 16
    expected = 0
    for name in IMAGE_SIZES:
        label = read_label(data / "labels" / f"{name}.png")
        shape = eval_shape(label.shape, 16)
        assert min(shape) == 16
        expected += int((resize_nearest(label, shape) != 255).sum())
        assert read_prediction(tmp_path / "run" / "predictions" / f"{name}.png").shape == shape
    assert metrics["num_pixels"] == expected


def test_dataset_clustering_matches_clusters_to_classes_once_for_the_data_set(dataset_run, data):
    out, metrics = dataset_run
    assert metrics["protocol"] == "unsupervised/dataset" and metrics["clusters"] == 3
    clusters = np.asarray(metrics["cluster_confusion_matrix"])
    matching = np.asarray(metrics["cluster_to_class"])
    # the matching is one-to-one and the best over all permutations (3 clusters, 3 classes)
    assert sorted(matching) == [0, 1, 2]
    best = max(sum(clusters[c, k] for k, c in enumerate(perm)) for perm in itertools.permutations(range(3)))
    assert sum(clusters[matching[k], k] for k in range(3)) == best
    # independent recount: raw cluster PNGs -> sklearn counts -> the same one mapping for all images
    truth, predicted = [], []
    for name in IMAGE_SIZES:
        label = read_label(data / "labels" / f"{name}.png")
        keep = label != 255
        truth.append(label[keep]), predicted.append(read_prediction(out / "predictions" / f"{name}.png")[keep])
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    assert np.array_equal(confusion_matrix(truth, predicted, labels=[0, 1, 2]), clusters)
    assert np.array_equal(confusion_matrix(truth, matching[predicted], labels=[0, 1, 2]), metrics["confusion_matrix"])
    assert (out / "kmeans.npz").is_file() and len(list((out / "pool").glob("*.npz"))) == 4


def test_more_clusters_than_classes_leave_unmatched_clusters_as_misses(data, tiny_model, tmp_path):
    code, metrics = run_cli(base_args(data, tiny_model, tmp_path / "run", "--mode", "unsupervised", "--clusters", "5"))
    assert code == 0
    clusters = np.asarray(metrics["cluster_confusion_matrix"])
    assert clusters.shape == (3, 5)
    unmatched = [k for k, c in enumerate(metrics["cluster_to_class"]) if c == -1]
    assert len(unmatched) == 2
    assert np.array_equal(metrics["unassigned_pixels"], clusters[:, unmatched].sum(axis=1))


def test_per_image_clustering_is_named_and_scores_each_images_own_matching(per_image_run, data):
    out, metrics = per_image_run
    assert metrics["protocol"] == "unsupervised/per-image" and "optimistic" in metrics["protocol_description"]
    assert "cluster_to_class" not in metrics
    total = np.zeros((3, 3), np.int64)
    for name in IMAGE_SIZES:
        label = read_label(data / "labels" / f"{name}.png")
        prediction = read_prediction(out / "predictions" / f"{name}.png")  # already matched, per image
        keep = label != 255
        counts = confusion_matrix(label[keep], prediction[keep], labels=[0, 1, 2])
        # each image's matching is optimal for that image
        best = max(sum(counts[perm[k], k] for k in range(3)) for perm in itertools.permutations(range(3)))
        assert np.trace(counts) == best
        total += counts
    assert np.array_equal(total, metrics["confusion_matrix"])


def test_class_names_file_replaces_the_prompt_words(data, tiny_model, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("street|road\nsky\nautomobile\n")
    code, metrics = run_cli(base_args(data, tiny_model, tmp_path / "run", "--class-names", str(names), "--limit", "2"))
    assert code == 0
    assert list(metrics["per_class_iou"]) == ["street", "sky", "automobile"]
    assert metrics["settings"]["classes"] == ["street|road", "sky", "automobile"]
    assert metrics["num_images"] == 2 and metrics["limit"] == 2


def test_background_threshold_fills_the_background_class_instead_of_prompting_it(data, tiny_model, tmp_path):
    dataset = replace(build_dataset("folder", data), background_index=0)
    segmenter = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=2)
    prompted = []
    original = segmenter.segment_batch

    def spy(images, classes, **options):
        prompted.append(list(classes))
        return original(images, classes, **options)

    segmenter.segment_batch = spy
    preset = segmenter.presets["default"].replace(size=64, background_threshold=1.0)  # cosines: nothing passes
    metrics = evaluate(dataset, segmenter, out_dir=tmp_path / "run", preset=preset, limit=2, progress=False)
    assert all(classes == ["sky|heaven", "car"] for classes in prompted)
    counts = np.asarray(metrics["confusion_matrix"])
    assert counts[:, 1:].sum() == 0 and counts[:, 0].sum() == metrics["num_pixels"]
    assert metrics["settings"]["background"] == "threshold"


def test_background_words_stand_for_the_background_class_instead_of_prompting_it(data, tiny_model, tmp_path):
    dataset = replace(build_dataset("folder", data), background_index=0)
    segmenter = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=2)
    preset = segmenter.presets["default"].replace(size=64)
    words = preset.replace(background_words=("wall", "floor"))
    metrics = evaluate(dataset, segmenter, out_dir=tmp_path / "words", preset=words, limit=2, progress=False)
    assert metrics["settings"]["background"] == "background words"
    # Pixels a background word wins are the background class (0): the run equals mapping by hand
    # the labels of a plain run whose prompt holds the same words in the same order.
    plain = [segmenter(path, ["sky|heaven", "car", "wall", "floor"], preset=preset).labels for path in (
        dataset.files[0].image_path, dataset.files[1].image_path)]  # fmt: skip
    by_hand = np.zeros_like(np.asarray(metrics["confusion_matrix"]))
    for labels, index in zip(plain, (0, 1), strict=True):
        truth = dataset.load(index).label
        predicted = np.where(labels >= 2, 0, labels + 1)
        scored = truth != 255
        np.add.at(by_hand, (truth[scored], predicted[scored]), 1)
    assert (np.asarray(metrics["confusion_matrix"]) == by_hand).all()


def test_missing_data_set_exits_2_naming_the_expected_layout(tiny_model, tmp_path, capsys):
    args = base_args(tmp_path, tiny_model, tmp_path / "out")
    args[args.index("folder")] = "cityscapes19"
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "leftImg8bit" in error and "gtFine" in error
    assert not (tmp_path / "out").exists()


def test_potsdam_mat_tiles_are_read_as_their_rgb_channels(tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    tiles = {}
    for tile in ("tile_a", "tile_b"):
        tiles[tile] = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)  # RGB + infrared
        savemat(base / "imgs" / f"{tile}.mat", {"img": tiles[tile]})
        savemat(base / "gt" / f"{tile}.mat", {"gt": rng.integers(0, 6, (40, 40)).astype(np.uint8)})
    (base / "labelled_test.txt").write_text("tile_a\ntile_b\n")
    assert np.array_equal(read_image(base / "imgs" / "tile_a.mat"), tiles["tile_a"][..., :3])
    args = base_args(tmp_path, tiny_model, tmp_path / "run")
    args[args.index("folder")] = "potsdam3"
    code, metrics = run_cli(args)
    assert code == 0
    assert metrics["num_images"] == 2 and metrics["num_failed"] == 0
    assert metrics["num_pixels"] == 2 * 40 * 40


def test_nearest_resize_keeps_values_and_eval_shape_keeps_the_aspect():
    label = np.array([[0, 1], [2, 255]], np.uint8)
    assert np.array_equal(resize_nearest(label, (4, 4)), np.kron(label, np.ones((2, 2), np.uint8)))
    assert resize_nearest(label, (2, 2)) is label
    assert eval_shape((1024, 2048), 256) == (256, 512)
    assert eval_shape((500, 375), None) == (500, 375)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdiffusion")
    return evaluate_command.add_command(parser.add_subparsers())


def test_every_evaluate_flag_with_a_default_says_it_in_its_help():
    shared = argparse.ArgumentParser()
    options.add_model_arguments(shared)
    options.add_preset_arguments(shared)
    theirs = {action.dest for action in shared._actions}  # the model and preset flags, shared by the commands
    checked = []
    for action in evaluate_parser()._actions:
        if action.dest in theirs or action.nargs == 0 or action.required or action.dest == "root":
            continue  # help, on/off switches, --dataset, and --root, which has no default
        assert "default" in action.help, action.option_strings
        if action.default is not None:
            assert str(action.default) in action.help, action.option_strings
        checked.append(action.dest)
    assert {"pool_size", "figures", "image_list", "limit", "out", "eval_size", "num_processes"} <= set(checked)


def test_evaluate_help_says_what_a_rerun_into_the_same_out_does():
    text = " ".join(evaluate_parser().format_help().split())
    assert "resume an interrupted run" in text and "toyworld keeps no checkpoints: it is recomputed" in text
    assert "other settings is refused" in text

"""The training-free open-vocabulary benchmarks (VOC21/20, Context60/59, COCO-Object, ADE20K):
fixture trees in each official layout, label values checked against what the layout means,
and the class-name files shipped with the package."""

from __future__ import annotations

import fnmatch
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from test_datasets import display_name, make_cocostuff, make_voc, write_index, write_rgb

from maskdiffusion import cli, datasets
from maskdiffusion.datasets import (
    BENCHMARK_CLASS_NAMES,
    COCOSTUFF_FINE,
    DatasetError,
    available_datasets,
    benchmark_classes,
    build_dataset,
)
from maskdiffusion.prompts import read_class_file

SUITE = ["voc21", "context60", "coco-object", "voc20", "context59", "cocostuff171", "cityscapes19", "ade20k"]


def make_context(root: Path, values) -> Path:
    """VOCdevkit/VOC2010 as mmsegmentation's Pascal Context converter leaves it; two val ids, one train id."""
    base = root / "VOCdevkit" / "VOC2010"
    for image_id in ("2008_000002", "2008_000003", "2008_000008"):
        write_rgb(base / "JPEGImages" / f"{image_id}.jpg")
        write_index(base / "SegmentationClassContext" / f"{image_id}.png", values)
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2008_000003\n2008_000002\n")
    (lists / "train.txt").write_text("2008_000008\n")
    return root


def make_ade20k(root: Path, values) -> Path:
    """ADEChallengeData2016 with two validation images and one training image."""
    base = root / "ADEChallengeData2016"
    for folder, stem in (
        ("validation", "ADE_val_00000002"),
        ("validation", "ADE_val_00000001"),
        ("training", "ADE_train_00000001"),
    ):
        write_rgb(base / "images" / folder / f"{stem}.jpg")
        write_index(base / "annotations" / folder / f"{stem}.png", values)
    return root


# --- registry and class-name files ----------------------------------------------------------


def test_every_suite_data_set_and_the_voc2012_alias_are_registered():
    assert {*SUITE, "voc2012"} <= set(available_datasets())


@pytest.mark.parametrize("name", SUITE)
def test_class_file_parses_to_the_class_count_and_its_first_words_are_the_class_names(name):
    words = benchmark_classes(name)
    assert len(words) == len(BENCHMARK_CLASS_NAMES[name])
    assert [w.split("|")[0] for w in words] == list(BENCHMARK_CLASS_NAMES[name])


def test_class_files_are_the_suite_and_are_shipped_as_package_data():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    folder = resources.files("maskdiffusion").joinpath(datasets.CLASSNAMES_FOLDER)
    shipped = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".txt"))
    assert shipped == sorted(f"{name}.txt" for name in SUITE)
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["maskdiffusion"]
    for name in shipped:
        assert any(fnmatch.fnmatch(f"{datasets.CLASSNAMES_FOLDER}/{name}", p) for p in patterns), name


def test_class_files_read_as_user_class_files_give_the_same_words():
    folder = resources.files("maskdiffusion").joinpath(datasets.CLASSNAMES_FOLDER)
    with resources.as_file(folder.joinpath("ade20k.txt")) as path:
        classes = read_class_file(str(path))
    assert classes[12].name == "person" and len(classes[12].synonyms) > 1
    assert tuple("|".join(c.synonyms) for c in classes) == benchmark_classes("ade20k")


def test_background_is_a_plain_word_where_the_data_set_has_a_background_class():
    for name in ("voc21", "context60", "coco-object"):
        assert benchmark_classes(name)[0] == "background"


def test_files_of_one_data_set_with_and_without_background_use_the_same_words():
    assert benchmark_classes("voc20") == benchmark_classes("voc21")[1:]
    assert benchmark_classes("context59") == benchmark_classes("context60")[1:]
    assert benchmark_classes("coco-object")[1:] == benchmark_classes("cocostuff171")[:80]


@pytest.mark.parametrize(
    "name, drawn",
    [
        ("voc21", "SegmentationClass/<id>.png"),
        ("voc20", "SegmentationClass/<id>.png"),
        ("context60", "SegmentationClassContext/<id>.png"),
        ("context59", "ImageSets/SegmentationContext/val.txt"),
        ("coco-object", "coco_stuff164k"),
        ("ade20k", "ADEChallengeData2016/"),
    ],
)
def test_missing_data_set_error_draws_its_own_layout(tmp_path, name, drawn):
    with pytest.raises(DatasetError) as caught:
        build_dataset(name, tmp_path)
    message = str(caught.value)
    assert repr(name) in message and drawn in message and "└──" in message and str(tmp_path) in message


# --- PASCAL VOC: voc21 (with background) and voc20 (background ignored) -------------------------


def test_voc21_keeps_label_values_with_background_as_class_0(tmp_path):
    dataset = build_dataset("voc21", make_voc(tmp_path, [[0, 15, 20, 255]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[0, 15, 20, 255]])
    assert dataset.name == "voc21" and dataset.num_classes == 21 and dataset.background_index == 0
    assert display_name(dataset, 15) == "person" and "|" in dataset.classes[15]
    assert dataset.classes == benchmark_classes("voc21")


def test_voc2012_is_an_alias_of_voc21_under_its_own_name(tmp_path):
    root = make_voc(tmp_path, [[0, 15, 255]])
    voc21, voc2012 = build_dataset("voc21", root), build_dataset("voc2012", root)
    assert voc2012.name == "voc2012"
    assert (voc2012.classes, voc2012.sample_ids, voc2012.background_index) == (
        voc21.classes,
        voc21.sample_ids,
        voc21.background_index,
    )
    np.testing.assert_array_equal(voc2012.load(1).label, voc21.load(1).label)


def test_voc20_ignores_background_and_moves_every_class_down_by_one(tmp_path):
    person = 15
    dataset = build_dataset("voc20", make_voc(tmp_path, [[0, 1, person, 20, 255]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[255, 0, 14, 19, 255]])
    assert dataset.num_classes == 20 and dataset.background_index is None
    assert display_name(dataset, 14) == "person" and display_name(dataset, 0) == "aeroplane"
    assert dataset.classes == benchmark_classes("voc20")


def test_voc20_reads_the_same_split_lists_as_voc21(tmp_path):
    root = make_voc(tmp_path, [[0]])
    assert build_dataset("voc20", root).sample_ids == ["2007_000033", "2007_000042"]
    assert build_dataset("voc20", root, split="train").sample_ids == ["2007_000061"]


def test_voc20_label_value_beyond_tv_monitor_is_a_clear_error(tmp_path):
    dataset = build_dataset("voc20", make_voc(tmp_path, [[21]]))
    with pytest.raises(DatasetError, match=r"values \[20\] but there are only 20 classes"):
        dataset.load(0)


# --- PASCAL Context: context60 (with background) and context59 (background ignored) ------------


def test_context60_passes_label_values_through_with_background_as_class_0(tmp_path):
    person = 37
    dataset = build_dataset("context60", make_context(tmp_path, [[0, 1, person, 59, 255]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[0, 1, 37, 59, 255]])
    assert dataset.num_classes == 60 and dataset.background_index == 0
    names = [display_name(dataset, i) for i in (0, 1, 37, 59)]
    assert names == ["background", "aeroplane", "person", "wood"]
    assert dataset.classes == benchmark_classes("context60")


def test_context59_ignores_background_and_moves_every_class_down_by_one(tmp_path):
    person = 37
    dataset = build_dataset("context59", make_context(tmp_path, [[0, 1, person, 59, 255]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[255, 0, 36, 58, 255]])
    assert dataset.num_classes == 59 and dataset.background_index is None
    assert [display_name(dataset, i) for i in (0, 36, 58)] == ["aeroplane", "person", "wood"]
    assert dataset.classes == benchmark_classes("context59")


def test_context_splits_follow_the_segmentation_context_lists(tmp_path):
    root = make_context(tmp_path, [[0]])
    dataset = build_dataset("context60", root)
    assert dataset.sample_ids == ["2008_000002", "2008_000003"]
    assert dataset.load(0).image_path == root / "VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg"
    assert build_dataset("context59", root, split="train").sample_ids == ["2008_000008"]
    assert build_dataset("context59", root / "VOCdevkit").sample_ids == dataset.sample_ids
    with pytest.raises(DatasetError, match="available: val, train"):
        build_dataset("context60", root, split="trainval")


def test_context_without_its_val_list_names_the_missing_file(tmp_path):
    root = make_context(tmp_path, [[0]])
    (root / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt").unlink()
    with pytest.raises(DatasetError, match=r"cannot read list file .*val\.txt(.|\n)*SegmentationClassContext"):
        build_dataset("context59", root)


def test_context60_label_value_beyond_59_is_a_clear_error(tmp_path):
    dataset = build_dataset("context60", make_context(tmp_path, [[60]]))
    with pytest.raises(DatasetError, match=r"values \[60\] but there are only 60 classes"):
        dataset.load(0)


# --- COCO-Object: COCO-Stuff 164k stuff-thing maps read as background + 80 things --------------


def test_coco_object_maps_things_to_their_index_plus_1_and_stuff_and_unlabelled_to_background(tmp_path):
    person, car, food_other, unlabelled, street_sign, toothbrush, hair_brush, banner, wood = (
        0, 2, 120, 255, 11, 89, 90, 91, 181,
    )  # fmt: skip
    assert COCOSTUFF_FINE[street_sign][1] is None and COCOSTUFF_FINE[hair_brush][1] is None  # never annotated
    values = [[person, car, food_other, unlabelled, street_sign, toothbrush, hair_brush, banner, wood]]
    dataset = build_dataset("coco-object", make_cocostuff(tmp_path, values, curated=None))
    np.testing.assert_array_equal(dataset.load(0).label, [[1, 3, 0, 0, 255, 80, 255, 0, 0]])
    assert [display_name(dataset, i) for i in (0, 1, 3, 80)] == ["background", "person", "car", "toothbrush"]
    assert dataset.num_classes == 81 and dataset.background_index == 0
    assert dataset.classes == benchmark_classes("coco-object")


def test_coco_object_numbers_the_80_annotated_thing_ids_in_order_and_every_stuff_id_is_background(tmp_path):
    every_fine_id = list(range(182))
    dataset = build_dataset("coco-object", make_cocostuff(tmp_path, [every_fine_id], curated=None))
    label = dataset.load(0).label[0]
    things, stuff = label[:91], label[91:]
    annotated = [fine for fine in range(91) if COCOSTUFF_FINE[fine][1] is not None]
    np.testing.assert_array_equal(things[annotated], np.arange(1, 81))
    assert (np.delete(things, annotated) == 255).all() and len(annotated) == 80
    assert (stuff == 0).all()


def test_coco_object_scores_every_val_image_and_reads_mmsegmentations_folder_name(tmp_path):
    make_cocostuff(tmp_path, [[0]], curated=["000000000285"])
    (tmp_path / "cocostuff").rename(tmp_path / "coco_stuff164k")
    dataset = build_dataset("coco-object", tmp_path)
    assert dataset.sample_ids == ["000000000139", "000000000285"] and dataset.image_list == "all"
    assert dataset.root == tmp_path / "coco_stuff164k"


# --- ADE20K -----------------------------------------------------------------------------------


def test_ade20k_value_1_is_class_0_and_0_other_is_ignored(tmp_path):
    wall, person, flag = 1, 13, 150
    dataset = build_dataset("ade20k", make_ade20k(tmp_path, [[0, wall, person, flag, 255]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[255, 0, 12, 149, 255]])
    assert [display_name(dataset, i) for i in (0, 12, 149)] == ["wall", "person", "flag"]
    assert dataset.num_classes == 150 and dataset.background_index is None
    assert dataset.classes == benchmark_classes("ade20k")


def test_ade20k_val_is_the_validation_folder_and_train_the_training_folder(tmp_path):
    root = make_ade20k(tmp_path, [[1]])
    dataset = build_dataset("ade20k", root)
    assert dataset.sample_ids == ["ADE_val_00000001", "ADE_val_00000002"]
    assert dataset.load(0).image_path == root / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    assert build_dataset("ade20k", root, split="train").sample_ids == ["ADE_train_00000001"]
    assert build_dataset("ade20k", root / "ADEChallengeData2016").sample_ids == dataset.sample_ids


def test_ade20k_image_without_annotation_is_named(tmp_path):
    root = make_ade20k(tmp_path, [[1]])
    (root / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images have no label file(.|\n)*ADE_val_00000002\.png"):
        build_dataset("ade20k", root)


def test_ade20k_annotation_value_above_150_is_a_clear_error(tmp_path):
    dataset = build_dataset("ade20k", make_ade20k(tmp_path, [[151]]))
    with pytest.raises(DatasetError, match=r"values \[150\] but there are only 150 classes"):
        dataset.load(0)


# --- end to end: evaluate counts the ground truth the layout means ------------------------------

# (data set, fixture tree, one label row (each image is 4 rows of it), ground-truth pixels per class
# over the 2 val images). The counts are written from what each layout's values mean.
ROW_CASES = [
    ("voc20", make_voc, [0, 15, 15, 1, 20, 255], {14: 16, 0: 8, 19: 8}),
    ("context60", make_context, [0, 0, 37, 59, 255, 1], {0: 16, 37: 8, 59: 8, 1: 8}),
    ("context59", make_context, [0, 0, 37, 59, 255, 1], {36: 8, 58: 8, 0: 8}),
    ("coco-object", make_cocostuff, [0, 2, 120, 255, 11, 0], {1: 16, 3: 8, 0: 16}),
    ("ade20k", make_ade20k, [0, 1, 1, 13, 150, 255], {0: 16, 12: 8, 149: 8}),
]


@pytest.mark.parametrize("name, make, row, expected", ROW_CASES, ids=[case[0] for case in ROW_CASES])
def test_evaluate_counts_the_ground_truth_each_layout_means(tiny_model, tmp_path, name, make, row, expected):
    label = np.tile(np.asarray(row), (4, 1))
    root = make(tmp_path / "data", label)
    if make is make_cocostuff:  # its second image has a label of its own: give it this one too
        write_index(root / "cocostuff/annotations/val2017/000000000285.png", label)
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", name, "--root", str(root), "--model", str(tiny_model), "--size", "64"]
    assert cli.main([*args, "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    truth = np.asarray(metrics["confusion_matrix"]).sum(axis=1) + np.asarray(metrics["unassigned_pixels"])
    dataset = build_dataset(name, root)
    wanted = np.zeros(dataset.num_classes, dtype=np.int64)
    for index, count in expected.items():
        wanted[index] = count
    np.testing.assert_array_equal(truth, wanted)
    assert metrics["num_images"] == 2 and metrics["class_names"][0] == display_name(dataset, 0)

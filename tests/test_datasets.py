"""Data set loaders, checked on tiny fixture trees written in each official layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from maskdiffusion import datasets
from maskdiffusion.datasets import (
    COCOSTUFF27_CLASSES,
    COCOSTUFF171_CLASSES,
    POTSDAM6_VAL_TILES,
    Dataset,
    DatasetError,
    SampleFile,
    available_datasets,
    build_dataset,
    register_dataset,
)

STANDARD = [
    "ade20k", "cityscapes19", "cityscapes27", "coco-object", "cocostuff171", "cocostuff27", "context59", "context60",
    "folder", "potsdam3", "potsdam6", "voc20", "voc21", "voc2012",
]  # fmt: skip


def display_name(dataset: Dataset, index: int) -> str:
    """The name of class ``index``: the first of its synonyms ("person|man" -> "person")."""
    return dataset.class_names[index].split("|")[0]


def write_rgb(path: Path, size=(6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path)


def write_index(path: Path, values, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def make_cityscapes(root: Path, label_ids) -> Path:
    """datasets/cityscapes with two val cities; frankfurt's label holds ``label_ids``."""
    base = root / "cityscapes"
    for city, name, values in (
        ("frankfurt", "frankfurt_000000_000294", label_ids),
        ("lindau", "lindau_000001_000019", [[7, 7]]),
    ):
        write_rgb(base / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png")
        write_index(base / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", values)
    return root


def make_cocostuff(root: Path, fine_ids, curated=("000000000139", "000000000285")) -> Path:
    """Two val images (139 sorts first) and STEGO's curated list naming ``curated`` (None: no list file)."""
    base = root / "cocostuff"
    for image_id, values in (("000000000139", fine_ids), ("000000000285", [[0, 255]])):
        write_rgb(base / "images" / "val2017" / f"{image_id}.jpg")
        write_index(base / "annotations" / "val2017" / f"{image_id}.png", values)
    if curated is not None:
        listed = base / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt"
        listed.parent.mkdir(parents=True)
        listed.write_text("".join(f"{i}\n" for i in curated))
    return root


def make_voc(root: Path, values) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for image_id in ("2007_000033", "2007_000042", "2007_000061"):
        write_rgb(base / "JPEGImages" / f"{image_id}.jpg")
        write_index(base / "SegmentationClass" / f"{image_id}.png", values, palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000042\n2007_000033\n")
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000061\n")
    return root


def make_potsdam_mat(root: Path, gt) -> Path:
    base = root / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    gt = np.asarray(gt, dtype=np.int32)
    for tile in ("7", "12", "30"):
        savemat(base / "imgs" / f"{tile}.mat", {"img": np.zeros((*gt.shape, 4), np.uint8)})
        savemat(base / "gt" / f"{tile}.mat", {"gt": gt})
    (base / "labelled_test.txt").write_text("7\n12\n")
    (base / "labelled_train.txt").write_text("30\n")
    return root


ISPRS = {  # the colour legend of the ISPRS Potsdam labels
    "impervious": (255, 255, 255), "building": (0, 0, 255), "low vegetation": (0, 255, 255),
    "tree": (0, 255, 0), "car": (255, 255, 0), "clutter": (255, 0, 0), "boundary": (0, 0, 0),
}  # fmt: skip


def make_potsdam_tif(root: Path, colours, tiles=(*POTSDAM6_VAL_TILES, "2_10")) -> Path:
    base = root / "potsdam"
    rgb = np.asarray([[ISPRS[c] for c in colours]], dtype=np.uint8)
    for tile in tiles:
        write_rgb(base / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", size=(rgb.shape[1], 1))
        (base / "5_Labels_all").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(base / "5_Labels_all" / f"top_potsdam_{tile}_label.tif")
    return root


def make_folder(root: Path, values, classes="grass\nsky|heaven\ncow\n") -> Path:
    for stem in ("b", "a"):
        write_rgb(root / "images" / f"{stem}.jpg")
        write_index(root / "labels" / f"{stem}.png", values)
    (root / "classes.txt").write_text(classes)
    return root


# --- registry --------------------------------------------------------------------------------


def test_registry_offers_every_standard_benchmark():
    assert set(STANDARD) <= set(available_datasets())


def test_unknown_dataset_name_is_refused_with_the_available_names():
    with pytest.raises(DatasetError, match="cityscapes27"):
        build_dataset("citiscapes", "/nowhere")


def test_registered_dataset_is_buildable_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))
    write_index(tmp_path / "l.png", [[1, 0]])

    def toyworld(root: Path, split: str) -> Dataset:
        files = (SampleFile("one", root / "i.png", root / "l.png"),)
        return Dataset("toyworld", split, root, ("ball", "floor"), files, datasets.decode_index_png)

    register_dataset("toyworld", toyworld)
    dataset = build_dataset("toyworld", tmp_path)
    assert dataset.class_names == ["ball", "floor"]
    np.testing.assert_array_equal(dataset.load(0).label, [[1, 0]])


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("voc2012", lambda root, split: None)


def test_options_a_dataset_does_not_take_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="image_list"):
        build_dataset("voc2012", make_voc(tmp_path, [[0]]), image_list="x.txt")


def test_class_words_are_unique_within_every_builtin_vocabulary():
    for classes in (
        datasets.CITYSCAPES27_CLASSES, datasets.CITYSCAPES19_CLASSES, COCOSTUFF27_CLASSES,
        COCOSTUFF171_CLASSES, datasets.VOC2012_CLASSES, datasets.POTSDAM3_CLASSES, datasets.POTSDAM6_CLASSES,
        datasets.CONTEXT60_CLASSES, datasets.COCO_OBJECT_CLASSES, datasets.ADE20K_CLASSES,
    ):  # fmt: skip
        words = [w.strip().casefold() for c in classes for w in c.split("|")]
        assert len(words) == len(set(words)), classes
        assert all(words)


# --- missing and malformed data sets -------------------------------------------------------


@pytest.mark.parametrize("name", STANDARD)
def test_missing_dataset_error_names_it_draws_the_layout_and_lists_where_it_looked(tmp_path, name):
    with pytest.raises(DatasetError) as caught:
        build_dataset(name, tmp_path)
    message = str(caught.value)
    assert repr(name) in message
    assert "└──" in message
    assert str(tmp_path) in message


def test_unknown_split_is_refused_with_the_available_splits(tmp_path):
    with pytest.raises(DatasetError, match="available: val, train"):
        build_dataset("cityscapes27", make_cityscapes(tmp_path, [[7]]), split="test")


def test_image_without_label_file_is_a_dataset_error_naming_the_missing_file(tmp_path):
    root = make_cityscapes(tmp_path, [[7]])
    (root / "cityscapes/gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images have no label file(.|\n)*lindau_000001_000019"):
        build_dataset("cityscapes27", root)


def test_split_list_naming_a_missing_image_is_a_dataset_error(tmp_path):
    root = make_voc(tmp_path, [[0]])
    (root / "VOCdevkit/VOC2012/JPEGImages/2007_000042.jpg").unlink()
    with pytest.raises(DatasetError, match=r"listed images are missing(.|\n)*2007_000042"):
        build_dataset("voc2012", root)


def test_colour_label_image_is_refused_as_not_an_index_image(tmp_path):
    root = make_cityscapes(tmp_path, [[7]])
    write_rgb(root / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png")
    dataset = build_dataset("cityscapes27", root)
    with pytest.raises(DatasetError, match="colour visualisation"):
        dataset.load(0)


def test_corrupt_label_file_is_a_dataset_error_naming_the_file(tmp_path):
    root = make_cocostuff(tmp_path, [[0]])
    (root / "cocostuff/annotations/val2017/000000000139.png").write_bytes(b"not a png")
    dataset = build_dataset("cocostuff171", root)
    with pytest.raises(DatasetError, match=r"000000000139\.png"):
        dataset.load(0)


# --- Cityscapes ------------------------------------------------------------------------------


def test_cityscapes_car_pixel_is_class_19_of_27(tmp_path):
    dataset = build_dataset("cityscapes27", make_cityscapes(tmp_path, [[26]]))
    assert dataset.load(0).label[0, 0] == 19
    assert dataset.class_names[19] == "car"


def test_cityscapes_car_pixel_is_class_13_of_19(tmp_path):
    dataset = build_dataset("cityscapes19", make_cityscapes(tmp_path, [[26]]))
    assert dataset.load(0).label[0, 0] == 13
    assert dataset.class_names[13] == "car"


def test_cityscapes27_is_label_id_minus_7_and_ignores_ids_outside_7_to_33(tmp_path):
    dataset = build_dataset("cityscapes27", make_cityscapes(tmp_path, [[0, 6, 7, 33, 34]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[255, 255, 0, 26, 255]])
    assert dataset.num_classes == 27


def test_cityscapes19_ignores_classes_without_a_train_id(tmp_path):
    parking, guard_rail, caravan, bicycle = 9, 14, 29, 33
    dataset = build_dataset("cityscapes19", make_cityscapes(tmp_path, [[parking, guard_rail, caravan, bicycle]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[255, 255, 255, 18]])
    assert dataset.num_classes == 19


def test_cityscapes_samples_are_sorted_ids_with_image_paths(tmp_path):
    dataset = build_dataset("cityscapes27", make_cityscapes(tmp_path, [[7]]))
    assert dataset.sample_ids == ["frankfurt_000000_000294", "lindau_000001_000019"]
    sample = dataset.load(1)
    assert sample.image_path.name == "lindau_000001_000019_leftImg8bit.png"
    assert sample.label.dtype == np.uint8


def test_root_may_be_the_datasets_folder_or_the_dataset_folder_itself(tmp_path):
    make_cityscapes(tmp_path, [[7]])
    from_parent = build_dataset("cityscapes19", tmp_path)
    from_own = build_dataset("cityscapes19", tmp_path / "cityscapes")
    assert from_parent.sample_ids == from_own.sample_ids
    assert from_own.root == tmp_path / "cityscapes"


# --- COCO-Stuff -----------------------------------------------------------------------------


def test_coco_fine_person_is_index_0_of_171_and_coarse_person(tmp_path):
    root = make_cocostuff(tmp_path, [[0]])
    assert build_dataset("cocostuff171", root).load(0).label[0, 0] == 0
    coarse = build_dataset("cocostuff27", root)
    assert COCOSTUFF27_CLASSES[coarse.load(0).label[0, 0]] == "person"


def test_coco171_skips_the_eleven_unannotated_thing_ids(tmp_path):
    banner, wood, street_sign = 91, 181, 11
    dataset = build_dataset("cocostuff171", make_cocostuff(tmp_path, [[banner, wood, street_sign]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[80, 170, 255]])
    assert display_name(dataset, 80) == "banner"
    assert display_name(dataset, 170) == "wood"
    assert dataset.num_classes == 171


def test_coco27_maps_stuff_classes_to_their_supercategory(tmp_path):
    road, tree, wall_brick, fog, salad, shelf = 148, 168, 170, 119, 152, 155
    dataset = build_dataset("cocostuff27", make_cocostuff(tmp_path, [[road, tree, wall_brick, fog, salad, shelf]]))
    words = [COCOSTUFF27_CLASSES[i] for i in dataset.load(0).label[0]]
    assert words == ["ground", "plant", "wall", "water", "vegetable|salad", "fixture|cabinet|shelf"]


def test_coco27_groups_fine_classes_as_the_coco_stuff_hierarchy_does():
    members: dict[str, list[str]] = {}
    for fine, coarse in datasets.COCOSTUFF_FINE_TO_27.items():
        members.setdefault(datasets.COCOSTUFF27_COARSE[coarse][0], []).append(datasets.COCOSTUFF_FINE[fine][0])
    assert len(members) == 27
    walls = ("brick", "concrete", "other", "panel", "stone", "tile", "wood")
    assert sorted(members["wall"]) == [f"wall-{m}" for m in walls]
    assert sorted(members["sky"]) == ["clouds", "sky-other"]
    assert sorted(members["vehicle"]) == ["airplane", "bicycle", "boat", "bus", "car", "motorcycle", "train", "truck"]
    assert sum(len(m) for m in members.values()) == 182


def test_coco_unlabeled_255_stays_ignore(tmp_path):
    root = make_cocostuff(tmp_path, [[255]])
    assert build_dataset("cocostuff27", root).load(0).label[0, 0] == 255
    assert build_dataset("cocostuff171", root).load(0).label[0, 0] == 255


def test_coco_image_list_restricts_the_samples(tmp_path):
    root = make_cocostuff(tmp_path, [[0]])
    (tmp_path / "subset.txt").write_text("000000000285.jpg\n")
    dataset = build_dataset("cocostuff27", root, image_list=tmp_path / "subset.txt")
    assert dataset.sample_ids == ["000000000285"]


def test_coco_curated_shorthand_reads_the_stego_list_inside_the_dataset(tmp_path):
    root = make_cocostuff(tmp_path, [[0]], curated=["000000000139"])
    dataset = build_dataset("cocostuff27", root, image_list="curated")
    assert dataset.sample_ids == ["000000000139"] and dataset.image_list == "curated"


def test_coco27_scores_the_curated_list_by_default_as_published_numbers_do(tmp_path):
    root = make_cocostuff(tmp_path, [[0]], curated=["000000000285"])
    dataset = build_dataset("cocostuff27", root)
    assert dataset.sample_ids == ["000000000285"] and dataset.image_list == "curated"


def test_coco_image_list_all_asks_for_every_image_of_the_split(tmp_path):
    root = make_cocostuff(tmp_path, [[0]], curated=["000000000285"])
    dataset = build_dataset("cocostuff27", root, image_list="all")
    assert dataset.sample_ids == ["000000000139", "000000000285"] and dataset.image_list == "all"


def test_coco171_scores_every_val_image_by_default(tmp_path):
    dataset = build_dataset("cocostuff171", make_cocostuff(tmp_path, [[0]], curated=None))
    assert dataset.sample_ids == ["000000000139", "000000000285"] and dataset.image_list == "all"


def test_coco27_without_the_curated_list_says_where_to_get_it_or_how_to_choose_all(tmp_path):
    root = make_cocostuff(tmp_path, [[0]], curated=None)
    with pytest.raises(DatasetError) as error:
        build_dataset("cocostuff27", root)
    message = str(error.value)
    assert "Coco164kFull_Stuff_Coarse_7.txt" in message and "STEGO" in message and "--image-list all" in message


def test_coco_custom_image_list_is_recorded_by_its_path(tmp_path):
    root = make_cocostuff(tmp_path, [[0]])
    (tmp_path / "subset.txt").write_text("000000000285\n")
    dataset = build_dataset("cocostuff27", root, image_list=tmp_path / "subset.txt")
    assert dataset.image_list == str((tmp_path / "subset.txt").resolve())


def test_data_sets_without_a_list_choice_record_none(tmp_path):
    assert build_dataset("voc2012", make_voc(tmp_path, [[0]])).image_list is None


# --- PASCAL VOC ------------------------------------------------------------------------------


def test_voc_palette_index_is_the_class_and_255_stays_ignore(tmp_path):
    dataset = build_dataset("voc2012", make_voc(tmp_path, [[0, 15, 20, 255]]))
    np.testing.assert_array_equal(dataset.load(0).label, [[0, 15, 20, 255]])
    assert display_name(dataset, 15) == "person"


def test_voc_val_split_follows_the_imagesets_list(tmp_path):
    root = make_voc(tmp_path, [[0]])
    assert build_dataset("voc2012", root).sample_ids == ["2007_000033", "2007_000042"]
    assert build_dataset("voc2012", root, split="train").sample_ids == ["2007_000061"]


def test_voc_has_21_classes_with_background_first(tmp_path):
    dataset = build_dataset("voc2012", make_voc(tmp_path, [[0]]))
    assert dataset.num_classes == 21
    assert dataset.class_names[0] == "background"
    assert dataset.background_index == 0


# --- Potsdam ---------------------------------------------------------------------------------


def test_potsdam3_merges_roads_with_cars_buildings_with_clutter_and_trees_with_low_vegetation(tmp_path):
    road, building, low_vegetation, tree, car, clutter = range(6)
    root = make_potsdam_mat(tmp_path, [[road, car, building, clutter, low_vegetation, tree, 255]])
    np.testing.assert_array_equal(build_dataset("potsdam3", root).load(0).label, [[0, 0, 1, 1, 2, 2, 255]])


def test_potsdam3_val_is_labelled_test_and_images_are_the_mat_tiles(tmp_path):
    dataset = build_dataset("potsdam3", make_potsdam_mat(tmp_path, [[0]]))
    assert dataset.sample_ids == ["12", "7"]
    assert dataset.load(1).image_path == tmp_path / "potsdam" / "imgs" / "7.mat"
    assert build_dataset("potsdam3", tmp_path, split="train").sample_ids == ["30"]


def test_potsdam3_gt_file_without_the_gt_variable_is_a_clear_error(tmp_path):
    root = make_potsdam_mat(tmp_path, [[0]])
    savemat(root / "potsdam" / "gt" / "7.mat", {"label": np.zeros((1, 1), np.int32)})
    with pytest.raises(DatasetError, match="no variable 'gt'"):
        build_dataset("potsdam3", root).load(1)


def test_potsdam6_decodes_the_isprs_colours_in_isprs_order(tmp_path):
    colours = ["impervious", "building", "low vegetation", "tree", "car", "clutter", "boundary"]
    dataset = build_dataset("potsdam6", make_potsdam_tif(tmp_path, colours))
    np.testing.assert_array_equal(dataset.load(0).label, [[0, 1, 2, 3, 4, 5, 255]])
    assert dataset.class_names[4] == "car"


def test_potsdam6_val_is_the_fourteen_isprs_test_tiles(tmp_path):
    dataset = build_dataset("potsdam6", make_potsdam_tif(tmp_path, ["car"]))
    assert len(dataset) == 14
    assert "top_potsdam_2_10" not in dataset.sample_ids
    assert dataset.load(0).image_path.name == "top_potsdam_2_13_RGB.tif"


def test_potsdam6_missing_val_tile_is_reported(tmp_path):
    root = make_potsdam_tif(tmp_path, ["car"], tiles=POTSDAM6_VAL_TILES[1:])
    with pytest.raises(DatasetError, match=r"top_potsdam_2_13_RGB\.tif"):
        build_dataset("potsdam6", root)


# --- folder ----------------------------------------------------------------------------------


def test_folder_reads_class_words_from_classes_txt_with_synonyms(tmp_path):
    dataset = build_dataset("folder", make_folder(tmp_path, [[0, 2, 255]]))
    assert dataset.class_names == ["grass", "sky|heaven", "cow"]
    assert dataset.sample_ids == ["a", "b"]
    np.testing.assert_array_equal(dataset.load(0).label, [[0, 2, 255]])


def test_folder_label_value_beyond_the_class_list_is_a_clear_error(tmp_path):
    dataset = build_dataset("folder", make_folder(tmp_path, [[0, 3]]))
    with pytest.raises(DatasetError, match=r"values \[3\] but there are only 3 classes"):
        dataset.load(0)


def test_folder_blank_line_inside_classes_txt_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="one non-blank class per line"):
        build_dataset("folder", make_folder(tmp_path, [[0]], classes="grass\n\ncow\n"))


def test_folder_split_file_selects_stems(tmp_path):
    root = make_folder(tmp_path, [[0]])
    (root / "test.txt").write_text("b\n")
    assert build_dataset("folder", root, split="test").sample_ids == ["b"]


# --- class names -----------------------------------------------------------------------------


def test_class_names_can_be_replaced_by_a_list_of_the_same_length(tmp_path):
    dataset = build_dataset("folder", make_folder(tmp_path, [[0]]))
    assert dataset.with_class_names(["lawn", "sky", "cattle"]).class_names == ["lawn", "sky", "cattle"]
    with pytest.raises(DatasetError, match="3 classes but 2 class names"):
        dataset.with_class_names(["lawn", "sky"])


def test_a_dataset_survives_pickling_for_worker_processes(tmp_path):
    dataset = build_dataset("cityscapes19", make_cityscapes(tmp_path, [[26]]))
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.sample_ids == dataset.sample_ids
    np.testing.assert_array_equal(clone.load(0).label, dataset.load(0).label)


def test_potsdam3_without_scipy_says_how_to_install_it(tmp_path, monkeypatch):
    root = make_potsdam_mat(tmp_path, [[0]])
    real = datasets.importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None if name == "scipy" else real(name))
    with pytest.raises(DatasetError, match=r"scipy.*maskdiffusion\[eval\]"):
        build_dataset("potsdam3", root)

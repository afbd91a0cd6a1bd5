"""Inputs at scale: files, folders, globs and @lists, streamed in a fixed order with collision-free output names."""

from __future__ import annotations

import itertools
import os
from pathlib import Path, PurePosixPath

import pytest

from maskdiffusion.inputs import Input, Problem, list_inputs


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def names(items) -> list[str]:
    return [str(item.name) for item in items if isinstance(item, Input)]


def problems(items) -> list[str]:
    return [item.message for item in items if isinstance(item, Problem)]


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "photos"
    for path in ("b/2.png", "b/10.jpg", "a/x.png", "a/deep/y.webp", "top.png", "notes.txt", "a/.hidden/z.png"):
        touch(root / path)
    (root / "empty").mkdir()
    return root


def test_a_folder_is_walked_depth_first_in_name_order_and_mirrored(tree):
    items = list(list_inputs([str(tree)]))
    assert names(items) == ["a/deep/y", "a/x", "b/10", "b/2", "top"]  # byte order, hidden and non-images left out
    assert [item.path for item in items] == [
        str(tree / p) for p in ("a/deep/y.webp", "a/x.png", "b/10.jpg", "b/2.png", "top.png")
    ]
    assert not problems(items)


def test_loose_files_stay_flat_and_shared_names_get_a_number(tree, tmp_path):
    other = touch(tmp_path / "elsewhere" / "x.png")
    items = list(list_inputs([str(tree / "a" / "x.png"), str(other), str(tree / "top.png"), str(tree / "notes.txt")]))
    assert names(items) == ["x", "x_2", "top", "notes"]  # a file named on purpose is read whatever its suffix


def test_names_never_collide_across_case_suffix_and_specs(tmp_path):
    root = tmp_path / "data"
    for path in ("a.png", "a.jpg", "A.PNG", "sub/c.png"):
        touch(root / path)
    touch(tmp_path / "sub" / "c.png")
    items = list(list_inputs([str(root), str(tmp_path / "sub" / "c.png"), str(root)]))
    found = names(items)
    assert found[:3] == ["A", "a_2", "a_3"] and found[3] == "sub/c"
    assert len({name.casefold() for name in found}) == len(found) == 9  # the same folder twice: new names too


def test_symlink_loops_unreadable_folders_and_missing_paths_are_reported_not_fatal(tree, tmp_path):
    os.symlink(tree, tree / "a" / "loop")  # leads back into the tree
    os.symlink(tree / "b", tree / "again")  # a second way into b: not a loop, listed again
    os.symlink(tmp_path / "gone.png", tree / "broken.png")
    locked = tree / "locked"
    locked.mkdir()
    touch(locked / "secret.png")
    locked.chmod(0)
    try:
        items = list(list_inputs([str(tree), str(tmp_path / "missing.png")]))
    finally:
        locked.chmod(0o755)
    found, said = names(items), problems(items)
    assert "again/2" in found and "b/2" in found and "a/x" in found
    assert any("symbolic-link loop" in message and "loop" in message for message in said)
    assert any("broken symbolic link" in message for message in said)
    assert any("does not exist" in message and "missing.png" in message for message in said)
    if os.geteuid() != 0:  # root reads every folder
        assert any("cannot read folder" in message and "locked" in message for message in said)


def test_glob_patterns_are_expanded_and_named_below_their_fixed_prefix(tree):
    items = list(list_inputs([f"{tree}/**/*.png", f"{tree}/nothing/*.jpg"]))
    assert names(items) == ["a/x", "b/2", "top"]  # ** matches any depth; glob leaves hidden folders out
    assert problems(items) == [f"pattern '{tree}/nothing/*.jpg' matches no image file"]


def test_a_list_file_names_paths_relative_to_its_folder(tree, tmp_path):
    listing = tree / "train.txt"
    listing.write_text("# the training split\nb/2.png\n\n  a/x.png  \na\nmissing.png\n")
    items = list(list_inputs([f"@{listing}"]))
    assert names(items) == ["b/2", "a/x", "a/deep/y", "a/x_2"]  # every line named by its path from the list's folder
    paths = [item.path for item in items if isinstance(item, Input)]
    assert paths[:2] == [str(tree / "b/2.png"), str(tree / "a/x.png")]
    assert len(problems(items)) == 1 and "missing.png" in problems(items)[0]
    assert problems(list_inputs([f"@{tmp_path / 'none.txt'}"]))[0].startswith("cannot read list file")


def test_an_output_name_never_lands_in_the_runs_own_state_folder(tmp_path):
    listing = touch(tmp_path / "list.txt", b".maskdiffusion/x.png\n")
    touch(tmp_path / ".maskdiffusion" / "x.png")
    assert names(list_inputs([f"@{listing}"])) == ["_.maskdiffusion/x"]


def test_listing_is_streamed_the_first_image_comes_before_the_tree_is_read(tmp_path, monkeypatch):
    root = tmp_path / "big"
    for folder, index in itertools.product(range(200), range(20)):
        touch(root / f"{folder:03d}" / f"{index:03d}.png", b"")
    read = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: read.append(path) or scandir(path))
    stream = list_inputs([str(root)])
    first = next(stream)
    assert first.name == PurePosixPath("000/000") and len(read) == 2  # the root and its first folder only
    assert sum(1 for _ in stream) == 200 * 20 - 1 and len(read) == 201

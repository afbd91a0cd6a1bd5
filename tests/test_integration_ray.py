"""The Ray Data adapter (maskdiffusion.integrations.ray) on a local Ray instance bound to loopback.

Ray reads these variables when it is imported (and its processes inherit them), so they are set
before the import: no usage statistics; on Linux Ray binds its servers to the machine's own
address on every interface unless told it is a single-machine instance, which is what
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says (its name aside, it holds on Linux too: every
server then listens on 127.0.0.1, which ``test_ray_listens_on_loopback_only`` checks); token
authentication with a token of this run, so Ray writes none to ``~/.ray``.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.update(
    RAY_USAGE_STATS_ENABLED="0",
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_AUTH_MODE="token",
    RAY_AUTH_TOKEN=secrets.token_hex(32),
)

import numpy as np
import pytest
import ray
from PIL import Image

from maskdiffusion import MaskDiffusion
from maskdiffusion.integrations.ray import SegmentBatch, actor_device
from maskdiffusion.loading import pick_device

CLASSES = ["sky", "road", "car"]
SIZES = [(40, 60), (64, 64), (50, 30), (24, 80)]  # (H, W): four sizes, so Ray's batches of two are ragged
PRESET = {"size": 64}


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this test module: 2 CPUs, no GPU, no dashboard, loopback only, its own temp folder."""
    address = os.environ.pop("RAY_ADDRESS", None)  # never join a cluster the environment points at
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 characters
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=128 * 2**20,
        _temp_dir=temp,
    )
    context = ray.data.DataContext.get_current()
    progress, context.enable_progress_bars = context.enable_progress_bars, False
    yield ray
    context.enable_progress_bars = progress
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """PNGs of four sizes."""
    out = tmp_path_factory.mktemp("ray-images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / f"{i}.png")
    return out


@pytest.fixture(scope="module")
def reference(tiny_model, folder, one_torch_thread):
    """What the plain pipeline gives for each file: views one at a time, one thread, as in the actor."""
    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=1, cache_size=0)
    preset = seg.presets["default"].replace(**PRESET)
    return {str(path): seg(path, CLASSES, preset=preset) for path in sorted(folder.glob("*.png"))}


def constructor(tiny_model, **changes):
    return {"model": str(tiny_model), "classes": CLASSES, "preset": PRESET, "batch_size": 1, **changes}


def check_row(row, expected):
    assert row["error"] == ""
    assert json.loads(row["classes"]) == expected.classes == CLASSES
    labels = np.asarray(row["labels"])
    assert labels.dtype == np.uint8
    assert labels.shape == expected.labels.shape
    np.testing.assert_array_equal(np.where(labels == 255, -1, labels), expected.labels)


def test_read_images_ragged_batches(local_ray, tiny_model, folder, reference):
    rows = (
        ray.data.read_images(str(folder), include_paths=True)
        .map_batches(
            SegmentBatch,
            fn_constructor_kwargs=constructor(tiny_model),
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=2,
            batch_format="numpy",
        )
        .take_all()
    )
    assert sorted(row["path"] for row in rows) == sorted(reference)
    for row in rows:
        assert set(row) == {"path", "labels", "classes", "error"}
        check_row(row, reference[row["path"]])


def test_binary_files_with_a_corrupt_one(local_ray, tiny_model, folder, reference, tmp_path):
    """read_images stops at a file that is no image; read_binary_files hands it over and it becomes an error row."""
    for path in folder.glob("*.png"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = (
        ray.data.read_binary_files(str(tmp_path), include_paths=True)
        .map_batches(
            SegmentBatch,
            fn_constructor_kwargs=constructor(tiny_model),
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=2,
            batch_format="numpy",
        )
        .take_all()
    )
    by_name = {Path(row["path"]).name: row for row in rows}
    assert sorted(by_name) == sorted([*(Path(p).name for p in reference), "broken.png"])
    broken = by_name.pop("broken.png")
    assert "not an image file or corrupt" in broken["error"]
    assert np.asarray(broken["labels"]).shape == (0, 0)
    for path, expected in reference.items():
        check_row(by_name[Path(path).name], expected)


def test_auto_device_is_the_cpu_without_a_reserved_gpu(local_ray):
    assert str(ray.get(ray.remote(num_gpus=0)(actor_device).remote("auto"))) == "cpu"
    assert str(actor_device("cpu")) == "cpu"
    assert actor_device("auto") == pick_device("auto")  # the driver: maskdiffusion's own choice


def _listening_sockets() -> dict[str, str]:
    """Socket inode -> local address of every listening TCP socket in this network namespace."""
    found = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address = bytes.fromhex(fields[1].split(":")[0])
            # /proc prints each 32-bit word of the address in the host's (little-endian) byte order
            raw = b"".join(address[i : i + 4][::-1] for i in range(0, len(address), 4))
            found[fields[9]] = str(ipaddress.ip_address(raw))
    return found


def _process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, []))
    return tree


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@ray.remote(num_cpus=0)
class _Probe:
    def pid(self) -> int:
        return os.getpid()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_ray_listens_on_loopback_only(local_ray):
    probe = _Probe.remote()  # an actor up, so an actor's own server is listening too
    actor = ray.get(probe.pid.remote())
    sockets = _listening_sockets()
    ours = {}
    for pid in _process_tree(os.getpid()):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # a process that ended meanwhile
            continue
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in sockets:
                ours[inode] = (pid, sockets[inode])
    assert len(ours) >= 3, f"expected Ray's servers (GCS, raylet, workers) among {ours}"
    assert actor in {pid for pid, _ in ours.values()}, f"the actor {actor} listens nowhere: {ours}"
    exposed = {inode: where for inode, where in ours.items() if not _is_loopback(where[1])}
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    ray.kill(probe)


# -- the adapter called directly (no Ray scheduling) ------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_model, one_torch_thread):
    rle = importlib.util.find_spec("pycocotools") is not None  # a test dependency; optional for users
    return SegmentBatch(**constructor(tiny_model, rle=rle, device="cpu"))


def test_stacked_batch_and_rle_round_trip(adapter, folder, reference):
    mask_api = pytest.importorskip("pycocotools.mask")

    path = str(folder / "1.png")  # 64x64: two copies stack into a (2, H, W, 3) column
    image = np.asarray(Image.open(path).convert("RGB"))
    out = adapter({"image": np.stack([image, image]), "path": np.array([path, path], dtype=object)})
    assert set(out) == {"path", "labels", "classes", "rle", "error"}
    assert all(len(column) == 2 for column in out.values())
    expected = reference[path]
    for i in range(2):
        row = {key: column[i] for key, column in out.items()}
        check_row(row, expected)
        entries = json.loads(row["rle"])
        present = sorted(int(k) for k in np.unique(expected.labels) if k >= 0)
        assert [entry["category_id"] - 1 for entry in entries] == present
        for entry in entries:
            index = entry["category_id"] - 1
            truth = expected.labels == index
            rle = {**entry["segmentation"], "counts": entry["segmentation"]["counts"].encode("ascii")}
            np.testing.assert_array_equal(mask_api.decode(rle), truth)
            assert entry["class"] == CLASSES[index]
            assert entry["area"] == int(truth.sum())
            rows, cols = np.nonzero(truth)
            x, y = cols.min(), rows.min()
            assert entry["bbox"] == [x, y, cols.max() + 1 - x, rows.max() + 1 - y]


def test_bad_arrays_become_error_rows(adapter, folder, reference):
    path = str(folder / "0.png")
    good = np.asarray(Image.open(path).convert("RGB"))
    ray_gray = np.zeros((1, 20, 20), dtype=np.uint8)  # how Ray's reader hands over grayscale among colour images
    column = np.empty(4, dtype=object)
    column[:] = [good, np.zeros((5, 5, 2), dtype=np.uint8), ray_gray, np.zeros((8, 8, 3), dtype=np.int32)]
    out = adapter({"image": column, "path": np.array([path, "a", "b", "c"], dtype=object)})
    check_row({key: values[0] for key, values in out.items()}, reference[path])
    assert "has shape (5, 5, 2)" in out["error"][1]
    assert "mode='RGB'" in out["error"][2]
    assert "dtype int32" in out["error"][3]
    for i in (1, 2, 3):
        assert np.asarray(out["labels"][i]).shape == (0, 0)
        assert out.get("rle", ["[]"] * 4)[i] == "[]"


def test_rle_without_pycocotools_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match=r"pip install .maskdiffusion\[coco\]. \(or pip install pycocotools\)"):
        SegmentBatch("no-model-is-loaded", CLASSES, rle=True)


def test_import_without_ray_says_how_to_install(monkeypatch):
    import maskdiffusion

    monkeypatch.setattr(maskdiffusion, "integrations", maskdiffusion.integrations)  # re-imported below
    for name in [n for n in sys.modules if n == "ray" or n.startswith(("ray.", "maskdiffusion.integrations"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    importlib.import_module("maskdiffusion.integrations")  # the package itself needs no Ray
    with pytest.raises(ImportError, match=r"pip install 'maskdiffusion\[ray\]'"):
        importlib.import_module("maskdiffusion.integrations.ray")

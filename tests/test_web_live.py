"""The web app live on a loopback port, driven through its HTTP API as a script would drive it.

The page's widgets bound what a browser sends; the API takes any JSON and any client can
leave mid-request. These tests send what the page never does and check that the one-slot
queue keeps serving: fields are refused with a message, a request stops at its deadline or
when its client goes (both through ``segment_batch(cancel=...)``), and the next request runs.

The model is the tiny random one with every UNet batch slowed to :data:`BATCH_SECONDS`, so
"long" requests are long by construction, not by machine speed.
"""

import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from maskdiffusion import SegmentationCancelled, web

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")
BATCH_SECONDS = 0.25  # each batch of one view
DEADLINE = 3.0  # request timeout: the wide image (~18 batches, 4.5 s) passes it; earlier stops are the client's
CLASSES = "sky, road"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Probe:
    """Counts the slowed batches and records how each segmentation ended."""

    def __init__(self):
        self.batches = 0
        self.running = 0
        self.ends: list[tuple[str, float]] = []

    def wait_idle(self, timeout: float = 2 * DEADLINE) -> None:
        """Wait until no segmentation runs (one a test left behind must not count for the next)."""
        limit = time.monotonic() + timeout
        while self.running and time.monotonic() < limit:
            time.sleep(0.05)
        assert not self.running, f"a segmentation still runs {timeout} s on"

    def wait_for_end(self, count: int, timeout: float) -> tuple[str, float]:
        limit = time.monotonic() + timeout
        while len(self.ends) < count and time.monotonic() < limit:
            time.sleep(0.05)
        assert len(self.ends) >= count, f"the segmentation did not end within {timeout} s ({self.batches} batches)"
        return self.ends[count - 1]


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    """``(url, probe, images)``: the app with the slowed tiny model, on a free loopback port."""
    try:
        from gradio_client import Client  # noqa: F401
    except ImportError:
        pytest.fail("the live web tests need Gradio and gradio_client: pip install -e '.[web]'")
    from maskdiffusion import MaskDiffusion

    saved_heartbeat = os.environ.get("GRADIO_HEARTBEAT_INTERVAL")
    os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "0.5"  # how often Gradio looks for a closed event stream
    segmenter = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", batch_size=1)
    probe = Probe()
    encode, segment_batch = segmenter._encode_missing, segmenter.segment_batch

    def slow_encode(*args, **kwargs):
        probe.batches += 1
        time.sleep(BATCH_SECONDS)
        return encode(*args, **kwargs)

    def recorded_segment_batch(*args, **kwargs):
        probe.running += 1
        try:
            results = segment_batch(*args, **kwargs)
        except SegmentationCancelled:
            probe.ends.append(("cancelled", time.monotonic()))
            raise
        finally:
            probe.running -= 1
        probe.ends.append(("finished", time.monotonic()))
        return results

    segmenter._encode_missing, segmenter.segment_batch = slow_encode, recorded_segment_batch
    folder = tmp_path_factory.mktemp("live-images")
    rng = np.random.default_rng(0)
    images = {}
    for name, shape in {"small": (64, 64, 3), "wide": (64, 1024, 3)}.items():  # 1 view; 16:1, the most views
        images[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(images[name])
    app = web.build_app(segmenter, examples=[], request_timeout=DEADLINE)
    port = free_port()
    web.launch(app, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/", probe, images
    app.close()
    if saved_heartbeat is None:
        os.environ.pop("GRADIO_HEARTBEAT_INTERVAL", None)
    else:
        os.environ["GRADIO_HEARTBEAT_INTERVAL"] = saved_heartbeat


@pytest.fixture(scope="module")
def client(live):
    from gradio_client import Client

    return Client(live[0], verbose=False, download_files=False)


def segment(client, image, size=64, preset="default", threshold=None, classes=CLASSES):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), classes, preset, size, threshold, api_name="/segment")


def test_api_settings_beyond_the_page_are_refused_with_a_message(live, client):
    _, _, images = live
    started = time.monotonic()
    for settings, words in [
        ({"size": 4096}, "size 4096 is not a whole number from 64 to 1024"),
        ({"size": 96}, "size 96 is not a multiple of 64"),
        ({"preset": "fastest"}, "unknown preset 'fastest'"),
        ({"threshold": 7.5}, "background threshold 7.5 is not from 0 to 1"),
        ({"classes": "x" * (web.MAX_CLASS_TEXT + 1)}, "more than this app takes"),
    ]:
        status, overlay, *_ = segment(client, images["small"], **settings)
        assert words in status and overlay is None, settings
    assert time.monotonic() - started < 20  # refused up front: no model work


def raw_call(url, payload):
    """Send ``payload`` as the image field through the plain HTTP API; return the final event's data."""
    answer = httpx.post(f"{url}gradio_api/call/segment", json={"data": [payload, CLASSES, "default", 64, None]})
    answer.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/call/segment/{answer.json()['event_id']}", timeout=30) as stream:
        events = stream.read().decode()
    return events


def test_api_cannot_make_the_app_read_a_file_that_was_not_uploaded(live):
    """A file record without Gradio's meta key skips Gradio's own check: the app's holds."""
    url, _, images = live
    events = raw_call(url, {"path": str(images["small"])})
    assert "must be a file uploaded to this app" in events and "Segmented" not in events
    events = raw_call(url, {"path": str(images["small"]), "meta": {"_type": "gradio.FileData"}})
    assert "event: error" in events and "Segmented" not in events  # Gradio refuses this one itself


def test_request_past_its_deadline_is_stopped_and_the_next_is_served(live, client):
    _, probe, images = live
    probe.wait_idle()
    before = len(probe.ends)
    started = time.monotonic()
    status, overlay, *_ = segment(client, images["wide"])
    assert f"took longer than this server's limit of {DEADLINE:g} s and was stopped" in status and overlay is None
    assert time.monotonic() - started < DEADLINE + 3 * BATCH_SECONDS + 3
    assert probe.ends[before][0] == "cancelled"
    status, overlay, *_ = segment(client, images["small"])
    assert status.startswith("Segmented small.png") and overlay is not None


def wait_for_batches(probe, count, timeout=20):
    limit = time.monotonic() + timeout
    while probe.batches < count and time.monotonic() < limit:
        time.sleep(0.02)
    assert probe.batches >= count, "the request never started"


def test_cancelled_request_stops_its_work_and_the_next_is_served(live, client):
    from gradio_client import handle_file

    _, probe, images = live
    probe.wait_idle()
    before, batches = len(probe.ends), probe.batches
    job = client.submit(handle_file(str(images["wide"])), CLASSES, "default", 64, None, api_name="/segment")
    wait_for_batches(probe, batches + 1)
    job.cancel()
    left = time.monotonic()
    how, when = probe.wait_for_end(before + 1, timeout=DEADLINE)
    assert how == "cancelled" and when - left < 2.0, f"the work went on {when - left:.1f} s after the client left"
    status, overlay, *_ = segment(client, images["small"])
    assert status.startswith("Segmented small.png") and overlay is not None


def test_request_whose_client_disconnects_stops_its_work(live, client):
    """A page closed mid-request: its event stream drops, Gradio marks the event dead, the work stops."""
    url, probe, images = live
    session = "disconnecting-client"
    with open(images["wide"], "rb") as handle:
        uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("wide.png", handle, "image/png")})
    path = uploaded.json()[0]
    image = {"path": path, "orig_name": "wide.png", "meta": {"_type": "gradio.FileData"}}
    config = httpx.get(f"{url}config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "segment")
    probe.wait_idle()
    before, batches = len(probe.ends), probe.batches
    joined = httpx.post(
        f"{url}gradio_api/queue/join",
        json={"data": [image, CLASSES, "default", 64, None], "fn_index": fn_index, "session_hash": session},
    )
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=30) as stream:
        for line in stream.iter_lines():
            if "process_starts" in line:
                break
        wait_for_batches(probe, batches + 1)
    left = time.monotonic()  # the stream is closed: the client has gone
    how, when = probe.wait_for_end(before + 1, timeout=DEADLINE + 2)
    assert how == "cancelled" and when - left < 2.0, f"the work went on {when - left:.1f} s after the client left"
    status, overlay, *_ = segment(client, images["small"])
    assert status.startswith("Segmented small.png") and overlay is not None


def test_requests_run_one_at_a_time_even_after_a_cancel(live, client):
    """A cancelled event frees Gradio's slot before its thread stops: the app's lock keeps one model pass."""
    from gradio_client import handle_file

    _, probe, images = live
    running, overlap = [0], []
    lock = threading.Lock()
    original = web.segment_request

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            overlap.append(running[0])
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    web.segment_request = counting
    try:
        probe.wait_idle()
        batches = probe.batches
        job = client.submit(handle_file(str(images["wide"])), CLASSES, "default", 64, None, api_name="/segment")
        wait_for_batches(probe, batches + 1)
        job.cancel()
        status, *_ = segment(client, images["small"])
    finally:
        web.segment_request = original
    assert status.startswith("Segmented small.png") and max(overlap) == 1, json.dumps(overlap)


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../../../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"]
)
def test_files_outside_the_app_are_not_served(live, path):
    url, _, images = live
    for target in [path, str(images["small"])]:  # a file the app did not make, even in the temp folder
        answer = httpx.get(f"{url}gradio_api/file={target}")
        assert answer.status_code in (403, 404), (target, answer.status_code)

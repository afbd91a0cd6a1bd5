"""``maskdiffusion serve`` as a process, as users start and stop it: IPv6, signals, temporary files, a soak.

Each test starts the real command in a subprocess with the tiny random model, on a free
loopback port, with ``TMPDIR`` pointing at the test's own folder (so what the server leaves
in the temporary folder can be seen), and stops it with a signal.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")
START_SECONDS = 180  # importing torch + Gradio and loading the model, on a busy 2-core machine
SOAK_REQUESTS = 24  # concurrent requests, answered one at a time by the one-slot queue
RSS_GROWTH_MB = 150  # the server's resident memory may grow at most this much over the soak


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        free_port(socket.AF_INET6, "::1")
    except OSError:
        return False
    return True


class Serve:
    """``maskdiffusion serve`` in a subprocess; its output is collected as it comes."""

    def __init__(self, model: Path, tmp: Path, *flags: str):
        self.tmp = tmp
        env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "maskdiffusion", "serve", "--model", str(model), "--device", "cpu", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _wait_for_url(self) -> str:
        limit = time.monotonic() + START_SECONDS
        while time.monotonic() < limit and self.process.poll() is None:
            for line in self.lines:
                if "serving on " in line:
                    return line.split("serving on ", 1)[1].split()[0]
            time.sleep(0.2)
        self.process.kill()
        pytest.fail(f"serve did not start within {START_SECONDS} s:\n{self.output}")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024

    def temp_folders(self) -> list[Path]:
        return sorted(self.tmp.glob("maskdiffusion-web-*"))

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"serve did not stop within 60 s of signal {sig}:\n{self.output}")


def test_serve_on_ipv6_loopback_prints_one_url_and_cleans_up_on_ctrl_c(tiny_model, tmp_path):
    assert ipv6_loopback_works(), "this machine cannot bind ::1, so serve --host ::1 cannot be tested here"
    port = free_port(socket.AF_INET6, "::1")
    server = Serve(tiny_model, tmp_path, "--host", "::1", "--port", str(port))
    try:
        assert server.url == f"http://[::1]:{port}/"
        assert httpx.get(server.url, timeout=30).status_code == 200
        assert len(server.temp_folders()) == 1
        assert "random weights" in server.output  # said on the console too
        assert "share=True" not in server.output and "launch()" not in server.output  # Gradio's banner is off
        assert "warning: listening on" not in server.output  # ::1 is loopback
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0, server.output
    assert "Traceback" not in server.output, server.output
    assert server.temp_folders() == []


def segment_payload(client, image: Path, size: int, classes: str):
    from gradio_client import handle_file

    return client.submit(handle_file(str(image)), classes, "default", size, None, api_name="/segment")


def test_soak_concurrent_requests_are_all_answered_with_bounded_memory(tiny_model, tmp_path):
    """SOAK_REQUESTS at once (fewer than the queue holds), a few of them bad: every one answered, RSS bounded."""
    from gradio_client import Client

    server = Serve(tiny_model, tmp_path, "--port", str(free_port()), "--request-timeout", "30")
    started = time.monotonic()
    try:
        rng = np.random.default_rng(0)
        images = []
        for index in range(4):
            images.append(tmp_path / f"soak-{index}.png")
            Image.fromarray(rng.integers(0, 255, (64 + 16 * index, 96, 3), dtype=np.uint8)).save(images[-1])
        client = Client(server.url, verbose=False, download_files=False)
        for image in images:  # warm-up: first-request allocations are not growth
            assert segment_payload(client, image, 64, "sky, road").result(timeout=60)[0].startswith("Segmented")
        baseline = server.rss_mb()
        peak = [baseline]
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.1):
                peak[0] = max(peak[0], server.rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        jobs = []
        with ThreadPoolExecutor(8) as pool:
            for index in range(SOAK_REQUESTS):
                bad = index % 6 == 5  # every sixth request asks for a size the page cannot send
                size, classes = (
                    (4096, "sky") if bad else (64, ", ".join(["sky", "road", "car", "tree"][: 1 + index % 4]))
                )
                jobs.append(
                    (
                        bad,
                        pool.submit(
                            lambda i=images[index % 4], s=size, c=classes: segment_payload(client, i, s, c).result(
                                timeout=120
                            )
                        ),
                    )
                )
            answers = [(bad, future.result()) for bad, future in jobs]
        sampling.set()
        sampler.join()
        final = server.rss_mb()
    finally:
        code = server.stop(signal.SIGTERM)
    for bad, (status, overlay, *_) in answers:
        if bad:
            assert "size 4096 is not a whole number" in status and overlay is None
        else:
            assert status.startswith("Segmented soak-") and overlay is not None, status
    assert peak[0] - baseline < RSS_GROWTH_MB and final - baseline < RSS_GROWTH_MB, (baseline, peak[0], final)
    assert code == 0 and "Traceback" not in server.output, server.output
    assert server.temp_folders() == []  # SIGTERM, like Ctrl+C, removes the downloads folder
    assert time.monotonic() - started < 120

"""The web demo end to end, in a real headless browser: Debian's chromium driven by Playwright.

CI runs this: ``make test`` installs the ``web``/``test`` extras and, if missing, apt's ``chromium``.
Without chromium, Playwright or Gradio these tests FAIL and say what to install; to leave
them out on purpose run ``pytest --ignore=tests/test_web_browser.py``. Playwright drives the
system's chromium (``executable_path``), so no browser is ever downloaded, and every request
the page makes outside the loopback address is refused and counted.

``MASKDIFFUSION_WEB_SCREENSHOT=docs/web-demo.png`` also saves the screenshot taken after a
successful request there (that is how the README's picture is made).
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from maskdiffusion import web

CHROMIUM = os.environ.get("MASKDIFFUSION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
CLASSES = "sky, building, road, car, tree"
# Gradio's own queue statistics trip pandas deprecation warnings; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")
WAIT_MS = 30_000  # one request of the tiny model takes well under a second; CI machines are shared


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model):
    """The app on a free loopback port, serving the tiny model at size 128."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("the browser test needs Gradio: pip install -e '.[web,test]'")
    from maskdiffusion import MaskDiffusion

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    segmenter = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu")
    segmenter.preset = segmenter.preset.replace(size=128)
    # the model as users name it (`--model tiny-random`, the same builder), not by its temp folder,
    # so that the screenshot reads well
    segmenter.model_id = "tiny-random"
    app = web.build_app(segmenter)
    port = free_port()
    web.launch(app, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """One chromium page on the app; ``outside`` collects requests that tried to leave the machine."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the browser test needs Debian's chromium at {CHROMIUM}: apt-get install chromium "
            "(or set MASKDIFFUSION_CHROMIUM; or leave it out: pytest --ignore=tests/test_web_browser.py)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install -e '.[web,test]' (no browser download needed)")
    outside: list[str] = []

    def loopback_only(route):
        host = urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost", "::1") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            accept_downloads=True,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.route("**/*", loopback_only)
        page.goto(server)
        page.wait_for_selector("#segment-button")
        yield page, outside
        context.close()


def submit(page, image: Path | None, classes: str) -> None:
    if image is not None:
        page.locator("#input-image input[type=file]").set_input_files(str(image))
    page.locator("#classes textarea").fill(classes)
    page.click("#segment-button")


def test_segmenting_shows_overlay_legend_heatmaps_and_downloads_the_labels(browser, tmp_path):
    from playwright.sync_api import expect

    page, outside = browser
    street = Path(web.example_rows()[0][0])
    expect(page.locator("#model-info")).to_contain_text("tiny-random")
    expect(page.locator("#model-info")).to_contain_text("float32")
    expect(page.locator("#model-info")).to_contain_text("Random weights: this is a test model")
    submit(page, street, CLASSES)

    expect(page.locator("#status")).to_contain_text("Segmented street.png (480x320) into 5 classes")
    expect(page.locator("#status")).to_contain_text("random weights (a test model): its labels are meaningless")
    overlay = page.locator("#overlay img")
    expect(overlay).to_be_visible()
    # the overlay is the image plus a legend panel on its right
    assert overlay.evaluate("img => img.complete && img.naturalWidth") > 480
    for name in CLASSES.split(", "):
        expect(page.locator("#legend")).to_contain_text(name)
    expect(page.locator("#legend")).to_contain_text("%")
    expect(page.locator("#label-map img")).to_be_visible()
    expect(page.locator("#heatmaps img").first).to_be_visible()

    with page.expect_download() as download:
        page.locator("#downloads a[download$='.labels.png']").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    labels = Image.open(saved)
    assert saved.name == "street.labels.png"
    assert labels.mode == "P" and labels.size == (480, 320) and np.asarray(labels).max() < 5

    shot = tmp_path / "web-demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).width >= 1000
    if os.environ.get("MASKDIFFUSION_WEB_SCREENSHOT"):  # 256 colours: a third of the bytes, same look
        Image.open(shot).convert("RGB").quantize(256).save(os.environ["MASKDIFFUSION_WEB_SCREENSHOT"], optimize=True)
    assert outside == []


def test_bad_input_shows_a_message_and_the_server_keeps_serving(browser, tmp_path):
    from playwright.sync_api import expect

    page, outside = browser
    status = page.locator("#status")
    submit(page, None, "   ")
    expect(status).to_contain_text("the class list is empty")
    expect(page.locator("#overlay img")).to_have_count(0)  # no stale result beside the message

    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"this is not a PNG")
    submit(page, broken, "sky, sea")
    expect(status).to_contain_text("cannot read image 'holiday.png'")

    page.locator("#examples tbody tr").nth(1).click()  # the beach example: its image and classes
    expect(page.locator("#classes textarea")).to_have_value(web.example_rows()[1][1])
    page.click("#segment-button")
    expect(status).to_contain_text("Segmented beach.png")
    expect(status).to_contain_text(f"into {len(web.example_rows()[1][1].split(','))} classes")
    expect(status).to_contain_text("size 128")
    expect(page.locator("#overlay img")).to_be_visible()
    assert outside == []

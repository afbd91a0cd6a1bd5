"""Web demo: ``maskdiffusion serve`` runs a local Gradio app around one loaded model.

All the work of a request (input checks, segmentation, pictures, files to download)
happens in :func:`segment_request`, a plain function that returns a :class:`WebResponse`;
the Gradio layer in :func:`build_app` only lays that out. So the request logic is tested
without a browser, and ``gradio`` (the optional ``maskdiffusion[web]`` extra) is imported
only when an app is actually built.

Bad input never raises out of a request: it comes back as a message shown in the page,
and the server goes on serving. Requests are queued one at a time, because there is one
model and its passes would only compete for the same device.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import files, visualize
from .presets import Preset
from .prompts import ClassName, VocabularyError, parse_classes
from .views import ImageLoadError, load_image

if TYPE_CHECKING:
    import gradio

    from .pipeline import MaskDiffusion
    from .result import Result

log = logging.getLogger(__name__)

MAX_CLASSES = 200  # more names than anyone can tell apart in one picture; bounds a request's cost
MAX_PIXELS = 40_000_000  # 40 megapixels: the decoded RGB copy alone is 120 MB
MAX_UPLOAD = "100mb"  # Gradio refuses larger uploads before they reach a request
MAX_HEATMAPS = 48  # heat maps shown in the gallery; the JSON and label map cover every class
HEATMAP_SIDE = 320  # long side of a heat map in the gallery, in pixels
KEEP_REQUESTS = 16  # request folders of downloads kept on disk; older ones are deleted
DEFAULT_HOST = "127.0.0.1"  # loopback: the app is reachable from other machines only when asked
DEFAULT_PORT = 7860
SIZE_RANGE = (64, 1024)  # the size slider's range; its step is the model's block size
NO_IMAGE = "no image: upload one or pick an example below"


@dataclass
class WebResponse:
    """What one request shows in the page.

    Attributes:
        ok: the request produced a segmentation; when false only ``message`` is set.
        message: Markdown line for the status area: the problem and the fix, or a summary
            with the request's timing.
        overlay: image with class colours and a legend panel (``Result.overlay``).
        label_map: ``(H, W)`` RGB picture of the labels in the palette colours.
        legend_html: HTML table: colour swatch, class, words and pixel share per class.
        shares: rows ``[class, words, percent]`` of the same table, for programs.
        heatmaps: ``(picture, caption)`` per class: attention over a grey copy of the image.
        downloads: paths of the labels PNG and the JSON summary (empty without ``out_dir``).
        seconds: wall time of the request.
    """

    ok: bool
    message: str
    overlay: Image.Image | None = None
    label_map: Image.Image | None = None
    legend_html: str = ""
    shares: list[list[Any]] = field(default_factory=list)
    heatmaps: list[tuple[Image.Image, str]] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def error(cls, message: str) -> WebResponse:
        return cls(ok=False, message=f"**Cannot segment:** {message}")

    def outputs(self) -> tuple:
        """Values for the app's output components, in :data:`OUTPUT_ORDER`."""
        return (
            self.message,
            self.overlay,
            self.label_map,
            self.legend_html,
            self.heatmaps,
            self.downloads or None,
        )


OUTPUT_ORDER = ("status", "overlay", "label_map", "legend", "heatmaps", "downloads")


def model_info(segmenter: MaskDiffusion) -> str:
    """One Markdown line: which model runs where, so a screenshot says what made it."""
    dtype = str(segmenter.dtype).removeprefix("torch.")
    return f"Model `{segmenter.model_id}` · device `{segmenter.device}` · dtype `{dtype}`"


def check_classes(text: str | None) -> list[ClassName]:
    """Parse the class box (``"a, b|c"``); raise :class:`VocabularyError` with the fix."""
    cleaned = (text or "").strip().strip(",").strip()  # a stray comma at either end is not a class
    if not cleaned:
        raise VocabularyError("the class list is empty: type class names separated by commas, e.g. 'sky, road, car'")
    vocabulary = parse_classes(cleaned)
    if len(vocabulary) > MAX_CLASSES:
        raise VocabularyError(
            f"{len(vocabulary)} classes is more than this app takes ({MAX_CLASSES}): "
            "ask for fewer classes, or use the command line (maskdiffusion segment --classes @file.txt)"
        )
    return vocabulary


def open_checked(image: Any, name: str = "the upload") -> Image.Image:
    """The request's image as RGB, refused before decoding when it is over :data:`MAX_PIXELS`.

    ``image``: a file path (an upload), a PIL image or a ``(H, W[, 3|4])`` array.
    Raises :class:`ImageLoadError` naming the problem and the fix.
    """
    if image is None:
        raise ImageLoadError(NO_IMAGE)
    if isinstance(image, (str, os.PathLike)):
        try:
            with warnings.catch_warnings(), Image.open(image) as header:  # reads the header only
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height = header.size
        except Image.DecompressionBombError:
            width = height = math.inf
        except (OSError, SyntaxError, ValueError):
            width = height = 0  # load_image below says what is wrong with it
    elif isinstance(image, Image.Image):
        width, height = image.size
    else:
        height, width = np.shape(image)[:2] if np.ndim(image) >= 2 else (0, 0)
    if width * height > MAX_PIXELS:
        size = "too many" if math.isinf(width) else f"{width}x{height} = {width * height / 1e6:.1f}"
        raise ImageLoadError(
            f"{name} has {size} megapixels; this app takes at most {MAX_PIXELS / 1e6:.0f}: downscale it first"
        )
    return load_image(image, name=name)


def segment_request(
    segmenter: MaskDiffusion,
    image: Any,
    classes_text: str | None,
    preset_name: str | None = None,
    size: float | None = None,
    threshold: float | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
) -> WebResponse:
    """Run one request of the web app; bad input comes back as a message, never raised.

    Arguments:
        segmenter: the loaded model.
        image: upload path, PIL image or ``(H, W[, 3|4])`` array; ``None`` = nothing uploaded.
        classes_text: ``"sky, road, person|pedestrian"`` (comma-separated, ``|`` = synonyms).
        preset_name: a name in ``segmenter.presets``; ``None`` = the segmenter's preset.
        size: view short side in pixels; ``None`` = the preset's.
        threshold: background threshold on the best class score; ``None`` or NaN = off.
        out_dir: where the labels PNG and JSON for download are written; ``None`` = not written.

    Returns:
        A :class:`WebResponse`; ``ok`` is false when the input could not be segmented.
    """
    start = time.perf_counter()
    name = _display_name(image)
    if image is None:
        return WebResponse.error(NO_IMAGE)
    try:
        vocabulary, preset = segmenter.check_inputs(
            check_classes(classes_text), _request_preset(segmenter, preset_name, size, threshold)
        )
        picture = open_checked(image, name)
        result = segmenter(picture, classes=vocabulary, preset=preset)
    except (VocabularyError, ImageLoadError) as error:
        return WebResponse.error(str(error))
    except ValueError as error:  # settings that cannot work with this model (size, preset fields)
        return WebResponse.error(f"{error}; change the settings and try again")
    except MemoryError:
        return WebResponse.error("out of memory: try a smaller size or fewer classes")
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        return WebResponse.error("out of memory on the device: try a smaller size or fewer classes")
    result.source = name
    downloads = _write_downloads(result, out_dir, _stem(image)) if out_dir is not None else []
    seconds = time.perf_counter() - start
    shares = _share_rows(result)
    message = (
        f"Segmented {html.escape(name)} ({picture.width}x{picture.height}) into {len(result.classes)} "
        f"class{'es' if len(result.classes) != 1 else ''} in **{seconds:.2f} s** "
        f"(model {result.timings.get('seconds', 0.0):.2f} s, size {preset.size}"
        + (f", preset {preset_name})" if preset_name else ")")
    )
    return WebResponse(
        ok=True,
        message=message,
        overlay=result.overlay(),
        label_map=Image.fromarray(visualize.colorize(result.labels, result.palette)),
        legend_html=_legend_html(result, shares),
        shares=shares,
        heatmaps=_heatmaps(result),
        downloads=downloads,
        seconds=seconds,
    )


# -- request pieces ------------------------------------------------------------------


def _display_name(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name or "the upload"
    return "the image"


def _stem(image: Any) -> str:
    stem = Path(image).stem if isinstance(image, (str, os.PathLike)) else ""
    return stem or "image"


def _request_preset(
    segmenter: MaskDiffusion, preset_name: str | None, size: float | None, threshold: float | None
) -> Preset:
    """The named preset with the accordion's size and threshold applied (the model checks it)."""
    if preset_name and preset_name not in segmenter.presets:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(segmenter.presets)}")
    base = segmenter.presets[preset_name] if preset_name else segmenter.preset
    changes: dict[str, Any] = {}
    if size is not None:
        if float(size) != int(size) or int(size) <= 0:
            raise ValueError(f"size must be a positive whole number of pixels, got {size}")
        changes["size"] = int(size)
    if threshold is not None and not math.isnan(float(threshold)):
        changes["background_threshold"] = float(threshold)
    return base.replace(**changes)


def _share_rows(result: Result) -> list[list[Any]]:
    share = result.pixel_share()
    rows = [[c.name, " | ".join(c.synonyms), round(100 * share[c.name], 2)] for c in result.vocabulary]
    if "background" in share and "background" not in result.classes:
        rows.append(["background", "(under the threshold)", round(100 * share["background"], 2)])
    return rows


def _legend_html(result: Result, rows: list[list[Any]]) -> str:
    """Class colours, words and pixel share as an HTML table (names escaped: they are user text)."""
    colours = [tuple(int(v) for v in c) for c in result.palette] + [visualize.BACKGROUND_COLOUR]
    body = []
    for index, (name, words, percent) in enumerate(rows):
        r, g, b = colours[min(index, len(colours) - 1)]
        swatch = (
            '<span style="display:inline-block;width:1em;height:1em;border:1px solid #000;'
            f'background:rgb({r},{g},{b})"></span>'
        )
        body.append(
            f"<tr><td>{swatch}</td><td>{html.escape(str(name))}</td><td>{html.escape(str(words))}</td>"
            f'<td style="text-align:right">{percent:.1f}%</td></tr>'
        )
    return (
        '<table class="md-legend"><thead><tr><th></th><th>class</th><th>words</th><th>pixels</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _heatmaps(result: Result) -> list[tuple[Image.Image, str]]:
    """Per-class attention over a grey copy of the image, at most :data:`MAX_HEATMAPS`."""
    scale = HEATMAP_SIDE / max(result.image.size)
    size = (max(1, round(result.image.width * scale)), max(1, round(result.image.height * scale)))
    grey = result.image.convert("L").resize(size, Image.Resampling.BILINEAR).convert("RGB")
    pictures = []
    for index, name in enumerate(result.classes[:MAX_HEATMAPS]):
        heat = visualize.heatmap(result.attention[index], size)
        pictures.append((Image.blend(grey, heat, 0.65), name))
    return pictures


def _write_downloads(result: Result, out_dir: str | os.PathLike, stem: str) -> list[str]:
    out = Path(out_dir)
    return [
        str(files.write_image(out / f"{stem}.labels.png", result.label_image())),
        str(files.write_json(out / f"{stem}.json", result.summary())),
    ]


class RequestFolders:
    """A fresh folder per request for its downloads, keeping only the newest ``keep``.

    Downloads must outlive the request (the browser fetches them afterwards), but a server
    that runs for weeks must not fill the disk, so old folders are deleted as new ones come.
    """

    def __init__(self, root: str | os.PathLike | None = None, keep: int = KEEP_REQUESTS):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="maskdiffusion-web-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._folders: deque[Path] = deque()

    def new(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.root))
        self._folders.append(folder)
        while len(self._folders) > self.keep:
            shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder


# -- the Gradio app ------------------------------------------------------------------


def example_rows() -> list[list[str]]:
    """``[path, classes]`` of the example images shipped with the package."""
    from .cli import example_images

    return [[str(path), classes] for path, classes in example_images()]


def build_app(
    segmenter: MaskDiffusion,
    *,
    folders: RequestFolders | None = None,
    examples: list[list[str]] | None = None,
    title: str = "maskdiffusion",
) -> gradio.Blocks:
    """The Gradio app around ``segmenter``: inputs, settings accordion, outputs, queue.

    Arguments:
        segmenter: the loaded model; every request goes through :func:`segment_request`.
        folders: where downloads are written (default: a new folder in the system temp folder,
            which Gradio serves; elsewhere, pass its root in ``launch``'s ``allowed_paths``).
        examples: ``[path, classes]`` rows (default: the package's example images).

    Returns:
        A ``gradio.Blocks`` with its queue set to one request at a time; start it with
        :func:`launch`.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a local demo
    import gradio as gr

    folders = folders or RequestFolders()
    examples = example_rows() if examples is None else examples
    preset_names = sorted(segmenter.presets)

    def run(image_payload: Any, classes_text: str, preset_name: str, size: float, threshold: float | None) -> tuple:
        # The event runs with preprocess=False: the image arrives as Gradio's file record, so an
        # unreadable upload reaches open_checked (and gets our message) instead of failing in Gradio.
        path = image_payload.get("path") if isinstance(image_payload, dict) else image_payload
        try:
            response = segment_request(
                segmenter, path, classes_text, preset_name, size, threshold, out_dir=folders.new()
            )
        except Exception as error:  # keep serving; say what happened instead of a bare "Error"
            log.exception("request failed")
            response = WebResponse.error(f"internal error ({type(error).__name__}: {error}); see the server log")
        return response.outputs()

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "## maskdiffusion: open-vocabulary segmentation with a frozen Stable Diffusion\n"
            "Upload an image, type class names separated by commas (`|` between synonyms), press **Segment**."
        )
        gr.Markdown(model_info(segmenter), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="input-image")
                classes = gr.Textbox(
                    label="Classes",
                    placeholder="sky, road, car, person|pedestrian",
                    elem_id="classes",
                    max_lines=4,
                )
                with gr.Accordion("Settings", open=False):
                    preset = gr.Dropdown(
                        preset_names, value=_default_preset_name(segmenter), label="Preset", elem_id="preset"
                    )
                    size = gr.Slider(
                        minimum=SIZE_RANGE[0],
                        maximum=SIZE_RANGE[1],
                        step=segmenter.layout.block,
                        value=segmenter.preset.size,
                        label="Size (view short side, pixels)",
                        elem_id="size",
                    )
                    threshold = gr.Number(
                        value=segmenter.preset.background_threshold,
                        label="Background threshold (empty = off; pixels whose best score is lower get no class)",
                        elem_id="threshold",
                    )
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                status = gr.Markdown(elem_id="status")
                if examples:
                    gr.Examples(examples, inputs=[image, classes], label="Examples")
            with gr.Column(scale=2):
                overlay = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                with gr.Row():
                    label_map = gr.Image(label="Label map", format="png", interactive=False, elem_id="label-map")
                    downloads = gr.File(
                        label="Downloads (labels PNG, JSON)",
                        file_count="multiple",
                        interactive=False,
                        elem_id="downloads",
                    )
                heatmaps = gr.Gallery(
                    label="Attention per class", columns=4, format="png", elem_id="heatmaps", object_fit="contain"
                )
        outputs = {
            "status": status,
            "overlay": overlay,
            "label_map": label_map,
            "legend": legend,
            "heatmaps": heatmaps,
            "downloads": downloads,
        }
        gr.on(
            [button.click, classes.submit],
            run,
            inputs=[image, classes, preset, size, threshold],
            outputs=[outputs[name] for name in OUTPUT_ORDER],
            preprocess=False,
            api_name="segment",
        )
    app.queue(default_concurrency_limit=1, max_size=64)
    return app


def _default_preset_name(segmenter: MaskDiffusion) -> str:
    for name, preset in segmenter.presets.items():
        if preset == segmenter.preset:
            return name
    return "default" if "default" in segmenter.presets else sorted(segmenter.presets)[0]


def launch(
    app: gradio.Blocks,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    block: bool = True,
    allowed_paths: list[str] | None = None,
) -> Any:
    """Start ``app`` on ``host:port``; ``block=False`` returns at once (tests, notebooks).

    No share link, no server-side rendering (it would need Node), no analytics. Downloads
    live in the system's temporary folder, which Gradio serves without ``allowed_paths``.
    """
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        show_error=True,
        max_file_size=MAX_UPLOAD,
        allowed_paths=allowed_paths,
        prevent_thread_lock=not block,
        quiet=not block,
    )


# -- command line ----------------------------------------------------------------------


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``maskdiffusion serve [--model ...] [--host 127.0.0.1] [--port 7860] [--device ...]``."""
    from .cli import add_model_arguments

    serve = subparsers.add_parser("serve", help="start the web demo (needs: pip install 'maskdiffusion[web]')")
    add_model_arguments(serve)
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to the network)",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.set_defaults(run=cmd_serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, build the app and serve until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs Gradio: pip install 'maskdiffusion[web]'", file=sys.stderr)
        return 1
    from .pipeline import MaskDiffusion

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the app")
    segmenter = MaskDiffusion.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    print(f"{model_info(segmenter).replace('`', '')}; serving on http://{args.host}:{args.port}")
    launch(build_app(segmenter), host=args.host, port=args.port)
    return 0

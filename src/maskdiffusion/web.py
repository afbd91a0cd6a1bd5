"""Web demo: ``maskdiffusion serve`` runs a local Gradio app around one loaded model.

All the work of a request (input checks, segmentation, pictures, files to download)
happens in :func:`segment_request`, a plain function that returns a :class:`WebResponse`;
the Gradio layer in :func:`build_app` only lays that out. So the request logic is tested
without a browser, and ``gradio`` (the optional ``maskdiffusion[web]`` extra) is imported
only when an app is actually built.

Bad input never raises out of a request: it comes back as a message shown in the page,
and the server goes on serving. Every field is checked on the server as strictly as the page
checks it (the API takes any JSON), and a request's work is bounded: images over the
segmenter's :class:`~maskdiffusion.views.InputLimits` are refused from their header, and a
request stops at its deadline or when its client has gone. Requests are queued one at a
time, because there is one model and its passes would only compete for the same device.
"""

from __future__ import annotations

import atexit
import html
import ipaddress
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
MAX_CLASS_TEXT = 20_000  # characters in the class box: 200 classes of 100 characters
MAX_UPLOAD = "100mb"  # Gradio refuses larger uploads before they reach a request
MAX_HEATMAPS = 48  # heat maps shown in the gallery; the JSON and label map cover every class
HEATMAP_SIDE = 320  # long side of a heat map in the gallery, in pixels
KEEP_REQUESTS = 16  # request folders of downloads kept on disk; older ones are deleted
TOY_EXAMPLES = 4  # held-out toy-world scenes offered as examples with a toy-world model
DEFAULT_HOST = "127.0.0.1"  # loopback: the app is reachable from other machines only when asked
DEFAULT_PORT = 7860
SIZE_RANGE = (64, 1024)  # the size slider's range; its step is the model's block size
REQUEST_TIMEOUT = 120.0  # seconds of work one request may take before it is stopped (serve --request-timeout)
HEARTBEAT_SECONDS = 3  # how often Gradio writes to each page's event stream, and so finds closed ones
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
        return cls(ok=False, message=f"**Cannot segment:** {_escape(message)}")

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
    """Markdown: which model runs where, so a screenshot says what made it, and what its labels are worth."""
    dtype = str(segmenter.dtype).removeprefix("torch.")
    maps = "concept outputs" if segmenter.preset.class_maps == "concept" else "attention weights"
    lines = [
        f"Model `{segmenter.model_id}` · family `{segmenter.family.name}` ({segmenter.backbone.kind}, class maps: "
        f"{maps}) · device `{segmenter.device}` · dtype `{dtype}`"
    ]
    if segmenter.card.random_weights:
        lines.append(
            "**Random weights: this is a test model. Its labels and heat maps are meaningless;** "
            "it shows that the app runs, nothing more."
        )
    if segmenter.card.vocabulary is not None:
        words = ", ".join(segmenter.card.vocabulary)
        lines.append(f"This model was trained on these words only: {_escape(words)}. Other words get guesses.")
    return "\n\n".join(lines)


def check_classes(text: Any) -> list[ClassName]:
    """Parse the class box (``"a, b|c"``); raise :class:`VocabularyError` with the fix."""
    if text is not None and not isinstance(text, str):
        raise VocabularyError(f"the class list must be text, got {type(text).__name__}")
    if text is not None and len(text) > MAX_CLASS_TEXT:
        raise VocabularyError(
            f"the class list is {len(text)} characters long, more than this app takes ({MAX_CLASS_TEXT}): "
            "ask for fewer or shorter names, or use the command line (maskdiffusion segment --classes @file.txt)"
        )
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


def check_settings(segmenter: MaskDiffusion, preset_name: Any, size: Any, threshold: Any) -> Preset:
    """The named preset with the settings' size and threshold, each checked as strictly as the page does.

    The API takes any JSON, so nothing here trusts the page's widgets: the preset must be one
    of the list, the size a whole number in the slider's range (the model then checks it is a
    multiple of its block size), the threshold empty or a finite number in the scores' range.
    Raises ``ValueError`` naming the field and what to send.
    """
    if preset_name is not None and (not isinstance(preset_name, str) or preset_name not in segmenter.presets):
        raise ValueError(f"unknown preset {_short(preset_name)}; choose one of {sorted(segmenter.presets)}")
    base = segmenter.presets[preset_name] if preset_name else segmenter.preset
    changes: dict[str, Any] = {}
    if size is not None:
        low, high = SIZE_RANGE
        value = _number(size, "size")
        if not (low <= value <= high and value.is_integer()):
            raise ValueError(f"size {_short(size)} is not a whole number from {low} to {high} (the slider's range)")
        changes["size"] = int(value)
    value = math.nan if threshold is None else _number(threshold, "background threshold", allow_nan=True)
    if not math.isnan(value):  # NaN: the number box left empty
        low, high = base.score_range() or (-math.inf, math.inf)
        if not math.isfinite(value) or not low <= value <= high:
            where = f"from {low:g} to {high:g}, the range of the scores" if math.isfinite(low) else "a finite number"
            raise ValueError(f"background threshold {_short(threshold)} is not {where}; or leave it empty (off)")
        changes["background_threshold"] = value
    return base.replace(**changes)


def segment_request(
    segmenter: MaskDiffusion,
    image: Any,
    classes_text: str | None,
    preset_name: str | None = None,
    size: float | None = None,
    threshold: float | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    name: str | None = None,
    timeout: float | None = None,
    client_gone: Callable[[], bool] | None = None,
) -> WebResponse:
    """Run one request of the web app; bad input comes back as a message, never raised.

    Arguments:
        segmenter: the loaded model; its ``limits`` bound the image (checked from the header).
        image: upload path, PIL image or ``(H, W[, 3|4])`` array; ``None`` = nothing uploaded.
        classes_text: ``"sky, road, person|pedestrian"`` (comma-separated, ``|`` = synonyms).
        preset_name: a name in ``segmenter.presets``; ``None`` = the segmenter's preset.
        size: view short side in pixels, in :data:`SIZE_RANGE`; ``None`` = the preset's.
        threshold: background threshold on the best class score; ``None`` or NaN = off.
        out_dir: where the labels PNG and JSON for download are written; ``None`` = not written.
        name: the file name the user knows the image by (an upload's original name); messages
            use it and never the server's path of the file.
        timeout: seconds after which the segmentation stops with a message; ``None`` = no limit.
        client_gone: asked between model batches; true stops the work (nobody waits for it).

    Returns:
        A :class:`WebResponse`; ``ok`` is false when the input could not be segmented.
    """
    from .pipeline import SegmentationCancelled  # torch: imported when a request runs, not with the CLI

    start = time.perf_counter()
    is_file = isinstance(image, (str, os.PathLike))
    given = _file_name(name or (image if is_file else ""))
    name = given or "the image"
    if image is None:
        return WebResponse.error(NO_IMAGE)
    stopped_by: list[str] = []

    def cancel() -> bool:
        if timeout is not None and time.perf_counter() - start > timeout:
            stopped_by.append("deadline")
        elif client_gone is not None and client_gone():
            stopped_by.append("client")
        return bool(stopped_by)

    try:
        vocabulary, preset = segmenter.check_inputs(
            check_classes(classes_text), check_settings(segmenter, preset_name, size, threshold)
        )
        picture = load_image(image, name=name, limits=segmenter.limits)
        result = segmenter.segment_batch([picture], vocabulary, preset=preset, cancel=cancel)[0]
    except (VocabularyError, ImageLoadError) as error:
        return WebResponse.error(_hide_path(str(error), image, name))
    except SegmentationCancelled:
        if stopped_by == ["client"]:
            log.info("stopped a request whose client has gone")
            return WebResponse.error("the client has gone; the request was stopped")
        return WebResponse.error(
            f"the request took longer than this server's limit of {timeout:g} s and was stopped: try a smaller "
            "size, fewer classes or a smaller image (the limit is set by maskdiffusion serve --request-timeout)"
        )
    except ValueError as error:  # settings that cannot work with this model (size, preset fields)
        return WebResponse.error(f"{error}; change the settings and try again")
    except MemoryError:
        return WebResponse.error("out of memory: try a smaller size or fewer classes")
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        return WebResponse.error("out of memory on the device: try a smaller size or fewer classes")
    result.source = name
    downloads = _write_downloads(result, out_dir, Path(given).stem or "image") if out_dir is not None else []
    seconds = time.perf_counter() - start
    shares = _share_rows(result)
    message = (
        f"Segmented {_escape(name)} ({picture.width}x{picture.height}) into {len(result.classes)} "
        f"class{'es' if len(result.classes) != 1 else ''} in **{seconds:.2f} s** "
        f"(model {result.timings.get('seconds', 0.0):.2f} s, size {preset.size}"
        + (f", preset {preset_name})" if preset_name else ")")
        + "".join(f"\n\n**Warning:** {_escape(warning)}" for warning in result.warnings)
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


def _escape(text: str) -> str:
    """User text (file and class names) for Markdown: no HTML gets through."""
    return html.escape(text, quote=False)


def _file_name(path: str | os.PathLike) -> str:
    """The last part of a path the user gave, printable characters only and at most 100 of them.

    It names the image in messages and its downloads, so never a folder of the server, and
    nothing that cannot be a file name.
    """
    name = "".join(character for character in Path(path).name if character.isprintable())
    return name if len(name) <= 100 else f"{name[:60]}…{name[-39:]}"


def _short(value: Any, limit: int = 40) -> str:
    """A value from the request for a message: its repr, cut short (the API sends anything)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _number(value: Any, what: str, *, allow_nan: bool = False) -> float:
    """``value`` as a float when it is a real number (not a bool, not text), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {_short(value)}")
    number = float(value)
    if math.isnan(number) and not allow_nan:
        raise ValueError(f"{what} must be a number, got NaN")
    return number


def _hide_path(message: str, image: Any, name: str) -> str:
    """``message`` with the server's path of ``image`` replaced by the name the user knows."""
    if not isinstance(image, (str, os.PathLike)):
        return message
    for path in sorted({os.path.abspath(image), os.fspath(image)}, key=len, reverse=True):
        message = message.replace(path, name)
    return message.replace(os.path.dirname(os.path.abspath(image)), "…")


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
    """Per-class attention (each map scaled to its own peak) over a grey copy of the image, at most
    :data:`MAX_HEATMAPS`."""
    scale = HEATMAP_SIDE / max(result.image.size)
    size = (max(1, round(result.image.width * scale)), max(1, round(result.image.height * scale)))
    grey = result.image.convert("L").resize(size, Image.Resampling.BILINEAR).convert("RGB")
    pictures = []
    for index, name in enumerate(result.classes[:MAX_HEATMAPS]):
        values = result.attention[index]
        heat = visualize.heatmap(values / max(float(values.max()), 1e-30), size)
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
    Without a ``root`` the folders live in a new ``maskdiffusion-web-*`` folder of the
    system's temporary folder, removed by :meth:`close` and at the latest when Python exits.
    """

    def __init__(self, root: str | os.PathLike | None = None, keep: int = KEEP_REQUESTS):
        self.owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="maskdiffusion-web-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._folders: deque[Path] = deque()
        if self.owns_root:
            atexit.register(self.close)

    def new(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.root))
        self._folders.append(folder)
        while len(self._folders) > self.keep:
            shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder

    def close(self) -> None:
        """Delete what this object made: its own root, or the request folders in a given one."""
        for folder in [self.root] if self.owns_root else self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()


# -- the Gradio app ------------------------------------------------------------------


def example_rows() -> list[list[str]]:
    """``[path, classes]`` of the example images shipped with the package."""
    folder = Path(str(resources.files("maskdiffusion").joinpath("examples")))
    table = json.loads((folder / "examples.json").read_text(encoding="utf-8"))
    return [[str(folder / name), classes] for name, classes in table.items()]


def is_toy_world_model(segmenter: MaskDiffusion) -> bool:
    """Whether the model was trained on the toy world (its card lists exactly the world's classes)."""
    from .toyworld.world import CLASS_NAMES

    vocabulary = segmenter.card.vocabulary
    return vocabulary is not None and set(vocabulary) == set(CLASS_NAMES)


def toy_world_rows(folder: str | os.PathLike, count: int = TOY_EXAMPLES) -> list[list[str]]:
    """``[path, classes]`` of ``count`` held-out toy-world scenes, written as PNGs into ``folder``.

    A model that knows only the toy world is shown scenes of that world, asked for its classes:
    a street photo would only show it failing at what it never saw.
    """
    from .toyworld.gate import held_out_scenes
    from .toyworld.world import CLASS_NAMES

    classes = ", ".join(CLASS_NAMES)
    rows = []
    for index, scene in enumerate(held_out_scenes(count)):
        path = files.write_image(Path(folder) / f"toy-world-{index + 1}.png", Image.fromarray(scene.image))
        rows.append([str(path), classes])
    return rows


def upload_file(payload: Any) -> tuple[str | None, str | None]:
    """The server path and the user's file name of the image field's value (``None, None``: no image).

    The event runs with ``preprocess=False`` so that an unreadable upload reaches
    :func:`segment_request` and gets its message; so the value is whatever JSON the client
    sent, and it is accepted only as Gradio's record of a file in Gradio's upload folder.
    Raises :class:`ImageLoadError` otherwise.
    """
    from gradio.utils import get_upload_folder

    if payload is None:
        return None, None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, str):
        raise ImageLoadError(
            f"the image must be an uploaded file (Gradio's file record with a 'path'), got {type(payload).__name__}"
        )
    if not Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve()):
        raise ImageLoadError(
            "the image must be a file uploaded to this app: upload it first (gradio_client's handle_file does)"
        )
    original = payload.get("orig_name")
    return path, original if isinstance(original, str) and original else None


def client_gone_check(app: gradio.Blocks) -> Callable[[], bool] | None:
    """For the Gradio event running in this thread: a callable that says whether its client has gone.

    Gradio marks a running event dead (``alive = False``) when the page's event stream
    disconnects, and drops it from its running jobs when the client cancels it; the work
    itself, in a thread, goes on unless asked. Both facts live in Gradio's queue, which has
    no public interface for them: ``tests/test_web_live.py`` checks them on the installed
    version. ``None`` outside a Gradio event (a direct call).
    """
    from gradio.context import LocalContext

    event_id = LocalContext.event_id.get(None)
    if event_id is None:
        return None
    queue = app._queue

    def gone() -> bool:
        for job in queue.active_jobs:
            for event in job or ():
                if event._id == event_id:
                    return not event.alive
        return True  # no longer running in the queue: cancelled

    return gone


def build_app(
    segmenter: MaskDiffusion,
    *,
    folders: RequestFolders | None = None,
    examples: list[list[str]] | None = None,
    title: str = "maskdiffusion",
    request_timeout: float | None = REQUEST_TIMEOUT,
) -> gradio.Blocks:
    """The Gradio app around ``segmenter``: inputs, settings accordion, outputs, queue.

    Arguments:
        segmenter: the loaded model; every request goes through :func:`segment_request`.
        folders: where downloads are written (default: a new folder in the system temp folder,
            which Gradio serves; elsewhere, pass its root in ``launch``'s ``allowed_paths``).
        examples: ``[path, classes]`` rows (default: toy-world scenes for a toy-world model,
            else the package's example images).
        request_timeout: seconds of work a request may take before it stops with a message.

    Returns:
        A ``gradio.Blocks`` with its queue set to one request at a time; start it with
        :func:`launch`.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a local demo
    # Gradio notices a closed page when it next writes to its event stream: a heartbeat every
    # few seconds (its default is 15) bounds how long a departed client's work goes on.
    os.environ.setdefault("GRADIO_HEARTBEAT_INTERVAL", str(HEARTBEAT_SECONDS))
    import gradio as gr

    folders = folders or RequestFolders()
    if examples is None:
        examples = toy_world_rows(folders.root) if is_toy_world_model(segmenter) else example_rows()
    preset_names = sorted(segmenter.presets)
    # One segmentation at a time even when Gradio frees the queue's slot early (a cancelled
    # event's thread runs on until it next asks whether to stop).
    model_lock = threading.Lock()

    def run(image_payload: Any, classes_text: Any, preset_name: Any, size: Any, threshold: Any) -> tuple:
        try:
            path, name = upload_file(image_payload)
            with model_lock:
                response = segment_request(
                    segmenter,
                    path,
                    classes_text,
                    preset_name,
                    size,
                    threshold,
                    out_dir=folders.new(),
                    name=name,
                    timeout=request_timeout,
                    client_gone=client_gone_check(app),
                )
        except ImageLoadError as error:
            response = WebResponse.error(str(error))
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
                        step=segmenter.backbone.block,
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
                    gr.Examples(examples, inputs=[image, classes], label="Examples", elem_id="examples")
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


def url_host(host: str) -> str:
    """``host`` as it is written in a URL: an IPv6 address in brackets (``::1`` -> ``[::1]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, ``127.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def launch(
    app: gradio.Blocks,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    block: bool = True,
    allowed_paths: list[str] | None = None,
) -> Any:
    """Start ``app`` on ``host:port`` (IPv4 or IPv6); ``block=False`` returns at once (tests, notebooks).

    No share link, no server-side rendering (it would need Node), no analytics, and nothing
    printed: Gradio's banner suggests ``share=True``, which ``serve`` does not offer (it prints
    its own line with ``app.local_url``). Downloads live in the system's temporary folder,
    which Gradio serves without ``allowed_paths``.
    """
    return app.launch(
        server_name=url_host(host),
        server_port=port,
        share=False,
        ssr_mode=False,
        show_error=True,
        max_file_size=MAX_UPLOAD,
        allowed_paths=allowed_paths,
        prevent_thread_lock=not block,
        quiet=True,
    )

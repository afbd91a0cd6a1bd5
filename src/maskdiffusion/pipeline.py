"""The MaskDiffusion pipeline: image -> views -> latents -> one backbone pass -> mask head -> Result.

One straight line for every model: what differs between a UNet and a transformer lives behind
the backbone (:mod:`maskdiffusion.backbones`), not here.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone
from .capture import PassAverage, ensemble_passes, propagate
from .loading import (
    DEFAULT_MODEL,
    Components,
    components_from_pipe,
    load_components,
    load_tiny_encoder,
    pick_device,
    pick_dtype,
    resolve_model_folder,
    resolve_tiny_encoder,
)
from .mask_head import class_attention, segment_scores
from .pamr import refined_rows
from .precision import Precision
from .presets import Preset, resolve_preset
from .prompts import ClassName, PromptBatch, background_classes, parse_classes
from .result import BACKGROUND, Result
from .text import TextConditioning
from .views import (
    DEFAULT_LIMITS,
    ImageInput,
    ImageLoadError,
    InputLimits,
    ViewLayout,
    load_image,
    resize_maps,
    upsample_rows,
)

ClassesInput = str | Sequence[str | Sequence[str]]
LABEL_ROWS = 256  # rows upsampled at a time when labelling, to bound memory on large images


class SegmentationCancelled(RuntimeError):
    """``segment_batch``'s ``cancel`` callback asked to stop (a deadline, a client that left)."""


@dataclass
class _Pending:
    """Views of one image on their way through the batches."""

    index: int
    image: Image.Image
    layout: ViewLayout
    source: str | None
    key: str
    latents: list[torch.Tensor | None]
    attention: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Call:
    """What every image of one ``segment_batch`` call shares."""

    vocabulary: list[ClassName]  # the classes asked for (the preset's background words come after them)
    preset: Preset
    weights: torch.Tensor  # (classes + background words, used keys) class weights of the captured maps
    scale: torch.Tensor | None  # (C,) calibration divisors
    keep_features: bool
    warnings: list[str]
    preset_name: str
    noise: list[dict]  # what each timestep means in the model's own terms


class LRU:
    """A bounded least-recently-used map; capacity 0 keeps nothing."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[object, object] = OrderedDict()

    def get(self, key):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class LatentCache(LRU):
    """Bounded LRU of VAE latents per (image pixels, view layout).

    Asking about an image already seen (a new class list, another preset with the same
    views) skips the VAE encoder, the most expensive part besides the denoiser. Holds at most
    ``capacity`` images; 0 disables it.
    """

    @staticmethod
    def key(image, layout: ViewLayout) -> str:
        digest = hashlib.blake2b(np.asarray(image).tobytes(), digest_size=16)
        digest.update(repr((image.size, layout)).encode())
        return digest.hexdigest()


TEXT_CACHE_SIZE = 8  # vocabularies whose encoded prompts are kept (T5-XXL takes tens of seconds a prompt on a CPU)


# Component attributes a segmenter always has (``None`` where its model has no such part), named as in diffusers
PART_NAMES = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)


class MaskDiffusion:
    """Open-vocabulary semantic segmentation with a frozen text-to-image diffusion model.

    The components (``vae``, ``unet`` or ``transformer``, ``text_encoder``, ``tokenizer``, and
    the model's others: ``text_encoder_2``, ``tokenizer_3``, ...) are plain attributes, named as
    in diffusers; ``backbone`` is the architecture's seam. Build with :meth:`from_pretrained`;
    call with an image and classes.
    """

    def __init__(
        self,
        components: Components,
        *,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        preset: str | Preset | None = None,
        batch_size: int = 4,
        cache_size: int = 32,
        limits: InputLimits = DEFAULT_LIMITS,
        precision: Precision | None = None,
    ):
        self.vae = components.vae
        self.encoder = components.encoder or components.vae  # what encodes the views: the VAE or a tiny one
        self.encoder_id = components.encoder_id
        self.backbone: Backbone = components.backbone
        for name in PART_NAMES:
            setattr(self, name, getattr(self.backbone, name, None))
        self.family = components.family
        self.card = components.card
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.precision = precision or Precision(dtype=dtype, weights=self.backbone.denoiser.dtype, channels_last=False)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # named presets with their "auto" layers resolved for this model (Result JSON and metrics record these)
        self.presets = {name: self.backbone.resolve(p) for name, p in components.presets.items()}
        self.preset = self._preset(preset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.latent_cache = LatentCache(cache_size)
        self.text_cache = LRU(TEXT_CACHE_SIZE)  # (prompted classes, separator) -> (prompt batches, conditioning)
        self.limits = limits

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        preset: str | Preset | None = None,
        batch_size: int = 4,
        cache_size: int = 32,
        limits: InputLimits = DEFAULT_LIMITS,
        local_files_only: bool | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        encoder: str | os.PathLike = "full",
    ) -> MaskDiffusion:
        """Load a model of any family in :data:`~maskdiffusion.families.FAMILIES` (SD 1.x/2.x, SDXL,
        distilled, Turbo; SD3/3.5, FLUX.1 dev/schnell, PixArt-Σ): a hub id, a folder, ``toy`` or ``tiny-random``.

        Arguments:
            model: hub id (looked up in the local cache first) or diffusers folder (a string or a path).
            device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``mps``.
            dtype: ``float32`` (default), ``float16`` or ``bfloat16``: the weights are stored
                in it (float16 on a CPU: float32 weights under float16 autocast), attention maps
                and the mask head stay float32. bfloat16 pays on a CPU with AMX / AVX512-BF16
                (:func:`maskdiffusion.precision.native_half`); elsewhere it is emulated, slower.
            preset: default settings of this segmenter (name or :class:`Preset`).
            batch_size: views per UNet batch.
            cache_size: images whose VAE latents are kept for re-queries (LRU; 0 = off).
            limits: pixel count and aspect ratio an input image may have (:class:`InputLimits`).
            channels_last: convolutions in NHWC; ``None`` = on for half precision.
            compile: wrap the VAE encoder and the denoiser's hook-free parts in ``torch.compile``
                (the first call of every new shape compiles; labels equal the eager ones up
                to near-ties).
            encoder: what encodes the views: ``"full"``, the model's own VAE; ``"tiny"``, the
                family's tiny autoencoder (``madebyollin/taesd``, ``taesdxl``, ``taesd3``, ``taef1``:
                :attr:`Family.tiny_encoder <maskdiffusion.families.Family.tiny_encoder>`; cache-first
                like models), or the hub id or folder of an ``AutoencoderTiny``. A tiny encoder costs
                a fraction of the VAE encoder's FLOPs; what it costs in fidelity depends on the model.
        """
        model, encoder = os.fspath(model), os.fspath(encoder)
        device = pick_device(device)
        dtype = pick_dtype(dtype)
        folder = resolve_model_folder(model, local_files_only=local_files_only)
        precision = Precision.choose(device, dtype, channels_last=channels_last, compile=compile)
        components = load_components(folder, device=device, dtype=precision.weights, names=(model,))
        if encoder != "full":
            components.encoder_id, tiny = resolve_tiny_encoder(
                encoder, components.family, local_files_only=local_files_only
            )
            components.encoder = load_tiny_encoder(tiny, device=device, dtype=precision.weights, vae=components.vae)
        precision.apply(components.encoder or components.vae, components.backbone)
        return cls(
            components,
            model_id=model,
            device=device,
            dtype=dtype,
            preset=preset,
            batch_size=batch_size,
            cache_size=cache_size,
            limits=limits,
            precision=precision,
        )

    @classmethod
    def from_pipe(
        cls,
        pipe,
        *,
        preset: str | Preset | None = None,
        batch_size: int = 4,
        cache_size: int = 32,
        limits: InputLimits = DEFAULT_LIMITS,
    ) -> MaskDiffusion:
        """Wrap a diffusers pipeline already in memory (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1, PixArt-Σ).

        Its modules are shared, not copied, and left as they are: their device, dtype, mode
        and gradient flags are kept, every pass runs under ``torch.no_grad``, and the
        attention processors a pass installs are replaced by the pipeline's own after it.
        The family (and so the presets) is recognised from the pipeline's configurations.

        Arguments:
            pipe: e.g. a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
                ``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``PixArtSigmaPipeline``.
            preset, batch_size, cache_size, limits: as in :meth:`from_pretrained`.
        """
        components = components_from_pipe(pipe)
        model_id = str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
        return cls(
            components,
            model_id=model_id,
            device=components.backbone.denoiser.device,
            dtype=components.backbone.denoiser.dtype,
            preset=preset,
            batch_size=batch_size,
            cache_size=cache_size,
            limits=limits,
        )

    # -- inputs --------------------------------------------------------------------

    def _preset(self, preset: str | Preset | None, base: Preset | None = None) -> Preset:
        fallback = base or self.presets["default"]
        chosen = self.presets[preset] if isinstance(preset, str) and preset in self.presets else preset
        chosen = self.backbone.resolve(resolve_preset(chosen, fallback))
        chosen.check()
        block = self.backbone.block
        if chosen.size % block:
            raise ValueError(
                f"size {chosen.size} is not a multiple of {block}, the block size of this model; "
                f"use e.g. {max(block, round(chosen.size / block) * block)}"
            )
        self.backbone.check(chosen)
        return chosen

    def preset_name(self, preset: Preset) -> tuple[str, dict]:
        """The named preset ``preset`` is closest to, and the fields it changes: for JSON records."""

        def changes(name: str) -> dict:
            base = self.presets[name].to_dict()
            return {k: v for k, v in preset.to_dict().items() if base[k] != v}

        name = min(self.presets, key=lambda n: (len(changes(n)), n != "default"))
        return name, changes(name)

    def warnings(self, vocabulary: Sequence[ClassName]) -> list[str]:
        """What a user must know before trusting this model's labels for ``vocabulary``."""
        notes = []
        if self.card.random_weights:
            notes.append(
                f"model {self.model_id!r} has random weights (a test model): its labels are meaningless; "
                "use a trained model (--model toy, or a Stable Diffusion id or folder)"
            )
        if self.card.vocabulary is not None:
            known = {" ".join(word.casefold().split()) for word in self.card.vocabulary}
            unseen = [
                c.name for c in vocabulary if not any(" ".join(w.casefold().split()) in known for w in c.synonyms)
            ]
            if unseen:
                notes.append(
                    f"model {self.model_id!r} was trained on these words only: {', '.join(self.card.vocabulary)}; "
                    f"it never saw {', '.join(repr(name) for name in unseen[:10])}"
                    + (f" and {len(unseen) - 10} more" if len(unseen) > 10 else "")
                    + ": their labels are guesses"
                )
        return notes

    def check_inputs(self, classes: ClassesInput, preset: str | Preset | None) -> tuple[list[ClassName], Preset]:
        """Validate the class list and settings before any model work."""
        return parse_classes(classes), self._preset(preset, self.preset)

    # -- the straight line ----------------------------------------------------------

    def _autocast(self):
        return self.precision.autocast(self.device)

    @property
    def tokenizers(self) -> list[object]:
        return self.backbone.tokenizers

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.backbone.text_encoders

    def build_prompts(self, vocabulary: Sequence[ClassName], separator: str = " and ") -> list[PromptBatch]:
        """One :class:`~maskdiffusion.prompts.PromptBatch` per tokenizer of this model, with exact class spans."""
        return self.backbone.prompts(vocabulary, separator)

    @torch.no_grad()
    def encode_prompts(self, prompts: PromptBatch | Sequence[PromptBatch]) -> TextConditioning:
        """The prompts' :class:`~maskdiffusion.text.TextConditioning` (one batch per tokenizer)."""
        batches = [prompts] if isinstance(prompts, PromptBatch) else list(prompts)
        with self._autocast():
            return self.backbone.encode(batches, self.device)

    @torch.no_grad()
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """``(V, 3, S, S)`` pixels in [-1, 1] -> ``(V, c, S/f, S/f)`` clean latents in the denoiser's space.

        The VAE's posterior mean, or a tiny autoencoder's latents; either way less its config's
        ``shift_factor``, times its ``scaling_factor``, as diffusers' pipelines scale what their VAE
        encodes (TAESD's own factors are 1 and 0: its latents are SD's scaled ones already).
        """
        pixels = self.precision.layout(views.to(self.device, self.encoder.dtype))
        with self._autocast():
            encoded = self.encoder.encode(pixels)
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        config = self.encoder.config
        return (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def noise_levels(self, preset: Preset, view: tuple[int, int] | None = None) -> list[dict]:
        """What each timestep of ``preset`` means in this model's own terms at views of ``view`` pixels (records)."""
        view = view or (preset.size, preset.size)
        return [self.backbone.noise_level(t, view) for t in (preset.timestep, *preset.ensemble_timesteps)]

    @torch.no_grad()
    def capture(
        self, latents: torch.Tensor, text: TextConditioning, preset: Preset
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pass the preset asks for over clean latents, averaged, attention propagated.

        One pass per (timestep, noise seed) of :func:`~maskdiffusion.capture.ensemble_passes`
        (one, unless ``ensemble_timesteps`` or ``noise_samples`` ask for more); each pass
        covers every (view, prompt) pair (or, with ``shared-queries``, every view). Attention
        is the log-mean-exp over the passes, features their mean; with
        ``self_attention_factors`` each view's maps are then propagated by the mean of its
        passes' self-attention, ``S^k A``.

        Arguments:
            latents: ``(V, c, h, w)`` clean latents; text: the ``P`` prompts' conditioning.

        Returns:
            ``(V, P, K, ha, wa)`` float32 attention log-maps (mean over heads and layers, over the
            keys of :meth:`~maskdiffusion.backbones.Backbone.class_weights`) and ``(V, D, hf, wf)``
            float32 features (mean over the prompts' passes).
        """
        average = PassAverage()
        for timestep, seed, weight in ensemble_passes(preset):
            noised = self.backbone.noise(latents, timestep, seed)
            with self._autocast():
                signals = self.backbone.run(noised, timestep, text, preset, self.precision)
            average.add(signals.attention, signals.features, signals.self_attention, weight=weight)
        attention, features, self_attention = average.mean()
        if self_attention is not None:
            finest = min(preset.self_attention_factors)
            view = self.backbone.view(latents)
            grid = (view[0] // finest, view[1] // finest)
            attention = propagate(attention, self_attention, grid, preset.propagation_steps)
        return attention.cpu(), features.cpu()

    def _finish(self, item: _Pending, call: _Call) -> Result:
        """Stitch an image's views and run the mask head: the image's :class:`Result`."""
        start = time.perf_counter()
        layout, preset = item.layout, call.preset
        token_maps = layout.stitch_log(torch.cat(item.attention), preset.attention_factor)
        features = layout.stitch(torch.cat(item.features), preset.feature_factor)
        attention = class_attention(
            token_maps, call.weights, normalization=preset.attention_normalization, scale=call.scale
        )
        head = segment_scores(features, resize_maps(attention, layout.grid_shape(preset.feature_factor)), preset)
        image = item.image
        labels = _labels(head.scores, image, preset, head.present)
        classes = len(call.vocabulary)
        labels[labels >= classes] = BACKGROUND  # won by a background word
        item.seconds += time.perf_counter() - start
        return Result(
            classes=[c.name for c in call.vocabulary],
            labels=labels,
            attention=attention[:classes].numpy(),
            image=image,
            grid_scores=head.scores[:classes],
            preset=preset,
            vocabulary=call.vocabulary,
            model=self.model_id,
            source=item.source,
            timings={"seconds": round(item.seconds, 4)},
            preset_name=call.preset_name,
            warnings=list(call.warnings),
            absent=[
                c.name for c, here in zip(call.vocabulary, head.present[:classes].tolist(), strict=True) if not here
            ],
            runtime={
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size,
                "family": self.family.name,
                "backbone": self.backbone.kind,
                "encoder": self.encoder_id,
                "noise": call.noise,
            },
            features=features if call.keep_features else None,
        )

    def segment_batch(
        self,
        images: Sequence[ImageInput],
        classes: ClassesInput,
        *,
        preset: str | Preset | None = None,
        errors: str = "raise",
        progress: Callable[[Result | ImageLoadError], object] | None = None,
        keep_features: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> list[Result | ImageLoadError]:
        """Segment several images with one class list; their views share the backbone's batches.

        Arguments:
            images: paths, PIL images or ``(H, W[, 3|4])`` arrays.
            classes: ``"road, sky, person|pedestrian"`` or a list of names (or of
                synonym lists).
            preset: overrides this segmenter's preset for the call.
            errors: ``"raise"`` stops at the first unreadable image; ``"return"`` puts
                the :class:`ImageLoadError` in that image's place and goes on.
            progress: optional callable, called with each finished item.
            keep_features: also return each image's stitched features (``Result.features``).
            cancel: optional callable asked before every batch of views; when it returns true
                the call stops with :class:`SegmentationCancelled` (results so far went to
                ``progress``).

        Returns:
            One :class:`Result` (or error) per image, in order.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        vocabulary, preset = self.check_inputs(classes, preset)
        with _evaluation_mode([self.encoder, *self.backbone.modules().values()]):
            return self._segment_batch(images, vocabulary, preset, errors, progress, keep_features, cancel)

    def _segment_batch(
        self,
        images: Sequence[ImageInput],
        vocabulary: list[ClassName],
        preset: Preset,
        errors: str,
        progress: Callable[[Result | ImageLoadError], object] | None,
        keep_features: bool,
        cancel: Callable[[], bool] | None,
    ) -> list[Result | ImageLoadError]:
        prompted = [*vocabulary, *background_classes(vocabulary, preset.background_words)]
        batches, text = self._prompts(prompted, preset.separator)
        mass = preset.attention_normalization != "max"  # probabilities: a word's tokens' mass, not their mean
        weights = self.backbone.class_weights(batches, preset, "sum" if mass else "mean").flatten(1)  # (C, P*K)
        used = weights.sum(dim=0) > 0
        call = _Call(
            vocabulary=vocabulary,
            preset=preset,
            weights=weights[:, used],
            scale=self.card.class_scale(prompted) ** preset.calibration_strength
            if preset.attention_normalization == "calibrated"
            else None,
            keep_features=keep_features,
            warnings=self.warnings(vocabulary),
            preset_name=self.preset_name(preset)[0],
            noise=self.noise_levels(preset),
        )
        unit = max(self.backbone.block, preset.attention_factor, preset.feature_factor)

        results: list[Result | ImageLoadError | None] = [None] * len(images)
        queue: list[tuple[_Pending, int]] = []  # (image, view index) not yet through the backbone
        pending: list[_Pending] = []
        for index, image in enumerate(images):
            source = str(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else None
            try:
                picture = load_image(image, limits=self.limits)
            except ImageLoadError as error:
                if errors == "raise":
                    raise
                results[index] = error
                if progress:
                    progress(error)
                continue
            layout = ViewLayout.for_image(picture.size, preset.size, unit, preset.window_overlap)
            key = LatentCache.key(picture, layout)
            cached = self.latent_cache.get(key)
            latents = list(cached) if cached is not None else [None] * len(layout.offsets)
            item = _Pending(index=index, image=picture, layout=layout, source=source, key=key, latents=latents)
            pending.append(item)
            queue.extend((item, v) for v in range(len(layout.offsets)))

        crops: dict[int, torch.Tensor] = {}
        for start in range(0, len(queue), self.batch_size):
            if cancel is not None and cancel():
                raise SegmentationCancelled(f"stopped after {start} of {len(queue)} views")
            chunk = queue[start : start + self.batch_size]
            began = time.perf_counter()
            self._encode_missing(chunk, crops)
            attention, features = self.capture(torch.stack([item.latents[v] for item, v in chunk]), text, preset)
            attention = attention.flatten(1, 2)[:, used]
            share = (time.perf_counter() - began) / len(chunk)
            for row, (item, _) in enumerate(chunk):
                item.attention.append(attention[row : row + 1])
                item.features.append(features[row : row + 1])
                item.seconds += share
            while pending and len(pending[0].attention) == len(pending[0].layout.offsets):
                done = pending.pop(0)
                results[done.index] = self._finish(done, call)
                if progress:
                    progress(results[done.index])
        return results  # type: ignore[return-value]

    def _prompts(self, prompted: list[ClassName], separator: str) -> tuple[list[PromptBatch], TextConditioning]:
        """The vocabulary's prompt batches and their conditioning, encoded once per vocabulary (LRU)."""
        key = (tuple(prompted), separator)
        cached = self.text_cache.get(key)
        if cached is None:
            batches = self.build_prompts(prompted, separator)
            cached = (batches, self.encode_prompts(batches))
            self.text_cache.put(key, cached)
        return cached

    def _encode_missing(self, chunk: list[tuple[_Pending, int]], crops: dict[int, torch.Tensor]) -> None:
        """VAE-encode the views of ``chunk`` that the latent cache did not have, in one batch."""
        missing = [(item, v) for item, v in chunk if item.latents[v] is None]
        if not missing:
            return
        for item, _ in missing:
            if item.index not in crops:
                crops[item.index] = item.layout.crops(item.image)
        encoded = self.encode_views(torch.stack([crops[item.index][v] for item, v in missing]))
        for (item, v), latent in zip(missing, encoded, strict=True):
            item.latents[v] = latent
            if all(latent is not None for latent in item.latents):
                self.latent_cache.put(item.key, torch.stack(item.latents))
                crops.pop(item.index, None)

    def __call__(self, image: ImageInput, classes: ClassesInput, *, preset: str | Preset | None = None) -> Result:
        """Segment one image: ``seg("street.jpg", classes=["road", "sky"])`` -> :class:`Result`."""
        return self.segment_batch([image], classes, preset=preset)[0]


@contextmanager
def _evaluation_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Dropout off for one call (a pipeline shared through ``from_pipe`` may be in training mode), every
    module's own flag restored afterwards."""
    training = [m for module in modules for m in module.modules() if m.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def _labels(scores: torch.Tensor, image: Image.Image, preset: Preset, present: torch.Tensor) -> np.ndarray:
    """``(H, W)`` int64 argmax over the ``present`` classes of the scores upsampled to ``image`` (and refined on
    it where the preset says), a band of rows at a time.

    Only the present classes are upsampled and refined: the others cannot be labels, and both steps work on
    each class's map alone, so leaving them out changes no label.
    """
    height, width = image.height, image.width
    labels = np.empty((height, width), dtype=np.int64)
    threshold = preset.background_threshold
    kept = present.nonzero().flatten()  # (P,) class indices
    scores = scores[kept]
    for top in range(0, height, LABEL_ROWS):
        rows = slice(top, min(top + LABEL_ROWS, height))
        if preset.refinement_on_image == "pamr":
            band = refined_rows(scores, image, rows, preset.image_refine_steps, preset.image_refine_dilations)
        else:
            band = upsample_rows(scores, (height, width), rows)
        best, index = band.max(dim=0)
        label = kept[index]
        if threshold is not None:
            label = torch.where(best < threshold, BACKGROUND, label)
        labels[rows] = label.numpy()
    return labels

"""The toy world: a procedural scene generator and a small text-to-image model trained on it.

The project cannot download Stable Diffusion, so it trains its own small latent diffusion
model on captioned procedural scenes (never on masks) and asks MaskDiffusion to segment that
world zero-shot. ``world`` makes the scenes and ``gate`` checks the segmentation on them;
how the bundled model was trained, probed and sampled lives beside the package, in the
repository's ``research/`` folder (not installed).
"""

from .world import BACKGROUNDS, CLASS_NAMES, IMAGE_SIZE, SHAPES, Scene, eval_seed, make_scene, train_seed

__all__ = ["BACKGROUNDS", "CLASS_NAMES", "IMAGE_SIZE", "SHAPES", "Scene", "eval_seed", "make_scene", "train_seed"]

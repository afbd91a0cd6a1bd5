"""The toy world: a procedural scene generator and a small text-to-image model trained on it.

The project cannot download Stable Diffusion, so it trains its own small latent diffusion
model on captioned procedural scenes (never on masks) and asks MaskDiffusion to segment that
world zero-shot. ``world`` makes the scenes, ``train`` trains and saves the model in the
diffusers Stable-Diffusion layout, ``probe`` measures quickly whether its cross-attention
localises the caption's words.
"""

from .world import BACKGROUNDS, CLASS_NAMES, IMAGE_SIZE, SHAPES, Scene, eval_seed, make_scene, train_seed

__all__ = ["BACKGROUNDS", "CLASS_NAMES", "IMAGE_SIZE", "SHAPES", "Scene", "eval_seed", "make_scene", "train_seed"]

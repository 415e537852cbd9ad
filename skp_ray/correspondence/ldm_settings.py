"""SPEC 3's published settings, and which of a run's settings a stored context or a prediction depends on.

Torch-free: the correspondence job's driver checks its settings and keys the
context store with these before any model code is imported; ``ldm_maps``, the
optimisation and the localisation take their defaults from here.
"""

from __future__ import annotations

LDM_MODEL = "CompVis/stable-diffusion-v1-4"  # SPEC 3's model
CANVAS = 512
LDM_LAYERS = (0, 1, 2, 3)  # SD 1.x: the three 16 x 16 up-block layers and the first 32 x 32 one
LDM_TOKEN = 1
OPTIMISE_NOISE_LEVEL = 42  # index into the 50 DDIM timesteps: t = 140
PUBLISHED_INFERENCE_NOISE_LEVEL = 47  # t = 40, which the published inference used whatever it was told
LDM_CROP_FRACTION = 0.9317
LDM_CROP_MARGIN = 0.15
LDM_SIGMA = 27.98

# Everything that changes a context; the store keeps one folder per distinct set.
_CONTEXT_SETTINGS = (
    "method", "model", "revision", "unet_weights", "num_steps", "lr", "restarts", "num_tokens", "sigma",
    "crop_fraction", "crop_margin", "noise_level", "image_size", "seed", "dtype", "published_quirks",
)  # fmt: skip
# What else changes a prediction: the rows' settings hash covers both.
_LOCATE_SETTINGS = ("passes",)


def context_settings(config) -> dict:
    return {**{name: getattr(config, name) for name in _CONTEXT_SETTINGS}, "layers": list(LDM_LAYERS), "token": LDM_TOKEN}


def locate_settings(config) -> dict:
    return {**context_settings(config), **{name: getattr(config, name) for name in _LOCATE_SETTINGS}}

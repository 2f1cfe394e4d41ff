"""The layer page's dream lens: one photo dreamt (the 2015 DeepDream, atlas.optvis.dream) at each layer of a site,
so the pages show the same photo at several depths. Kept in the microscope's results file as lens "dream":

    /<model>/<layer>/dream/<key>/   attrs: settings (model, weights, layer, photo, octaves, steps)
        input [H, W, 3] uint8 (the photo as dreamt on), image [H, W, 3] uint8
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import torch

from atlas.images import load_rgb
from atlas.microscope.results import lens_group
from atlas.models.classifier import Classifier
from atlas.optvis import to_uint8
from atlas.optvis.dream import OCTAVES, STEPS, dream

log = logging.getLogger(__name__)


def dream_lens(results: h5py.File, model: Classifier, layer: str, photo: str) -> bool:
    """The 2015 DeepDream of `photo` at `layer` (atlas.optvis.dream's defaults: octaves and jitter), the photo scaled
    so its longer side is the model's input size; stored unless it is. Returns whether it dreamt."""
    settings = {"model": model.name, "weights": model.weights, "layer": layer, "photo": photo}
    group = lens_group(results, model.name, layer, "dream", {**settings, "octaves": OCTAVES, "steps": STEPS})
    if "image" in group:
        return False
    log.info("%s: DeepDream on %s", layer, photo)
    picture = load_rgb(photo)
    picture.thumbnail((model.input_size, model.input_size))
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    dreamt = dream(model, pixels, layer)
    group.create_dataset("input", data=np.asarray(picture))
    group.create_dataset("image", data=to_uint8(dreamt[None].cpu())[0])  # last: marks the group complete
    results.flush()
    return True

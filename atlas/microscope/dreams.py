"""The layer page's dream lens: one photo dreamt (the 2015 DeepDream, atlas.optvis.dream) at each layer of a site,
so the pages show the same photo at several depths. Kept in the microscope's results file as lens "dream":

    /<model>/<layer>/dream/<key>/   attrs: settings (model, weights, layer, photo, octaves, steps)
        input [H, W, 3] uint8 (the photo as dreamt on), image [H, W, 3] uint8
"""

from __future__ import annotations

import logging

import h5py

from atlas.images import load_rgb
from atlas.microscope.results import lens_group
from atlas.models.classifier import Classifier
from atlas.optvis.dream import OCTAVES, STEPS, dream_picture

log = logging.getLogger(__name__)


def dream_lens(results: h5py.File, model: Classifier, layer: str, photo: str) -> bool:
    """The 2015 DeepDream of `photo` at `layer` (atlas.optvis.dream's defaults: octaves and jitter), the photo scaled
    so its longer side is the model's input size; stored unless it is. Returns whether it dreamt."""
    settings = {"model": model.name, "weights": model.weights, "layer": layer, "photo": photo}
    group = lens_group(results, model.name, layer, "dream", {**settings, "octaves": OCTAVES, "steps": STEPS})
    if "image" in group:
        return False
    log.info("%s: DeepDream on %s", layer, photo)
    picture, dreamt = dream_picture(model, load_rgb(photo), layer, model.input_size)
    group.create_dataset("input", data=picture)
    group.create_dataset("image", data=dreamt)  # last: marks the group complete
    results.flush()
    return True

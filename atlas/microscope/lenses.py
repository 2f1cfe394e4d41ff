"""The optimised lenses: each unit's feature visualisation, and the layer's DeepDream and caricatures."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import h5py
import numpy as np
import torch

from atlas import AtlasError
from atlas.config import Settings
from atlas.images import UNREADABLE, ImageRecord, load_rgb, to_model_input
from atlas.microscope.results import lens_group
from atlas.models.classifier import Classifier
from atlas.optvis import PARAM, TRANSFORMS, choose_batch_size, forward, model_device, optimize_images
from atlas.optvis.objectives import Objective, caricature, channel, deepdream, diversity, neuron
from atlas.optvis.param import param_spec
from atlas.optvis.transform import image_key, preset
from atlas.progress import progress as progress_of
from atlas.runtime import resolve
from atlas.store import STR, store_finished

log = logging.getLogger(__name__)

SIZE = 128  # lucid's default image size, param.image(128)
STEPS = 512  # lucid's render_vis threshold (reference 2.1)
CARICATURES = 4  # photos caricatured per layer when none are given
DIVERSE = 4  # images per unit in the diversity lens, and the weight of the diversity term: lucid's diversity
DIVERSITY_WEIGHT = 100.0  # notebook (batch of 4, channel - 1e2 * diversity; ours is sign-flipped, so +)


@dataclass(frozen=True)
class LensSettings(Settings):
    """How every optimised lens of a layer is rendered (`atlas run microscope`'s flags): unit visualisations,
    DeepDream and caricatures. Validated when made; size and steps are lucid's (128 px, 512 steps); `lr` None is the
    parameterisation's own (atlas.optvis.param). `record()` is what the results file keys the lens by, so other
    settings are other results.
    """

    size: int = SIZE
    steps: int = STEPS
    transforms: str = TRANSFORMS
    param: str = PARAM
    lr: float | None = None
    seed: int = 0

    bounds = {"size": (1, None), "steps": (0, None), "seed": (0, None)}

    def validate(self) -> None:
        preset(self.transforms, self.size)  # validates the name
        if self.lr is None:
            object.__setattr__(self, "lr", param_spec(self.param).lr)  # also validates the parameterisation

    def record(self) -> dict:
        return asdict(self)

    def optimiser_options(self) -> dict:
        """The keyword arguments of `optimize_images` these settings fix."""
        stack = preset(self.transforms, self.size)
        return dict(size=self.size, steps=self.steps, transforms=stack, param=self.param, lr=self.lr)


def parse_units(spec: str | int | None, channels: int) -> list[int]:
    """None: every unit; "N" (or an int): the first N; "3,7,10-20": those units, in the order given."""
    if spec is None:
        return list(range(channels))
    text = str(spec).strip()
    try:
        if re.fullmatch(r"\d+", text):
            units = list(range(int(text)))
        else:
            units = []
            for part in filter(None, (p.strip() for p in text.split(","))):
                first, _, last = part.partition("-")
                units += list(range(int(first), int(last or first) + 1))
    except ValueError as err:
        raise AtlasError(f"--units {spec!r} is not a count or a list such as 3,7,10-20") from err
    units = list(dict.fromkeys(units))
    if not units:
        raise AtlasError(f"--units {spec!r} selects no unit")
    outside = [u for u in units if not 0 <= u < channels]
    if outside:
        raise AtlasError(f"units {outside[:5]} are outside the layer's {channels} channels (0..{channels - 1})")
    return units


# The unit lenses (Microscope's unit-level feature visualisations): the results group each is kept in, and how
# many images it makes per unit
UNIT_LENSES = {"channel": ("units", 1), "neuron": ("neurons", 1), "diversity": ("diversity", DIVERSE)}


def checked_lenses(lenses: Sequence[str] | None) -> list[str]:
    """The unit lenses to render, in UNIT_LENSES' order (None: all); an AtlasError naming an unknown one, or when
    "channel", the lens every unit page is made of, is left out."""
    chosen = set(UNIT_LENSES if lenses is None else lenses)
    unknown = sorted(chosen - set(UNIT_LENSES))
    if unknown:
        raise AtlasError(f"unknown unit lens {', '.join(unknown)}: choose from {', '.join(UNIT_LENSES)}")
    if "channel" not in chosen:
        raise AtlasError("the channel lens makes the unit pages: keep it in --lenses")
    return [kind for kind in UNIT_LENSES if kind in chosen]


def unit_objective(kind: str, layer: str, units: Sequence[int]) -> Objective:
    """The objective of one batch of a unit lens, one image per unit (per UNIT_LENSES' count for diversity):
    channel: the mean over the map; neuron: the centre position only; diversity: the channel objective of each of
    DIVERSE images per unit, plus lucid's diversity term within each unit's images."""
    if kind == "channel":
        return channel(layer, list(units))
    if kind == "neuron":
        return neuron(layer, list(units))
    if kind == "diversity":
        repeated = [unit for unit in units for _ in range(DIVERSE)]
        return channel(layer, repeated) + DIVERSITY_WEIGHT * diversity(layer, group=DIVERSE)
    raise AtlasError(f"unknown unit lens {kind!r}: choose from {', '.join(UNIT_LENSES)}")


def unit_lens_group(results: h5py.File, model: Classifier, layer: str, kind: str, settings: LensSettings) -> h5py.Group:
    """The results group of the `kind` unit lens (UNIT_LENSES) of `layer` for these settings."""
    record = {"model": model.name, "weights": model.weights, "layer": layer, **settings.record()}
    if kind == "diversity":
        record |= {"images": DIVERSE, "weight": DIVERSITY_WEIGHT}
    return lens_group(results, model.name, layer, UNIT_LENSES[kind][0], record)


def render_units(
    group: h5py.Group,
    model: Classifier,
    layer: str,
    units: Sequence[int],
    channels: int,
    settings: LensSettings,
    *,
    kind: str = "channel",
    batch_size: int | None = None,
    progress: bool = True,
) -> int:
    """Render the `kind` lens (UNIT_LENSES) of each of `units` not yet done in `group`; returns how many it rendered.

    Stored per unit: images [S, S, 3] (or [n, S, S, 3] for a lens of n images per unit) and their objective.
    Unit u's image i always starts from the random key (seed, u, i), so it does not depend on which run or batch
    renders it. Results are written and flushed after every batch.
    """
    side, per_unit = settings.size, UNIT_LENSES[kind][1]
    many = (per_unit,) if per_unit > 1 else ()
    if "done" not in group:
        group.create_dataset(
            "images",
            shape=(channels, *many, side, side, 3),
            dtype=np.uint8,
            chunks=(1, *many, side, side, 3),
            fillvalue=255,
        )
        group.create_dataset("objective", data=np.full((channels, *many), np.nan, np.float32))
        group.create_dataset("done", data=np.zeros(channels, bool))
    done = group["done"][()]
    todo = [u for u in units if not done[u]]
    log.info(
        "%s %s: %d of %d units to visualise (%d done before)",
        layer,
        kind,
        len(todo),
        len(units),
        len(units) - len(todo),
    )
    if not todo:
        return 0
    mixed_precision = resolve("render", model_device(model)).precision == "bf16"
    options = {**settings.optimiser_options(), "mixed_precision": mixed_precision}

    def keys(batch: Sequence[int]) -> list[int]:
        return [image_key(settings.seed, unit, attempt) for unit in batch for attempt in range(per_unit)]

    if batch_size is None:

        def probe(n: int) -> object:
            trial = {**options, "steps": 2}
            return optimize_images(model, unit_objective(kind, layer, [todo[0]] * n), keys([todo[0]] * n), **trial)

        batch_size = max(1, choose_batch_size(model, probe) // per_unit)
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    for batch in progress_of(batches, desc=f"{kind} {layer}", unit="batch", disable=not progress):
        images, (values,) = optimize_images(model, unit_objective(kind, layer, batch), keys(batch), **options)
        images = images.reshape(len(batch), *many, side, side, 3)
        values = values.reshape(len(batch), *many)
        store_finished(group, (np.asarray(batch),), ("images", images), {"objective": values}, "done")
    return len(todo)


def photo_inputs(paths: Sequence[str], model: Classifier, size: int) -> torch.Tensor:
    """Photos [P, 3, size, size] as the model sees them, scaled to `size` px so a caricature's map lines up."""
    resize = round(model.resize_size * size / model.input_size)
    return torch.stack([to_model_input(load_rgb(path, min_side=resize), resize, size) for path in paths])


def layer_lenses(
    results: h5py.File,
    model: Classifier,
    layer: str,
    photos: Sequence[str],
    settings: LensSettings,
) -> int:
    """DeepDream of `layer` and caricatures of `photos` (lucid's recipe, reference 2.5); stored unless they are.

    Returns the number of images rendered (0 when both were stored already).
    """
    common = {"model": model.name, "weights": model.weights, "layer": layer, **settings.record()}
    bf16 = resolve("render", model_device(model)).precision == "bf16"
    options = {**settings.optimiser_options(), "mixed_precision": bf16}
    rendered = 0
    dream = lens_group(results, model.name, layer, "deepdream", common)
    if "image" not in dream:
        log.info("%s: DeepDream", layer)
        images, (values,) = optimize_images(model, deepdream(layer), [image_key(settings.seed, 0)], **options)
        dream.attrs["objective"] = float(values[0])
        dream.create_dataset("image", data=images[0])
        rendered += 1
    cartoons = lens_group(results, model.name, layer, "caricature", {**common, "photos": list(photos)})
    if photos and "images" not in cartoons:
        log.info("%s: caricatures of %d photos", layer, len(photos))
        inputs = photo_inputs(photos, model, settings.size).to(model_device(model))
        with torch.no_grad():
            reference = forward(model, inputs, [layer])[layer].float()
        keys = [image_key(settings.seed, index) for index in range(len(photos))]
        images, (values,) = optimize_images(model, caricature(layer, reference), keys, **options)
        cartoons.create_dataset("photos", data=np.array(list(photos), dtype=object), dtype=STR)
        cartoons.create_dataset(
            "inputs", data=(inputs.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        )
        cartoons.create_dataset("objective", data=values.astype(np.float32))
        cartoons.create_dataset("images", data=images)  # last: marks the group complete
        rendered += len(photos)
    results.flush()
    return rendered


def default_photos(records: list[ImageRecord], count: int) -> list[str]:
    """`count` readable photos spread evenly over the image list (unreadable ones are passed over)."""
    chosen: list[str] = []
    for index in np.linspace(0, len(records), num=min(count, len(records)), endpoint=False).astype(int):
        for record in records[index:] + records[:index]:
            if record.path in chosen:
                continue
            try:
                load_rgb(record.path, min_side=64)
            except UNREADABLE:
                continue
            chosen.append(record.path)
            break
    return chosen

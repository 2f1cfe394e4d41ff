"""Feature visualisation (after lucid's optvis): images optimised so that a Classifier maximises an objective.

Split as in lucid: `param` (how an image is parameterised), `transform` (random transforms that make
the result robust), `objectives` (what to maximise, one value per image). This module runs the
optimisation; `visualize` is the one-call entry point:

    from atlas.optvis import objectives, visualize
    images, values = visualize(model, objectives.channel("mixed4c", [447, 3]), batch=2, size=128)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from atlas import AtlasError
from atlas.models.classifier import Classifier, capture
from atlas.optvis.objectives import LOGITS, Activations, Objective
from atlas.optvis.param import RADIUS, ImageParam, image
from atlas.optvis.transform import ImageRandom, Transform, collapse_alpha, compose, image_key, preset

# lucid's: on Lite0 it kept the best atlas-icon cosine from noise (0.86 vs phase 0.75) and, with crops, the best
# Lite1 top-1 on 64 class logits at 64 steps (0.70 vs phase 0.67, pixel 0.31) (benchmarks/results.md, quality).
# Each parameterisation names its optimiser and learning rate (param.PARAMS).
PARAM = "fft"
# lucid's standard stack after random crops of 50-100 % of the side: with it, Lite1 recognised 0.97 of 64 Lite0
# class-logit visualisations (128 px, 256 steps), 0.50 with lucid's stack alone (benchmarks/results.md, quality)
TRANSFORMS = "crops"
DEFAULT_CPU_BATCH = 16  # images per batch on CPU (benchmarks/bench_render.py)
MAX_BATCH = 512  # beyond a few hundred 80-px icons a GPU gains nothing, and a batch is the unit of resumption
PROBE_BATCH = 8  # images in the trial that measures GPU memory per image
MEMORY_FRACTION = 0.8  # of the free GPU memory, leaving room for allocator fragmentation


class _StopForwardError(Exception):
    """Raised by a hook once every layer an objective reads is recorded, so later layers are not computed."""


def forward(model: Classifier, images: torch.Tensor, layers: Sequence[str]) -> Activations:
    """Run `model` on [0, 1] `images` and return the activations of `layers` (and `LOGITS` when asked).

    Without LOGITS the forward pass stops after the last layer needed, as lucid's graphs compute only
    what the objective depends on.
    """
    wanted = [name for name in dict.fromkeys(layers) if name != LOGITS]
    with capture(model, wanted) as acts:
        stops = []
        if LOGITS not in layers:

            def stop_when_complete(*_):
                if len(acts) == len(wanted):
                    raise _StopForwardError

            # registered after capture's hooks, so each module records before it is checked
            stops = [model.layer_module(name).register_forward_hook(stop_when_complete) for name in wanted]
        try:
            logits = model(images)
        except _StopForwardError:
            logits = None
        finally:
            for hook in stops:
                hook.remove()
        recorded = dict(acts)
    if logits is not None:
        recorded[LOGITS] = logits
    return recorded


def layer_map(model: Classifier, layer: str, size: int) -> tuple[int, int, int]:
    """(channels, height, width) of `layer` for a `size` px input; AtlasError when it is no activation map."""
    try:
        acts = forward(model, torch.zeros(1, 3, size, size, device=model_device(model)), [layer])[layer]
    except RuntimeError as err:
        raise AtlasError(f"{size} px is too small for {model.name} layer {layer}: {err}") from err
    if acts.dim() != 4:
        raise AtlasError(f"layer {layer} of {model.name} gives {tuple(acts.shape)}, not a [B, C, H, W] activation map")
    channels, height, width = acts.shape[1:]
    return channels, height, width


def evaluate(model: Classifier, objectives: Sequence[Objective], images: torch.Tensor) -> list[torch.Tensor]:
    """Values [B] of `objectives` on untransformed `images`, in float32 and without gradients."""
    layers = [name for objective in objectives for name in objective.layers]
    with torch.no_grad():
        acts = forward(model, images, layers)
        return [objective(acts) for objective in objectives]


def optimize(
    model: Classifier,
    objective: Objective,
    param: ImageParam,
    rand: ImageRandom,
    *,
    transforms: Sequence[Transform],
    steps: int,
    lr: float | None = None,
    mixed_precision: bool = False,
) -> None:
    """Maximise the sum over the batch of `objective` on `param`; every image follows its own value.

    The optimiser is the one `param` is tuned for (param.PARAMS), at its learning rate unless `lr` is given.

    The network runs under bfloat16 autocast when `mixed_precision`; the image, transforms and
    objective stay in float32.
    """
    transform = compose(([collapse_alpha] if param.alpha else []) + list(transforms))
    optimizer = param.optimizer(lr)
    inputs = list(param.parameters())
    device_type = param.tensor.device.type
    for _ in range(steps):
        images = transform(param(), rand)
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if mixed_precision else contextlib.nullcontext()
        with autocast:
            acts = forward(model, images, objective.layers)
        loss = -objective(acts).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=inputs)  # gradients for the image only, none for the model's weights
        optimizer.step()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W, C] uint8."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def uint8_to_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """[B, H, W, C] uint8 -> [B, C, H, W] float32 in [0, 1]: what the model sees of a stored image."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def choose_batch_size(model: torch.nn.Module, probe: Callable[[int], object]) -> int:
    """Images per batch: on CUDA as many as fit in the free memory, measured by `probe(PROBE_BATCH)`, a short trial
    of the very objective and transforms that will run on PROBE_BATCH images; on CPU, DEFAULT_CPU_BATCH."""
    device = model_device(model)
    if device.type != "cuda":
        return DEFAULT_CPU_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe(PROBE_BATCH)
    per_image = max(1.0, (torch.cuda.max_memory_allocated(device) - before) / PROBE_BATCH)
    return int(np.clip(MEMORY_FRACTION * free / per_image, 1, MAX_BATCH))


def optimize_images(
    model: Classifier,
    objective: Objective,
    keys: Sequence[int],
    *,
    size: int,
    steps: int,
    transforms: Sequence[Transform],
    param: str = PARAM,
    decorrelate: bool = True,
    alpha: bool = False,
    lr: float | None = None,
    decay_power: float = 1.0,
    mixed_precision: bool = False,
    measures: Sequence[Objective] = (),
    start: np.ndarray | None = None,
    radius: float = RADIUS,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Optimise one image per random key; returns (uint8 [B, H, W, 3 or 4], values of [objective, *measures]).

    decay_power: the fft parameterisation's spectrum (param.image). The values are measured on the final
    images as stored (quantised, untransformed); with alpha, over black. start: uint8 [B, size, size, 3]
    images to accentuate instead of noise, each kept within `radius` of its start (param.image).
    """
    device = model_device(model)
    rand = ImageRandom(keys, device)
    images = image(
        size,
        rand,
        param=param,
        decorrelate=decorrelate,
        alpha=alpha,
        decay_power=decay_power,
        start=None if start is None else uint8_to_tensor(start, device),
        radius=radius,
    )
    optimize(model, objective, images, rand, transforms=transforms, steps=steps, lr=lr, mixed_precision=mixed_precision)
    final = to_uint8(images())
    seen = uint8_to_tensor(final, device)
    if alpha:
        seen = seen[:, :3] * seen[:, 3:]
    values = evaluate(model, [objective, *measures], seen)
    return final, [value.cpu().numpy() for value in values]


def visualize(
    model: Classifier,
    objective: Objective,
    *,
    size: int = 128,  # lucid's default image size
    batch: int = 1,
    steps: int = 512,  # lucid's render_vis default threshold
    transforms: str | Sequence[Transform] = TRANSFORMS,
    param: str = PARAM,
    decorrelate: bool = True,
    alpha: bool = False,
    lr: float | None = None,
    decay_power: float = 1.0,
    seed: int = 0,
    mixed_precision: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Optimise `batch` images of `size` px to maximise `objective`, on the model's device.

    Returns (images uint8 [B, H, W, 3 or 4], final objective [B], measured as in `optimize_images`).
    Image b starts from the random key (seed, b), so a batch of one repeats the first image of a larger
    batch. mixed_precision: bfloat16 autocast; by default on CUDA only.
    """
    if mixed_precision is None:
        mixed_precision = model_device(model).type == "cuda"
    images, (values,) = optimize_images(
        model,
        objective,
        [image_key(seed, index) for index in range(batch)],
        size=size,
        steps=steps,
        transforms=preset(transforms, size),
        param=param,
        decorrelate=decorrelate,
        alpha=alpha,
        lr=lr,
        decay_power=decay_power,
        mixed_precision=mixed_precision,
    )
    return images, values

"""Image input: folders, lists of paths and the bundled demo photos, read robustly.

Every image PIL can decode is used (grayscale, RGBA, CMYK, palette, 16-bit, tiny); one that cannot be
read, or that would decode to more than `MAX_PIXELS`, is reported as skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from atlas import AtlasError
from atlas.classes import imagenet_wnids, normal_name
from atlas.progress import progress as progress_of

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
WNID = re.compile(r"^(n\d{8})")
# the most pixels an image may decode to: Pillow's own bomb bound (89.5 Mpx, 268 MB as RGB). A few-kilobyte PNG
# can declare 200 Mpx; it is refused from its header, before any pixel is decoded. Large JPEGs decode at 1/2..1/8
# size (`Image.draft`), so a JPEG counts by its reduced size.
MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS  # Pillow's default; None (no bound) is a user's choice
# what load_rgb raises for a file that is no readable image (or one too large to decode)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to report, not grey pixels


@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int = -1


def images_identity(paths: list[str]) -> str:
    """A digest of the image list: each path with its file's size, so that a photo replaced under the same name
    makes the products made from it stale. Not the modification time: a copied or re-extracted dataset keeps its
    store. A missing file counts as size -1 (reading it is what reports it)."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        digest.update(f"{path}\t{size}\n".encode())
    return digest.hexdigest()


def list_images(
    data: str | Path, class_names: list[str] | None = None, imagenet_index: list[int] | None = None
) -> list[ImageRecord]:
    """The images of a data source, in a deterministic order.

    data: "demo", a folder (recursive; a class sub-folder or a leading WordNet id gives the label),
    or a text file with one image path per line (relative paths are relative to the file).
    class_names: the model's, for class-named sub-folders. imagenet_index: the model's class index of each
    ImageNet-1k class (`Classifier.imagenet_index`), for models whose logits are in another order; WordNet
    ids and the demo photos' labels are ImageNet-1k indices.
    """
    if str(data) == "demo":
        return demo_images(imagenet_index)
    path = Path(data)
    if path.is_dir():
        return _folder_images(path, class_names or [], imagenet_index)
    if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        lines = [line.strip() for line in path.read_text().splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
        return [
            ImageRecord(str((path.parent / entry).resolve()), _label_from_name(entry, {}, imagenet_index))
            for entry in entries
        ]
    if path.is_file():
        return [ImageRecord(str(path), -1)]
    raise AtlasError(f"data source {data!r} is neither 'demo', a folder, nor a file of image paths")


def _folder_images(root: Path, class_names: list[str], imagenet_index: list[int] | None) -> list[ImageRecord]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AtlasError(f"no images found under {root}")
    # ImageFolder convention: a top-level sub-folder is a class; its index is the model's class when the
    # name is a WordNet id or a class name, else its position among the sorted sub-folders
    folders = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    by_name = {normal_name(name): i for i, name in enumerate(class_names)}
    folder_label = {}
    for i, folder in enumerate(folders):
        label = _label_from_name(folder, by_name, imagenet_index)
        folder_label[folder] = label if label >= 0 else i
    records = []
    for p in files:
        parts = p.relative_to(root).parts
        label = folder_label[parts[0]] if len(parts) > 1 else _label_from_name(p.stem, {}, imagenet_index)
        records.append(ImageRecord(str(p), label))
    return records


def _label_from_name(name: str, by_name: dict[str, int], imagenet_index: list[int] | None) -> int:
    """Class index from a WordNet-id prefix (`n01484850_great_white_shark`) or an exact class name."""
    match = WNID.match(Path(name).name)
    if match:
        try:
            return _model_label(imagenet_wnids().index(match.group(1)), imagenet_index)
        except ValueError:
            return -1
    return by_name.get(normal_name(name), -1)


def _model_label(imagenet_label: int, imagenet_index: list[int] | None) -> int:
    return imagenet_label if imagenet_index is None else imagenet_index[imagenet_label]


def demo_images(imagenet_index: list[int] | None = None) -> list[ImageRecord]:
    """Photos that installed packages ship, so the default run works offline.

    foolbox's 20 ImageNet validation photos (label index in the file name) and scikit-learn's two
    sample photos (unlabelled).
    """
    records = []
    spec = importlib.util.find_spec("foolbox")
    if spec and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        for p in sorted(folder.glob("imagenet_*")):
            label = int(p.stem.split("_")[-1])  # an ImageNet-1k index
            records.append(ImageRecord(str(p), _model_label(label, imagenet_index)))
    spec = importlib.util.find_spec("sklearn")
    if spec and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
        records += [ImageRecord(str(p), -1) for p in sorted(folder.glob("*.jpg"))]
    if not records:
        raise AtlasError("no demo photos found: install the project with `make install` (foolbox, scikit-learn)")
    return records


def load_rgb(path: str | Path, min_side: int | None = None, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode any image PIL can read into 8-bit RGB.

    Transparent images are composited on mid-grey (the colour the renderer pads with); 16-bit and
    float images are rescaled; EXIF rotation is applied. `min_side` lets a JPEG decode at reduced size
    (its short side stays >= min_side). Raises OSError or ValueError (with PIL's reason) for unreadable
    files, and DecompressionBombError, before decoding, for one that would decode to over `max_pixels`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings on odd metadata (and its bomb warning) say nothing here
        image: Image.Image = Image.open(path)  # an ImageFile, replaced by plain Images below
        if min_side and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} is {image.width * image.height} pixels, over the bound of {max_pixels}"
            )
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        span = pixels.max() - pixels.min()
        pixels = (pixels - pixels.min()) / (span if span > 0 else 1.0) * 255.0
        image = Image.fromarray(pixels.astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        image = Image.alpha_composite(background, rgba)
    if image.width == 0 or image.height == 0:
        raise ValueError("image has no pixels")
    return image.convert("RGB")


def to_model_input(image: Image.Image, resize_size: int, crop_size: int) -> torch.Tensor:
    """Resize the short side to `resize_size`, centre-crop `crop_size`: a float (3, H, W) tensor in [0, 1]."""
    scale = resize_size / min(image.size)
    width, height = max(crop_size, round(image.width * scale)), max(crop_size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (width - crop_size) // 2, (height - crop_size) // 2
    image = image.crop((left, top, left + crop_size, top + crop_size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Records -> (row, image tensor) pairs; an unreadable image yields (row, None, reason)."""

    def __init__(self, records: list[ImageRecord], resize_size: int, crop_size: int, start: int = 0):
        self.records = records
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.start = start  # row of records[0] in the whole image list

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_rgb(self.records[i].path, min_side=self.resize_size)
            return self.start + i, to_model_input(image, self.resize_size, self.crop_size), ""
        except UNREADABLE as err:
            return self.start + i, None, f"{type(err).__name__}: {err}".splitlines()[0]


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    """Stack the readable images; pass the unreadable ones on as (row, reason)."""
    good = [(row, tensor) for row, tensor, _ in items if tensor is not None]
    skipped = [(row, reason) for row, tensor, reason in items if tensor is None]
    rows = [row for row, _ in good]
    batch = torch.stack([tensor for _, tensor in good]) if good else None
    return rows, batch, skipped


def load_batches(
    records: list[ImageRecord],
    resize_size: int,
    input_size: int,
    batches: list[list[int]],
    workers: int | None,
    start: int = 0,
    progress: bool | None = None,
    pin_memory: bool = False,
    desc: str = "images",
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """(rows, image batch, skipped) per batch of rows, decoded in `workers` processes (None: up to 4) as a model
    of these sides sees them; `records` holds the rows from `start` on. pin_memory (for a GPU) lets the copy to the
    device run asynchronously."""
    dataset = ImageDataset(records, resize_size, input_size, start=start)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[[row - start for row in batch] for batch in batches],
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    total = len(batches)
    yield from progress_of(loader, total=total, desc=desc, unit="batch", disable=total == 0 or progress is False)

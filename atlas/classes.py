"""Class names: the label sets the models use (ImageNet-1k, lucid InceptionV1's 1008 logits, Places365's scenes),
and what a user types ("Great White Shark", "great_white_shark", "2", "n01484850") resolved to an index."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from atlas import AtlasError

INCEPTIONV1_LOGITS = 1008  # lucid's InceptionV1 head: 1000 ImageNet classes, a 'dummy' and 7 unused
PLACES365_LOGITS = 365


@cache
def _imagenet_lines() -> tuple[tuple[str, str], ...]:
    """(wnid, name) of the 1000 ImageNet-1k classes, in logit order, from the shipped label file."""
    lines = Path(__file__).with_name("imagenet_classes.txt").read_text().splitlines()
    pairs = (line.split(" ", 1) for line in lines if line and not line.startswith("#"))
    return tuple((wnid, name) for wnid, name in pairs)


def imagenet_wnids() -> list[str]:
    """The WordNet ids of the 1000 ImageNet-1k classes, in the standard logit order."""
    return [wnid for wnid, _name in _imagenet_lines()]


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard (torchvision) logit order."""
    return [name for _wnid, name in _imagenet_lines()]


def normal_name(name: str) -> str:
    """Lower-case letters and digits only: how names are compared ("Great-White_Shark", "greatwhiteshark" and
    "great white shark" are one name)."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to `n` distinct candidates that `word` may have meant, best first: those whose normal name contains the
    word's, then the nearest by edit distance on normal names (within a third of the word's length, at least 2), of a
    length nearest the word's."""
    wanted = normal_name(word)
    scored = []
    for candidate in dict.fromkeys(candidates):
        normal = normal_name(candidate)
        distance = edit_distance(wanted, normal)
        if wanted and wanted in normal or distance <= max(2, len(wanted) // 3):
            scored.append((wanted not in normal, distance, abs(len(normal) - len(wanted)), candidate))
    return [candidate for *_score, candidate in sorted(scored, key=lambda item: item[:3])][:n]


def resolve_class(name_or_index: str | int, class_names: list[str]) -> int:
    """Index of a class given by index, by ImageNet WordNet id (n01484850), or by name in any case, spacing or
    punctuation. An unknown name gets an AtlasError with the closest names as suggestions."""
    text = str(name_or_index).strip()
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < len(class_names):
            raise AtlasError(f"class index {index} is out of range 0..{len(class_names) - 1}")
        return index
    if re.fullmatch(r"n\d{8}", text):
        return wordnet_class(text, len(class_names))
    normals = [normal_name(c) for c in class_names]
    if normal_name(text) in normals:
        return normals.index(normal_name(text))
    suggestions = close_matches(text, class_names)
    hint = "; did you mean " + ", ".join(repr(s) for s in suggestions) + "?"
    raise AtlasError(f"unknown class {text!r}" + (hint if suggestions else ""))


def wordnet_class(wnid: str, count: int) -> int:
    """The logit of an ImageNet-1k WordNet id in a model of `count` classes (ImageNet's 1000, or InceptionV1's)."""
    wnids = imagenet_wnids()
    if wnid not in wnids:
        raise AtlasError(f"{wnid} is not the WordNet id of an ImageNet-1k class")
    if count == len(wnids):
        return wnids.index(wnid)
    if count == INCEPTIONV1_LOGITS:
        return inceptionv1_imagenet_index(wnids)[wnids.index(wnid)]
    raise AtlasError(f"a WordNet id names an ImageNet class, and this model has {count} classes: give a name or index")


def _inceptionv1_lines() -> list[tuple[str, int, str]]:
    """(wnid, index, name) per line of the shipped label file, in logit order 1..1000."""
    lines = (Path(__file__).with_name("inceptionv1_classes.txt")).read_text().splitlines()
    rows: list[tuple[str, int, str]] = []
    for line in lines:
        if line and not line.startswith("#"):
            wnid, index, name = line.split(" ", 2)
            if int(index) != len(rows) + 1:
                raise AtlasError(f"inceptionv1_classes.txt: line for class {index} is out of order")
            rows.append((wnid, int(index), name))
    return rows


def inceptionv1_classes() -> list[str]:
    """lucid's 1008 InceptionV1 class names: 0 is 'dummy', 1..1000 from the shipped label file, 1001..1007 unused."""
    names = ["dummy"] + [name for _wnid, _index, name in _inceptionv1_lines()]
    return names + [f"unused {i}" for i in range(len(names), INCEPTIONV1_LOGITS)]


def inceptionv1_imagenet_index(imagenet_wnids: list[str]) -> list[int]:
    """For each ImageNet-1k class index (the order of `imagenet_wnids`), InceptionV1's logit of that class."""
    by_wnid = {wnid: index for wnid, index, _name in _inceptionv1_lines()}
    return [by_wnid[wnid] for wnid in imagenet_wnids]


def places365_classes() -> list[str]:
    """The 365 Places365 scene names in logit order: "airfield", ..., "apartment building/outdoor", ...

    atlas/places365_classes.txt is CSAILVision/places365's categories_places365.txt (github.com/CSAILVision/places365,
    commit 06218620), whose lines read "/a/apartment_building/outdoor 8": kept in its order, one name a line,
    without the "/a/" prefix and the index, "_" written as a space ("/outdoor" and the like name sub-categories).
    """
    names = Path(__file__).with_name("places365_classes.txt").read_text().splitlines()
    if len(names) != PLACES365_LOGITS:
        raise AtlasError(f"places365_classes.txt has {len(names)} names, not {PLACES365_LOGITS}")
    return names

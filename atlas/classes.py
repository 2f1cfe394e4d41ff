"""Class names: resolve what a user types ("Great White Shark", "great_white_shark", "2") to an index."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from atlas import AtlasError

INCEPTIONV1_LOGITS = 1008  # lucid's InceptionV1 head: 1000 ImageNet classes, a 'dummy' and 7 unused


def squash_name(name: str) -> str:
    """Lower case, with runs of spaces, '_' and '-' as one space: how names are compared."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def resolve_class(name_or_index: str | int, class_names: list[str]) -> int:
    """Index of a class given by index or by name (case, spaces, '_' and '-' are ignored).

    An unknown name gets an AtlasError with the closest names as suggestions.
    """
    text = str(name_or_index).strip()
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < len(class_names):
            raise AtlasError(f"class index {index} is out of range 0..{len(class_names) - 1}")
        return index
    squashed = [squash_name(c) for c in class_names]
    wanted = squash_name(text)
    if wanted in squashed:
        return squashed.index(wanted)
    close = difflib.get_close_matches(wanted, squashed, n=5, cutoff=0.6)
    contains = [c for c in squashed if wanted in c][:5]
    suggestions = list(dict.fromkeys(close + contains))[:5]
    hint = "; did you mean " + ", ".join(f"{class_names[squashed.index(s)]!r}" for s in suggestions) + "?"
    raise AtlasError(f"unknown class {text!r}" + (hint if suggestions else ""))


def _inceptionv1_lines() -> list[tuple[str, int, str]]:
    """(wnid, index, name) per line of the shipped label file, in logit order 1..1000."""
    lines = (Path(__file__).with_name("inceptionv1_classes.txt")).read_text().splitlines()
    rows = []
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

"""Class names as the README promises: any case, spacing or punctuation, WordNet ids; and the suggestions."""

from __future__ import annotations

import pytest

from atlas import AtlasError
from atlas.classes import (
    close_matches,
    edit_distance,
    imagenet_classes,
    imagenet_wnids,
    inceptionv1_classes,
    resolve_class,
)

NAMES = imagenet_classes()


@pytest.mark.parametrize(
    "name",
    ["great white shark", "Great White Shark", "greatwhiteshark", "great-white-shark", "great_white  shark", "2"],
)
def test_any_case_spacing_punctuation_or_hyphens_name_the_class(name):
    assert resolve_class(name, NAMES) == 2


def test_hyphenated_imagenet_names_match_with_spaces_or_underscores():
    assert NAMES[resolve_class("three_toed_sloth", NAMES)] == "three-toed sloth"


def test_a_wordnet_id_names_the_imagenet_class_in_either_head():
    assert resolve_class("n01484850", NAMES) == 2
    lucid = inceptionv1_classes()
    assert lucid[resolve_class("n01484850", lucid)] == "great white shark"
    with pytest.raises(AtlasError, match="n99999999 is not the WordNet id of an ImageNet-1k class"):
        resolve_class("n99999999", NAMES)
    with pytest.raises(AtlasError, match="this model has 10 classes"):
        resolve_class("n01484850", [f"class {k}" for k in range(10)])


def test_suggestions_rank_names_that_contain_the_word_first_and_have_no_duplicates():
    assert close_matches("shark", NAMES)[:2] == ["tiger shark", "great white shark"]
    assert close_matches("resnet5", ["resnet50", "resnet50", "resnet18", "resnet152"]) == [
        "resnet50",
        "resnet18",
        "resnet152",
    ]
    assert close_matches("_blocks.1O", [f"_blocks.{i}" for i in range(16)])[0] == "_blocks.10"
    with pytest.raises(AtlasError, match="did you mean 'great white shark'"):
        resolve_class("grate white shark", NAMES)


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0


def test_the_shipped_imagenet_labels_are_torchvisions_in_its_order_with_their_wordnet_ids():
    from torchvision.models import ResNet50_Weights

    assert ResNet50_Weights.DEFAULT.meta["categories"] == NAMES
    wnids = imagenet_wnids()
    assert len(set(wnids)) == 1000 and wnids[2] == "n01484850" and resolve_class("n01484850", NAMES) == 2

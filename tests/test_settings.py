"""The settings base's declarative checks (atlas.config.Settings): every field of every stage's settings refuses a
value of the wrong type with one AtlasError naming the field, whatever the field, and keeps a right one."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas import AtlasError
from atlas.class_atlas import ComparisonSettings, SelectSettings
from atlas.config import Settings
from atlas.layout import LayoutSettings
from atlas.microscope.lenses import LensSettings
from atlas.patch import PatchSettings
from atlas.stages.collect import CollectSettings
from atlas.stages.compose import ComposeSettings
from atlas.stages.grid import GridSettings
from atlas.stages.render import RenderSettings

CLASSES = [
    CollectSettings,
    LayoutSettings,
    GridSettings,
    RenderSettings,
    ComposeSettings,
    LensSettings,
    PatchSettings,
    SelectSettings,
    ComparisonSettings,
]
FIELDS = [(cls, field.name) for cls in CLASSES for field in dataclasses.fields(cls)]
# a value of every kind a YAML file can hold, as a config would give it
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-2.5, 2.5, allow_nan=False).filter(lambda x: x != int(x)),
    st.text(max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def _allows(hint: object, value: object) -> bool:
    """Whether `value` is of the annotated type: the rule the base must apply."""
    options = typing.get_args(hint) if typing.get_origin(hint) is not None and "|" in str(hint) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, float):
            return True
        if option is str and isinstance(value, str):
            return True
        if typing.get_origin(option) is tuple and not isinstance(value, (dict, str)) and value is not None:
            return _allows(typing.get_args(option)[0], value)
    return False


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_a_value_of_the_wrong_type_is_one_atlas_error_naming_its_field(field, value):
    cls, name = field
    allowed = _allows(typing.get_type_hints(cls)[name], value)
    try:
        made = cls(**{name: value})
    except AtlasError as err:  # a right type may still be out of range; a wrong one must be named
        assert "\n" not in str(err) and (allowed or name in str(err)), str(err)
        return
    assert allowed, f"{cls.__name__}({name}={value!r}) was accepted"
    kept = getattr(made, name)
    # kept as given, or normalised: a list to a tuple, None to what the default resolves to (LensSettings' lr)
    assert kept == value or isinstance(kept, tuple) or (value is None and kept == getattr(cls(), name)), (value, kept)


@pytest.mark.parametrize(("cls", "name"), [(cls, n) for cls, n in FIELDS if cls.bounds.get(n)])
def test_a_bounded_field_refuses_a_value_below_its_bound(cls, name):
    low = cls.bounds[name][0]
    with pytest.raises(AtlasError, match=f"{name} must be"):
        cls(**{name: low - 1})


def test_a_float_field_stores_an_integer_as_a_float_so_equal_settings_record_alike():
    assert RenderSettings(cossim_pow=4) == RenderSettings(cossim_pow=4.0)
    assert isinstance(RenderSettings(cossim_pow=4).cossim_pow, float)
    assert GridSettings(sizes=[5, 6]).sizes == (5, 6) and GridSettings(sizes=7).sizes == (7,)


def test_every_stage_settings_class_uses_the_base():
    assert all(issubclass(cls, Settings) and "__post_init__" not in vars(cls) for cls in CLASSES)

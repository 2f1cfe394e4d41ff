"""Run configuration: YAML files in configs/, read into each stage's settings class.

A config names the model, layer and data, and has one section per stage (`collect`, `project`, `grid`,
`render`, `compose`) whose keys are the fields of that stage's frozen `Settings` dataclass (`CollectSettings`,
`LayoutSettings`, `GridSettings`, `RenderSettings`, `ComposeSettings`), so an unknown, misspelt or misplaced key
(`collect: {out: ...}`) and a bad value are caught, in one line, before any work starts.
`layers: {NAME: {stage: {...}}}` overrides sections for one layer (the paper's early layers use other UMAP
settings).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import numbers
import types
import typing
from pathlib import Path
from typing import ClassVar, NoReturn, TypeVar

import yaml

from atlas import AtlasError

S = TypeVar("S", bound="Settings")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODEL = "efficientnet-lite0"
TOP_KEYS = {
    *("model", "layer", "data", "weights", "layers", "collect", "project", "grid", "render", "compose"),
    "threads",  # torch's intra-op threads (default: atlas.runtime.default_threads)
    "demo_config",  # the config (in configs/) a run uses instead when its data falls back to the demo photos
    "class_atlas",  # its sub-sections are checked by pipelines.class_atlas
    "accentuated",  # a second icon set: render settings with accentuate set (pipelines.atlas.accentuated_settings)
}


class Settings:
    """Base of a stage's frozen settings dataclass (its fields' defaults are the stage's, stated once there).

    Its checks are declarative, after scikit-learn's `_parameter_constraints`: every field's value must be of its
    annotated type (an int field takes no "50", a bool no 1; a float field takes an int and stores it as a float, so
    4 and 4.0 are one setting; a tuple field takes a list, or one item), and a field named in `bounds` must lie in
    its closed range. A subclass's `validate` then checks what depends on several fields or on a library.
    """

    bounds: ClassVar[dict[str, tuple[float, float | None]]] = {}  # field -> (low, high or None for no bound)
    section: ClassVar[str] = ""  # the config section the settings are read from, named in their errors

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            name, value = f"{self.section}: {field.name}" if self.section else field.name, getattr(self, field.name)
            if field.name in self.bounds and value is not None:
                low, high = self.bounds[field.name]
                kind = int if int in _options(hints[field.name]) else float
                value = check_number(name, value, low, high, kind=kind)
            else:
                value = _typed(name, value, hints[field.name])
            object.__setattr__(self, field.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across fields, after the types and bounds (a subclass's own)."""

    @classmethod
    def from_config(cls: type[S], values: dict, where: str | None = None) -> S:
        """The settings of a config section (or CLI flags): an unknown key is an AtlasError naming it, and the
        dataclass checks the values."""
        check_keys(values, {field.name for field in dataclasses.fields(cls)}, where or cls.__name__)  # type: ignore[arg-type]
        return cls(**values)


def _options(hint: object) -> tuple:
    """The types a field's annotation allows: (int, NoneType) for `int | None`."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _typed(name: str, value: object, hint: object) -> object:
    """`value` checked against a field's type `hint` (and a float field's int made a float); an AtlasError naming
    the field otherwise."""
    options = _options(hint)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is tuple:
            (item, _ellipsis) = typing.get_args(option)
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            return tuple(_typed(name, element, item) for element in items)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if option is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join(TYPE_NAMES.get(option, str(option)) for option in options)
    raise AtlasError(f"{name} must be {wanted}, not {value!r}")


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a word", type(None): "none"}


def config_path(model: str | None) -> Path:
    """configs/<model>.yaml when it exists, else the offline default's config."""
    path = CONFIG_DIR / f"{model or DEFAULT_MODEL}.yaml"
    return path if path.exists() else CONFIG_DIR / f"{DEFAULT_MODEL}.yaml"


def load_config(path: str | Path, sections: dict[str, type[Settings]], layer: str | None = None) -> dict:
    """Read a config, apply the per-layer overrides for `layer`, and check every key.

    Each section named in `sections` becomes an instance of its settings class (absent: the defaults); the other
    sections stay as read.
    """
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise AtlasError(f"cannot read config {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(config, dict):
        raise AtlasError(f"config {path} must be a mapping of settings, not {type(config).__name__}")
    check_keys(config, TOP_KEYS, str(path))
    overrides = layer_overrides(config, str(path)).get(str(layer or config.get("layer")), {})
    merged = copy.deepcopy(config)
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    for section, settings in sections.items():
        where = f"{path} ({section}:)"
        values = merged.get(section) or {}
        if not isinstance(values, dict):
            raise AtlasError(f"config {where} must be a mapping")
        merged[section] = settings.from_config(values, where)
    return merged


def layer_overrides(config: dict, where: str) -> dict[str, dict]:
    """A config's per-layer settings: `layers:` as a mapping of layer -> {section: settings} (the production
    configs'); a `layers:` list names a run's layers and overrides nothing."""
    layers = config.get("layers") or {}
    if isinstance(layers, list):
        if not all(isinstance(name, str) for name in layers):
            raise AtlasError(f"config {where}: layers: must list layer names, not {layers!r}")
        if "layer" in config:
            raise AtlasError(f"config {where} names both layer: and a layers: list; keep one")
        return {}
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise AtlasError(f"config {where}: layers: must be a list of layers, or a mapping of layer -> settings")
    return layers


def run_layers(config: dict) -> list[str] | None:
    """The layers a config's run makes: its `layers:` list, else its one `layer:`, else None (the model's)."""
    if isinstance(config.get("layers"), list):
        return list(config["layers"])
    return [config["layer"]] if config.get("layer") else None


def check_keys(values: dict, accepted: set[str], where: str) -> None:
    """A one-line AtlasError naming the first key of `values` that is not `accepted`, with the close matches."""
    for key in values:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(accepted))}"
            raise AtlasError(f"unknown key {key!r} in {where}{hint}")


def check_number(name: str, value: object, low: float, high: float | None = None, kind: type = int) -> int | float:
    """`value` as an int (or with kind=float, a finite number) in [low, high]: the one check of every number a user
    gives, from the command line or a config alike. Otherwise a one-line AtlasError naming it and the allowed range."""
    what = "an integer" if kind is int else "a number"
    allowed = f"from {low:,} to {high:,}" if high is not None else f"at least {low:,}"
    typed = isinstance(value, numbers.Integral if kind is int else numbers.Real) and not isinstance(value, bool)
    number = float(value) if typed and isinstance(value, numbers.Real) else math.nan
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        raise AtlasError(f"{name} must be {what} {allowed}, not {value!r}")
    return kind(value)


class Parser(argparse.ArgumentParser):
    """argparse with one line on stderr for a bad argument, as for every other bad value (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


PARAM_CHOICES = ["fft", "phase", "pixel"]  # atlas.optvis.param.PARAMS, named here so --help imports no torch
PARAM_HELP = "image parameterisation: fft (lucid's, the default), phase (MACO) or pixel"


def given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The flags among `names` that were given: the others keep the settings class's defaults, stated once there."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def add_flags(parser: argparse.ArgumentParser, settings: type[Settings], helps: dict[str, str]) -> None:
    """A --flag for each field of `settings` named in `helps`, typed by the field's annotation. A flag has no default
    of its own (one not given is not passed, see `given`) and its help ends with the field's default: defaults are
    stated once, in the settings class. A true/false field gets --name and --no-name."""
    fields = {field.name: field for field in dataclasses.fields(settings)}  # type: ignore[arg-type]  # a dataclass
    for name, text in helps.items():
        field = fields[name]
        shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        options: dict = {"dest": name, "default": None, "help": f"{text} (default: {shown})"}
        if field.type == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = FLAG_TYPES[str(field.type)]
        parser.add_argument("--" + name.replace("_", "-"), **options)


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _number_or_word(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


# a settings field's annotation -> how its flag reads the command line
FLAG_TYPES = {
    "int": int,
    "int | None": int,
    "float": float,
    "float | None": float,
    "str": str,
    "str | None": str,
    "float | str": _number_or_word,
    "tuple[int, ...]": _integers,
}

"""Config fields that carry their own rules: the allowed choices or bounds sit on the field (as
dataclass metadata, beside its one-line comment), and `check_fields` walks a config tree and
applies them, so no table far from the fields lists them again."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Tuple


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the rule and the fix."""


def one_of(*choices: str, default: Optional[str] = None):
    """A string field that must be one of `choices`; its default is `default`, else the first."""
    return dataclasses.field(default=choices[0] if default is None else default,
                             metadata={"choices": choices})


def bounded(default: Any, *, at_least: Optional[float] = None, at_most: Optional[float] = None,
            what: str = ""):
    """A number field within [at_least, at_most] (either end open when None); `what` says in a
    few words what the number is, for the error message. None (an optional field) passes."""
    return dataclasses.field(default=default,
                             metadata={"at_least": at_least, "at_most": at_most, "what": what})


def _walk(node, prefix: str) -> Iterator[Tuple[str, Any, dataclasses.Field]]:
    """(dotted key, value, field) of every field in the tree, lists of sections included."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        yield key, value, f
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _walk(item, f"{key}[{i}].")


def _unknown_keys(node, prefix: str) -> Iterator[Tuple[str, list]]:
    """Keys a `+key=value` override added beside the schema's fields: Hydra accepts them (it
    even suggests `+` when a key is unknown) and the trainer would silently ignore them."""
    fields = {f.name for f in dataclasses.fields(node)}
    for name, value in vars(node).items():
        if name not in fields:
            yield f"{prefix}{name}", sorted(fields)
        elif dataclasses.is_dataclass(value):
            yield from _unknown_keys(value, f"{prefix}{name}.")


def check_fields(node, prefix: str = "") -> None:
    """Raise ConfigError for the first unknown key, or value outside its field's choices or
    bounds, in the config tree `node` (keys are named `prefix` + dotted path)."""
    for key, known in _unknown_keys(node, prefix):
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        raise ConfigError(f"unknown config key {key}: {section} has no such field, so the "
                          f"value would be ignored; remove it or use one of {', '.join(known)}")
    for key, value, f in _walk(node, prefix):
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}; pick one of "
                              "these")
        if value is None:
            continue
        what = f" ({f.metadata['what']})" if f.metadata.get("what") else ""
        low, high = f.metadata.get("at_least"), f.metadata.get("at_most")
        if low is not None and value < low:
            raise ConfigError(f"{key}={value} must be >= {low}{what}; set it to {low} or more")
        if high is not None and value > high:
            raise ConfigError(f"{key}={value} must be <= {high}{what}; set it to {high} or less")

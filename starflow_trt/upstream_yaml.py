"""Upstream STARFlow-V's YAML config format (spec §1.1): what a file states, as typed field values.

The file has one top-level key ``arguments`` holding a list of one-key maps. Upstream joins them into a
command line (``--key value``), splits on whitespace and parses with its training parser, so list
options are written as space-separated strings (``layers_per_block: 2 2 2 2 2 24``). :func:`read_arguments`
reads the same way, each value by its field's type: a key absent from the file keeps upstream's default
(the published configs name only what differs from it; the defaults are
:class:`~starflow_trt.config.ModelConfig`'s field defaults), training-only keys (:data:`TRAINING_KEYS`) are
accepted and ignored, other unknown keys are kept instead of aborting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import yaml

from .errors import ConfigError

#: ``field`` metadata naming a field's upstream YAML key where it differs from the field's name
YAML_KEY = "yaml_key"

#: options of upstream's training parser that the published configs carry and nothing here uses
#: (data loading, optimiser, FSDP, logging): accepted and ignored, listed apart from unknown keys
TRAINING_KEYS = frozenset({
    "no_flip", "fsdp", "fsdp_text_encoder", "secondary_img_size", "batch_size", "secondary_batch_size",
    "secondary_ratio", "lr", "min_lr", "wds", "loss_scaling", "grad_clip", "grad_skip", "sample_freq",
    "latent_norm_regularization",
})

_NONE_WORDS = ("None", "none", "")


def yaml_key(f: dataclasses.Field) -> str:
    """The upstream YAML key (and stored-config key) of a config field."""
    return f.metadata.get(YAML_KEY, f.name)


def _flag_or_int(text: str) -> int:
    """Upstream's int options: ``1``, ``1.0`` and YAML booleans (``true`` → 1)."""
    word = text.strip().lower()
    return int(word == "true") if word in ("true", "false") else int(float(text))


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.strip() in _NONE_WORDS else parse(text.strip())


#: a field's type annotation → how its YAML text reads (lists are space-separated, as on upstream's command line)
_SYNTAX: dict[str, Callable[[str], Any]] = {
    "int": _flag_or_int,
    "float": float,
    "str": str,
    "Optional[int]": _optional(int),
    "Optional[str]": _optional(str),
    "tuple[int, ...]": lambda text: tuple(int(t) for t in text.split()),
    "tuple[float, ...]": lambda text: tuple(float(t) for t in text.split()),
}


@dataclass(frozen=True)
class Arguments:
    """What one upstream YAML states, read onto a config's fields."""

    #: field name → value, for every field the YAML states (a key stated twice: the last one)
    values: dict[str, Any]
    #: (key, text) of every key that names no field (training-only ones included), in file order
    unknown: tuple[tuple[str, str], ...]
    #: fields the YAML does not state: they keep upstream's defaults (spec §1.2)
    absent: tuple[str, ...]


def read_arguments(data: Mapping[str, Any] | str, fields: Iterable[dataclasses.Field]) -> Arguments:
    """Upstream YAML text (or its loaded mapping) → the values of ``fields`` it states and its other keys.

    Each value is parsed by its field's type annotation; a value that does not parse raises
    :class:`ConfigError` naming the key."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, Mapping) or "arguments" not in data:
        raise ConfigError("config must have a top-level 'arguments:' list of one-key maps (upstream format)")
    items = data["arguments"]
    if not isinstance(items, list):
        raise ConfigError("'arguments' must be a list of one-key maps like '- channels: 512'")
    known = {yaml_key(f): f for f in fields}
    values: dict[str, Any] = {}
    unknown: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ConfigError(f"every 'arguments' entry must be a one-key map, got {item!r}")
        for key, value in item.items():
            raw = "" if value is None else str(value)
            if key not in known:
                unknown.append((str(key), raw))
                continue
            f = known[key]
            try:
                values[f.name] = _SYNTAX[f.type](raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config field {key!r}: cannot parse value {raw!r} ({exc}); "
                                  "fix the YAML value") from exc
    absent = tuple(f.name for f in known.values() if f.name not in values)
    return Arguments(values, tuple(unknown), absent)


def write_arguments(items: Iterable[tuple[str, Any]]) -> str:
    """Upstream ``arguments:`` YAML of (key, value) pairs, in order; tuples are written space-separated."""
    def text(value: Any) -> Any:
        return " ".join(str(x) for x in value) if isinstance(value, tuple) else value

    return yaml.safe_dump({"arguments": [{key: text(value)} for key, value in items]}, sort_keys=False)

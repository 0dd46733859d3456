"""Load and validate the workflow config against schemas/config.schema.yaml, filling in defaults.

Usage:
    cfg = validate_config(yaml.safe_load(open("config.yaml")))   # raises ConfigError naming the key
    options = option_table(cfg)                                   # [(w_bits, a_bits), ...]
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

__all__ = ["SCHEMA_PATH", "ConfigError", "validate_config", "load_config", "option_table", "option_name"]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The config does not satisfy the schema; the message names the key and what was expected."""


def _with_defaults(validator_class):
    """A validator class that fills `default` values into objects as it validates (then re-validates)."""
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _message(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = sorted(err.schema.get("properties", {}))
        where = "" if key == "<top level>" else f" under {key!r}"
        return f"unknown config key(s) {extra}{where}; allowed: {allowed}"
    if err.validator in ("oneOf", "anyOf") and err.schema.get("description"):
        # "is not valid under any of the given schemas" says nothing: name what the key expects.
        return f"config key {key!r}: {err.instance!r} is not valid; expected {err.schema['description']}"
    return f"config key {key!r}: {err.message}"


def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def validate_config(config: dict) -> dict:
    """Validate `config` and check paths; raise ConfigError on the first problem.

    Returns a copy with the defaults filled in and every mapping's keys sorted: rule params derived
    from it (and so Snakemake's params rerun trigger) do not depend on the key order of the YAML.
    """
    cfg = copy.deepcopy(dict(config))
    validator = _with_defaults(jsonschema.Draft202012Validator)(_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise ConfigError(_message(errors[0]))
    # Fill in defaults of nested objects whose default was set above, then validate the result.
    errors = list(validator.iter_errors(cfg))
    if errors:
        raise ConfigError(_message(errors[0]))
    _check_paths(cfg)
    return _sorted_keys(cfg)


def _sorted_keys(obj):
    """`obj` with the keys of every nested mapping in sorted order (lists keep their order)."""
    if isinstance(obj, dict):
        return {k: _sorted_keys(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted_keys(v) for v in obj]
    return obj


def _check_paths(cfg: dict) -> None:
    for name, m in cfg["models"].items():
        ds = m["dataset"]
        if ds["name"] != "digits":
            if not ds.get("root"):
                raise ConfigError(f"config key 'models.{name}.dataset.root': dataset {ds['name']!r} needs a local path")
            if not Path(ds["root"]).is_dir():
                raise ConfigError(
                    f"config key 'models.{name}.dataset.root': {ds['root']!r} is not an existing directory"
                )
        if m.get("weights") is not None and not Path(m["weights"]).is_file():
            raise ConfigError(f"config key 'models.{name}.weights': {m['weights']!r} is not an existing file")
        if m["arch"].startswith("torchvision:") and m.get("weights") is None and ds["name"] == "imagenet":
            raise ConfigError(
                f"config key 'models.{name}.weights': a torchvision model on ImageNet needs a local weights file"
            )


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it; errors name the file."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    try:
        return validate_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def option_table(cfg: dict) -> list[tuple[int, int]]:
    """All (w_bits, a_bits) options, highest precision first."""
    q = cfg["quant"]
    return [(w, a) for w in sorted(q["w_bits"], reverse=True) for a in sorted(q["a_bits"], reverse=True)]


def option_name(option: tuple[int, int]) -> str:
    """'w4a8' for (4, 8)."""
    return f"w{option[0]}a{option[1]}"

"""Checks of the files a config names against the models it configures, before any job runs: those
that need the model constructors (torch), and so cannot live in :mod:`mpqflow.config_checks`.

Usage (the Snakefile runs it right after :func:`mpqflow.validation.validate_config`):
    check_named_files(cfg)        # ConfigError naming the key, the value and what was expected

- ``models.<m>.weights``: its tensor names and shapes against the configured architecture, built on
  the meta device (no memory, no data) for the dataset's channels and class count.
- ``limpq.indicators`` (with method limpq): a LIMPQ pickle of plain data whose layers and bit-widths
  are those of each model's layer table, traced on the meta device the way calibration traces it.
- ``latency.table``: a per-layer latency table with a row for every candidate layer of each model's
  layer table (traced on the meta device) at every option, and no layer the table does not have.
  Where the trace cannot run, the check_budgets job checks it, first after calibration.

torch is imported only when one of these keys is set: a config without them pays nothing.
"""

from __future__ import annotations

import logging

from .config import Config, ConfigError, ModelConfig, QuantConfig

__all__ = ["check_named_files", "meta_layer_table"]
log = logging.getLogger("mpqflow")


def check_named_files(cfg: dict) -> None:
    """Every weights file fits its model; an imported indicator file fits every model's layer table."""
    typed = Config.from_dict(cfg)
    for name, model in typed.models.items():
        if model.weights is not None:
            _check_weights(name, model, cfg["seed"])
    if "limpq" in cfg["methods"] and cfg["limpq"]["indicators"] is not None:
        for name, model in typed.models.items():
            _check_indicators(cfg["limpq"]["indicators"], name, model, typed.quant, cfg["seed"])
    if cfg["latency"]["table"] is not None:
        for name, model in typed.models.items():
            _check_latency_table(cfg["latency"]["table"], name, model, typed.quant, cfg["seed"])


def _meta_model(name: str, model: ModelConfig, seed: int):
    """The configured architecture with its data's channels and classes, on the meta device."""
    import torch

    from .models import fresh_model

    try:
        with torch.device("meta"):
            return fresh_model(model, seed)
    except ValueError as err:  # an unknown arch, or one that cannot take the data's input size
        raise ConfigError(f"config key 'models.{name}.arch': {err}") from None


def _check_weights(name: str, model: ModelConfig, seed: int) -> None:
    from .checkpoints import load_state_dict
    from .models import weights_mismatch

    key = f"config key 'models.{name}.weights'"
    try:
        state = load_state_dict(model.weights, "model weights")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    problem = weights_mismatch(_meta_model(name, model, seed), state)
    if problem is not None:
        raise ConfigError(
            f"{key}: {model.weights!r} does not fit models.{name}.arch {model.arch!r} built for dataset "
            f"{model.dataset.name!r}: {problem}"
        )


def meta_layer_table(name: str, model: ModelConfig, quant: QuantConfig, seed: int):
    """The layer table calibration will write for `model` (:func:`mpqflow.context.layer_table`), traced
    on the meta device without data or weights; None where the forward does not run on meta tensors."""
    import torch

    from .context import layer_table
    from .data import data_spec

    spec = data_spec(model, seed)
    example = torch.empty(1, spec.in_channels, spec.input_size, spec.input_size, device="meta")
    try:
        with torch.no_grad():
            return layer_table(_meta_model(name, model, seed).eval(), example, quant)
    except (RuntimeError, NotImplementedError, TypeError) as err:  # a data-dependent forward (.item(), ...)
        log.info("%s: the layer table cannot be traced on the meta device (%s)", model.arch, err)
        return None


def _check_indicators(path: str, name: str, model: ModelConfig, quant: QuantConfig, seed: int) -> None:
    """The pickle read as the limpq_indicators job reads it, against the layer table traced on meta
    (only its structure and bit-widths where the trace cannot run; the job checks the rest)."""
    from .indicators import read_limpq_pickle, read_limpq_structure

    key = f"config key 'limpq.indicators' ({path!r}, model {name!r})"
    table = meta_layer_table(name, model, quant, seed)
    try:
        if table is None:
            read_limpq_structure(path, quant.w_bits, quant.a_bits)
        else:
            read_limpq_pickle(path, table)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_latency_table(path: str, name: str, model: ModelConfig, quant: QuantConfig, seed: int) -> None:
    """The latency table against the layer table traced on meta (the check_budgets job checks it
    where the trace cannot run)."""
    from .deploy.latency import LatencyTableError, check_against_layers, read_latency_table

    table = meta_layer_table(name, model, quant, seed)
    if table is None:
        return
    try:
        check_against_layers(read_latency_table(path), table)
    except LatencyTableError as err:
        raise ConfigError(f"config key 'latency.table' (model {name!r}): {err}") from None

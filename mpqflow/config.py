"""Typed config: the validated dict as frozen dataclasses, one per section.

Usage:
    cfg = Config.from_dict(load_config("config.yaml"))    # the whole validated config
    cfg.quant.options                                     # [(8, 8), (8, 4), ...]
    cfg.models["digits_resnet20"].dataset.name            # "digits"
    quant = QuantConfig.from_dict(snakemake.params.quant) # what a workflow script builds from its params

The schema (schemas/config.schema.yaml, through :mod:`mpqflow.validation`) is the only place
defaults live: these classes have none, and ``from_dict`` refuses a missing or unknown key, so a
section can only be built from a validated dict. Library functions take the section they need.
No torch here: the Snakefile and the torch-free stages import this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config_checks import finetune_target_name
from .names import option_table
from .validation import ConfigError, load_config, validate_config

__all__ = [
    "ConfigError",
    "Section",
    "validate_config",
    "load_config",
    "Runtime",
    "DatasetConfig",
    "TrainSettings",
    "ModelConfig",
    "QuantConfig",
    "SamplePlanConfig",
    "SensitivityConfig",
    "SolverConfig",
    "HawqConfig",
    "CladoConfig",
    "StudyConfig",
    "GradQuantStudyConfig",
    "PlotsConfig",
    "EvaluationConfig",
    "PtqConfig",
    "FinetuneConfig",
    "finetune_target_names",
    "LimpqConfig",
    "CladoNaConfig",
    "LimpqSearchConfig",
    "Config",
]


def _tuples(value):
    """Lists become tuples (recursively), so a frozen section is immutable all the way down."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


class Section:
    """from_dict/to_dict for a frozen dataclass whose fields are plain values or nested sections: the
    base of every typed config section (and of the method registry's settings)."""

    _nested: dict = {}

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a validated mapping: every field present, no unknown key (else ConfigError)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
        missing, unknown = sorted(set(names) - set(d)), sorted(set(d) - set(names))
        if missing or unknown:
            raise ConfigError(
                f"{cls.__name__}: missing key(s) {missing}, unknown key(s) {unknown} "
                "(build sections from a validated config)"
            )
        kwargs = {}
        for n in names:
            sub = cls._nested.get(n)
            kwargs[n] = sub.from_dict(d[n]) if sub is not None else _tuples(d[n])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain nested dict (lists for tuples): JSON-ready, and equal to the validated input."""
        return _plain(dataclasses.asdict(self))


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Runtime(Section):
    """Execution settings: where and how a job runs. Not rule params, so changing them reruns nothing.

    Args:
        device: auto | cpu | cuda.
        threads: torch intra-op threads of the job (its rule's `threads:`).
        collective_timeout_s: how long a data-parallel process waits for the others in a collective
            before the job fails (the process-group timeout).
    """

    device: str
    threads: int
    collective_timeout_s: float

    @classmethod
    def of_job(cls, config: dict, threads: int) -> Runtime:
        """A job's runtime from the validated config and the threads Snakemake gave the job."""
        return cls(config["device"], threads, float(config["collective_timeout_s"]))


@dataclass(frozen=True)
class DatasetConfig(Section):
    """models.<m>.dataset: which data and how it is read."""

    name: str
    root: str | None
    test_fraction: float
    image_size: int
    workers: int


@dataclass(frozen=True)
class TrainSettings(Section):
    """models.<m>.train: SGD with Nesterov momentum, one-cycle learning rate, random shifts.

    batch_size is the global batch, split over `world_size` data-parallel processes; `amp` turns on
    bf16 autocast on CUDA (no effect on the CPU); `grad_quant` (method, bits, bucket_size, norm,
    update_iters) exchanges quantized gradients between the processes.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment_shift: int
    world_size: int
    amp: bool
    grad_quant: dict | None  # quantized gradient exchange (mpqflow.comm), None = float all-reduce

    def train_settings(self) -> TrainSettings:
        """The trainer's settings alone (a section that extends them drops its own keys)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})


@dataclass(frozen=True)
class ModelConfig(Section):
    """models.<m>: architecture, local weights (None = train), class count (None = the dataset's) and data."""

    arch: str
    weights: str | None
    num_classes: int | None
    dataset: DatasetConfig
    train: TrainSettings
    _nested = {"dataset": DatasetConfig, "train": TrainSettings}


@dataclass(frozen=True)
class QuantConfig(Section):
    """quant: the quantizer schemes (plain dicts for :meth:`mpqflow.quant.QuantScheme.from_dict`),
    the searched bit-widths and the calibration samples."""

    weight: dict
    activation: dict
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    fixed_bits: int
    fix_first_last: bool
    calibration_samples: int
    calibration_batch_size: int
    fold_bn: bool

    @property
    def options(self) -> list[tuple[int, int]]:
        """The option table w_bits x a_bits, highest precision first."""
        return option_table(self.w_bits, self.a_bits)


@dataclass(frozen=True)
class SamplePlanConfig(Section):
    """How the training split is used: calibration samples first, then the sensitivity batch pool.

    Built from quant.calibration_samples, sensitivity.batch_size / pool_batches and seed: the
    only settings that decide which samples a batch or a sensitivity set holds.
    """

    calibration_samples: int
    batch_size: int
    pool_batches: int
    seed: int

    @classmethod
    def of(cls, cfg: dict) -> SamplePlanConfig:
        """From a validated config dict (or a rule's params holding seed, quant and sensitivity)."""
        s = cfg["sensitivity"]
        return cls(cfg["quant"]["calibration_samples"], s["batch_size"], s["pool_batches"], cfg["seed"])


@dataclass(frozen=True)
class SensitivityConfig(Section):
    """sensitivity: the batch pool and each estimator's settings (`<estimator>_<key>`)."""

    batch_size: int
    pool_batches: int
    clado_engine: str
    clado_stack: bool
    hawq_rel_se: float
    hawq_min_probes: int
    hawq_max_probes: int
    hawq_sketch: int
    hawq_seed: int

    def of_estimator(self, estimator: str) -> dict:
        """The batch size and the settings of one estimator: what its per-batch job depends on."""
        own = {k: v for k, v in self.to_dict().items() if k.startswith(f"{estimator}_")}
        return {"batch_size": self.batch_size, **own}


@dataclass(frozen=True)
class HawqConfig(Section):
    """HAWQ's settings (sensitivity.hawq_<field>): probe each layer's Hutchinson trace until its
    standard error is at most `rel_se` of it, after `min_probes` and at most `max_probes` probes,
    with `sketch` Hutch++ deflation directions, probes seeded by `seed` and the batch."""

    rel_se: float
    min_probes: int
    max_probes: int
    sketch: int
    seed: int

    @classmethod
    def of(cls, settings: dict) -> HawqConfig:
        """From an estimator's settings dict (:meth:`SensitivityConfig.of_estimator`: `hawq_<field>` keys;
        other keys ignored); a missing key is a ConfigError naming it."""
        return _prefixed(cls, "hawq", settings)


@dataclass(frozen=True)
class CladoConfig(Section):
    """CLADO's execution settings (sensitivity.clado_<field>): the `engine` that runs the pairs (fast:
    re-run only the graph downstream of a perturbation; reference: one full forward per pair; the same
    numbers) and whether the fast engine `stack`s several perturbations per pass."""

    engine: str
    stack: bool

    @classmethod
    def of(cls, settings: dict) -> CladoConfig:
        """From an estimator's settings dict (`clado_<field>` keys; other keys ignored)."""
        return _prefixed(cls, "clado", settings)


def _prefixed(cls, prefix: str, settings: dict):
    """A section whose fields are the sensitivity section's `<prefix>_<field>` keys; a missing key is a
    ConfigError naming it (the schema fills them all in)."""
    missing = [f"{prefix}_{f}" for f in _fields(cls) if f"{prefix}_{f}" not in settings]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing key(s) {missing} (sensitivity.{prefix}_*)")
    return cls(**{f: settings[f"{prefix}_{f}"] for f in _fields(cls)})


@dataclass(frozen=True)
class SolverConfig(Section):
    """solver: back-end, limits and gap of every solve."""

    backend: str
    time_limit: float
    mip_gap: float
    node_limit: object  # None, an int, or {backend: int | None}

    def node_limit_for(self, backend: str):
        """The node limit of one back-end (None = none)."""
        if isinstance(self.node_limit, dict):
            return self.node_limit.get(backend)
        return self.node_limit


@dataclass(frozen=True)
class CladoNaConfig(Section):
    """clado_na: noise-aware CLADO's threshold `k` (entries within k standard errors of 0 are noise): a
    number, or "universal" (√(2 ln m) over the m entries of each family, :mod:`mpqflow.methods`).
    Method clado_na's settings in the method registry (:data:`mpqflow.methods.METHODS`)."""

    k: float | str


@dataclass(frozen=True)
class LimpqSearchConfig(Section):
    """limpq.alpha: the search's weight of the weight indicators against the activation ones,
    Σ s_a + α·s_w. Method limpq's settings in the method registry; the rest of `limpq` trains the
    indicators (:class:`LimpqConfig`), so retuning α re-solves and retrains nothing."""

    alpha: float


@dataclass(frozen=True)
class StudyConfig(Section):
    """study: sensitivity-set sizes and how many sets of each size."""

    set_sizes: tuple[int, ...]
    sets_per_size: int


@dataclass(frozen=True)
class PlotsConfig(Section):
    """plots: resolution and panel size."""

    dpi: int
    panel_width: float


@dataclass(frozen=True)
class EvaluationConfig(Section):
    """evaluation: batch size on the held-out split."""

    batch_size: int


@dataclass(frozen=True)
class PtqConfig(Section):
    """ptq: the PTQ study's variants and uniform options."""

    variants: tuple[str, ...]
    options: tuple[str, ...]


@dataclass(frozen=True)
class GradQuantStudyConfig(Section):
    """gradquant: the gradient-quantization study's models, exchange methods x bits and run settings."""

    models: tuple[str, ...] | None
    methods: tuple[str, ...]
    bits: tuple[int, ...]
    world_size: int
    epochs: int | None
    bucket_size: int
    norm: str
    update_iters: tuple[int, ...]

    def runs(self) -> list[str]:
        """The study's run names: 'none' (float all-reduce, once) and '<method>-<bits>bit' for the others."""
        return [m if m == "none" else f"{m}-{b}bit" for m in self.methods for b in (self.bits if m != "none" else [0])]

    def run_spec(self, run: str) -> dict:
        """What one run depends on (its rule's params): processes, epochs and its exchange (grad_quant,
        None for 'none'); not the lists of models, methods and bits, so adding a run reruns no other."""
        if run not in self.runs():
            raise ValueError(f"unknown gradquant run {run!r}; expected one of {self.runs()}")
        spec = {"world_size": self.world_size, "epochs": self.epochs, "grad_quant": None}
        if run != "none":
            method, bits = run.rsplit("-", 1)
            spec["grad_quant"] = {"method": method, "bits": int(bits.removesuffix("bit")),
                                  "bucket_size": self.bucket_size, "norm": self.norm,
                                  "update_iters": list(self.update_iters)}  # fmt: skip
        return spec

    def study_models(self, configured) -> list[str]:
        """The models the study trains: `models`, or every configured one."""
        return list(configured) if self.models is None else list(self.models)


@dataclass(frozen=True)
class FinetuneConfig(TrainSettings):
    """finetune (but its `targets`, :func:`finetune_target_names`): the LSQ fine-tuning's settings, SGD
    as in `train`, plus knowledge distillation (`distill` weight of the KL from the FP model's logits at
    `temperature`) and how the weight steps start (`weight_init`). What one fine-tuning job depends on:
    adding a target refits no other."""

    distill: float
    temperature: float
    weight_init: str

    @classmethod
    def of_section(cls, section: dict) -> FinetuneConfig:
        """From the validated `finetune` section, leaving out its targets."""
        return cls.from_dict({k: v for k, v in section.items() if k != "targets"})


def finetune_target_names(section: dict) -> list[str]:
    """Each target of a validated `finetune` section as its path under results/<model>/finetuned/:
    'clado/set_4x0/avg_bits-2.5', 'uniform/w2a4'."""
    return [finetune_target_name(t) for t in section["targets"]]


@dataclass(frozen=True)
class LimpqConfig(TrainSettings):
    """limpq: the indicator pretraining (SGD as in `train`, on `data`: a set's batches or the whole
    training split; `prune`: LIMPQP's iterative pruning with rewinding, or None), or an imported LIMPQ
    pickle (`indicators`). The section's `alpha` is the search's (:class:`LimpqSearchConfig`), not
    part of this one: an indicator file does not depend on it."""

    data: str
    indicators: str | None
    prune: dict | None

    @classmethod
    def of_section(cls, section: dict) -> LimpqConfig:
        """From the validated `limpq` section, leaving out the search's alpha."""
        return cls.from_dict({k: v for k, v in section.items() if k not in _fields(LimpqSearchConfig)})


@dataclass(frozen=True)
class Config:
    """The whole validated config, one typed section per key."""

    seed: int
    device: str
    threads: int
    collective_timeout_s: float
    models: dict  # name -> ModelConfig
    quant: QuantConfig
    sensitivity: SensitivityConfig
    methods: tuple[str, ...]
    clado_na: CladoNaConfig
    budgets: tuple[str, ...]
    study: StudyConfig
    solver: SolverConfig
    ptq: PtqConfig
    gradquant: GradQuantStudyConfig
    finetune: FinetuneConfig
    finetune_targets: tuple[str, ...]
    limpq: LimpqConfig
    plots: PlotsConfig
    evaluation: EvaluationConfig

    @classmethod
    def from_dict(cls, cfg: dict) -> Config:
        """From a dict that :func:`validate_config` returned."""
        return cls(
            seed=cfg["seed"],
            device=cfg["device"],
            threads=cfg["threads"],
            collective_timeout_s=float(cfg["collective_timeout_s"]),
            models={name: ModelConfig.from_dict(m) for name, m in cfg["models"].items()},
            quant=QuantConfig.from_dict(cfg["quant"]),
            sensitivity=SensitivityConfig.from_dict(cfg["sensitivity"]),
            methods=tuple(cfg["methods"]),
            clado_na=CladoNaConfig.from_dict(cfg["clado_na"]),
            budgets=tuple(cfg["budgets"]),
            study=StudyConfig.from_dict(cfg["study"]),
            solver=SolverConfig.from_dict(cfg["solver"]),
            ptq=PtqConfig.from_dict(cfg["ptq"]),
            gradquant=GradQuantStudyConfig.from_dict(cfg["gradquant"]),
            finetune=FinetuneConfig.of_section(cfg["finetune"]),
            finetune_targets=tuple(finetune_target_names(cfg["finetune"])),
            limpq=LimpqConfig.of_section(cfg["limpq"]),
            plots=PlotsConfig.from_dict(cfg["plots"]),
            evaluation=EvaluationConfig.from_dict(cfg["evaluation"]),
        )

    @property
    def runtime(self) -> Runtime:
        """The execution settings (device, threads, collective timeout) of a job of this config."""
        return Runtime(self.device, self.threads, self.collective_timeout_s)

    @property
    def sample_plan(self) -> SamplePlanConfig:
        """The sample plan's settings."""
        return SamplePlanConfig(
            self.quant.calibration_samples, self.sensitivity.batch_size, self.sensitivity.pool_batches, self.seed
        )

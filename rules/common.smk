import hashlib
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from mpqflow.config import ConfigError, option_name, option_table, validate_config


try:
    _validated = validate_config(config)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
config.clear()
config.update(_validated)

MODELS = list(config["models"])
OPTIONS = [option_name(o) for o in option_table(config)]


wildcard_constraints:
    model="|".join(MODELS),
    option=r"w\d+a\d+",


def code_version(*modules):
    """Hash of the mpqflow modules a stage runs: a param, so editing that code reruns the stage."""
    root = Path(workflow.basedir) / "mpqflow"
    h = hashlib.sha256()
    for name in sorted(modules):
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [root / f"{name}.py"]
        for f in files:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_params(*sections):
    """Params factory: the model's own config plus the named top-level sections (nothing else)."""

    def inner(wildcards):
        out = {key: config[key] for key in sections}
        out["models"] = {wildcards.model: config["models"][wildcards.model]}
        return out

    return inner


def uniform_evals(wildcards):
    return expand(
        "results/{model}/eval/uniform/{option}.json", model=wildcards.model, option=OPTIONS
    )


def all_targets():
    return expand("results/{model}/eval/uniform.csv", model=MODELS)

"""Where every artifact lives: the one owner of the result paths, for the rules and for the code.

Usage:
    output: decision=paths.DECISION                    # in a rule: a pattern with Snakemake's wildcards
    paths.DECISION.format(model="m", method="clado", n=4, s=0, budget="avg_bits-2.5")
    paths.set_file("m", "clado", 4, 0)                 # "results/m/sensitivity/clado/set_4x0.npz"
    paths.target_name("clado", 4, 0, "avg_bits-2.5")   # "clado/set_4x0/avg_bits-2.5" (fine-tuning targets)

Every pattern is relative to the workflow's working directory and uses the rules' wildcard names:
{model}, {estimator}, {batch}, {n} and {s} (set NxS: n batches, set id s), {method}, {budget},
{option} ('w4a8'), {target} (a decision's 'method/set_NxS/budget' or 'uniform/<option>'), {variant}
(a PTQ scheme variant) and {run} (a gradient-quantization run). A set's identity is also recorded
inside its file (:func:`mpqflow.artifacts.set_identity`), so no code parses it back out of a path.
Standard library only: the Snakefile imports this at every DAG build.
"""

from __future__ import annotations

__all__ = [
    "MODEL_DIR",
    "CHECKPOINT",
    "CALIBRATION",
    "LAYERS",
    "BUDGETS",
    "BATCH",
    "SET",
    "LIMPQ_SET",
    "DECISION",
    "EVAL",
    "UNIFORM_EVAL",
    "UNIFORM_TABLE",
    "SANITY",
    "SANITY_TABLE",
    "STUDY_TABLE",
    "PARETO_AUC_TABLE",
    "CALIBRATION_TABLE",
    "PTQ_VARIANT",
    "PTQ_TABLE",
    "TARGET_DECISION",
    "TARGET_EVAL",
    "FINETUNED",
    "FINETUNED_EVAL",
    "FINETUNED_EXPORT",
    "FINETUNED_EXPORT_META",
    "FINETUNE_TABLE",
    "GRADQUANT_RUN",
    "GRADQUANT_TABLE",
    "GRADQUANT_VARIANCE_TABLE",
    "GRADQUANT_REPORT",
    "TRAIN_STATE",
    "LIMPQ_STATE",
    "FINETUNE_STATE",
    "GRADQUANT_STATE",
    "plot",
    "set_dir",
    "set_file",
    "target_name",
    "uniform_target",
]

MODEL_DIR = "results/{model}"

# the model and its quantizers
CHECKPOINT = MODEL_DIR + "/model.pt"
CALIBRATION = MODEL_DIR + "/calibration.pt"
LAYERS = MODEL_DIR + "/layers.json"
BUDGETS = MODEL_DIR + "/budgets.json"

# sensitivities: per-batch sums, and a set's pooled (or trained, limpq) file
BATCH = MODEL_DIR + "/sensitivity/{estimator}/batch_{batch}.npz"
SET = MODEL_DIR + "/sensitivity/{estimator}/set_{n}x{s}.npz"
LIMPQ_SET = MODEL_DIR + "/sensitivity/limpq/set_{n}x{s}.npz"  # SET of LIMPQ's indicators (rule limpq_indicators)

# decisions and their evaluations
DECISION = MODEL_DIR + "/decisions/{method}/set_{n}x{s}/{budget}.json"
EVAL = MODEL_DIR + "/eval/{method}/set_{n}x{s}/{budget}.json"
UNIFORM_EVAL = MODEL_DIR + "/eval/uniform/{option}.json"
UNIFORM_TABLE = MODEL_DIR + "/eval/uniform.csv"
SANITY = MODEL_DIR + "/sanity/{method}.json"

# the variance study's tables (its plots: :func:`plot`)
STUDY_TABLE = MODEL_DIR + "/study.csv"
SANITY_TABLE = MODEL_DIR + "/sanity.csv"
PARETO_AUC_TABLE = MODEL_DIR + "/pareto_auc.csv"
CALIBRATION_TABLE = MODEL_DIR + "/calibration.csv"

# the PTQ scheme study
PTQ_VARIANT = MODEL_DIR + "/ptq/{variant}.json"
PTQ_TABLE = MODEL_DIR + "/ptq.csv"

# fine-tuning: a target names a decision (or a uniform option) under decisions/ and eval/
TARGET_DECISION = MODEL_DIR + "/decisions/{target}.json"
TARGET_EVAL = MODEL_DIR + "/eval/{target}.json"
FINETUNED = MODEL_DIR + "/finetuned/{target}.pt"
FINETUNED_EVAL = MODEL_DIR + "/finetuned/{target}.json"
FINETUNED_EXPORT = MODEL_DIR + "/finetuned/{target}.export.pt"
FINETUNED_EXPORT_META = MODEL_DIR + "/finetuned/{target}.export.json"
FINETUNE_TABLE = MODEL_DIR + "/finetune.csv"

# the gradient-quantization study
GRADQUANT_RUN = MODEL_DIR + "/gradquant/{run}.json"
GRADQUANT_TABLE = MODEL_DIR + "/gradquant.csv"
GRADQUANT_VARIANCE_TABLE = MODEL_DIR + "/gradquant_variance.csv"
GRADQUANT_REPORT = MODEL_DIR + "/gradquant.md"

# epoch checkpoints of the training jobs (outside the rules' outputs: a rerun resumes from them)
TRAIN_STATE = MODEL_DIR + "/.train_state"
LIMPQ_STATE = MODEL_DIR + "/.limpq_state/set_{n}x{s}"
FINETUNE_STATE = MODEL_DIR + "/.finetune_state/{target}"
GRADQUANT_STATE = MODEL_DIR + "/.gradquant_state/{run}"


def plot(name: str) -> str:
    """The pattern of one of a model's figures: plot("ptq") is 'results/{model}/plots/ptq.png'."""
    return MODEL_DIR + f"/plots/{name}.png"


def set_dir(n: int, s: int) -> str:
    """The directory name of set NxS under decisions/ and eval/: 'set_4x0'."""
    return f"set_{int(n)}x{int(s)}"


def set_file(model: str, estimator: str, n: int, s: int) -> str:
    """The set file of set NxS of one estimator."""
    return SET.format(model=model, estimator=estimator, n=int(n), s=int(s))


def target_name(method: str, n: int, s: int, budget: str) -> str:
    """A searched decision as a fine-tuning {target}: 'clado/set_4x0/avg_bits-2.5'."""
    return f"{method}/{set_dir(n, s)}/{budget}"


def uniform_target(option: str) -> str:
    """A uniform option as a fine-tuning {target}: 'uniform/w2a4'."""
    return f"uniform/{option}"

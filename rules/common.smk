import os
import re
import sys

sys.path.insert(0, workflow.basedir)

from mpqflow import paths
from mpqflow.codehash import code_hash
from mpqflow.config import (
    Config,
    ConfigError,
    SamplePlanConfig,
    SensitivityConfig,
    validate_config,
)
from mpqflow.input_checks import check_named_files
from mpqflow.validation import check_device, check_local_cores
from mpqflow.data import sensitivity_set
from mpqflow.methods import (
    additive_estimators,
    estimator_prunes,
    method_estimator,
    method_settings,
    pairwise_estimator,
)
from mpqflow.names import option_name, option_table

# The device is checked in check_local_device (onstart), once the executor is known: a cluster's
# submit host may have no GPU where its compute nodes do.
try:
    _validated = validate_config(config, local=False)
    if (
        workflow.is_main_process
    ):  # not again in every cluster job step (it may load a weights file)
        check_named_files(_validated)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
config.clear()
config.update(_validated)

MODELS = list(config["models"])
OPTIONS = [
    option_name(o)
    for o in option_table(config["quant"]["w_bits"], config["quant"]["a_bits"])
]
SEARCH_METHODS = [m for m in config["methods"] if method_estimator(m) is not None]
ESTIMATORS = sorted({method_estimator(m) for m in SEARCH_METHODS})
# estimators whose set file is the sum of per-batch files (the others train one run per set)
ADDITIVE_ESTIMATORS = additive_estimators(ESTIMATORS)
CFG = Config.from_dict(config)  # the typed sections
LIMPQ = CFG.limpq
SETS = [
    (n, s)
    for n in config["study"]["set_sizes"]
    for s in range(config["study"]["sets_per_size"])
]
FINETUNE = CFG.finetune
# 'clado/set_4x0/avg_bits-2.5' or 'uniform/w2a4': results/{model}/finetuned/<target>.pt, eval/<target>.json
FINETUNE_TARGETS = list(CFG.finetune_targets)
# each target's canonical dict ({method, set: "NxS", budget} or {method: uniform, option}), by name
FINETUNE_TARGET_SPECS = dict(zip(FINETUNE_TARGETS, config["finetune"]["targets"]))
GRADQUANT = CFG.gradquant
# what target `gradquant` makes per model (the study's table, report and plots)
GRADQUANT_OUTPUTS = [
    paths.GRADQUANT_TABLE,
    paths.GRADQUANT_REPORT,
    paths.plot("gradquant_variance"),
    paths.plot("gradquant_accuracy"),
]


wildcard_constraints:
    model="|".join(MODELS),
    option=r"w\d+a\d+",
    estimator="|".join(ESTIMATORS) or "none",
    method="|".join(SEARCH_METHODS) or "none",
    batch=r"\d+",
    n=r"\d+",
    s=r"\d+",
    budget=r"[a-z_]+-[0-9.]+",


def stage_code(stage):
    """Hash of the import closure of mpqflow.stages.<stage>: a param, so editing any module the
    stage runs reruns it (and what follows), and editing anything else does not."""
    return code_hash(f"mpqflow.stages.{stage}")


def model_config(wildcards):
    """The configured model of the {model} wildcard."""
    return config["models"][wildcards.model]


def sample_plan(with_pool):
    """The settings that decide which samples a batch (with_pool=False) or a set (True) holds:
    sets are drawn from the pool, a single batch does not depend on its size."""
    plan = SamplePlanConfig.of(config).to_dict()
    if not with_pool:
        del plan["pool_batches"]
    return plan


def estimator_settings(wildcards):
    """The batch size and this estimator's own settings: growing the pool or retuning another
    estimator leaves finished batch files valid."""
    return SensitivityConfig.from_dict(config["sensitivity"]).of_estimator(
        wildcards.estimator
    )


def gpu_if_cuda(wildcards):
    """GPU-bound rules reserve one GPU when the config asks for CUDA (`auto` uses a GPU if it
    sees one but reserves none, so it runs anywhere; use `device: cuda` to schedule GPUs).
    """
    return 1 if config["device"] == "cuda" else 0


def _trains(wildcards):
    """(world_size, whether the rule trains) of the {model} wildcard (a model with weights only loads)."""
    model = config["models"][wildcards.model]
    return model["train"]["world_size"], model["weights"] is None


def train_threads(wildcards):
    """train_model's CPUs: `threads` per data-parallel process (models.<m>.train.world_size of them).
    On SLURM they become the job's --cpus-per-task: torchrun starts the processes inside that one task.
    """
    world_size, trains = _trains(wildcards)
    return config["threads"] * (world_size if trains else 1)


def train_gpus(wildcards):
    """train_model's GPUs with `device: cuda`: one per data-parallel process (sbatch --gpus on SLURM)."""
    world_size, trains = _trains(wildcards)
    return (world_size if trains else 1) if config["device"] == "cuda" else 0


def finetune_threads(wildcards):
    """A fine-tuning job's CPUs: `threads` per data-parallel process (finetune.world_size of them)."""
    return config["threads"] * FINETUNE.world_size


def finetune_gpus(wildcards):
    """A fine-tuning job's GPUs with `device: cuda`: one per data-parallel process."""
    return FINETUNE.world_size if config["device"] == "cuda" else 0


def gradquant_threads(wildcards):
    """A gradient-quantization run's CPUs: `threads` per data-parallel process."""
    return config["threads"] * GRADQUANT.world_size


def gradquant_gpus(wildcards):
    """A gradient-quantization run's GPUs with `device: cuda`: one per data-parallel process."""
    return GRADQUANT.world_size if config["device"] == "cuda" else 0


def gradquant_run_spec(wildcards):
    """The {run}'s settings: processes, epochs and its gradient exchange."""
    return GRADQUANT.run_spec(wildcards.run)


def limpq_threads(wildcards):
    """An indicator run's CPUs: `threads` per data-parallel process (limpq.world_size of them; one
    process reads an imported file)."""
    return config["threads"] * (LIMPQ.world_size if LIMPQ.indicators is None else 1)


def limpq_gpus(wildcards):
    """An indicator run's GPUs with `device: cuda`: one per data-parallel process (none to import)."""
    if config["device"] != "cuda" or LIMPQ.indicators is not None:
        return 0
    return LIMPQ.world_size


def limpq_imported(wildcards):
    """The imported LIMPQ pickle (limpq.indicators) as an input: editing it redoes the import."""
    return {} if LIMPQ.indicators is None else {"imported": LIMPQ.indicators}


def latency_table(wildcards):
    """The per-layer latency table (latency.table) as an input of the jobs that build a problem
    (check_budgets, solve_budget, sanity_check), so that editing the table re-solves."""
    table = config["latency"]["table"]
    return {} if table is None else {"latency": table}


def study_latency(wildcards):
    """The latency table and the layer table it fits, for the study table's latency_ms column (none
    without latency.table: the default study's inputs stay as they were)."""
    table = config["latency"]["table"]
    return {} if table is None else {"latency": table, "layers": paths.LAYERS}


def limpq_batches(wildcards):
    """The pool batches set NxS's indicator run trains on (limpq.data: set), None for the whole
    training split: a param, so growing the pool retrains exactly the sets whose batches changed.
    """
    if LIMPQ.data != "set" or LIMPQ.indicators is not None:
        return None
    return sensitivity_set(
        int(wildcards.n),
        int(wildcards.s),
        config["sensitivity"]["pool_batches"],
        config["seed"],
    )


def pruning_masks(model, method, n, s):
    """{"masks": the set file} when the method's estimator prunes (LIMPQP: limpq.prune) and its file of
    set NxS carries the masks that the decision keeps; {} otherwise."""
    estimator = method_estimator(method)
    if not estimator_prunes(estimator, config):
        return {}
    return {"masks": paths.set_file(model, estimator, n, s)}


def decision_masks(wildcards):
    """The pruning masks an evaluate_decisions job applies (decisions of a pruned set only)."""
    return pruning_masks(wildcards.model, wildcards.method, wildcards.n, wildcards.s)


def solve_settings(wildcards):
    """The {method}'s own settings (the registry's; {} for most): retuning one re-solves that method only."""
    return method_settings(wildcards.method, config)


def study_method_settings():
    """Every searched method's own settings, by method: what the study's standard errors re-form."""
    return {m: method_settings(m, config) for m in SEARCH_METHODS}


def finetune_decision(wildcards):
    """The decision a fine-tuning target starts from ({} for a uniform option: none), and the
    pruning masks it keeps (LIMPQP decisions)."""
    spec = FINETUNE_TARGET_SPECS[wildcards.target]
    if "option" in spec:
        return {}
    n, s = spec["set"].split("x")
    return {
        "decision": paths.TARGET_DECISION.format(
            model=wildcards.model, target=wildcards.target
        ),
        **pruning_masks(wildcards.model, spec["method"], n, s),
    }


def finetune_option(wildcards):
    """The uniform option ('w2a4') of a uniform target, None for a searched decision."""
    return FINETUNE_TARGET_SPECS[wildcards.target].get("option")


def finetuned_evals(wildcards):
    """The fine-tuned targets' evaluations, in config order."""
    return expand(paths.FINETUNED_EVAL, model=wildcards.model, target=FINETUNE_TARGETS)


def finetuned_ptq_evals(wildcards):
    """The PTQ evaluations of the same targets (eval/ holds decisions and uniform options alike)."""
    return expand(paths.TARGET_EVAL, model=wildcards.model, target=FINETUNE_TARGETS)


def set_batch_files(wildcards):
    n, s = int(wildcards.n), int(wildcards.s)
    batches = sensitivity_set(
        n, s, config["sensitivity"]["pool_batches"], config["seed"]
    )
    return expand(
        paths.BATCH,
        model=wildcards.model,
        estimator=wildcards.estimator,
        batch=batches,
    )


def method_set_file(wildcards):
    estimator = method_estimator(wildcards.method)
    return paths.set_file(wildcards.model, estimator, wildcards.n, wildcards.s)


def set_decisions(wildcards):
    """Every budget's decision of one (method, set), in config order."""
    return expand(
        paths.DECISION,
        model=wildcards.model,
        method=wildcards.method,
        n=wildcards.n,
        s=wildcards.s,
        budget=config["budgets"],
    )


def decision_evals(wildcards):
    return [
        paths.EVAL.format(model=wildcards.model, method=method, n=n, s=s, budget=budget)
        for method in SEARCH_METHODS
        for n, s in SETS
        for budget in config["budgets"]
    ]


def method_set_files(wildcards):
    """Every set file of the {method}'s estimator, in SETS order."""
    estimator = method_estimator(wildcards.method)
    return [paths.set_file(wildcards.model, estimator, n, s) for n, s in SETS]


def sanity_results(wildcards):
    """Every method's no-budget solves (one file per method, a result per set)."""
    return expand(paths.SANITY, model=wildcards.model, method=SEARCH_METHODS)


def pool_batch_files(wildcards):
    """Every per-batch file of the additive estimators (the batches of all sets): the spread of the
    single-batch estimates gives each decision's standard error."""
    pool, seed = config["sensitivity"]["pool_batches"], config["seed"]
    batches = sorted({b for n, s in SETS for b in sensitivity_set(n, s, pool, seed)})
    return expand(
        paths.BATCH,
        model=wildcards.model,
        estimator=ADDITIVE_ESTIMATORS,
        batch=batches,
    )


def heatmap_matrix(wildcards):
    """The pairwise estimator's (CLADO's) matrix of the largest first set feeds the interaction heat map
    (a target only when a configured method has a pairwise estimator)."""
    n = max(config["study"]["set_sizes"])
    return paths.set_file(wildcards.model, pairwise_estimator(ESTIMATORS), n, 0)


def uniform_evals(wildcards):
    return expand(
        paths.UNIFORM_EVAL,
        model=wildcards.model,
        option=OPTIONS,
    )


# `snakemake --report`: report what a (partly finished) run has made and say what is missing, instead
# of Snakemake's "marked for report but does not exist" for the first file not made yet.
REPORTING = any(a == "--report" or a.startswith("--report=") for a in sys.argv)


def report_folder():
    """Snakemake writes the report into its folder without making it (a fresh clone has no results/):
    make it, or the command ends in FileNotFoundError after building the DAG."""
    args = sys.argv[1:]
    for i, a in enumerate(args):
        path = a.partition("=")[2] if a.startswith("--report=") else None
        if a == "--report" and i + 1 < len(args) and not args[i + 1].startswith("-"):
            path = args[i + 1]
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)


if REPORTING:
    report_folder()


def all_targets():
    """The study of every model (with the interaction heat map when a method is pairwise, CLADO), its PTQ
    study unless `ptq.variants` is empty (or `ptq: null`), and its PTQ-vs-fine-tuned table and plot
    when `finetune.targets` names any."""
    targets = [
        paths.BUDGETS,
        paths.UNIFORM_TABLE,
        paths.STUDY_TABLE,
        paths.plot("accuracy_vs_size"),
    ]
    if pairwise_estimator(ESTIMATORS) is not None:
        targets.append(paths.plot("interaction_heatmap"))
    if config["ptq"]["variants"]:
        targets += [paths.PTQ_TABLE, paths.plot("ptq")]
    if FINETUNE_TARGETS:
        targets += [
            paths.FINETUNE_TABLE,
            paths.plot("finetune"),
        ]
    targets = expand(targets, model=MODELS)
    if REPORTING:
        missing = [t for t in targets if not os.path.exists(t)]
        if missing:
            print(
                "mpqflow: the report leaves out what this run has not made yet: "
                + ", ".join(missing),
                file=sys.stderr,
            )
        targets = [t for t in targets if t not in missing]
    return targets


def targets_gradquant():
    """Whether this run's targets include the gradient-quantization study (not part of `all`)."""
    targets = workflow.dag_settings.targets
    return any("gradquant" in t for t in targets)  # the rule, or one of its files


def check_local_device():
    """Before the first job, when jobs run on this machine: `device: cuda` without CUDA, or more
    data-parallel processes than it has cores."""
    if workflow.local_exec:
        try:
            check_device(config)
            check_local_cores(config, gradquant=targets_gradquant())
        except ConfigError as err:
            raise WorkflowError(f"invalid configuration: {err}") from None


def report_where():
    """Tell the user where the study's (and the gradient-quantization study's) tables and plots are."""
    for model in MODELS:
        tables = (paths.STUDY_TABLE, paths.GRADQUANT_TABLE, paths.GRADQUANT_REPORT)
        made = [
            t.format(model=model)
            for t in tables
            if os.path.exists(t.format(model=model))
        ]
        if made:
            plots = paths.plot("*").format(model=model)
            print(f"mpqflow: {model}: {', '.join(made)}, {plots}")
    print(
        "mpqflow: build the browsable report with: snakemake --report results/report.html"
    )

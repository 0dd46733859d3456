"""Incremental reruns: after one complete tiny run, a config or code change reruns exactly the
stages it invalidates (issue 5, item 3).

The session's one full run of the tiny config (conftest.tiny_run), then only dry-runs (`snakemake --dry-run`
with the default rerun triggers: mtime, params, input, code, software-env) against modified
copies of the config, or against a copy of the repository with edited mpqflow code. Each dry-run
lists every job it would run with its rule and outputs; the tests assert that list exactly.

    python -m pytest -m slow tests/test_reruns.py
"""

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DRY_TIMEOUT = 180  # s: one dry-run

sys.path.insert(0, str(REPO))
from conftest import TINY, run_snakemake  # noqa: E402

from mpqflow.data import sensitivity_set  # noqa: E402
from mpqflow.methods import method_estimator  # noqa: E402

pytestmark = pytest.mark.slow

UPSTREAM = {
    *("train_model", "calibrate", "evaluate_uniform", "uniform_table", "sensitivity_batch", "pool_set"),
    "limpq_indicators",
}


def snakemake(workdir, configfile, *args, snakefile=REPO / "Snakefile", timeout=DRY_TIMEOUT):
    proc = run_snakemake(workdir, *args, configfile=configfile, snakefile=snakefile, timeout=timeout)
    return proc.stdout + proc.stderr


def jobs(output, target="all"):
    """{rule: sorted [first output of each job]} of the jobs a dry-run would run (without the
    `target` rule: `all`, or `gradquant`, which only gather files)."""
    out, rule = {}, None
    for line in output.splitlines():
        if m := re.match(r"(localrule|rule) (\w+):$", line):
            rule = m[2]
            if rule != target:
                out.setdefault(rule, [])
        elif rule and rule != target and (m := re.match(r"\s+output: (.+)$", line)):
            out[rule].append(m[1].split(",")[0].strip())
        elif not line.startswith(" "):
            rule = None
    return {rule: sorted(outputs) for rule, outputs in out.items()}


def job_stats(output, target="all"):
    """{rule: count} from the dry-run's `Job stats` table (without the `target` rule and `total`)."""
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n((?:\w+\s+\d+\n)+)", output)
    assert m, f"no job stats table in:\n{output[-3000:]}"
    rows = dict(line.split() for line in m[1].splitlines())
    return {rule: int(n) for rule, n in rows.items() if rule not in (target, "total")}


def dry_run(workdir, config, name, snakefile=REPO / "Snakefile", target="all"):
    """Dry-run `target` (the default one, `all`, or e.g. `gradquant`) on `config` (a dict) in `workdir`:
    {rule: sorted outputs} it would run."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = () if target == "all" else (target,)
    output = snakemake(workdir, path, "--dry-run", *targets, snakefile=snakefile)
    if "Nothing to be done" in output:
        return {}
    found = jobs(output, target)
    assert {rule: len(v) for rule, v in found.items()} == job_stats(output, target), output[-3000:]
    return found


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """(workdir, config dict) of the session's complete tiny run (conftest.tiny_run)."""
    config = yaml.safe_load(TINY.read_text())
    assert dry_run(tiny_run, config, "same") == {}, "an unchanged config must have nothing to do"
    return tiny_run, config


@pytest.fixture(scope="module")
def every_job(tiny):
    """{rule: outputs} of every job of the tiny workflow (a forced dry-run)."""
    workdir, _ = tiny
    return jobs(snakemake(workdir, TINY, "--dry-run", "--forceall"))


def _copy(config):
    return copy.deepcopy(config)  # keeps the key order: see test_reordered_config_reruns_nothing


def _searched(config):
    return [m for m in config["methods"] if method_estimator(m) is not None]


def _sets(config):
    return [(n, s) for n in config["study"]["set_sizes"] for s in range(config["study"]["sets_per_size"])]


def _decisions(config, budgets, sets=None):
    sets = _sets(config) if sets is None else sets
    return sorted(
        f"results/tiny/decisions/{m}/set_{n}x{s}/{b}.json" for m in _searched(config) for n, s in sets for b in budgets
    )


def _eval_jobs(config, sets=None):
    """First outputs of the evaluate_decisions jobs: one job per (method, set) evaluates all budgets."""
    sets = _sets(config) if sets is None else sets
    first = config["budgets"][0]
    return sorted(f"results/tiny/eval/{m}/set_{n}x{s}/{first}.json" for m in _searched(config) for n, s in sets)


STUDY = ["results/tiny/study.csv"]


def _sanity(config):
    """The sanity_check jobs (one per searched method: its no-budget solves on every set)."""
    return sorted(f"results/tiny/sanity/{m}.json" for m in _searched(config))


PLOTS = ["results/tiny/plots/accuracy_vs_size.png"]
HEATMAP = ["results/tiny/plots/interaction_heatmap.png"]  # CLADO's matrix of the largest first set
FT_TABLE = {"finetune_table": ["results/tiny/finetune.csv"], "finetune_plot": ["results/tiny/plots/finetune.png"]}


def _finetuned(config, keep=lambda target: True):
    """{finetune, evaluate_finetuned: first outputs} of the config's fine-tuning targets that `keep`
    accepts, with the fine-tuning table and plot (empty if none is kept)."""
    names = []
    for t in config["finetune"]["targets"]:
        name = f"uniform/{t['option']}" if t["method"] == "uniform" else f"{t['method']}/set_{t['set']}/{t['budget']}"
        if keep(t):
            names.append(name)
    if not names:
        return {}
    return {
        "finetune": sorted(f"results/tiny/finetuned/{n}.pt" for n in names),
        "evaluate_finetuned": sorted(f"results/tiny/finetuned/{n}.json" for n in names),
        **FT_TABLE,
    }


def _searched_target(sets=None):
    """keep for _finetuned: the searched decisions (of `sets`, "NxS" names; all when None)."""
    return lambda t: t["method"] != "uniform" and (sets is None or t["set"] in sets)


def test_changed_budget_reruns_only_its_solves(tiny):
    """(a) A changed budget: only its solves and evaluations, then the study table and plots."""
    workdir, config = tiny
    changed = _copy(config)
    changed["budgets"] = ["avg_bits-4", "avg_bits-5"]  # avg_bits-6 -> avg_bits-5
    decisions = _decisions(config, ["avg_bits-5"])
    assert len(decisions) == 12  # 6 searched methods x 2 sets
    expected = {
        "check_budgets": ["results/tiny/budgets.json"],
        "solve_budget": decisions,
        "evaluate_decisions": _eval_jobs(changed),
        "study_table": STUDY,
        "study_plots": PLOTS,
        # one job evaluates every budget of a (method, set): the fine-tuned target's PTQ evaluation is
        # written again, so the PTQ-vs-fine-tuned table is rebuilt; nothing is fine-tuned again
        **FT_TABLE,
    }
    assert dry_run(workdir, changed, "budget_changed") == expected


def test_added_budget_reruns_only_its_solves(tiny):
    """(a) An added budget: the same, the existing budgets' decisions stay."""
    workdir, config = tiny
    added = _copy(config)
    added["budgets"] = config["budgets"] + ["avg_bits-5"]
    decisions = _decisions(config, ["avg_bits-5"])
    expected = {
        "check_budgets": ["results/tiny/budgets.json"],
        "solve_budget": decisions,
        "evaluate_decisions": _eval_jobs(added),
        "study_table": STUDY,
        "study_plots": PLOTS,
        **FT_TABLE,  # as above
    }
    assert dry_run(workdir, added, "budget_added") == expected


def test_larger_pool_computes_only_new_batches(tiny):
    """(b) A larger batch pool: exactly the batches that no finished batch file covers are computed
    (for every estimator); a set is re-pooled (and its solves, evaluations, the study redone) exactly
    when its batch list changed; every other set, and every finished batch file, stays."""
    workdir, config = tiny
    old_pool, new_pool = config["sensitivity"]["pool_batches"], 5
    bigger = _copy(config)
    bigger["sensitivity"]["pool_batches"] = new_pool
    old = {ns: sensitivity_set(*ns, old_pool, config["seed"]) for ns in _sets(config)}
    new = {ns: sensitivity_set(*ns, new_pool, config["seed"]) for ns in _sets(config)}
    new_batches = sorted(set().union(*new.values()) - set().union(*old.values()))
    changed_sets = [ns for ns in _sets(config) if new[ns] != old[ns]]
    # The tiny config's sets: the test means something only if the pool change moves them.
    assert new_batches and changed_sets, (old, new)
    # per-batch estimators; LIMPQ's set files are training runs on the set's batches
    estimators = sorted({method_estimator(m) for m in _searched(config)} - {"limpq"})
    sens = "results/tiny/sensitivity"
    expected = {
        "sensitivity_batch": sorted(f"{sens}/{e}/batch_{b}.npz" for e in estimators for b in new_batches),
        "pool_set": sorted(f"{sens}/{e}/set_{n}x{s}.npz" for e in estimators for n, s in changed_sets),
        # retrained exactly when the set's batches changed (the batch ids are its param, not the pool size)
        "limpq_indicators": sorted(f"{sens}/limpq/set_{n}x{s}.npz" for n, s in changed_sets),
        "solve_budget": _decisions(config, config["budgets"], changed_sets),
        "sanity_check": _sanity(config),
        "evaluate_decisions": _eval_jobs(config, changed_sets),
        "study_table": STUDY,
        "study_plots": PLOTS,
        **_finetuned(config, _searched_target({f"{n}x{s}" for n, s in changed_sets})),
    }
    if (max(config["study"]["set_sizes"]), 0) in changed_sets:  # the heat map's set
        expected["interaction_heatmap"] = HEATMAP
    assert dry_run(workdir, bigger, "pool") == expected
    # The finished batch files the new sets reuse are there and are not recomputed.
    reused = set().union(*new.values()) - set(new_batches)
    for e in estimators:
        for b in reused:
            assert (workdir / sens / e / f"batch_{b}.npz").is_file()


def test_quantizer_change_invalidates_calibration_and_after(tiny, every_job):
    """(c) A quantizer setting: calibration and every stage after it, not training."""
    workdir, config = tiny
    changed = _copy(config)
    changed["quant"].setdefault("weight", {})["observer"] = "mse"
    found = dry_run(workdir, changed, "quant")
    assert "train_model" not in found
    assert found == {rule: outs for rule, outs in every_job.items() if rule != "train_model"}


def test_added_finetune_target_fine_tunes_only_it(tiny):
    """A fine-tuning target added to the config: only it is fine-tuned and evaluated (the targets
    list is no param of the others), then its tables."""
    workdir, config = tiny
    added = _copy(config)
    new = {"method": "mpqco", "set": "1x0", "budget": "avg_bits-6"}
    added["finetune"]["targets"] = config["finetune"]["targets"] + [new]
    expected = {**_finetuned(added, lambda t: t == new), "study_table": STUDY, "study_plots": PLOTS}
    assert dry_run(workdir, added, "ft_added") == expected


def test_finetune_setting_reruns_fine_tuning_not_solves(tiny):
    """A fine-tuning setting (epochs) reruns every fine-tuning and what follows: no solve, no PTQ evaluation."""
    workdir, config = tiny
    changed = _copy(config)
    changed["finetune"]["epochs"] = config["finetune"]["epochs"] + 1
    assert dry_run(workdir, changed, "ft_epochs") == {**_finetuned(config), "study_table": STUDY, "study_plots": PLOTS}


def test_limpq_pruning_reruns_only_limpq(tiny):
    """Turning on LIMPQP's pruning retrains LIMPQ's indicators and redoes its solves, its (pruned)
    evaluations and its fine-tuning; no other method's work, and changing alpha only re-solves."""
    workdir, config = tiny
    changed = _copy(config)
    changed["limpq"] = {**config["limpq"], "prune": {"method": "l1_unstructured", "amount": 0.5}}
    only_limpq = {**config, "methods": ["limpq"]}
    expected = {
        "limpq_indicators": sorted(f"results/tiny/sensitivity/limpq/set_{n}x{s}.npz" for n, s in _sets(config)),
        "solve_budget": _decisions(only_limpq, config["budgets"]),
        "sanity_check": ["results/tiny/sanity/limpq.json"],
        "evaluate_decisions": _eval_jobs(only_limpq),
        "study_table": STUDY,
        "study_plots": PLOTS,
        **_finetuned(config, lambda t: t["method"] == "limpq"),
    }
    assert dry_run(workdir, changed, "limpq_prune") == expected
    alpha = _copy(config)
    alpha["limpq"] = {**config["limpq"], "alpha": 1.0}
    assert dry_run(workdir, alpha, "limpq_alpha") == {k: v for k, v in expected.items() if k != "limpq_indicators"}


def test_plot_settings_rerun_only_plots(tiny):
    """(d) Plot settings: only the plots (the study's and the PTQ study's), not their tables."""
    workdir, config = tiny
    changed = _copy(config)
    changed["plots"]["dpi"] = config["plots"]["dpi"] + 10
    assert dry_run(workdir, changed, "plots") == {
        "study_plots": PLOTS,
        "interaction_heatmap": HEATMAP,
        "ptq_plot": ["results/tiny/plots/ptq.png"],
        "finetune_plot": FT_TABLE["finetune_plot"],
    }


def _sorted_keys(obj):
    if isinstance(obj, dict):
        return {k: _sorted_keys(obj[k]) for k in sorted(obj, reverse=True)}
    return obj


def test_reordered_config_reruns_nothing(tiny):
    """The same config with its keys in another order (a YAML edit that changes nothing) reruns nothing."""
    workdir, config = tiny
    assert dry_run(workdir, _sorted_keys(config), "reordered") == {}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """A copy of the repository's tracked and untracked, not ignored files (no venv, no results)."""
    dest = tmp_path_factory.mktemp("repo") / "mpqflow-copy"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_unchanged_repo_copy_reruns_nothing(tiny, repo_copy):
    """The control for (e): the copy itself (another base directory, the same code) reruns nothing."""
    workdir, config = tiny
    assert dry_run(workdir, config, "copy", snakefile=repo_copy / "Snakefile") == {}


def test_solver_code_change_invalidates_solves(tiny, repo_copy, tmp_path):
    """(e) Editing mpqflow/optimize reruns the budget check, every solve and what follows, no sensitivity."""
    workdir, config = tiny
    edited = tmp_path / "edited"
    shutil.copytree(repo_copy, edited)
    with open(edited / "mpqflow" / "optimize" / "solve.py", "a") as f:
        f.write("\n# an edit the solve stage must notice\n")
    found = dry_run(workdir, config, "code", snakefile=edited / "Snakefile")
    decisions = _decisions(config, config["budgets"])
    assert found == {
        "check_budgets": ["results/tiny/budgets.json"],
        "solve_budget": decisions,
        "sanity_check": _sanity(config),
        "evaluate_decisions": _eval_jobs(config),
        "study_table": STUDY,
        "study_plots": PLOTS,
        **_finetuned(config, _searched_target()),  # a re-solved decision is fine-tuned again
    }
    assert not UPSTREAM & found.keys()


def test_objective_code_change_resolves_but_never_remeasures(tiny, repo_copy, tmp_path):
    """Editing the objectives (mpqflow/methods.py: clado_na's shrinkage, say) re-solves, re-checks and
    re-evaluates; the estimators do not import it, so no sensitivity is measured again."""
    workdir, config = tiny
    found = dry_run(workdir, config, "code", snakefile=_edit(repo_copy, tmp_path, "mpqflow/methods.py"))
    assert {"solve_budget", "sanity_check", "evaluate_decisions"} <= found.keys()
    assert not {"train_model", "calibrate", "sensitivity_batch", "pool_set", "limpq_indicators"} & found.keys()


def test_sensitivity_code_change_invalidates_sensitivity(tiny, every_job, repo_copy, tmp_path):
    """(e) Editing mpqflow/sensitivity reruns the batch files, the pooling and all after them, not
    training, calibration, the uniform evaluations or the PTQ study (which runs no estimator)."""
    workdir, config = tiny
    edited = tmp_path / "edited"
    shutil.copytree(repo_copy, edited)
    init = edited / "mpqflow" / "sensitivity" / "__init__.py"
    init.write_text(init.read_text() + "\n# an edit the sensitivity stage must notice\n")
    found = dry_run(workdir, config, "code", snakefile=edited / "Snakefile")
    keep = {
        "train_model",
        "calibrate",
        "check_budgets",
        "evaluate_uniform",
        "uniform_table",
        "ptq_variant",
        "ptq_table",
        "ptq_plot",
    }
    expected = {rule: outs for rule, outs in every_job.items() if rule not in keep}
    expected.update(_finetuned(config, _searched_target()))  # not the uniform option's fine-tuning
    assert found == expected


def _every_evaluation(config):
    """{rule: first outputs} of every job that evaluates (uniform, decisions, PTQ) and what follows."""
    return {
        "evaluate_uniform": ["results/tiny/eval/uniform/w8a8.json"],
        "uniform_table": ["results/tiny/eval/uniform.csv"],
        "evaluate_decisions": _eval_jobs(config),
        "study_table": STUDY,
        "study_plots": PLOTS,
        "ptq_variant": sorted(f"results/tiny/ptq/{v}.json" for v in config["ptq"]["variants"]),
        "ptq_table": ["results/tiny/ptq.csv"],
        "ptq_plot": ["results/tiny/plots/ptq.png"],
        # the fine-tuned models are evaluated again; their fine-tuning is not repeated
        **{k: v for k, v in _finetuned(config).items() if k != "finetune"},
    }


def test_evaluation_code_change_reruns_only_evaluations(tiny, repo_copy, tmp_path):
    """(f) Editing the evaluation code (mpqflow/evaluate.py) re-evaluates the decisions, the uniform
    options and the PTQ variants (which evaluate too) and redraws what follows; it never retrains,
    recalibrates, re-measures sensitivities or re-solves."""
    workdir, config = tiny
    edited = tmp_path / "edited"
    shutil.copytree(repo_copy, edited)
    with open(edited / "mpqflow" / "evaluate.py", "a") as f:
        f.write("\n# an edit the evaluation stage must notice\n")
    found = dry_run(workdir, config, "code", snakefile=edited / "Snakefile")
    assert found == _every_evaluation(config)
    assert not {"train_model", "calibrate", "sensitivity_batch", "pool_set", "solve_budget"} & found.keys()


def test_evaluation_batch_size_reruns_no_sensitivity(tiny):
    """(g) evaluation.batch_size reruns the evaluations (and the PTQ variants, which evaluate) and
    what follows them: not training, calibration, the sensitivity batches or the solves."""
    workdir, config = tiny
    changed = _copy(config)
    changed["evaluation"]["batch_size"] = config["evaluation"]["batch_size"] // 2
    assert dry_run(workdir, changed, "eval_batch") == _every_evaluation(config)


def _edit(repo_copy, tmp_path, rel):
    """A copy of the repository with one comment appended to `rel`; its Snakefile."""
    edited = tmp_path / "edited"
    shutil.copytree(repo_copy, edited)
    with open(edited / rel, "a") as f:
        f.write("\n# an edit the stages that run this file must notice\n")
    return edited / "Snakefile"


def test_quantizer_code_change_recalibrates_but_never_retrains(tiny, every_job, repo_copy, tmp_path):
    """(h) Editing the quantizers (mpqflow/quant) recalibrates and reruns what follows; training
    imports no quantizer code, so the model stays."""
    workdir, config = tiny
    found = dry_run(workdir, config, "code", snakefile=_edit(repo_copy, tmp_path, "mpqflow/quant/functional.py"))
    assert found == {rule: outs for rule, outs in every_job.items() if rule != "train_model"}


def test_plot_code_change_redraws_only_plots(tiny, repo_copy, tmp_path):
    """(i) Editing the study's figures (mpqflow/study_plots.py) redraws the study's plots, rebuilds its
    table (the study stage owns both) and nothing else: no evaluation, solve, nor the other reports
    (the uniform table, the PTQ and fine-tuning studies draw with their own modules)."""
    workdir, config = tiny
    found = dry_run(workdir, config, "code", snakefile=_edit(repo_copy, tmp_path, "mpqflow/study_plots.py"))
    assert found == {"study_table": STUDY, "study_plots": PLOTS, "interaction_heatmap": HEATMAP}


# The gradient-quantization study is not part of `all`: its own short run, two runs of one epoch.
GRADQUANT = {
    "seed": 0, "device": "cpu", "threads": 1,
    "models": {"d": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 1}}},
    "methods": ["uniform"], "finetune": None, "ptq": None,
    "gradquant": {"methods": ["none", "qsgd"], "bits": [3], "epochs": 1, "bucket_size": 512},
}  # fmt: skip


@pytest.fixture(scope="module")
def gradquant_run(tmp_path_factory):
    """The working directory of one complete `snakemake gradquant` on GRADQUANT (about 40 s on 2 cores)."""
    workdir = tmp_path_factory.mktemp("gradquant")
    path = workdir / "gradquant.yaml"
    path.write_text(yaml.safe_dump(GRADQUANT, sort_keys=False))
    run_snakemake(workdir, "gradquant", "--quiet", "rules", configfile=path, timeout=600)
    assert (workdir / "results" / "d" / "gradquant.csv").is_file()
    assert dry_run(workdir, GRADQUANT, "same", target="gradquant") == {}
    return workdir


def test_gradquant_plot_code_change_redraws_only_the_gradquant_report(tiny, gradquant_run, repo_copy, tmp_path):
    """(j) Editing the gradient-quantization study's figures (mpqflow/gradquant_study.py) redoes its
    report (table, curves, plots, markdown) and nothing else: not its runs, nor anything of `all`
    (the study, the PTQ and fine-tuning reports import none of it). Editing the study's figures, in
    turn, leaves the gradient-quantization report alone."""
    workdir, config = tiny
    edited = _edit(repo_copy, tmp_path, "mpqflow/gradquant_study.py")
    assert dry_run(gradquant_run, GRADQUANT, "code", snakefile=edited, target="gradquant") == {
        "gradquant_study": ["results/d/gradquant.csv"]
    }
    assert dry_run(workdir, config, "code", snakefile=edited) == {}
    study_edited = _edit(repo_copy, tmp_path / "study", "mpqflow/study_plots.py")
    assert dry_run(gradquant_run, GRADQUANT, "study_code", snakefile=study_edited, target="gradquant") == {}

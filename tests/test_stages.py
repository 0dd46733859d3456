"""Unit tests of the stage modules (mpqflow/stages) and the artifacts they pass along, without Snakemake.

One tiny digits CNN is trained once per module (one epoch); every stage runs on it in a temp dir, the
way its workflow script calls it, so a stage change is checked in seconds instead of by the tiny run.
"""

import functools
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from mpqflow.artifacts import (
    load_batch_file,
    load_calibration,
    load_checkpoint,
    load_decision,
    load_layer_table,
    save_batch_file,
    save_decision,
)
from mpqflow.config import Config, ConfigError, QuantConfig, SamplePlanConfig, validate_config
from mpqflow.io import file_sha256
from mpqflow.methods import estimated_loss_increase
from mpqflow.optimize import InfeasibleBudget
from mpqflow.stages import calibrate, evaluate, sensitivity, solve, study, train
from mpqflow.study import choice_vector, estimate_standard_errors

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 1, "lr": 0.1}}},
    "quant": {"w_bits": [2, 8], "a_bits": [8], "calibration_samples": 64, "calibration_batch_size": 32},
    "sensitivity": {"batch_size": 16, "pool_batches": 2},
    "methods": ["uniform", "mpqco", "clado", "clado_raw"],
    "budgets": ["avg_bits-4", "avg_bits-6"],
    "study": {"set_sizes": [1, 2], "sets_per_size": 1},
    "solver": {"backend": "highs", "time_limit": 20},
    "plots": {"dpi": 50},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, dir) with the model trained and calibrated by the model stage."""
    cfg = Config.from_dict(validate_config(RAW))
    d = tmp_path_factory.mktemp("stages")
    m = cfg.models["m"]
    fp = train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, str(d / "model.pt"))
    assert 0.3 < fp["top1"] <= 1.0
    calibrate.calibrate(
        m,
        cfg.quant,
        cfg.seed,
        cfg.runtime,
        str(d / "model.pt"),
        str(d / "calibration.pt"),
        str(d / "layers.json"),
        plan=cfg.sample_plan,
    )
    return cfg, d


def test_config_sections_round_trip_and_refuse_partial_dicts():
    raw = validate_config(RAW)
    cfg = Config.from_dict(raw)
    assert cfg.quant.to_dict() == raw["quant"] and cfg.models["m"].to_dict() == raw["models"]["m"]
    assert cfg.quant.options == [(8, 8), (2, 8)]
    assert cfg.solver.node_limit_for("highs") is None
    assert cfg.sensitivity.of_estimator("hawq") == {
        "batch_size": 16,
        "hawq_max_probes": 1000,
        "hawq_min_probes": 30,
        "hawq_rel_se": raw["sensitivity"]["hawq_rel_se"],
        "hawq_sketch": 16,
        "hawq_seed": 0,
    }
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['a_bits'"):
        QuantConfig.from_dict({k: v for k, v in raw["quant"].items() if k != "a_bits"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        QuantConfig.from_dict({**raw["quant"], "colour": 1})
    with pytest.raises(AttributeError):
        cfg.quant.fixed_bits = 4  # frozen


def test_model_stage_artifacts(run):
    cfg, d = run
    ckpt = load_checkpoint(d / "model.pt")
    assert ckpt["arch"] == "digits_cnn" and set(ckpt["fp_metrics"]) >= {"top1", "loss"}
    table = load_layer_table(d / "layers.json")
    assert table.candidates == ("conv2", "conv3") and table.fixed == {"conv1": (8, 8), "fc": (8, 8)}
    state, table2 = load_calibration(d / "calibration.pt", file_sha256(d / "model.pt"), cfg.quant.to_dict())
    assert table2 == table and set(state["qparams"]) == set(table.layers)
    with pytest.raises(ValueError, match="calibrated for another checkpoint"):
        load_calibration(d / "calibration.pt", "0" * 64, cfg.quant.to_dict())
    other = {**cfg.quant.to_dict(), "fixed_bits": 4}
    with pytest.raises(ValueError, match=r"other quant settings.*\['fixed_bits'\]"):
        load_calibration(d / "calibration.pt", file_sha256(d / "model.pt"), other)


def test_not_a_checkpoint_names_the_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# not a checkpoint\n")
    with pytest.raises(ValueError, match=r"README\.md.*not a PyTorch checkpoint") as err:
        load_checkpoint(readme)
    assert "weights_only=False" not in str(err.value)


def test_calibrate_refuses_a_pool_larger_than_the_split(run, tmp_path):
    cfg, d = run
    big = SamplePlanConfig(cfg.quant.calibration_samples, 64, 100, cfg.seed)
    with pytest.raises(
        ValueError,
        match=r"quant.calibration_samples \(64\).*sensitivity.batch_size \(64\).*"
        r"pool of 100 batches needs 6464",
    ):
        calibrate.calibrate(
            cfg.models["m"],
            cfg.quant,
            cfg.seed,
            cfg.runtime,
            str(d / "model.pt"),
            str(tmp_path / "c.pt"),
            str(tmp_path / "l.json"),
            plan=big,
        )
    assert not (tmp_path / "c.pt").exists()


@pytest.fixture(scope="module")
def pooled(run):
    """mpqco and clado per-batch files for both pool batches, pooled into set_2x0 and set_1x0."""
    cfg, d = run
    plan = SamplePlanConfig(
        cfg.quant.calibration_samples, cfg.sensitivity.batch_size, cfg.sensitivity.pool_batches, cfg.seed
    )
    out = {}
    for est in ("mpqco", "clado"):
        batches = []
        for b in range(2):
            path = d / "sensitivity" / est / f"batch_{b}.npz"
            sensitivity.sensitivity_batch(
                cfg.models["m"],
                cfg.quant,
                plan,
                {**cfg.sensitivity.of_estimator(est), "progress": False},
                cfg.runtime,
                str(d / "model.pt"),
                str(d / "calibration.pt"),
                est,
                b,
                str(path),
            )
            batches.append(str(path))
        sensitivity.pool_set(batches, str(d / "sensitivity" / est / "set_2x0.npz"), 2, 0)
        sensitivity.pool_set(batches[:1], str(d / "sensitivity" / est / "set_1x0.npz"), 1, 0)
        out[est] = d / "sensitivity" / est
    return out


def test_sensitivity_stage_pools_exactly(pooled):
    one = load_batch_file(pooled["mpqco"] / "batch_0.npz")
    two = load_batch_file(pooled["mpqco"] / "batch_1.npz")
    both = load_batch_file(pooled["mpqco"] / "set_2x0.npz")
    assert int(both["count"]) == int(one["count"]) + int(two["count"]) == 32
    np.testing.assert_allclose(both["sq_sum"], one["sq_sum"] + two["sq_sum"], rtol=1e-12)


def test_check_budgets_and_solve_stage(run, pooled, tmp_path):
    cfg, d = run
    caps = solve.check_budgets(str(d / "layers.json"), ["avg_bits-4", "bitops_rel-0.5"], str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(caps))
    assert caps["avg_bits-4"]["bitops_cap"] is None and caps["bitops_rel-0.5"]["size_cap_bits"] is None
    with pytest.raises(InfeasibleBudget, match=r"avg_bits-2\.1 is infeasible: the smallest achievable size"):
        solve.check_budgets(str(d / "layers.json"), ["avg_bits-2.1"])
    out = tmp_path / "decisions" / "clado" / "set_2x0" / "avg_bits-4.json"
    dec = solve.solve_budget(
        str(d / "layers.json"), str(pooled["clado"] / "set_2x0.npz"), "clado", "avg_bits-4", cfg.solver, str(out), {}
    )
    assert json.loads(out.read_text())["choice"] == dec["choice"]
    assert (dec["set_size"], dec["set_id"]) == (2, 0) and dec["avg_bits"] <= 4 + 1e-9
    assert dec["solver"]["status"] == "optimal" and set(dec["choice"]) <= {"w8a8", "w2a8"}


def test_sanity_check_stage(run, pooled, tmp_path):
    """No budget: MPQCO's squared output errors are >= 0 and smallest at w8a8, so every layer ends
    there; a set where one option 'lowers the loss' (a negative entry, as noise makes CLADO's) fails,
    and the study tables carry the verdict per method and set."""
    cfg, d = run
    layers = str(d / "layers.json")
    good = solve.sanity_check(
        layers, str(pooled["mpqco"] / "set_2x0.npz"), "mpqco", cfg.solver, {}, str(tmp_path / "a.json")
    )
    assert good["passes"] and good["layers_at_highest"] == good["layers"] > 0 and good["highest"] == "w8a8"
    assert good["estimated_loss_increase"] == pytest.approx(good["estimated_at_highest"])
    assert json.loads((tmp_path / "a.json").read_text())["passes"] is True
    noisy = load_batch_file(pooled["mpqco"] / "set_2x0.npz")
    options = [tuple(o) for o in np.asarray(noisy["options"]).reshape(-1, 2)]
    i = options.index((2, 8))  # layer 0 at w2a8
    noisy["sq_sum"] = noisy["sq_sum"].copy()
    noisy["sq_sum"][i] = -1.0
    noisy["set_size"], noisy["set_id"] = 1, 1  # the identity the set file records
    save_batch_file(str(tmp_path / "set_1x1.npz"), noisy)
    bad = solve.sanity_check(layers, str(tmp_path / "set_1x1.npz"), "mpqco", cfg.solver, {}, str(tmp_path / "b.json"))
    assert not bad["passes"] and bad["layers_at_highest"] == bad["layers"] - 1 and bad["choice"][0] == "w2a8"
    assert (bad["set_size"], bad["set_id"]) == (1, 1)
    assert bad["estimated_loss_increase"] < bad["estimated_at_highest"]
    sanity = study.sanity_table([str(tmp_path / "b.json"), str(tmp_path / "a.json")])
    assert list(sanity.set_size) == [1, 2] and list(sanity.passes) == [False, True]


def test_solve_and_study_stages_import_no_torch():
    import subprocess
    import sys

    code = "import sys, mpqflow.stages.solve, mpqflow.stages.study; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_evaluate_and_study_stages(run, pooled, tmp_path):
    cfg, d = run
    m, layers = cfg.models["m"], str(d / "layers.json")
    uni = [str(tmp_path / "eval" / "uniform" / f"{o}.json") for o in ("w8a8", "w2a8")]
    rows = evaluate.evaluate_uniform(
        m,
        cfg.quant,
        cfg.seed,
        cfg.evaluation,
        cfg.runtime,
        str(d / "model.pt"),
        str(d / "calibration.pt"),
        ["w8a8", "w2a8"],
        uni,
    )
    assert rows[0]["avg_bits"] == pytest.approx(8.0) and rows[1]["size_mb"] < rows[0]["size_mb"]
    decisions, evals = [], []
    for n in (1, 2):
        for b in cfg.budgets:
            path = tmp_path / "decisions" / "mpqco" / f"set_{n}x0" / f"{b}.json"
            solve.solve_budget(layers, str(pooled["mpqco"] / f"set_{n}x0.npz"), "mpqco", b, cfg.solver, str(path), {})
            decisions.append(str(path))
            evals.append(str(path).replace("/decisions/", "/eval/"))
    evaluate_decisions = functools.partial(
        evaluate.evaluate_decisions,
        m,
        cfg.quant,
        cfg.sample_plan,
        cfg.evaluation,
        cfg.runtime,
        str(d / "model.pt"),
        str(d / "calibration.pt"),
    )
    res = evaluate_decisions(decisions, evals)
    assert [r["budget"] for r in res] == list(cfg.budgets) * 2
    assert all(np.isfinite(r["measured_loss_increase"]) and r["avg_bits"] <= 6 + 1e-9 for r in res)
    # Evaluating one decision alone gives the same numbers as in the batch (no state leaks between them).
    alone = evaluate_decisions(decisions[-1:], [str(tmp_path / "alone.json")])[0]
    assert {k: alone[k] for k in ("top1", "loss", "measured_loss_increase")} == {
        k: res[-1][k] for k in ("top1", "loss", "measured_loss_increase")
    }
    checks = [str(tmp_path / "sanity" / "mpqco.json")]
    sets = [str(pooled["mpqco"] / f"set_{n}x0.npz") for n in (1, 2)]
    assert len(solve.sanity_checks(layers, sets, "mpqco", cfg.solver, checks[0], {})) == 2
    table = study.study_table(
        uni, evals, str(tmp_path / "study.csv"), sanity_paths=checks, sanity_csv=str(tmp_path / "sanity.csv")
    )
    assert len(table) == 2 + len(evals) and set(table.method) == {"uniform", "mpqco"}
    assert table.sanity_pass[table.method == "uniform"].isna().all()
    assert table.sanity_pass[table.method == "mpqco"].eq(True).all()
    assert list(pd.read_csv(tmp_path / "sanity.csv").passes) == [True, True]
    outs = {k: str(tmp_path / "plots" / f"{k}.png") for k in ("accuracy", "pareto", "sanity", "bits")}
    outs["auc"], outs["calibration"] = str(tmp_path / "pareto_auc.csv"), str(tmp_path / "calibration.csv")
    batch_files = sorted(str(p) for est in ("mpqco", "clado") for p in pooled[est].glob("batch_*.npz"))
    study.study_plots(str(tmp_path / "study.csv"), layers, outs, cfg.plots, batch_files)
    outs["heatmap"] = str(tmp_path / "plots" / "heatmap.png")
    study.interaction_heatmap(str(pooled["clado"] / "set_2x0.npz"), layers, outs["heatmap"], cfg.plots)
    for k, p in outs.items():
        head = open(p, "rb").read(8)
        assert head == b"\x89PNG\r\n\x1a\n" if k not in ("auc", "calibration") else head.startswith(b"method")
    calib = pd.read_csv(outs["calibration"])
    assert list(zip(calib.method, calib.set_size, calib.decisions)) == [("mpqco", 1, 2), ("mpqco", 2, 2)]
    # error bars: MPQCO's estimate is linear in the batch means, so a decision's SE is the spread of its
    # two single-batch estimates over √(set size), computed here by hand
    se = estimate_standard_errors(table, batch_files, load_layer_table(layers), {})
    assert np.isnan(se[table.method.to_numpy() == "uniform"]).all()
    for i in np.flatnonzero(table.method.to_numpy() == "mpqco"):
        x = choice_vector(table.choice.iloc[i], load_layer_table(layers))
        per_batch = [
            estimated_loss_increase("mpqco", (None, load_batch_file(p)["sq_sum"] / load_batch_file(p)["count"]), x)
            for p in sorted(str(p) for p in pooled["mpqco"].glob("batch_*.npz"))
        ]
        assert se[i] == pytest.approx(np.std(per_batch, ddof=1) / np.sqrt(table.set_size.iloc[i]), rel=1e-9)
    assert (calib.se_mean > 0).all()
    mpq = table[(table.method == "mpqco") & (table.set_size == 1)]
    assert calib.mae[0] == pytest.approx(
        (mpq.estimated_loss_increase - mpq.measured_loss_increase).abs().mean(), rel=1e-5
    )


def test_calibration_table_ranks_and_errors():
    rows = [
        {"method": "a", "set_size": 1, "estimated_loss_increase": e, "measured_loss_increase": m}
        for e, m in ((0.1, 0.2), (0.2, 0.3), (0.3, 0.5), (0.4, 0.4))
    ]
    rows += [
        {"method": "b", "set_size": 4, "estimated_loss_increase": -e, "measured_loss_increase": e} for e in (1, 2, 3)
    ]
    rows += [{"method": "uniform", "set_size": None, "estimated_loss_increase": None, "measured_loss_increase": 0.1}]
    calib = study.calibration_table(pd.DataFrame(rows)).set_index("method")
    assert calib.loc["a", "spearman"] == pytest.approx(0.8) and calib.loc["b", "spearman"] == pytest.approx(-1.0)
    assert calib.loc["a", "mae"] == pytest.approx(0.1) and calib.loc["a", "bias"] == pytest.approx(-0.1)
    assert calib.loc["b", "bias"] == pytest.approx(-4.0) and "uniform" not in calib.index


def test_decision_for_another_table_is_refused(run, tmp_path):
    cfg, d = run
    table = load_layer_table(d / "layers.json")
    bad = tmp_path / "d.json"
    record = {"method": "mpqco", "budget": "avg_bits-4", "set_size": 1, "set_id": 0}
    save_decision(bad, {**record, "candidates": ["conv3", "conv2"], "choice": ["w8a8", "w8a8"]})
    with pytest.raises(ValueError, match="candidate layers differ"):
        load_decision(bad, table)
    save_decision(bad, {**record, "candidates": list(table.candidates), "choice": ["w4a8", "w8a8"]})
    with pytest.raises(ValueError, match=r"options \['w4a8'\] are not in the option table"):
        load_decision(bad, table)


def test_default_config_builds_every_section():
    from pathlib import Path

    from mpqflow.config import load_config

    cfg = Config.from_dict(load_config(Path(__file__).resolve().parent.parent / "config.yaml"))
    assert cfg.models["digits_resnet20"].arch == "resnet20" and cfg.sample_plan.pool_batches == 8
    assert yaml.safe_load(yaml.safe_dump(cfg.quant.to_dict())) == cfg.quant.to_dict()


def test_constant_logits_fail_the_mpqco_job_naming_the_layers(run, tmp_path):
    """MPQCO divides by the true-class logit: a model whose logits are constant zero (classifier weight
    and bias 0) makes its entries 0/0. The per-batch job refuses to write its file, naming the
    estimator, the batch and the layers, instead of the solve failing on `linear has non-finite entries`."""
    import torch

    from mpqflow.artifacts import load_checkpoint, save_checkpoint

    cfg, d = run
    ckpt = load_checkpoint(d / "model.pt")
    state = dict(ckpt["state_dict"])
    fc = [k for k in state if k.endswith(".weight")][-1].removesuffix(".weight")  # the classifier
    state[f"{fc}.weight"], state[f"{fc}.bias"] = (
        torch.zeros_like(state[f"{fc}.weight"]),
        torch.zeros_like(state[f"{fc}.bias"]),
    )
    save_checkpoint(tmp_path / "model.pt", state, ckpt["arch"], ckpt["fp_metrics"])
    m = cfg.models["m"]
    calibrate.calibrate(m, cfg.quant, cfg.seed, cfg.runtime, str(tmp_path / "model.pt"),
                        str(tmp_path / "calibration.pt"), str(tmp_path / "layers.json"))  # fmt: skip
    plan = SamplePlanConfig(
        cfg.quant.calibration_samples, cfg.sensitivity.batch_size, cfg.sensitivity.pool_batches, cfg.seed
    )
    out = tmp_path / "batch_1.npz"
    with pytest.raises(ValueError, match=r"mpqco on pool batch 1: non-finite sensitivities") as err:
        sensitivity.sensitivity_batch(m, cfg.quant, plan, {**cfg.sensitivity.of_estimator("mpqco"), "progress": False},
                                      cfg.runtime, str(tmp_path / "model.pt"), str(tmp_path / "calibration.pt"),
                                      "mpqco", 1, str(out))  # fmt: skip
    table = load_layer_table(tmp_path / "layers.json")
    assert f"sq_sum at {', '.join(table.candidates)}" in str(err.value), str(err.value)
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_non_finite_entries_are_named_by_layer_on_every_axis():
    """Per-option (n,), per-layer (L,) and pairwise (n, n) arrays: each entry names the layers of its axes."""
    from mpqflow.sensitivity.common import nonfinite_layers, refuse_nonfinite

    layers, K = ["a", "b", "c"], 2
    single, per_layer, pair = np.zeros(6), np.zeros(3), np.zeros((6, 6))
    single[3] = np.inf  # option 3 = layer b, second option
    per_layer[2] = np.nan
    pair[0, 5] = -np.inf  # layers a and c
    payload = {"single_sum": single, "trace_sum": per_layer, "pair_sum": pair, "count": np.int64(4),
               "ok_sum": np.ones(6), "mask": np.ones(3, bool)}  # fmt: skip
    assert nonfinite_layers(payload, layers, K) == {"single_sum": ["b"], "trace_sum": ["c"], "pair_sum": ["a", "c"]}
    with pytest.raises(ValueError, match=r"clado on pool batch 7: .*single_sum at b; trace_sum at c; pair_sum at a, c"):
        refuse_nonfinite(payload, layers, K, "clado on pool batch 7")
    refuse_nonfinite({"ok_sum": np.ones(6)}, layers, K, "fine")

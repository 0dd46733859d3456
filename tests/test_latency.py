"""Latency as a budget (issue 25, item 4): the per-layer latency table, its refusals, and the
latency_ms / latency_rel caps in every back-end, checked against brute force."""

import copy
import itertools
import json

import numpy as np
import pytest
import yaml
from conftest import TINY, run_snakemake
from test_optimize import AVAILABLE, make_problem

from mpqflow.artifacts import save_layer_table
from mpqflow.config import ConfigError
from mpqflow.deploy.latency import (
    LATENCY_COLUMNS,
    LatencyTableError,
    check_against_layers,
    latency_costs,
    read_latency_table,
)
from mpqflow.layers import LayerTable
from mpqflow.names import option_name
from mpqflow.optimize import Budget, InfeasibleBudget, NoLatencyTable, build_problem, caps_of, solve
from mpqflow.stages.solve import check_budgets
from mpqflow.study import STUDY_COLUMNS, study_table
from mpqflow.validation import validate_config

RAW = yaml.safe_load(TINY.read_text())

# A small layer table: first and last layers fixed at W8A8, three candidates, four options.
TABLE = LayerTable(
    layers=("conv1", "conv2", "conv3", "conv4", "fc"),
    candidates=("conv2", "conv3", "conv4"),
    fixed={"conv1": (8, 8), "fc": (8, 8)},
    options=((8, 8), (8, 4), (4, 8), (2, 4)),
    numel={"conv1": 100, "conv2": 2000, "conv3": 4000, "conv4": 3000, "fc": 500},
    macs={"conv1": 10_000, "conv2": 90_000, "conv3": 60_000, "conv4": 40_000, "fc": 500},
)


def _ms(layer: str, option) -> float:
    """A made-up but structured latency: MACs times a per-option speed, so options trade differently."""
    speed = {(8, 8): 1.0, (8, 4): 0.8, (4, 8): 0.7, (2, 4): 0.45}[tuple(option)]
    return round(TABLE.macs[layer] * speed / 1e4 + 0.05, 6)


def _rows(with_fixed=True, skip=(), extra=()):
    rows = [(l, o) for l in TABLE.candidates for o in TABLE.options if (l, option_name(o)) not in skip]
    if with_fixed:
        rows += [(l, o) for l, o in TABLE.fixed.items() if (l, option_name(o)) not in skip]
    return [(l, option_name(o), f"{_ms(l, o):g}", "0.01") for l, o in rows] + list(extra)


def _write(path, rows, header=LATENCY_COLUMNS):
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
    return path


# ---- the reader's refusals ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_column", r"line 1: column\(s\) \['spread'\] missing from the header"),
        ("bad_option", r"line 2: option 'W4A8': expected w<weight bits>a<activation bits>"),
        ("duplicate", r"line 16: layer 'conv2' option w8a8 is listed twice \(first on line 2\)"),
        ("zero_ms", r"line 2: ms '0'; expected a finite number of milliseconds > 0"),
        ("negative_ms", r"line 2: ms '-1.5'; expected a finite number of milliseconds > 0"),
        ("nan_ms", r"line 2: ms 'nan'; expected a finite number of milliseconds > 0"),
        ("inf_ms", r"line 2: ms 'inf'; expected a finite number of milliseconds > 0"),
        ("text_ms", r"line 2: ms 'fast' is not a number"),
        ("negative_spread", r"line 2: spread '-0.1'; expected a finite number of milliseconds >= 0"),
        ("short_row", r"line 2: 3 cells for the 4 columns of the header"),
        ("no_rows", r"has a header but no rows"),
    ],
)
def test_the_reader_refuses_a_bad_file_naming_it_and_the_line(tmp_path, case, expected):
    rows = _rows()
    first = list(rows[0])
    header = LATENCY_COLUMNS
    if case == "missing_column":
        header, rows = LATENCY_COLUMNS[:3], [r[:3] for r in rows]
    elif case == "bad_option":
        rows[0] = (first[0], "W4A8", *first[2:])
    elif case == "duplicate":
        rows.append(tuple(first))
    elif case.endswith("_ms"):
        value = {"zero_ms": "0", "negative_ms": "-1.5", "nan_ms": "nan", "inf_ms": "inf", "text_ms": "fast"}[case]
        rows[0] = (first[0], first[1], value, first[3])
    elif case == "negative_spread":
        rows[0] = (*first[:3], "-0.1")
    elif case == "short_row":
        rows[0] = tuple(first[:3])
    elif case == "no_rows":
        rows = []
    path = _write(tmp_path / "t4.csv", rows, header)
    with pytest.raises(LatencyTableError, match=expected) as err:
        read_latency_table(path)
    assert f"latency table {str(path)!r}" in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(LatencyTableError, match=r"'.*nowhere\.csv' is not an existing file"):
        read_latency_table(tmp_path / "nowhere.csv")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_option", r"no row for layer 'conv3' option w4a8; expected a row for every candidate layer"),
        ("missing_layer", r"no row for layer 'conv4' option w8a8"),
        ("unknown_layer", r"layer 'features.9' is not a quantized layer of the layer table"),
        ("some_fixed", r"fixed layer\(s\) \['conv1'\] have a row at their fixed option but \['fc'\] do not"),
    ],
)
def test_a_table_that_does_not_fit_the_layer_table_is_refused_by_name(tmp_path, case, expected):
    skip = {
        "missing_option": [("conv3", "w4a8")],
        "missing_layer": [("conv4", option_name(o)) for o in TABLE.options],
        "some_fixed": [("fc", "w8a8")],
    }.get(case, [])
    extra = [("features.9", "w8a8", "1.0", "")] if case == "unknown_layer" else []
    path = _write(tmp_path / "mine.csv", _rows(skip=skip, extra=extra))
    table = read_latency_table(path)
    with pytest.raises(LatencyTableError, match=expected) as err:
        check_against_layers(table, TABLE)
    assert str(path) in str(err.value)


def test_fixed_layers_count_when_the_table_has_them_and_extra_columns_and_options_are_kept_out(tmp_path):
    """Fixed layers at their fixed option add a constant; without their rows they add 0 ms; a
    provenance column, an empty spread and rows at options the search does not use are accepted."""
    rows = [(*r[:3], "", "ort-1.19 cpu") for r in _rows()] + [("conv2", "w2a2", "0.1", "", "extra option")]
    full = read_latency_table(_write(tmp_path / "full.csv", rows, (*LATENCY_COLUMNS, "runtime")))
    costs = latency_costs(full, TABLE)
    assert costs.fixed_counted and costs.fixed_ms == pytest.approx(_ms("conv1", (8, 8)) + _ms("fc", (8, 8)))
    assert costs.per_option == [_ms(l, o) for l in TABLE.candidates for o in TABLE.options]
    assert costs.reference_ms == pytest.approx(costs.fixed_ms + sum(_ms(l, (8, 8)) for l in TABLE.candidates))
    assert full.spread[("conv2", (8, 8))] is None
    candidates_only = latency_costs(read_latency_table(_write(tmp_path / "c.csv", _rows(with_fixed=False))), TABLE)
    assert not candidates_only.fixed_counted and candidates_only.fixed_ms == 0.0
    assignment = TABLE.uniform_assignment((4, 8))
    assert full.total_ms(assignment, TABLE) == pytest.approx(
        costs.fixed_ms + sum(_ms(l, (4, 8)) for l in TABLE.candidates)
    )


# ---- the caps, in every back-end ---------------------------------------------------------------
def _with_latency(problem, seed):
    """The problem with a latency per option that is not proportional to its size or BitOPs."""
    rng = np.random.default_rng(100 + seed)
    speed = {(2, 4): 0.5, (4, 8): 0.8, (8, 8): 1.0}
    lat = np.array([rng.uniform(0.5, 2.0) * speed[o] for o in problem.options])
    ref = 0.3 + sum(lat[ix][[problem.options[i] for i in ix].index((8, 8))] for ix in problem.layers)
    from dataclasses import replace

    return replace(problem, latency_ms=lat, fixed_latency_ms=0.3, reference_latency_ms=ref)


def _brute_force(problem, caps):
    best = (np.inf, None)
    for choice in itertools.product(*problem.layers):
        x = problem.x_of(choice)
        if problem.is_feasible(x, *caps):
            best = min(best, (problem.objective(x), tuple(x)), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("kind", ["indefinite", "psd", "linear"])
@pytest.mark.parametrize("backend", AVAILABLE)
def test_a_latency_budget_is_respected_by_the_table_sum_at_the_brute_force_optimum(kind, backend):
    for seed in range(2):
        problem = _with_latency(make_problem(seed, kind), seed)
        fastest, slowest = (
            problem.min_latency_ms(),
            problem.total_latency_ms(problem.x_of([ix[-1] for ix in problem.layers])),
        )
        mid = (fastest + slowest) / 2
        for budget in (f"latency_ms-{mid:.6f}", f"latency_rel-{mid / problem.reference_latency_ms:.6f}",
                       [f"latency_ms-{mid:.6f}", "avg_bits-5"]):  # fmt: skip
            caps = caps_of(budget, problem)
            assert caps.latency_ms == pytest.approx(mid, rel=1e-5)
            best, _ = _brute_force(problem, caps)
            assert np.isfinite(best)
            sol = solve(problem, budget, backend=backend, time_limit=30, mip_gap=1e-9)
            assert sol.status == "optimal", (kind, budget, backend)
            assert problem.total_latency_ms(sol.x) <= caps.latency_ms * (1 + 1e-9)
            assert sol.objective == pytest.approx(best, rel=1e-7, abs=1e-9), (kind, seed, budget, backend)
            unconstrained = solve(problem, None, backend=backend, time_limit=30, mip_gap=1e-9)
            if problem.total_latency_ms(unconstrained.x) > caps.latency_ms * (1 + 1e-9):
                assert sol.objective >= unconstrained.objective - 1e-9  # the cap binds: it costs


def test_latency_rel_is_a_fraction_of_the_all_w8a8_table_sum_fixed_layers_included(tmp_path):
    table = read_latency_table(_write(tmp_path / "t.csv", _rows()))
    problem = build_problem(TABLE, linear=np.zeros(12), latency=table)
    w8a8 = problem.x_of([ix[0] for ix in problem.layers])
    assert problem.total_latency_ms(w8a8) == pytest.approx(problem.reference_latency_ms)
    assert caps_of("latency_rel-0.5", problem).latency_ms == pytest.approx(0.5 * problem.reference_latency_ms)
    assert Budget.parse("latency_rel-1").to_caps(problem).latency_ms == pytest.approx(problem.total_latency_ms(w8a8))
    least = problem.min_latency_ms()
    with pytest.raises(
        InfeasibleBudget, match=rf"latency_ms-0.1 is infeasible: the smallest achievable latency is {least:.6g} ms"
    ):
        caps_of("latency_ms-0.1", problem)
    no_w8a8 = LayerTable(**{**TABLE.__dict__, "options": ((4, 8), (2, 4))})
    narrow = build_problem(no_w8a8, linear=np.zeros(6), latency=read_latency_table(_write(tmp_path / "n.csv", [
        r for r in _rows() if r[1] != "w8a8" or r[0] in TABLE.fixed])))  # fmt: skip
    with pytest.raises(NoLatencyTable, match=r"latency_rel-0.5 .* no w8a8 row for every candidate layer"):
        caps_of("latency_rel-0.5", narrow)


def test_a_latency_budget_without_a_table_is_refused():
    problem = make_problem(0, "linear")
    with pytest.raises(NoLatencyTable, match=r"latency_ms-2 is a latency budget.*latency.table"):
        solve(problem, "latency_ms-2")
    raw = copy.deepcopy(RAW)
    raw["budgets"] = ["avg_bits-4", "latency_rel-0.5"]
    with pytest.raises(ConfigError, match=r"'budgets\[1\]': 'latency_rel-0.5' caps the latency.*'latency.table'"):
        validate_config(raw)


def test_the_config_checks_read_the_table_before_any_job(tmp_path):
    raw = copy.deepcopy(RAW)
    bad = _write(tmp_path / "bad.csv", [("conv.0", "w8a8", "-2", "0")])
    raw["latency"] = {"table": str(bad)}
    with pytest.raises(ConfigError, match=r"'latency.table': latency table '.*bad\.csv' line 2: ms '-2'"):
        validate_config(raw)
    only_w8 = _write(tmp_path / "w8.csv", [("conv.0", "w8a8", "2", "0")])
    raw["latency"] = {"table": str(only_w8)}
    with pytest.raises(ConfigError, match=r"has no row at option w2a8 for any layer"):
        validate_config(raw)


def test_check_budgets_records_the_latency_caps_and_refuses_a_table_that_misses_a_layer(tmp_path):
    layers = tmp_path / "layers.json"
    save_layer_table(layers, TABLE, "0" * 64)
    good = _write(tmp_path / "t.csv", _rows())
    caps = check_budgets(
        str(layers), ["latency_rel-0.6", "avg_bits-4"], str(tmp_path / "b.json"), latency_path=str(good)
    )
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(caps))
    lat = build_problem(TABLE, linear=np.zeros(12), latency=read_latency_table(good))
    assert caps["latency_rel-0.6"]["latency_cap_ms"] == pytest.approx(0.6 * lat.reference_latency_ms)
    assert caps["avg_bits-4"]["latency_cap_ms"] is None and caps["latency_rel-0.6"]["size_cap_bits"] is None
    missing = _write(tmp_path / "m.csv", _rows(skip=[("conv3", "w2a4")]))
    with pytest.raises(LatencyTableError, match=r"config key 'latency.table'.*no row for layer 'conv3' option w2a4"):
        check_budgets(str(layers), ["avg_bits-4"], latency_path=str(missing))
    with pytest.raises(NoLatencyTable, match=r"latency_ms-5 is a latency budget"):
        check_budgets(str(layers), ["latency_ms-5"])
    # no table: the record is what it was before latency budgets existed
    plain = check_budgets(str(layers), ["avg_bits-4"])
    assert set(plain["avg_bits-4"]) == {"size_cap_bits", "bitops_cap", "same_cap_as"}


def test_the_study_table_gains_latency_ms_only_with_a_table(tmp_path):
    layers = tmp_path / "layers.json"
    save_layer_table(layers, TABLE, "0" * 64)
    evals = []
    for o in TABLE.options:
        p = tmp_path / f"{option_name(o)}.json"
        assignment = {l: list(v) for l, v in TABLE.uniform_assignment(o).items()}
        p.write_text(json.dumps({"option": option_name(o), "top1": 0.5, "loss": 1.0, "assignment": assignment}))
        evals.append(str(p))
    plain = study_table(evals, [], str(tmp_path / "plain.csv"))
    assert list(plain.columns) == STUDY_COLUMNS
    table = _write(tmp_path / "t.csv", _rows())
    df = study_table(evals, [], str(tmp_path / "s.csv"), latency_path=str(table), layers_path=str(layers))
    assert list(df.columns) == [*STUDY_COLUMNS[:12], "latency_ms", *STUDY_COLUMNS[12:]]
    fixed = _ms("conv1", (8, 8)) + _ms("fc", (8, 8))
    for r in df.itertuples():
        o = tuple(int(b) for b in r.option[1:].split("a"))
        assert r.latency_ms == pytest.approx(fixed + sum(_ms(l, o) for l in TABLE.candidates))


# ---- before any job ----------------------------------------------------------------------------
def test_a_user_table_missing_a_layer_is_refused_by_name_before_any_job(tmp_path):
    """latency.table against the tiny model's layer table traced on the meta device: the key, the
    file and the missing layer are named, and nothing is written under results/."""
    from mpqflow.config import Config
    from mpqflow.input_checks import meta_layer_table

    cfg = Config.from_dict(validate_config(RAW))
    table = meta_layer_table("tiny", cfg.models["tiny"], cfg.quant, 0)
    dropped = table.candidates[-1]
    rows = [(l, option_name(o), "0.5", "0.01") for l in table.candidates if l != dropped for o in table.options]
    path = _write(tmp_path / "my_t4.csv", rows)
    raw = copy.deepcopy(RAW)
    raw["latency"] = {"table": str(path)}
    raw["budgets"] = ["avg_bits-4", "latency_rel-0.8"]
    config = tmp_path / "with_table.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = run_snakemake(tmp_path, configfile=config, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "config key 'latency.table'" in out and str(path) in out, out[-3000:]
    assert f"no row for layer {dropped!r}" in out, out[-3000:]
    assert not (tmp_path / "results").exists()

"""Damaged or edited artifacts (issue 24): every reader names the file and the remedy; a layer table that
is not whole, or was edited since calibrate wrote it, is refused before anything is made from it; and
budgets that resolve to the same cap are noted in budgets.json, the log and the study table.

Torch-free except for the .pt readers: the layer table and sensitivity sets are built by hand.
"""

import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY, run_snakemake

from mpqflow.artifacts import (
    check_set_matches_table,
    load_batch_file,
    load_calibration,
    load_checkpoint,
    load_decision,
    load_evaluation,
    load_layer_table,
    save_batch_file,
    save_decision,
    save_layer_table,
)
from mpqflow.config import Config, validate_config
from mpqflow.io import DamagedArtifact, load_csv, load_json, load_record, save_json, save_torch
from mpqflow.layers import LayerTable, table_fault
from mpqflow.optimize.budgets import same_caps
from mpqflow.sensitivity.common import sensitivity_meta
from mpqflow.stages import solve
from mpqflow.stages.uniform_report import uniform_table
from mpqflow.study import study_table

SHA = "c" * 64
TABLE = LayerTable(
    layers=("conv1", "conv2", "conv3", "fc"),
    candidates=("conv2", "conv3"),
    fixed={"conv1": (8, 8), "fc": (8, 8)},
    options=((2, 8), (4, 8), (8, 8)),
    numel={"conv1": 100, "conv2": 1000, "conv3": 1000, "fc": 100},
    macs={"conv1": 10_000, "conv2": 50_000, "conv3": 50_000, "fc": 100},
)
BUDGETS = ["avg_bits-4", "avg_bits-6"]
REMEDY = "--forcerun"


@pytest.fixture
def solver():
    return Config.from_dict(validate_config(yaml.safe_load(TINY.read_text()))).solver


@pytest.fixture
def results(tmp_path):
    """A model's directory as calibrate, check_budgets and pool_set leave it: layers.json, budgets.json
    and an mpqco set file made with the table."""
    save_layer_table(tmp_path / "layers.json", TABLE, SHA)
    solve.check_budgets(str(tmp_path / "layers.json"), BUDGETS, str(tmp_path / "budgets.json"))
    _save_set(tmp_path / "set_1x0.npz", TABLE, SHA)
    return tmp_path


def _save_set(path, table: LayerTable, sha: str) -> None:
    n = len(table.candidates) * len(table.options)
    sq = np.tile(np.array([4.0, 1.0, 0.1]), len(table.candidates))[:n]
    meta = {**sensitivity_meta(table, {}, sha, "mpqco", {}), "set_size": 1, "set_id": 0}
    save_batch_file(path, {"sq_sum": 16 * sq, "count": np.int64(16)}, meta)


def _edit_table(path, edit) -> None:
    """Edit layers.json in place as a user might, keeping it valid JSON (its recorded digest kept)."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _consumers_refuse(results, solver, *expected: str) -> None:
    """check_budgets, the solve and the sanity check all refuse the table, naming it and `expected`;
    budgets.json keeps its bytes and no decision or sanity result is written."""
    layers, budgets = str(results / "layers.json"), results / "budgets.json"
    before = budgets.read_bytes()
    decision, sanity = results / "decisions" / "avg_bits-4.json", results / "sanity.json"
    calls = [
        lambda: solve.check_budgets(layers, BUDGETS, str(budgets)),
        lambda: solve.solve_budget(
            layers, str(results / "set_1x0.npz"), "mpqco", "avg_bits-4", solver, str(decision), {}
        ),  # fmt: skip
        lambda: solve.sanity_checks(layers, [str(results / "set_1x0.npz")], "mpqco", solver, str(sanity), {}),
    ]
    for call in calls:
        with pytest.raises(DamagedArtifact) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{layers}: ") and REMEDY in message and layers in message, message
        for text in expected:
            assert text in message, message
    assert budgets.read_bytes() == before
    assert not decision.exists() and not sanity.exists()
    assert not list(results.rglob(".*.json"))  # no temporary file left either


def test_the_intact_table_is_read_back_and_solved(results, solver):
    assert load_layer_table(results / "layers.json") == TABLE
    dec = solve.solve_budget(str(results / "layers.json"), str(results / "set_1x0.npz"), "mpqco", "avg_bits-4",
                             solver, str(results / "d.json"), {})  # fmt: skip
    assert dec["candidates"] == list(TABLE.candidates) and (results / "d.json").is_file()


def test_a_dropped_macs_entry_is_refused_naming_the_file_the_field_and_the_layer(results, solver):
    _edit_table(results / "layers.json", lambda t: t["macs"].pop("conv2"))
    _consumers_refuse(results, solver, "field 'macs' has no entry for layer 'conv2'")


def test_a_removed_candidate_is_refused_and_budgets_json_is_left_untouched(results, solver):
    """Still a whole table (conv3 just becomes an FP layer), so only the recorded digest tells: without
    it check_budgets would rewrite budgets.json with the larger caps of one fewer 8-bit layer."""
    _edit_table(results / "layers.json", lambda t: t["candidates"].remove("conv3"))
    assert table_fault(json.loads((results / "layers.json").read_text())) is None
    _consumers_refuse(results, solver, "was edited or damaged since calibrate wrote it", "sha256")


def test_a_truncated_or_unhashed_table_is_refused(results, solver):
    path = results / "layers.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    _consumers_refuse(results, solver, "not valid JSON")
    data = json.loads(text)
    del data["sha256"]
    path.write_text(json.dumps(data))
    _consumers_refuse(results, solver, "records no content hash")


@pytest.mark.parametrize(
    ("edit", "fault"),
    [
        (lambda t: t.pop("numel"), "field(s) ['numel'] missing"),
        (lambda t: t["numel"].update(conv3=-1), "field 'numel' of layer 'conv3' is -1"),
        (lambda t: t["candidates"].append("conv9"), "field 'candidates' names ['conv9'], not in field 'layers'"),
        (lambda t: t["fixed"].update(conv2=[8, 8]), "layer(s) ['conv2'] are both candidates and fixed"),
        (lambda t: t["options"].append([4]), "[4] is not a (w_bits, a_bits) pair"),
    ],
)
def test_table_fault_names_the_field_and_the_layer(edit, fault):
    data = TABLE.to_dict()
    assert table_fault(data) is None
    edit(data)
    assert fault in table_fault(data)


def test_a_set_of_another_table_or_checkpoint_is_refused_naming_both_files(results, solver):
    other = LayerTable(**{**TABLE.__dict__, "candidates": ("conv3", "conv2")})
    _save_set(results / "set_1x0.npz", other, SHA)
    layers, pooled = str(results / "layers.json"), str(results / "set_1x0.npz")
    with pytest.raises(
        DamagedArtifact, match=r"set_1x0\.npz: its layers differ from the candidates of the layer table .*layers\.json"
    ):  # noqa: E501
        solve.solve_budget(layers, pooled, "mpqco", "avg_bits-4", solver, str(results / "d.json"), {})
    with pytest.raises(DamagedArtifact, match="its options"):
        check_set_matches_table(
            {"layers": list(TABLE.candidates), "options": np.array([[8, 8]])}, pooled, TABLE, layers
        )
    _save_set(results / "set_1x0.npz", TABLE, "d" * 64)
    with pytest.raises(
        DamagedArtifact, match=r"layers\.json: calibrated from another checkpoint .* than .*set_1x0\.npz"
    ):
        solve.solve_budget(layers, pooled, "mpqco", "avg_bits-4", solver, str(results / "d.json"), {})
    assert not (results / "d.json").exists()


# ---------------------------------------------------------------- equal caps


def test_same_caps_groups_budgets_whose_caps_admit_the_same_totals():
    caps = {"avg_bits-4": (8800.0, None), "size_rel-0.5": (8800.000000001, None), "avg_bits-6": (13200.0, None),
            "gbitops-8800": (None, 8800.0), "size_mb-0.0011": (8800.0, None)}  # fmt: skip
    assert same_caps(caps) == {
        "avg_bits-4": ["size_rel-0.5", "size_mb-0.0011"],
        "size_rel-0.5": ["avg_bits-4", "size_mb-0.0011"],
        "size_mb-0.0011": ["avg_bits-4", "size_rel-0.5"],
        "avg_bits-6": [],
        "gbitops-8800": [],  # a BitOPs cap is another quantity, whatever its number
    }
    assert same_caps({"avg_bits-4": (8800.0, None), "avg_bits-4.001": (8802.2, None)})["avg_bits-4"] == []


def test_equal_caps_are_recorded_in_budgets_json_logged_and_noted_in_the_study_table(results, caplog, tmp_path):
    """avg_bits-4 and size_rel-0.5 are both 8,800 bits here (every weight's reference is 8 bits)."""
    budgets = results / "budgets.json"
    with caplog.at_level(logging.WARNING, logger="mpqflow"):
        caps = solve.check_budgets(str(results / "layers.json"), ["avg_bits-4", "size_rel-0.5", "avg_bits-6"],
                                   str(budgets))  # fmt: skip
    assert json.loads(budgets.read_text()) == json.loads(json.dumps(caps))
    assert caps["avg_bits-4"]["size_cap_bits"] == caps["size_rel-0.5"]["size_cap_bits"] == 8800
    assert caps["avg_bits-4"]["same_cap_as"] == ["size_rel-0.5"] and caps["size_rel-0.5"]["same_cap_as"] == [
        "avg_bits-4"
    ]
    assert caps["avg_bits-6"]["same_cap_as"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "avg_bits-4 has the same cap as size_rel-0.5" in warnings[0], warnings

    evals = []
    for budget in ("avg_bits-4", "size_rel-0.5", "avg_bits-6"):
        evals.append(tmp_path / f"{budget}.json")
        save_json(evals[-1], {"method": "mpqco", "budget": budget, "set_size": 1, "set_id": 0, "top1": 0.9,
                              "loss": 0.3, "size_mb": 0.0011, "choice": "w4a8 w4a8"})  # fmt: skip
    uniform = tmp_path / "w8a8.json"
    save_json(uniform, {"option": "w8a8", "top1": 0.95, "loss": 0.2})
    df = study_table([str(uniform)], list(map(str, evals)), str(tmp_path / "study.csv"), budgets_path=str(budgets))
    noted = dict(zip(df.budget, df.same_cap_as, strict=True))
    assert noted["avg_bits-4"] == "size_rel-0.5" and noted["size_rel-0.5"] == "avg_bits-4"
    assert pd.isna(noted["avg_bits-6"])
    assert list(pd.read_csv(tmp_path / "study.csv").columns)[-1] == "same_cap_as"

    # without shared caps (the default study's budgets) the table is as before: no such column
    solve.check_budgets(str(results / "layers.json"), BUDGETS, str(budgets))
    df = study_table([str(uniform)], list(map(str, evals[::2])), str(tmp_path / "study.csv"), budgets_path=str(budgets))
    assert "same_cap_as" not in df.columns


# ---------------------------------------------------------------- every reader names the file and the remedy


def _refused(call, path, *expected: str) -> str:
    with pytest.raises(DamagedArtifact) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"{path}: ") and REMEDY in message, message
    for text in expected:
        assert text in message, message
    return message


def test_json_readers_name_the_file_the_fault_and_the_remedy(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{"top1": 0.9, "lo')
    _refused(lambda: load_json(path), path, "not valid JSON")
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    _refused(lambda: load_json(path), path, "not valid JSON")
    path.write_text("[1, 2]")
    _refused(lambda: load_record(path, "evaluation", ["top1"]), path, "not evaluation (a JSON list")
    save_json(path, {"method": "mpqco", "top1": 0.9, "loss": 0.1, "budget": "avg_bits-4"})
    _refused(lambda: load_evaluation(path), path, "field(s) ['set_size', 'set_id'] missing")
    save_json(path, {"option": "w8a8", "top1": 0.9})
    _refused(lambda: uniform_table([str(path)], str(tmp_path / "u.csv")), path, "uniform evaluation", "'loss'")
    assert not (tmp_path / "u.csv").exists()
    save_json(path, {"method": "mpqco", "candidates": ["conv2"], "choice": ["w8a8"]})
    _refused(lambda: load_decision(path, TABLE), path, "not a complete decision", "'budget', 'set_size', 'set_id'")
    save_json(path, [{"method": "mpqco", "set_size": 1, "set_id": 0, "choice": []}])
    _refused(lambda: study_table([], [], str(tmp_path / "s.csv"), sanity_paths=[str(path)]), path, "'solver'")


def test_npz_and_csv_readers_name_the_file_the_fault_and_the_remedy(tmp_path):
    path = tmp_path / "set_1x0.npz"
    np.savez(path, sq_sum=np.ones(3), count=np.int64(1))
    _refused(lambda: load_batch_file(path), path, "not a sensitivity file", "'format'")
    data = path.read_bytes()
    path.write_bytes(data[:40])
    _refused(lambda: load_batch_file(path), path, "not a readable .npz file")
    csv = tmp_path / "study.csv"
    csv.write_text("")
    _refused(lambda: load_csv(csv, "study table"), csv, "not a readable study table CSV")
    csv.write_text("method,top1\nmpqco,0.9\n")
    _refused(lambda: load_csv(csv, "study table", ["method", "size_mb"]), csv, "column(s) ['size_mb'] missing")


def test_checkpoint_readers_name_the_file_the_fault_and_the_remedy(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    save_torch(path, {"state_dict": {"w": torch.ones(2)}, "arch": "digits_cnn", "fp_metrics": {"top1": 1.0}})
    assert load_checkpoint(path)["arch"] == "digits_cnn"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=rf"model checkpoint file '{path}' is not a PyTorch checkpoint .*--forcerun {path}"
    ):
        load_checkpoint(path)
    save_torch(path, {"state_dict": {"w": torch.ones(2)}})
    _refused(lambda: load_checkpoint(path), path, "not a model checkpoint written by mpqflow")
    calibration = tmp_path / "calibration.pt"
    save_torch(calibration, {"quantizer": {}, "checkpoint_sha256": SHA})
    _refused(lambda: load_calibration(calibration, SHA, {}), calibration, "not a calibration written by mpqflow")
    bad_table = {k: v for k, v in TABLE.to_dict().items() if k != "macs"}
    save_torch(calibration, {"quantizer": {}, "table": bad_table, "checkpoint_sha256": SHA, "quant_config": {}})
    _refused(lambda: load_calibration(calibration, SHA, {}), calibration, "its layer table: field(s) ['macs'] missing")


def test_a_decision_of_another_table_names_the_file(tmp_path):
    path = tmp_path / "d.json"
    save_decision(path, {"method": "mpqco", "budget": "avg_bits-4", "set_size": 1, "set_id": 0,
                         "candidates": ["conv3", "conv2"], "choice": ["w8a8", "w8a8"]})  # fmt: skip
    _refused(lambda: load_decision(path, TABLE), path, "candidate layers differ")


# ---------------------------------------------------------------- the remedy, in the workflow


def test_the_workflow_refuses_an_edited_table_and_the_named_remedy_regenerates_it(tmp_path):
    """The tiny model up to budgets.json; a candidate removed from layers.json makes check_budgets (rerun
    by Snakemake since layers.json is newer) fail naming the file, with no budgets.json of wrong caps;
    the remedy the message names (`--forcerun results/tiny/layers.json`) remakes both as they were."""
    target = "results/tiny/budgets.json"
    run_snakemake(tmp_path, target)
    layers, budgets = tmp_path / "results/tiny/layers.json", tmp_path / target
    good_layers, good_budgets = layers.read_bytes(), budgets.read_bytes()
    _edit_table(layers, lambda t: t["candidates"].pop())
    proc = run_snakemake(tmp_path, target, check=False)
    log = (tmp_path / "logs/tiny/check_budgets.log").read_text()
    assert proc.returncode != 0
    assert "results/tiny/layers.json: was edited or damaged since calibrate wrote it" in log, log[-2000:]
    remedy = "--forcerun results/tiny/layers.json"
    assert remedy in log, log[-2000:]
    assert not budgets.exists() or budgets.read_bytes() == good_budgets  # Snakemake removes a failed job's outputs
    run_snakemake(tmp_path, target, *remedy.split())
    assert layers.read_bytes() == good_layers and budgets.read_bytes() == good_budgets

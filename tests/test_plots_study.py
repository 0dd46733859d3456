"""Study tables and plots (mpqflow/study.py, study_plots.py) and artifact file modes (mpqflow/io.py), no torch runs."""

import os
import stat
import struct
import warnings

import numpy as np
import pandas as pd
import pytest

from mpqflow import io, study, study_plots


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _png_size(path) -> tuple[int, int]:
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _study(methods=("clado", "hawq", "mpqco"), set_sizes=(2, 4), sets=1, budgets=(3, 4, 6)) -> pd.DataFrame:
    """A study table: uniform rows plus one row per (method, set size, set, budget)."""
    rows = [
        {"method": "uniform", "option": o, "size_mb": s, "top1": a, "fp_top1": 0.95}
        for o, s, a in (("w2a8", 0.5, 0.6), ("w8a8", 2.0, 0.94))
    ]
    for i, m in enumerate(methods):
        for n in set_sizes:
            for s in range(sets):
                for b in budgets:
                    size, acc = 0.25 * b + 0.1 * (i == 2), 0.7 + 0.03 * b  # the first two methods' coincide
                    rows.append(
                        {"method": m, "set_size": n, "set_id": s, "budget": f"avg_bits-{b}", "size_mb": size}
                        | {"top1": acc + 0.001 * s, "fp_top1": 0.95, "estimated_loss_increase": 0.1 * i + 0.01}
                        | {"measured_loss_increase": 0.05 * b, "choice": "w8a8 w4a8"}
                    )
    return pd.DataFrame(rows, columns=study.STUDY_COLUMNS)


# ---- io: file modes ----------------------------------------------------------------------------


def _writers(tmp_path):
    import torch

    return {
        "json": lambda p: io.save_json(p, {"a": 1}),
        "npz": lambda p: io.save_npz(p, G=np.eye(2)),
        "pt": lambda p: io.save_torch(p, {"w": torch.zeros(2)}),
        "csv": lambda p: io.save_csv(p, pd.DataFrame({"a": [1.5]})),
    }


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    for ext, write in _writers(tmp_path).items():
        path = tmp_path / f"out.{ext}"
        write(path)
        assert stat.S_IMODE(path.stat().st_mode) == mode, ext
        write(path)  # replacing an existing file: same mode
        assert stat.S_IMODE(path.stat().st_mode) == mode, ext
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.json", "out.npz", "out.pt"]


def test_failing_block_leaves_no_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("killed")
    assert list(path.parent.iterdir()) == []
    io.save_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            raise RuntimeError("killed")
    assert list(path.parent.iterdir()) == [path] and io.load_json(path) == {"a": 1}


# ---- study: Pareto AUC -------------------------------------------------------------------------


def test_auc_does_not_reward_one_small_decision():
    """The issue's case: CLADO's lone decision is the smallest but worse than every decision of HAWQ."""
    rows = [("clado", 1.0, 0.70)] + [("hawq", s, a) for s, a in ((2.0, 0.80), (3.0, 0.90), (4.0, 0.95))]
    df = pd.DataFrame(
        [{"method": m, "set_size": 2, "set_id": 0, "size_mb": s, "top1": a} for m, s, a in rows]
        + [{"method": "uniform", "size_mb": 0.5, "top1": 0.1}]  # uniform does not widen the range
    )
    assert study.auc_range(df) == (2.0, 4.0)
    auc = study.pareto_auc(df).set_index("method").auc
    assert auc["hawq"] > auc["clado"]
    assert auc["clado"] == pytest.approx(0.70)  # its one decision, flat over the common range
    assert auc["hawq"] == pytest.approx((0.80 + 0.90) / 2)  # exact area of the step curve over [2, 4]
    assert list(study.pareto_auc(df).columns) == ["method", "set_size", "set_id", "auc"]


def test_auc_single_common_size_is_the_value_there(caplog):
    df = pd.DataFrame(
        [
            {"method": "a", "set_size": 1, "set_id": 0, "size_mb": 3.0, "top1": 0.5},
            {"method": "b", "set_size": 1, "set_id": 0, "size_mb": 1.0, "top1": 0.6},
            {"method": "b", "set_size": 1, "set_id": 0, "size_mb": 3.0, "top1": 0.4},
        ]
    )
    auc = study.pareto_auc(df).set_index("method").auc
    assert auc.to_dict() == {"a": 0.5, "b": 0.6}
    assert "shares only the size" in caplog.text
    assert study.pareto_auc(df[df.method == "uniform"]).empty


# ---- plots ---------------------------------------------------------------------------------------


def test_layer_bits_of_60_layers_stays_narrow(tmp_path):
    layers = [f"features.{i}.conv.{i % 3}.weight" for i in range(60)]
    rng = np.random.default_rng(0)
    decisions = {
        m: {f"avg_bits-{b}": [(int(rng.choice([2, 4, 8])), 8) for _ in layers] for b in (3, 4, 6)}
        for m in ("clado", "hawq", "mpqco", "uniform_search")
    }
    study_plots.plot_layer_bits(decisions, layers, tmp_path / "bits.png", dpi=150)
    width, height = _png_size(tmp_path / "bits.png")
    assert width <= 2000 and height <= 3000, (width, height)


def test_layer_bits_from_study_table(tmp_path):
    study_plots.plot_layer_bits(study_plots.first_set_choices(_study()), ["conv1", "conv2"], tmp_path / "bits.png")
    study_plots.plot_layer_bits({}, [], tmp_path / "empty.png")
    assert _png_size(tmp_path / "bits.png")[0] < 2000 and _png_size(tmp_path / "empty.png")[0] > 0


@pytest.mark.parametrize("sets", [1, 3])
def test_accuracy_and_pareto_plots_raise_no_warning(tmp_path, sets):
    df = _study(sets=sets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study_plots.plot_accuracy_vs_size(df, tmp_path / "acc.png")
        auc = study_plots.plot_pareto(df, tmp_path / "pareto.png", tmp_path / "auc.csv")
        study_plots.plot_estimated_vs_measured(df, tmp_path / "sanity.png")
    assert len(auc) == 3 * 2 * sets and auc.auc.between(0, 1).all()
    assert pd.read_csv(tmp_path / "auc.csv").columns.tolist() == ["method", "set_size", "set_id", "auc"]
    for png in ("acc", "pareto", "sanity"):
        assert _png_size(tmp_path / f"{png}.png")[0] > 0


def test_coinciding_methods_get_distinct_markers_and_offsets():
    methods = ["clado", "hawq", "mpqco"]
    markers, offsets = study_plots._markers(methods), study_plots._offsets(methods, 0.01)
    assert len(set(markers.values())) == 3 and "s" not in markers.values()  # "s" is uniform's
    assert len(set(offsets.values())) == 3 and sum(offsets.values()) == pytest.approx(0)


def test_mean_std_over_sets_without_warnings():
    curves = np.array([[np.nan, 1.0, 2.0], [np.nan, np.nan, 4.0]])  # (sets, grid)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = study_plots._mean_std(curves)
    np.testing.assert_array_equal(mean, [np.nan, 1.0, 3.0])
    np.testing.assert_array_equal(std, [np.nan, 0.0, 1.0])

"""Study tables and plots (mpqflow/study.py, study_plots.py; the PTQ and fine-tuning figures too) and artifact
file modes (mpqflow/io.py), without torch runs."""

import os
import stat
import struct
import warnings

import numpy as np
import pandas as pd
import pytest

from mpqflow import io, study, study_plots
from mpqflow.finetune_study import finetune_plot
from mpqflow.ptq_study import ptq_plot


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


# ---- plots: each drawing function returns the figure it saved; the tests read it as a reader would ----

METHODS = ["clado", "hawq", "mpqco"]


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, f"no legend on {ax.get_title()!r}"
    return [t.get_text() for t in legend.get_texts()]


def _labelled_lines(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def _colorbar_labels(fig) -> list[str]:
    return [im.colorbar.ax.get_ylabel() for ax in fig.axes for im in ax.images if im.colorbar is not None]


def test_layer_bits_of_60_layers_stays_narrow(tmp_path):
    layers = [f"features.{i}.conv.{i % 3}.weight" for i in range(60)]
    rng = np.random.default_rng(0)
    decisions = {
        m: {f"avg_bits-{b}": [(int(rng.choice([2, 4, 8])), 8) for _ in layers] for b in (3, 4, 6)}
        for m in ("clado", "hawq", "mpqco", "uniform_search")
    }
    fig = study_plots.plot_layer_bits(decisions, layers, tmp_path / "bits.png", dpi=150)
    width, height = _png_size(tmp_path / "bits.png")
    assert width <= 2000 and height <= 3000, (width, height)
    panels = [ax for ax in fig.axes if ax.images]  # 2 rows of 30 layers, one panel per method in each
    assert [ax.get_ylabel() for ax in panels] == 2 * sorted(decisions)
    assert [ax.get_title() for ax in panels if ax.get_title()] == ["layers 1-30 of 60", "layers 31-60 of 60"]
    assert _colorbar_labels(fig) == ["weight bits"]


def test_layer_bits_from_study_table(tmp_path):
    fig = study_plots.plot_layer_bits(
        study_plots.first_set_choices(_study()), ["conv1", "conv2"], tmp_path / "b.png", 80
    )
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_ylabel() for ax in panels] == METHODS  # one panel per method
    budgets = ["avg_bits-3", "avg_bits-4", "avg_bits-6"]
    assert [[t.get_text() for t in ax.get_yticklabels()] for ax in panels] == 3 * [budgets]  # a row per budget
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == ["conv1", "conv2"]
    assert "candidate layer" in panels[-1].get_xlabel() and "weight bits" in panels[-1].get_xlabel()
    assert "Per-layer bit-widths" in fig.get_suptitle()
    assert _colorbar_labels(fig) == ["weight bits"]
    empty = study_plots.plot_layer_bits({}, [], tmp_path / "empty.png", 80)
    assert _png_size(tmp_path / "empty.png")[0] > 0 and _colorbar_labels(empty) == []


@pytest.mark.parametrize("sets", [1, 3])
def test_accuracy_vs_size_has_a_panel_per_set_size_and_a_marker_group_per_method(tmp_path, sets):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = study_plots.plot_accuracy_vs_size(_study(sets=sets), tmp_path / "acc.png", 80)
    assert fig.get_suptitle().startswith("Accuracy vs size per method")
    assert [ax.get_title() for ax in fig.axes] == [f"sensitivity sets of {n} batch(es), n={sets} sets" for n in (2, 4)]
    assert fig.axes[0].get_ylabel() == "held-out top-1 accuracy (%)"
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("model size (MB of quantized weights)")
        groups = {c.get_label(): c for c in ax.containers}  # one error-bar group per method
        assert list(groups) == METHODS
        assert all(len(g.lines[0].get_xdata()) == 3 for g in groups.values())  # a marker per budget
        assert _labelled_lines(ax) == ["uniform", "full precision"]
    assert sorted(_legend(fig.axes[-1])) == sorted([*METHODS, "uniform", "full precision"])


@pytest.mark.parametrize("sets", [1, 3])
def test_pareto_has_a_curve_and_an_auc_bar_per_method(tmp_path, sets):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = study_plots.plot_pareto(_study(sets=sets), tmp_path / "pareto.png", tmp_path / "auc.csv", 80)
    auc = pd.read_csv(tmp_path / "auc.csv")
    assert auc.columns.tolist() == ["method", "set_size", "set_id", "auc"]
    assert len(auc) == 3 * 2 * sets and auc.auc.between(0, 1).all()
    curves, bars = fig.axes
    assert curves.get_title() == "Running-best Pareto curves (mean ± std over sets)"
    assert curves.get_xlabel() == "model size (MB of quantized weights)"
    assert curves.get_ylabel() == "best top-1 at or below this size (%)"
    assert _labelled_lines(curves) == [*METHODS, "full precision"]  # one step curve per method
    assert _legend(curves) == [*METHODS, "AUC range (all curves defined)", "full precision"]
    assert bars.get_title() == "Pareto AUC per method (mean ± std over sets)"
    assert bars.get_xlabel() == "mean best top-1 over the shaded size range (%)"
    assert sorted(t.get_text() for t in bars.get_yticklabels()) == METHODS  # one bar per method
    assert len(bars.patches) == len(METHODS)


def test_estimated_vs_measured_has_a_point_group_per_method_and_says_limpq_s_units(tmp_path):
    df = _study(methods=("clado", "hawq", "limpq"))
    df["estimate_se"] = np.where(df.method == "uniform", np.nan, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = study_plots.plot_estimated_vs_measured(df, tmp_path / "sanity.png", 80)
    (ax,) = fig.axes
    assert ax.get_title().startswith("Estimated vs measured loss increase of chosen decisions")
    assert "standard error" in ax.get_title()  # the error bars are explained
    assert ax.get_xlabel() == "measured loss increase on the sensitivity set (nats, symlog)"
    assert ax.get_ylabel() == "method's estimated loss increase (nats, symlog)"
    groups = ["clado", "hawq", "limpq (indicator units, not nats)"]
    assert [c.get_label() for c in ax.collections if not c.get_label().startswith("_")] == groups
    assert _legend(ax) == [*groups, "estimate = measurement"]


def test_interaction_heatmap_has_a_labelled_colorbar(tmp_path):
    G = np.random.default_rng(0).normal(size=(4, 4))
    fig = study_plots.plot_interaction_heatmap(G, ["conv1", "conv2"], [(8, 8), (2, 8)], tmp_path / "heat.png", 80)
    ax = fig.axes[0]
    assert ax.get_title().startswith("CLADO interaction matrix G")
    assert ax.get_xlabel() == "candidate layer (options within a block: w8a8, w2a8)"
    assert ax.get_ylabel() == "candidate layer"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "conv2"]
    assert _colorbar_labels(fig) == ["G[i, j] (nats)"]


def _ptq_df():
    rows = [("naive", "w4a4", 0.50), ("naive", "w8a4", 0.70), ("all", "w4a4", 0.80), ("all", "w8a4", 0.90)]
    return pd.DataFrame([{"variant": v, "option": o, "top1": a, "fp_top1": 0.95} for v, o, a in rows])


def test_ptq_plot_has_a_bar_group_per_variant(tmp_path):
    fig = ptq_plot(_ptq_df(), tmp_path / "ptq.png", dpi=60)
    (ax,) = fig.axes
    assert ax.get_title() == "Post-training quantization: naive min/max vs ACIQ schemes"
    assert ax.get_xlabel() == "uniform option (weight bits, activation bits)"
    assert ax.get_ylabel() == "top-1 accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W4A4", "W8A4"]
    bars = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}  # one group per variant
    assert bars == {"naive": pytest.approx([50.0, 70.0]), "all": pytest.approx([80.0, 90.0])}
    assert _legend(ax) == ["FP", "naive", "all"] and ax.get_legend().get_title().get_text() == "variant"
    assert [t.get_text() for t in ax.texts] == ["50.0", "70.0", "80.0", "90.0"]  # every bar carries its value


def test_finetune_plot_puts_ptq_beside_fine_tuned(tmp_path):
    df = pd.DataFrame([
        {"method": "clado", "target": "set_2x0/avg_bits-4", "size_mb": 0.5, "top1_ptq": 0.7, "top1_qat": 0.9},
        {"method": "uniform", "target": "w2a8", "size_mb": 1.5, "top1_ptq": 0.3, "top1_qat": 0.8},
    ]).assign(epochs=2, fp_top1=0.95)  # fmt: skip
    fig = finetune_plot(df, tmp_path / "ft.png", dpi=60)
    (ax,) = fig.axes
    assert ax.get_title() == "Quantization-aware fine-tuning (2 epochs) vs post-training quantization"
    assert ax.get_xlabel().startswith("decision (method, sensitivity set / budget")
    assert ax.get_ylabel() == "top-1 accuracy (%)"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["clado\nset_2x0\navg_bits-4\n500 kB", "uniform\nw2a8\n1.5 MB"]  # with the weight size's unit
    bars = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}
    assert bars == {"PTQ": pytest.approx([70.0, 30.0]), "fine-tuned (LSQ)": pytest.approx([90.0, 80.0])}
    assert _legend(ax) == ["FP", "PTQ", "fine-tuned (LSQ)"]
    assert _labelled_lines(ax) == ["FP"] and ax.get_lines()[0].get_ydata()[0] == pytest.approx(95.0)


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

"""The fine-tuning study's table and figure: each fine-tuned decision's PTQ top-1 beside its fine-tuned one.

Usage (what :mod:`mpqflow.stages.finetune_report` does):
    df = finetune_table(finetuned_eval_jsons, their_ptq_eval_jsons, "results/m/finetune.csv")
    finetune_plot(df, "results/m/plots/finetune.png", dpi=150, width=6.0)
"""

from __future__ import annotations

import pandas as pd

from .artifacts import decision_target, load_evaluation
from .io import save_csv
from .plotting import Figure
from .top1_bars import grouped_top1_bars

__all__ = ["FINETUNE_COLUMNS", "finetune_table", "finetune_plot"]

FINETUNE_COLUMNS = [
    "method", "target", "size_mb", "avg_bits", "gbitops", "top1_ptq", "loss_ptq", "top1_qat", "loss_qat", "fp_top1",
    "epochs", "world_size", "distill", "train_seconds",
]  # fmt: skip


_FINETUNED_FIELDS = ("method", "size_mb", "avg_bits", "gbitops", "top1", "loss", "fp_top1", "epochs", "world_size",
                     "distill", "train_seconds")  # fmt: skip


def finetune_table(finetuned_paths: list[str], ptq_paths: list[str], out_csv: str) -> pd.DataFrame:
    """One row per fine-tuned decision: its PTQ evaluation (eval/) beside the fine-tuned one."""
    rows = []
    for qp, pp in zip(finetuned_paths, ptq_paths, strict=True):
        q = load_evaluation(qp, "fine-tuned evaluation", _FINETUNED_FIELDS)
        p = load_evaluation(pp, "evaluation", ("top1", "loss"))
        if decision_target(q) != decision_target(p) or q["method"] != p.get("method", "uniform"):
            raise ValueError(
                f"{qp} and {pp} evaluate different decisions ({decision_target(q)} vs {decision_target(p)})"
            )
        rows.append({
            "method": q["method"], "target": decision_target(q), "size_mb": q["size_mb"], "avg_bits": q["avg_bits"],
            "gbitops": q["gbitops"], "top1_ptq": p["top1"], "loss_ptq": p["loss"], "top1_qat": q["top1"],
            "loss_qat": q["loss"], "fp_top1": q["fp_top1"], "epochs": q["epochs"], "world_size": q["world_size"],
            "distill": q["distill"], "train_seconds": q["train_seconds"],
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=FINETUNE_COLUMNS)
    save_csv(out_csv, df, float_format=None)  # full precision: the table feeds the plot
    return df


def finetune_plot(df: pd.DataFrame, png: str, dpi: int, width: float = 6.0) -> Figure:
    """PTQ vs LSQ fine-tuned top-1 (%) of every fine-tuned decision: x = method / set / budget (size);
    saved and returned."""
    names = [  # one line per part: method, set, budget (or option), size; long labels would overlap
        "\n".join(
            [
                r.method,
                *str(r.target).split("/"),
                f"{r.size_mb * 1e3:.3g} kB" if r.size_mb < 1 else f"{r.size_mb:.3g} MB",
            ]
        )
        for r in df.itertuples()
    ]
    acc = pd.DataFrame(
        {"PTQ": df["top1_ptq"].to_numpy() * 100, "fine-tuned (LSQ)": df["top1_qat"].to_numpy() * 100}, index=names
    )
    epochs = ", ".join(str(e) for e in sorted(set(df["epochs"])))
    labels = {"xlabel": "decision (method, sensitivity set / budget or uniform option, weight size)",
              "title": f"Quantization-aware fine-tuning ({epochs} epochs) vs post-training quantization"}  # fmt: skip
    return grouped_top1_bars(acc, 100 * float(df["fp_top1"].iloc[0]), png, labels, dpi, width)

"""report.json and report.md: D_A accuracy after each stage, D_B accuracy, forgetting, per variant."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .engine import write_json_atomic


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table_columns(report: Dict[str, Any]) -> List[str]:
    n = report["num_stages"]
    cols = ["name"] + [f"finetune_stage{k}" for k in range(1, n + 1)] + [f"mix_stage{k}" for k in range(1, n + 1)]
    cols += [f"acc_A_after_stage{k}" for k in range(1, n + 1)]
    cols += [f"acc_{chr(ord('A') + k - 1)}_after_stage{k}" for k in range(2, n + 1)]
    cols += ["forgetting"] + [f"epochs_stage{k}" for k in range(1, n + 1)]
    cols += [f"train_seconds_stage{k}" for k in range(1, n + 1)]
    return cols


def markdown_table(report: Dict[str, Any]) -> str:
    cols = table_columns(report)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["variants"]:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "report.json"), report)
    md = [f"# Forgetting report: {report['recipe']}", "",
          f"World size {report['world_size']}, precision {report['precision']}, ds_config {report['ds_config']}.",
          "Accuracies are greedy-generation exact match (strip + lower-case) in [0, 1]; "
          "forgetting = acc_A_after_stage1 - acc_A after the last stage.", "", markdown_table(report), ""]
    path = os.path.join(out_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, path)
    return path

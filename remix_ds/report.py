"""The forgetting report: report.json, report.md and forgetting.png in the recipe's output_dir.

Per variant: finetune mode and mixing of each stage, D_A accuracy after each stage, each later dataset's
accuracy after its own stage (D_B after stage 2, ...), forgetting (D_A after stage 1 minus D_A after the
last stage), epochs and wall time per stage. ``forgetting.png``: D_A accuracy after each stage per
variant side by side, and the per-epoch D_A teacher-forced accuracy of stage 2 (and later stages) read
from ``<output_dir>/<variant>/stage<k>/train_log.jsonl``.

Variants are compared in words only where the numbers say so: a difference between two variants'
accuracies is stated when a two-proportion z-test rejects equality at 5% after a Bonferroni correction
over the pairs compared; otherwise the report says the differences are within sampling noise.
"""
from __future__ import annotations

import json
import math
import os
from itertools import combinations
from statistics import NormalDist
from typing import Any, Dict, List, Optional, Tuple

from .engine import write_json_atomic

FIGURE = "forgetting.png"
ALPHA = 0.05


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _letter(j: int) -> str:
    return chr(ord("A") + j - 1)


def table_columns(report: Dict[str, Any]) -> List[str]:
    n = report["num_stages"]
    cols = ["name"] + [f"finetune_stage{k}" for k in range(1, n + 1)] + [f"mix_stage{k}" for k in range(1, n + 1)]
    cols += [f"acc_A_after_stage{k}" for k in range(1, n + 1)]
    cols += [f"acc_{_letter(k)}_after_stage{k}" for k in range(2, n + 1)]
    cols += ["forgetting"] + [f"epochs_stage{k}" for k in range(1, n + 1)]
    cols += [f"train_seconds_stage{k}" for k in range(1, n + 1)]
    cols += [f"tokens_per_s_stage{k}" for k in range(1, n + 1)]
    return cols


def markdown_table(report: Dict[str, Any]) -> str:
    cols = table_columns(report)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["variants"]:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def detail_table(report: Dict[str, Any]) -> str:
    """Every dataset's metrics after every stage, per variant (from the rows' ``stages``)."""
    cols = ["variant", "stage", "dataset", "n", "scorer", "accuracy", "accuracy_metric", "exact_match",
            "alias_exact_match", "rouge_l", "eval_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["variants"]:
        for st in row.get("stages") or []:
            for key, m in st.get("eval", {}).items():
                vals = [row["name"], st["stage"], f"{m.get('dataset', key)} ({key})", m.get("n"), m.get("scorer"),
                        m.get("accuracy"), m.get("accuracy_metric"), m.get("exact_match"),
                        m.get("alias_exact_match"), m.get("rouge_l"), m.get("seconds")]
                lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def dropped_warnings(report: Dict[str, Any]) -> List[str]:
    """Stages that trained on fewer examples than planned (longer than max_seq_length, dropped)."""
    out = []
    for row in report["variants"]:
        for st in row.get("stages") or []:
            nd, n_data, n_mix = st.get("n_dropped"), st.get("n_data") or 0, st.get("n_mix") or 0
            if nd:
                out.append(f"{row['name']}/stage{st['stage']} dropped {nd} of its {n_data + n_mix} training examples "
                           f"({n_data} of {st.get('data')} + {n_mix} mixing) as longer than max_seq_length"
                           + ("; check that the mixing was actually trained on" if n_mix else "") + ".")
    return out


# ------------------------------------------------------------------ words, only where the numbers say so

def two_proportion_z(p1: float, n1: int, p2: float, n2: int) -> float:
    """z of the difference p1 - p2 (pooled standard error); 0 when both are equal."""
    if p1 == p2:
        return 0.0
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    return (p1 - p2) / se if se > 0 else math.copysign(math.inf, p1 - p2)


def _differences(a: Dict[str, Any], b: Dict[str, Any], n_stages: int) -> List[str]:
    keys = [f"finetune_stage{k}" for k in range(1, n_stages + 1)] + [f"mix_stage{k}" for k in range(1, n_stages + 1)]
    return [k for k in keys if a.get(k) != b.get(k)]


def _measures(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(row key, n key, description) of the accuracies compared between variants."""
    n = report["num_stages"]
    out = [(f"acc_A_after_stage{n}", "n_A", f"D_A accuracy after stage {n} (what is retained)")] if n > 1 else []
    out.append(("acc_A_after_stage1", "n_A", "D_A accuracy after stage 1 (what was learnt)"))
    out += [(f"acc_{_letter(k)}_after_stage{k}", f"n_{_letter(k)}", f"D_{_letter(k)} accuracy after stage {k}")
            for k in range(2, n + 1)]
    return out


def comparisons(report: Dict[str, Any], alpha: float = ALPHA) -> List[str]:
    """Sentences comparing variants; a difference is stated only when it is statistically clear."""
    rows = report["variants"]
    if len(rows) < 2:
        return []
    out: List[str] = []
    for key, nkey, desc in _measures(report):
        have = [r for r in rows if r.get(key) is not None and r.get(nkey)]
        if len(have) < 2:
            continue
        values = [r[key] for r in have]
        if max(values) == min(values):
            out.append(f"{desc[0].upper() + desc[1:]}: every variant has {values[0]:.3f}.")
            continue
        pairs = list(combinations(have, 2))
        crit = NormalDist().inv_cdf(1 - alpha / (2 * len(pairs)))
        clear = []
        for a, b in pairs:
            z = two_proportion_z(a[key], a[nkey], b[key], b[nkey])
            if abs(z) > crit:
                hi, lo = (a, b) if z > 0 else (b, a)
                diff = _differences(hi, lo, report["num_stages"])
                clear.append(f"{hi['name']} > {lo['name']} ({hi[key]:.3f} vs {lo[key]:.3f}, n={hi[nkey]}/{lo[nkey]}, "
                             f"|z|={abs(z):.1f}" + (f"; they differ in {', '.join(diff)}" if diff else "") + ")")
        if clear:
            out.append(f"{desc[0].upper() + desc[1:]}: " + "; ".join(clear)
                       + ". Other pairs are within sampling noise.")
        else:
            out.append(f"{desc[0].upper() + desc[1:]}: the variants range from {min(values):.3f} to {max(values):.3f}, "
                       f"but no pair differs beyond sampling noise (two-proportion z-test, {len(pairs)} pairs, "
                       f"Bonferroni-corrected {int(alpha * 100)}% level).")
    return out


# ------------------------------------------------------------------ per-epoch curves

def _read_epochs(path: str) -> List[Dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "teacher_forced_accuracy" in rec:
                    out.append(rec)
    except OSError:
        pass
    return out


def stage_curves(output_dir: str, row: Dict[str, Any], num_stages: int) -> Optional[Dict[str, Any]]:
    """D_A's per-epoch teacher-forced accuracy through stages 2..n of one variant.

    x is the epoch counted from the end of stage 1 (0: the last epoch record of stage 1, when there is
    one); ``boundaries`` marks where stage 3, 4, ... begin. None when no log has D_A.
    """
    stages = row.get("stages") or []
    key_a = stages[0]["data"] if stages else "A"
    base = os.path.join(output_dir, row["name"])
    xs: List[float] = []
    ys: List[float] = []
    boundaries: List[float] = []
    first = _read_epochs(os.path.join(base, "stage1", "train_log.jsonl"))
    if first and key_a in first[-1]["teacher_forced_accuracy"]:
        xs.append(0.0)
        ys.append(float(first[-1]["teacher_forced_accuracy"][key_a]))
    offset = 0.0
    for k in range(2, num_stages + 1):
        recs = [r for r in _read_epochs(os.path.join(base, f"stage{k}", "train_log.jsonl"))
                if key_a in r["teacher_forced_accuracy"]]
        if k > 2:
            boundaries.append(offset)
        last = 0.0
        for r in recs:
            last = float(r["epoch"])
            xs.append(offset + last)
            ys.append(float(r["teacher_forced_accuracy"][key_a]))
        offset += last
    if len(xs) < 1 or (len(xs) == 1 and first):
        return None
    return {"dataset": key_a, "epoch": xs, "accuracy": ys, "boundaries": boundaries}


def plot_forgetting(report: Dict[str, Any], curves: Dict[str, Dict[str, Any]], path: str) -> str:
    """Left: D_A accuracy after each stage per variant (grouped bars). Right: per-epoch D_A curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["variants"]
    n = report["num_stages"]
    fig = Figure(figsize=(max(10.0, 2.2 * len(rows) + 6), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1.0, len(rows) / 3), 1.2]})
    width = 0.8 / n
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for k in range(1, n + 1):
        vals = [r.get(f"acc_A_after_stage{k}") for r in rows]
        xs = [i + (k - 1 - (n - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=f"after stage {k}",
                      color=colors[(k - 1) % len(colors)])
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4
                       else "center")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("D_A accuracy")
    scorer = report.get("scorer") or "generate"
    ax.set_title(f"D_A accuracy after each stage ({scorer})")
    ax.legend(loc="upper right", fontsize=8)
    drawn = 0
    for r in rows:
        c = curves.get(r["name"])
        if not c:
            continue
        bx.plot(c["epoch"], c["accuracy"], marker="o", markersize=3, label=r["name"])
        for b in c.get("boundaries", []):
            bx.axvline(b, color="grey", lw=0.8, ls="--")
        drawn += 1
    if not drawn:
        bx.text(0.5, 0.5, "no per-epoch D_A log\n(stage2 train_log.jsonl)", ha="center", va="center",
                transform=bx.transAxes)
    else:
        bx.legend(fontsize=8)
    bx.set_ylim(-0.03, 1.03)
    bx.set_xlabel("epoch of stage 2" + (" onwards" if n > 2 else "") + " (0: end of stage 1)")
    bx.set_ylabel("D_A teacher-forced accuracy")
    bx.set_title("Forgetting of D_A during stage 2" + (" onwards" if n > 2 else ""))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ writing

def write_report(report: Dict[str, Any], out_dir: str) -> str:
    """report.json, report.md and forgetting.png in out_dir; returns report.md's path."""
    os.makedirs(out_dir, exist_ok=True)
    report = dict(report)
    rows = report["variants"]
    if not report.get("scorer"):
        scorers = sorted({s for r in rows for s in str(r.get("scorer") or "").split("+") if s})
        report["scorer"] = "+".join(scorers) or "generate"
    run_dir = report.get("output_dir") or out_dir
    curves = {}
    if report["num_stages"] > 1:
        for r in rows:
            c = stage_curves(run_dir, r, report["num_stages"])
            if c:
                curves[r["name"]] = c
    report["curves"] = curves
    report["comparisons"] = comparisons(report)
    report["warnings"] = dropped_warnings(report)
    figure = None
    if rows:
        try:
            figure = plot_forgetting(report, curves, os.path.join(out_dir, FIGURE))
        except ImportError as e:  # matplotlib is a dependency, but a bare environment should still get the tables
            report["warnings"].append(f"{FIGURE} not written: {e}")
    report["figure"] = os.path.basename(figure) if figure else None
    write_json_atomic(os.path.join(out_dir, "report.json"), report)

    scorer_text = {"generate": "greedy-generation accuracy (exact match after strip + lower-case; WebQuestions: "
                               "prediction contained in the gold; GSM8K / MATH: final answer)",
                   "teacher-forced": "teacher-forced exact token match (greedy output == gold tokens + EOS)"}
    desc = "; ".join(scorer_text.get(s, s) for s in report["scorer"].split("+"))
    md = [f"# Forgetting report: {report['recipe']}", "",
          f"World size {report['world_size']}, precision {report['precision']}, ds_config {report['ds_config']}.",
          f"Accuracies are {desc}, in [0, 1]; forgetting = acc_A_after_stage1 - acc_A after the last stage; "
          "train_seconds is the training wall time of the stage, tokens_per_s its padding-free tokens per second "
          "of training steps (summed over ranks).", "", markdown_table(report), ""]
    if report["warnings"]:
        md += [f"- **Warning:** {w}" for w in report["warnings"]] + [""]
    if figure:
        md += [f"![D_A accuracy after each stage, and per epoch of stage 2]({os.path.basename(figure)})", "",
               "Left: D_A accuracy after each stage (the scorer above). Right: D_A teacher-forced accuracy after "
               "every epoch of stage 2, from the stage's train_log.jsonl (epoch 0: the end of stage 1).", ""]
    if report["comparisons"]:
        md += ["## Comparison", ""] + [f"- {c}" for c in report["comparisons"]] + [""]
    details = detail_table(report)
    if details:
        md += ["## All metrics", "", details, ""]
    path = os.path.join(out_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, path)
    return path

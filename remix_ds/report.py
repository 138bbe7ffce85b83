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

from .files import write_json_atomic

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


def long_table(report: Dict[str, Any]) -> str:
    """Every column of ``table_columns``, one per key (report.json's rows hold them all)."""
    cols = table_columns(report)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["variants"]:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _tuple(values: List[Any], fmt=_fmt) -> str:
    return ", ".join(fmt(v) for v in values)


def _stages(ks) -> str:
    return "(" + ", ".join(f"s{k}" for k in ks) + ")"


def retention_names(report: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(probe set names, text set names) over every variant, in order."""
    probes: List[str] = []
    texts: List[str] = []
    for row in report["variants"]:
        for name, r in (row.get("retention") or {}).items():
            (probes if r.get("kind") == "probe" else texts).append(name) if name not in probes + texts else None
    return probes, texts


def compact_columns(report: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """(header, row -> cell) of the table a researcher reads at a glance (the printed one and report.md's)."""
    n = report["num_stages"]
    rows = report["variants"]
    ks = list(range(1, n + 1))
    later_mix = any(r.get(f"mix_stage{k}") not in (None, "none") for r in rows for k in ks[1:])
    cols: List[Tuple[str, Any]] = [
        ("name", lambda r: r["name"]),
        ("mode", lambda r: " → ".join(str(r.get(f"finetune_stage{k}")) for k in ks)),
        ("mix" if later_mix else "mix (s1)",
         (lambda r: " → ".join(str(r.get(f"mix_stage{k}")) for k in ks)) if later_mix else
         (lambda r: r.get("mix_stage1")))]
    for j in ks:   # each stage's dataset from its own stage on
        letter = _letter(j)
        if n == 1 or j > 1 or n > 2:
            label = f"D_{letter} " + _stages(range(j, n + 1))
            cols.append((label, lambda r, j=j, letter=letter: _tuple([r.get(f"acc_{letter}_after_stage{k}")
                                                                       for k in range(j, n + 1)])))
        else:   # two stages: the README's columns, D_A after stage 1 and after stage 2
            cols.append(("D_A after s1", lambda r: _fmt(r.get("acc_A_after_stage1"))))
            cols.append(("D_A after s2", lambda r: _fmt(r.get("acc_A_after_stage2"))))
    if n > 1:
        cols.append(("forgetting", lambda r: _fmt(r.get("forgetting"))))
    if n > 2:
        cols.append(("ACC", lambda r: _fmt(r.get("average_accuracy"))))
        cols.append(("BWT", lambda r: _fmt(r.get("backward_transfer"))))
    probes, texts = retention_names(report)

    def ret(name: str):
        def cell(r):
            x = (r.get("retention") or {}).get(name)
            return _tuple([x.get("base")] + list(x.get("after") or [])) if x else "-"
        return cell
    for name in probes:
        cols.append((f"{name} (base, {', '.join(f's{k}' for k in ks)})", ret(name)))
    for name in texts:
        cols.append((f"{name} loss (base, {', '.join(f's{k}' for k in ks)})", ret(name)))
    cols.append(("epochs " + _stages(ks), lambda r: _tuple([r.get(f"epochs_stage{k}") for k in ks])))
    cols.append(("train s " + _stages(ks), lambda r: _tuple(
        [r.get(f"train_seconds_stage{k}") for k in ks], lambda v: "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}")))
    return cols


def markdown_table(report: Dict[str, Any]) -> str:
    """The compact table: mode ``full → lora``, each dataset's accuracy from its own stage on, forgetting, every
    retention set (base, after each stage), epochs and training seconds as ``(s1, s2)`` tuples. Every column
    of the long form (``long_table``) is in report.json's rows."""
    cols = compact_columns(report)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in report["variants"]:
        lines.append("| " + " | ".join(str(f(row)) for _, f in cols) + " |")
    return "\n".join(lines)


def matrix_section(report: Dict[str, Any]) -> List[str]:
    """Per variant: the accuracy matrix (rows: base model, after stage 1..N; columns: every stage's dataset, then
    the retention probes) and its summaries."""
    out: List[str] = []
    for row in report["variants"]:
        m = row.get("matrix")
        if not m or not m.get("rows"):
            continue
        out += [f"| {row['name']} | " + " | ".join(m["columns"]) + " |", "|---|" + "---|" * len(m["columns"])]
        for name, vals in zip(m["rows"], m["values"]):
            out.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
        out += ["", f"ACC {_fmt(m.get('average_accuracy'))}, BWT {_fmt(m.get('backward_transfer'))}, "
                    f"forgetting {_fmt(m.get('forgetting'))}.", ""]
    return out


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for pkg in ("remix_ds", "torch", "deepspeed", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            if pkg != "bitsandbytes":
                out[pkg] = None
    return out


def environment() -> Dict[str, Any]:
    """Where the report was written: hardware, remix_ds's git commit, Python and package versions."""
    import platform
    import subprocess

    env: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "packages": _versions()}
    try:
        import torch
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["hardware"] = f"{len(names)} x {names[0]}" + (f" (and {', '.join(sorted(set(names[1:])))})"
                                                               if len(set(names)) > 1 else "")
        else:
            model = platform.processor() or "CPU"
            try:
                for line in open("/proc/cpuinfo"):
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
            except OSError:
                pass
            env["hardware"] = f"CPU: {model}, {os.cpu_count()} cores"
    except Exception as e:  # noqa: BLE001  (the report never fails on this)
        env["hardware"] = f"unknown ({e})"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def zero_text(report: Dict[str, Any]) -> str:
    """The ZeRO stage each stage actually ran (DONE.json's summary), not the ds_config's name."""
    n = report["num_stages"]
    per = {r["name"]: [r.get(f"zero_stage_stage{k}") for k in range(1, n + 1)] for r in report["variants"]}
    values = {v for vs in per.values() for v in vs}
    if values == {None}:
        return "ZeRO stage not recorded"
    if len(values) == 1:
        return f"ZeRO stage {values.pop()} in every stage"
    return "ZeRO stage " + _stages(range(1, n + 1)) + ": " + "; ".join(f"{name} {_tuple(vs)}" for name, vs in per.items())


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
    """What differs between two variants' recipes: every stage key whose value differs (``stage1.lora.r 8 vs 64``),
    from the rows' ``spec``; rows without it (older report.json) fall back to the mode and mixing columns."""
    if isinstance(a.get("spec"), dict) and isinstance(b.get("spec"), dict):
        sa, sb = a["spec"], b["spec"]
        keys = [k for k in list(sa) + [k for k in sb if k not in sa] if sa.get(k, "-") != sb.get(k, "-")]
        # a whole mix block against none: one entry, not one per sub-key
        whole = {k.split(".")[0] + ".mix" for k in keys if sa.get(k.split(".")[0] + ".mix") == "none"
                 or sb.get(k.split(".")[0] + ".mix") == "none"}
        keys = [k for k in keys if not any(k.startswith(w + ".") for w in whole)]
        return [f"{k} {_short(sa.get(k, '-'))} vs {_short(sb.get(k, '-'))}" if k not in whole else
                f"{k} {a.get('mix_' + k.split('.')[0])} vs {b.get('mix_' + k.split('.')[0])}" for k in keys]
    keys = [f"finetune_stage{k}" for k in range(1, n_stages + 1)] + [f"mix_stage{k}" for k in range(1, n_stages + 1)]
    return [k for k in keys if a.get(k) != b.get(k)]


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _measures(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(row key, n key, description) of the accuracies compared between variants."""
    n = report["num_stages"]
    out = [(f"acc_A_after_stage{n}", "n_A", f"D_A accuracy after stage {n} (what is retained)")] if n > 1 else []
    out.append(("acc_A_after_stage1", "n_A", "D_A accuracy after stage 1 (what was learnt)"))
    out += [(f"acc_{_letter(k)}_after_stage{k}", f"n_{_letter(k)}", f"D_{_letter(k)} accuracy after stage {k}")
            for k in range(2, n + 1)]
    probes, _ = retention_names(report)
    out += [(f"{p}_after_stage{n}", f"n_{p}", f"{p} (retention probe) after stage {n}") for p in probes]
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


def epoch_curves(output_dir: str, row: Dict[str, Any], num_stages: int) -> Optional[Dict[str, Any]]:
    """Every dataset's per-epoch teacher-forced accuracy of one variant, from the stages' train_log.jsonl:
    ``stage1``: {"epoch": [...], "series": {D_A: [...]}}; ``later``: stages 2..n on one axis, x counted from the
    end of stage 1 (0: stage 1's last epoch record), ``series`` per dataset letter (D_A forgetting, D_B learning,
    ...), ``boundaries`` where stage 3, 4, ... begin. None when no log has any."""
    stages = row.get("stages") or []
    letters: Dict[str, str] = {}
    for j, st in enumerate(stages, 1):
        letters.setdefault(st.get("data"), _letter(j))
    base = os.path.join(output_dir, row["name"])
    first = _read_epochs(os.path.join(base, "stage1", "train_log.jsonl"))
    s1 = {"epoch": [float(r["epoch"]) for r in first], "series": {}}
    for key, letter in letters.items():
        if first and all(key in r["teacher_forced_accuracy"] for r in first):
            s1["series"][f"D_{letter}"] = [float(r["teacher_forced_accuracy"][key]) for r in first]
    later: Dict[str, Any] = {"epoch": [], "series": {}, "boundaries": []}
    xs: List[float] = []
    offset = 0.0
    points: List[Tuple[float, Dict[str, float]]] = []
    if first:
        points.append((0.0, {k: float(v) for k, v in first[-1]["teacher_forced_accuracy"].items()}))
    for k in range(2, num_stages + 1):
        recs = _read_epochs(os.path.join(base, f"stage{k}", "train_log.jsonl"))
        if k > 2:
            later["boundaries"].append(offset)
        last = 0.0
        for r in recs:
            last = float(r["epoch"])
            points.append((offset + last, {key: float(v) for key, v in r["teacher_forced_accuracy"].items()}))
        offset += last
    if len(points) > 1:
        xs = [x for x, _ in points]
        later["epoch"] = xs
        for key, letter in letters.items():
            later["series"][f"D_{letter}"] = [acc.get(key) for _, acc in points]
    if not s1["series"] and not later["series"]:
        return None
    return {"stage1": s1, "later": later}


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
STYLES = ["-", "--", ":", "-."]
SETTLED = 0.1   # the stage-2 panel's x-axis ends 3 epochs after every curve has made all but this share of its change


def _settled(xs: List[float], series: List[List[Optional[float]]], share: float = 0.1) -> float:
    """The first x by which every series has made all but ``share`` of its change from its first value to its
    last (a curve that only fluctuates afterwards counts as settled)."""
    out = xs[0] if xs else 0.0
    for ys in series:
        vals = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not vals:
            continue
        start, final = vals[0][1], vals[-1][1]
        tol = max(share * abs(final - start), 1e-9)
        out = max(out, next(x for x, y in vals if abs(y - final) <= tol))
    return out


def _retention_lines(ax, rows, names, color, dodge, marker: str) -> None:
    """One line per variant and retention set on `ax`: the set's value on the base model, then after each stage
    (x 0, 1, ...; each variant shifted by its `dodge` so that equal values stay visible), a line style per set."""
    for si, name in enumerate(names):
        for r in rows:
            x = (r.get("retention") or {}).get(name)
            if not x:
                continue
            ys = [x.get("base")] + list(x.get("after") or [])
            pts = [(i + dodge[r["name"]], y) for i, y in enumerate(ys) if y is not None]
            ax.plot([i for i, _ in pts], [y for _, y in pts], color=color[r["name"]],
                    ls=STYLES[si % len(STYLES)], marker=marker, markersize=4, lw=1.4)


def plot_forgetting(report: Dict[str, Any], curves: Dict[str, Dict[str, Any]], path: str) -> str:
    """forgetting.png. Top row: D_A accuracy after each stage (bars; a zero bar shows as its outline at 0), D_A
    per epoch of stage 1, and from the end of stage 1 the D_A forgetting curve beside the D_B learning curve
    (x cut to where the curves still change). Bottom row, with retention sets: each probe's accuracy and each
    text set's loss on the base model and after every stage. The legend has its own panel (or sits below)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = report["variants"]
    n = report["num_stages"]
    color = {r["name"]: COLORS[i % len(COLORS)] for i, r in enumerate(rows)}
    probes, texts = retention_names(report)
    two_rows = bool(probes or texts)
    fig = Figure(figsize=(15, 8.4 if two_rows else 4.8), dpi=90)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2 if two_rows else 1, 3, width_ratios=[1.1, 1, 1.3])
    ax = fig.add_subplot(gs[0, 0])
    # (a) bars: D_A after each stage, series = stage
    width = 0.8 / n
    stage_colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for k in range(1, n + 1):
        vals = [r.get(f"acc_A_after_stage{k}") for r in rows]
        xs = [i + (k - 1 - (n - 1) / 2) * width for i in range(len(rows))]
        c = stage_colors[(k - 1) % len(stage_colors)]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width * 0.92, color=c, edgecolor=c,
                      linewidth=2.5, label=f"after stage {k}")
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, max(b.get_height(), 0)),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points", color=c)
    ax.axhline(0, color="black", lw=0.6, zorder=0)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=25 if len(rows) > 3 else 0,
                       ha="right" if len(rows) > 3 else "center", fontsize=8)
    ax.set_ylim(-0.06, 1.18)
    scorer = report.get("scorer") or "generate"
    ax.set_title(f"D_A after each stage ({scorer})", fontsize=10)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(rows) <= 3 else -0.25), ncol=n, fontsize=8,
              frameon=False)
    # (b) stage 1 curves
    bx = fig.add_subplot(gs[0, 1])
    cx = fig.add_subplot(gs[0, 2], sharey=bx)
    drawn_b = drawn_c = 0
    later_x: List[float] = []
    later_series: List[List[Optional[float]]] = []
    letters_seen: List[str] = []
    for r in rows:
        c = curves.get(r["name"])
        if not c:
            continue
        s1 = c["stage1"]
        for letter, ys in s1["series"].items():
            bx.plot(s1["epoch"], ys, color=color[r["name"]], ls="-", marker="o", markersize=2.5, lw=1.4)
            drawn_b += 1
        lt = c["later"]
        for i, (letter, ys) in enumerate(sorted(lt["series"].items())):
            pts = [(x, y) for x, y in zip(lt["epoch"], ys) if y is not None]
            if not pts:
                continue
            if letter not in letters_seen:
                letters_seen.append(letter)
            cx.plot([x for x, _ in pts], [y for _, y in pts], color=color[r["name"]],
                    ls=STYLES[letters_seen.index(letter) % len(STYLES)], marker="o", markersize=2.5, lw=1.4)
            later_x += lt["epoch"]
            later_series.append(ys)
            drawn_c += 1
        for b in lt.get("boundaries", []):
            cx.axvline(b, color="grey", lw=0.8, ls="--")
    bx.set_title("stage 1: D_A per epoch (teacher-forced)", fontsize=10)
    bx.set_xlabel("epoch of stage 1")
    bx.set_ylabel("accuracy")
    bx.set_ylim(-0.03, 1.03)
    if not drawn_b:
        bx.text(0.5, 0.5, "no per-epoch log", ha="center", va="center", transform=bx.transAxes)
    title = "stage 2" + (" onwards" if n > 2 else "") + ": " + " and ".join(
        f"{x} ({'forgetting' if x == 'D_A' else 'learning' if x == 'D_B' else 'later'})" for x in letters_seen)
    cx.set_title(title if drawn_c else "stage 2 onwards", fontsize=10)
    if drawn_c:
        xmax = max(later_x)
        # where the change happens: cut the x-axis a little after the last epoch any curve still moved
        by_series = []
        for r in rows:
            c = curves.get(r["name"])
            if c and c["later"]["series"]:
                for ys in c["later"]["series"].values():
                    by_series.append((c["later"]["epoch"], ys))
        last = max(_settled(xs, [ys], SETTLED) for xs, ys in by_series)
        cut = min(xmax, max(5.0, last + 3.0))
        if n == 2 and cut < xmax:
            cx.set_xlim(-0.3, cut + 0.3)
            cx.set_xlabel(f"epoch from the end of stage 1 (shown to {cut:g} of {xmax:g}: every curve\nhas made "
                          f"{100 * (1 - SETTLED):.0f}% of its change by epoch {last:g}, then only fluctuates)", fontsize=8)
        else:
            cx.set_xlabel("epoch from the end of stage 1", fontsize=9)
        cx.axvline(0, color="black", lw=0.8)
    else:
        cx.text(0.5, 0.5, "no per-epoch log of stage 2", ha="center", va="center", transform=cx.transAxes)
    # (d, e) retention
    handles = [Line2D([], [], color=color[r["name"]], lw=2, label=r["name"]) for r in rows]
    handles += [Line2D([], [], color="black", ls=STYLES[i % len(STYLES)], lw=1.4, label=f"{x} (per epoch)")
                for i, x in enumerate(letters_seen)]
    if two_rows:
        labels = ["base"] + [f"after s{k}" for k in range(1, n + 1)]
        # variants side by side around each model's x, so that equal values do not hide one another
        dodge = {r["name"]: (i - (len(rows) - 1) / 2) * min(0.05, 0.3 / max(1, len(rows))) for i, r in enumerate(rows)}
        dx = fig.add_subplot(gs[1, 0])
        _retention_lines(dx, rows, probes, color, dodge, "s")
        dx.set_xticks(range(len(labels)))
        dx.set_xticklabels(labels)
        dx.set_ylim(-0.03, 1.03)
        dx.set_ylabel("accuracy")
        dx.set_title("known facts kept: " + ", ".join(probes) if probes else "no probe set", fontsize=10)
        ex = fig.add_subplot(gs[1, 1])
        _retention_lines(ex, rows, texts, color, dodge, "D")
        ex.set_xticks(range(len(labels)))
        ex.set_xticklabels(labels)
        ex.set_ylabel("loss per token (nats)")
        ex.set_title("generic text: " + ", ".join(texts) if texts else "no text set", fontsize=10)
        handles += [Line2D([], [], color="black", ls=STYLES[i % len(STYLES)], marker="s", lw=1.4, label=p)
                    for i, p in enumerate(probes)]
        handles += [Line2D([], [], color="black", ls=STYLES[i % len(STYLES)], marker="D", lw=1.4, label=t)
                    for i, t in enumerate(texts)]
        lx = fig.add_subplot(gs[1, 2])
        lx.axis("off")
        lx.legend(handles=handles, loc="center", fontsize=9, frameon=False, title="variants / series")
        fig.tight_layout()
    else:
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
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
    curves, full_curves = {}, {}
    for r in rows:
        c = stage_curves(run_dir, r, report["num_stages"]) if report["num_stages"] > 1 else None
        if c:
            curves[r["name"]] = c
        fc = epoch_curves(run_dir, r, report["num_stages"])
        if fc:
            full_curves[r["name"]] = fc
    report["curves"] = curves
    report["epoch_curves"] = full_curves
    report["columns"] = table_columns(report)
    report["comparisons"] = comparisons(report)
    report["warnings"] = dropped_warnings(report)
    figure = None
    if rows:
        try:
            figure = plot_forgetting(report, full_curves, os.path.join(out_dir, FIGURE))
        except ImportError as e:  # matplotlib is a dependency, but a bare environment should still get the tables
            report["warnings"].append(f"{FIGURE} not written: {e}")
    report["figure"] = os.path.basename(figure) if figure else None
    write_json_atomic(os.path.join(out_dir, "report.json"), report)

    scorer_text = {"generate": "greedy-generation accuracy (exact match after strip + lower-case; WebQuestions: "
                               "prediction contained in the gold; GSM8K / MATH: final answer)",
                   "teacher-forced": "teacher-forced exact token match (greedy output == gold tokens + EOS)"}
    desc = "; ".join(scorer_text.get(s, s) for s in report["scorer"].split("+"))
    env = report.get("environment") or {}
    pk = env.get("packages") or {}
    md = [f"# Forgetting report: {report['recipe']}", "",
          f"World size {report['world_size']}, precision {report['precision']}, {zero_text(report)} (ds_config "
          f"{report['ds_config']}, as adapted to the run); {env.get('hardware', 'hardware not recorded')}; remix_ds "
          f"commit {env.get('git_commit') or 'unknown'}" + "".join(f", {k} {v}" for k, v in pk.items() if v) + ".",
          "",
          f"Accuracies are {desc}, in [0, 1]; D_X (s1, s2, ...): accuracy after each stage from the dataset's own "
          "on; forgetting = D_A after stage 1 - D_A after the last stage; train s: training wall time per stage. "
          "Every column in long form (tokens/s, stop rule, ...) is in report.json.", ""]
    probes, texts = retention_names(report)
    if probes or texts:
        md += ["Retention (base model, then after each stage): " + "; ".join(
            f"**{name}** = {next((r['retention'][name].get('what') for r in rows if name in (r.get('retention') or {})), '')}"
            + (f" (n = {next((r['retention'][name].get('n') for r in rows if name in (r.get('retention') or {})), '')})"
               if name in probes else "") for name in probes + texts)
            + ". A probe's value is the share of its facts the model answers by filter-unknown's rule "
            f"({(report.get('retention') or {}).get('scorer', 'generate')}); a text set's, the mean loss per token "
            "of its passages as plain text (lower is better).", ""]
    md += [markdown_table(report), ""]
    if report["warnings"]:
        md += [f"- **Warning:** {w}" for w in report["warnings"]] + [""]
    if figure:
        md += [f"![D_A after each stage, per-epoch curves, retention]({os.path.basename(figure)})", "",
               "Top: D_A after each stage (the scorer above); D_A per epoch of stage 1; from the end of stage 1 "
               "(x = 0), D_A (forgetting) and D_B (learning) per epoch of stage 2, teacher-forced, from each stage's "
               "train_log.jsonl." + (" Bottom: the retention sets on the base model and after each stage."
                                    if probes or texts else ""), ""]
    matrix = matrix_section(report)
    if matrix:
        md += ["## Accuracy matrix", "",
               "Rows: the model (base, then after each stage); columns: each stage's dataset (the scorer above), "
               "then the retention probes; `-`: not scored. Over the D_A..D_N block: ACC = mean accuracy after the "
               "last stage; BWT = mean over earlier datasets of (after the last stage - after its own stage); "
               "forgetting = mean over earlier datasets of (best before the last stage - after it) "
               "(docs/evaluation.md).", ""] + matrix
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

"""Answer scoring, per example and per dataset.

- The study's metric: exact match after strip + lower-case; for WebQuestions a prediction counts when
  it is contained in the gold answer.
- Alias-aware exact match (any of ``[answer] + aliases``), where the source has aliases (PopQA possible
  answers, TriviaQA aliases).
- ROUGE-L F-measure (``rouge-score`` package, stemming off).
- GSM8K: the final number after ``####``; MATH: the last ``\\boxed{...}``, normalised as in the MATH
  dataset's own ``is_equiv``. These replace exact match as the accuracy of such datasets (D_B).

Which rule applies is chosen from the example's source name (``Example.source``, the recipe's
``datasets.<key>.source``), see ``task_of``.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Dict, List, Optional, Sequence

# ------------------------------------------------------------------ which rule

EXACT, CONTAINS, GSM8K, MATH = "exact_match", "contains", "gsm8k_final_number", "math_boxed"


def _name_tokens(source: str) -> List[str]:
    return [t for t in re.split(r"[^a-z0-9]+", (source or "").lower()) if t]


def task_of(source: str) -> str:
    """The accuracy rule of a source: EXACT, CONTAINS (WebQuestions), GSM8K or MATH.

    Matched on the name: ``webquestions``/``web_questions``/``webq*`` -> CONTAINS; a name with a
    ``gsm8k`` part -> GSM8K; a name with a ``math`` part (``math``, ``hendrycks_math``, ``MATH-500``,
    not ``mathqa`` / ``math_qa``) -> MATH; anything else (kvr, popqa, triviaqa, json, ...) -> EXACT.
    """
    flat = re.sub(r"[^a-z0-9]", "", (source or "").lower())
    tokens = _name_tokens(source)
    if flat.startswith("webq") or "webquestions" in flat:
        return CONTAINS
    if any(t.startswith("gsm8k") for t in tokens):
        return GSM8K
    if "math" in tokens and "mathqa" not in flat:   # MathQA (math_qa) is multiple choice, not MATH
        return MATH
    return EXACT


def is_task_source(source: str) -> bool:
    """Sources scored by their final answer (GSM8K, MATH): evaluated even when not factoid."""
    return task_of(source) in (GSM8K, MATH)


# ------------------------------------------------------------------ the study's rules

def normalize(text: str) -> str:
    """The study's normalisation: strip surrounding whitespace, lower-case."""
    return (text or "").strip().lower()


def exact_match(prediction: str, gold: str) -> bool:
    return normalize(prediction) == normalize(gold)


def contains_match(prediction: str, gold: str) -> bool:
    """WebQuestions: the (normalised, non-empty) prediction is contained in the gold answer."""
    p = normalize(prediction)
    return bool(p) and p in normalize(gold)


def alias_match(prediction: str, golds: Sequence[str], rule: str = EXACT) -> bool:
    match = contains_match if rule == CONTAINS else exact_match
    return any(match(prediction, g) for g in golds)


# ------------------------------------------------------------------ ROUGE-L

_ROUGE = None


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure in [0, 1] (rouge-score's tokenizer: lower-case, alphanumeric tokens)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(gold or "", prediction or "")["rougeL"].fmeasure)


# ------------------------------------------------------------------ GSM8K

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _canon_number(text: str) -> Optional[str]:
    t = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def gsm8k_answer(text: str, strict: bool = True) -> Optional[str]:
    """The final number: the first number after the last ``####``; canonical (no commas, 18.0 -> 18).

    With ``strict=False`` a text without ``####`` gives its last number (for gold answers stored as a
    bare number, and predictions of a model trained on such answers)."""
    text = text or ""
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        return _canon_number(m.group(0)) if m else None
    if strict:
        return None
    found = _NUMBER.findall(text)
    return _canon_number(found[-1]) if found else None


def gsm8k_match(prediction: str, gold: str) -> bool:
    g = gsm8k_answer(gold, strict=False)
    p = gsm8k_answer(prediction, strict="####" in (gold or ""))
    return g is not None and p == g


# ------------------------------------------------------------------ MATH

def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``), braces balanced."""
    text = text or ""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    name = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    rest = rest[len(name):]
    if rest.startswith(" "):  # "\boxed 5"
        return rest.strip().split("$")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None  # unbalanced


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{"):
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b = sub[0], sub[1]
        if b != "{":
            out += "{" + a + "}{" + b + "}" + sub[2:]
        else:
            out += "{" + a + "}" + b + sub[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:
        return s.split("\\text{ ")[0]
    return s


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    parts = s.split("\\sqrt")
    out = parts[0]
    for sub in parts[1:]:
        if sub and sub[0] != "{":
            out += "\\sqrt{" + sub[0] + "}" + sub[1:]
        else:
            out += "\\sqrt" + sub
    return out


def normalize_math(s: str) -> str:
    """The MATH dataset's answer normalisation (Hendrycks et al., ``strip_string``)."""
    s = (s or "").replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    halves = s.split("=")
    if len(halves) == 2 and len(halves[0].strip()) <= 2:
        s = halves[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    s = s.rstrip(".")
    return s


def math_answer(text: str, strict: bool = True) -> Optional[str]:
    """The normalised last boxed answer; with ``strict=False`` the whole text when nothing is boxed."""
    boxed = last_boxed(text)
    if boxed is None:
        if strict or not (text or "").strip():
            return None
        boxed = text.strip()
    return normalize_math(boxed)


def math_match(prediction: str, gold: str) -> bool:
    g = math_answer(gold, strict=False)
    p = math_answer(prediction, strict=last_boxed(gold) is not None)
    return g is not None and p == g


# ------------------------------------------------------------------ per example / per dataset

def score_example(prediction: str, gold: str, aliases: Sequence[str] = (), source: str = "",
                  rouge: bool = True) -> Dict[str, object]:
    """All per-example scores. ``correct`` is the study's accuracy rule for the source."""
    rule = task_of(source)
    out: Dict[str, object] = {"exact_match": exact_match(prediction, gold)}
    if rule == CONTAINS:
        out["correct"] = contains_match(prediction, gold)
    elif rule == GSM8K:
        out["correct"] = gsm8k_match(prediction, gold)
        out["pred_answer"] = gsm8k_answer(prediction, strict="####" in (gold or ""))
        out["gold_answer"] = gsm8k_answer(gold, strict=False)
    elif rule == MATH:
        out["correct"] = math_match(prediction, gold)
        out["pred_answer"] = math_answer(prediction, strict=last_boxed(gold) is not None)
        out["gold_answer"] = math_answer(gold, strict=False)
    else:
        out["correct"] = out["exact_match"]
    if aliases:
        out["alias_match"] = alias_match(prediction, [gold] + list(aliases), rule if rule == CONTAINS else EXACT)
    if rouge:
        out["rouge_l"] = rouge_l(prediction, gold)
    return out


def aggregate(rows: Sequence[Dict[str, object]], sources: Sequence[str]) -> Dict[str, object]:
    """Dataset-level metrics from ``score_example`` rows.

    accuracy: the study's rule (``accuracy_metric`` names it); exact_match: plain strip+lower EM;
    alias_exact_match: over examples with aliases counted with them (None when no example has any);
    rouge_l: mean F-measure (None when not computed).
    """
    n = len(rows)

    def mean(key):
        vals = [float(r[key]) for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None
    rules = sorted({task_of(s) for s in sources}) or [EXACT]
    has_alias = any("alias_match" in r for r in rows)
    alias = None
    if has_alias:
        alias = sum(bool(r.get("alias_match", r["correct"])) for r in rows) / n if n else 0.0
    return {"n": n, "accuracy": (sum(bool(r["correct"]) for r in rows) / n) if n else 0.0,
            "accuracy_metric": "+".join(rules), "exact_match": mean("exact_match") if n else 0.0,
            "alias_exact_match": alias, "rouge_l": mean("rouge_l")}

"""One loader per dataset source. Each returns a list of Example, cut to ``num_examples``.

Every hub-backed source reads, in this order of preference:

1. ``path:`` a local file or directory (JSON, JSONL, parquet, a ``save_to_disk`` directory, a directory of
   such files such as EntityQuestions' per-relation layout, or a glob);
2. otherwise ``datasets.load_dataset(name or the source's hub id, config, split=..., revision=...,
   streaming=...)``.

Rows may be in any of three schemas, detected from the first row (or forced with ``format:``):

- ``native``: the source's own row schema on the hub (e.g. PopQA ``question``/``possible_answers``);
- ``released``: the study authors' per-dataset JSON records (``input_text``, ``target_text``,
  ``target_for_eval``, ``messages``);
- ``simple``: ``prompt`` (or ``question``) and ``answer`` (+ ``aliases``), used verbatim; this is what
  ``filter_unknown`` writes.

Rows that repeat a question (the same prompt) are one example (``SourceInfo.dedupe``: PopQA, TriviaQA, LAMA):
repeats of one fact are merged into the first row, their answers added as aliases; for PopQA and TriviaQA a
question whose rows give different facts (different entities of one name) is ambiguous and dropped. A KVR
file that repeats a key is an error. ``keep_repeats=True`` (``semantics: study``) keeps every row instead, one
example each, as the study's loaders do (src/datasets.py: every row of the file becomes a datapoint).

Then every set is shuffled deterministically by the seed and cut: examples ``skip .. skip+num_examples``
of the shuffled order (``skip`` is 0, and ``num_examples`` for the ``...B`` sources, which so take the
next examples, disjoint from the first). With a ``fits`` test (``overlong: drop``, see
``load_fitting_examples``) the cut is of that order with the examples that fail it left out. docs/datasets.md
lists every source.

Register new sources with ``@source("name", factoid=True)`` (a function ``(spec, seed) -> [Example]``) or
with ``register(SourceInfo(...))``.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import random
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ..config import DatasetSpec
from ..errors import ConfigError, DataError
from .example import Example, Turn
from .hub import hub_rows
from .io import Row, local_rows, require_fields, tree_mtime
from .kvr import PROMPT as KVR_PROMPT
from .kvr import kvr_examples

log = logging.getLogger(__name__)

Loader = Callable[..., List[Example]]
SOURCES: Dict[str, Loader] = {}
FACTOID: Dict[str, bool] = {}
FORMATS = ("auto", "native", "released", "simple")
QA_SUFFIX = "\nThe answer is: "          # PopQA / TriviaQA prompts, as in the study
STUDY_POOL = 20000                         # UltraChat and the generic text sources: the first 20,000 rows
APPS_DIFFICULTIES = ("introductory", "interview")
RELEASED_COLUMNS = ("input_text", "target_text", "target_for_eval", "messages", "prompt", "answer", "aliases")


def source(name: str, factoid: bool = True):
    def deco(fn: Loader) -> Loader:
        SOURCES[name] = fn
        FACTOID[name] = factoid
        return fn
    return deco


def shuffled_head(items: List[Example], n: int, seed: int) -> List[Example]:
    """The first n items after a deterministic shuffle by the seed."""
    return cut(items, n, seed)


def _order(n_items: int, seed: int, shuffle: bool = True) -> List[int]:
    order = list(range(n_items))
    if shuffle:
        random.Random(f"shuffle-{seed}").shuffle(order)
    return order


def cut(items: List[Example], n: int, seed: int, skip: int = 0, shuffle: bool = True) -> List[Example]:
    """Items skip .. skip+n of the order shuffled by the seed (or of the given order)."""
    order = _order(len(items), seed, shuffle)
    return [_copy(items[i]) for i in order[skip:skip + n]]


def fitting_cut(items: List[Example], n: int, seed: int, skip: int, shuffle: bool,
                fits: Callable[[Example], bool]) -> Tuple[List[Example], int]:
    """``cut`` of the order with the items that fail ``fits`` left out: the fitting items skip .. skip+n of the
    order shuffled by the seed (or of the given order), and how many items failing ``fits`` were passed over
    after the first ``skip`` fitting ones. The order is walked only as far as needed."""
    out: List[Example] = []
    n_fit = n_over = 0
    for i in _order(len(items), seed, shuffle):
        if len(out) >= n:
            break
        if not fits(items[i]):
            n_over += n_fit >= skip
            continue
        if n_fit >= skip:
            out.append(_copy(items[i]))
        n_fit += 1
    return out, n_over


def _copy(ex: Example) -> Example:
    return dataclasses.replace(ex, aliases=list(ex.aliases),
                               messages=list(ex.messages) if ex.messages else None)


# ---------------------------------------------------------------- row helpers

def _text(rec: Dict[str, Any], key: str) -> str:
    return str(rec[key]).strip()


def answer_list(value: Any) -> List[str]:
    """A list of answers from a list, a JSON-encoded list (PopQA) or a single value; empty ones dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return answer_list(parsed)
        return [s] if s else []
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out.extend(answer_list(v))
        return out
    if isinstance(value, dict):  # TriviaQA's answer object
        return answer_list(value.get("value")) + answer_list(value.get("aliases"))
    return [str(value)]


def _unique(values: Iterable[str]) -> List[str]:
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def qa_example(prompt: str, answers: List[str], src: str, where: str, row: int, field: str) -> Example:
    answers = _unique(a for a in answers if a)
    if not answers:
        raise DataError(f"{where}: row {row}: field {field!r} holds no answer")
    return Example(prompt=prompt, answer=answers[0], aliases=answers[1:], source=src)


def message_turns(messages: Any, where: str, row: int, field: str = "messages") -> List[Turn]:
    """(user, assistant) pairs from [{"role", "content"}, ...] or from alternating strings (UltraChat).

    System messages are dropped; a trailing user message without a reply is dropped.
    """
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"{where}: row {row}: field {field!r} must be a list of messages")
    texts: List[Tuple[str, str]] = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            if "content" not in m:
                raise DataError(f"{where}: row {row}: {field}[{i}] has no 'content'")
            role = str(m.get("role", "user" if i % 2 == 0 else "assistant"))
            if role == "system":
                continue
            texts.append(("assistant" if role in ("assistant", "gpt", "model") else "user", str(m["content"])))
        else:
            texts.append(("user" if len(texts) % 2 == 0 else "assistant", str(m)))
    turns: List[Turn] = []
    pending: Optional[str] = None
    for role, content in texts:
        if role == "user":
            pending = content if pending is None else pending + "\n" + content
        elif pending is not None:
            turns.append((pending, content))
            pending = None
    return turns


# ---------------------------------------------------------------- source descriptions

@dataclass(frozen=True)
class SourceInfo:
    name: str
    kind: str                            # factoid | instruction | conversation
    hub: Optional[str] = None            # default hub id (None: local files only)
    config: Optional[str] = None
    split: Optional[str] = "train"
    revision: Optional[str] = None
    streaming: bool = False
    pool: Optional[int] = None           # read only the first `pool` rows
    columns: Tuple[str, ...] = ()        # the native columns used (selected on the hub path)
    suffix: str = ""                     # appended to the question in native and released rows
    convert: Optional[Callable[[Dict[str, Any], str, int, Dict[str, Any]], Optional[Example]]] = None
    dedupe: bool = False                 # rows with the same prompt are one question (see on_conflict)
    # dedupe, rows of one prompt that state different facts: "merge" (every answer is right: LAMA's objects of
    # one subject and relation become aliases) or "drop" (the question is ambiguous: every row of it dropped)
    on_conflict: str = "merge"
    # on_conflict "drop": a row's fact identity (PopQA subj_id, TriviaQA question_id; None if the row has none).
    # Rows of one prompt are the same fact when their identities are equal or their answers overlap.
    fact_id: Optional[Callable[[Dict[str, Any]], Any]] = None
    unique_prompts: bool = False         # duplicate prompts are an error (KVR keys)
    exclude_files: Tuple[str, ...] = ()  # file names in a local directory that are not rows
    local_hint: str = "a .json/.jsonl/.parquet file or a save_to_disk directory"

    @property
    def factoid(self) -> bool:
        return self.kind == "factoid"


INFO: Dict[str, SourceInfo] = {}


def register(info: SourceInfo, b_variant: bool = False) -> None:
    """Register a rows-backed source, and its ``<name>B`` variant (the next num_examples examples)."""
    for name, b in ((info.name, False), (info.name + "B", True))[:2 if b_variant else 1]:
        def loader(spec: DatasetSpec, seed: int, key: str = "", _info=info, _b=b) -> List[Example]:
            return load_rows_source(spec, seed, key, _info, _b)
        loader.rows_info = (info, b)    # type: ignore[attr-defined]  (for rows_backed)
        SOURCES[name] = loader
        FACTOID[name] = info.factoid
        INFO[name] = info


# ---------------------------------------------------------------- native converters

def _popqa(rec, where, row, ctx):
    require_fields(rec, ["question"], where, row)
    answers = answer_list(rec.get("obj")) + answer_list(rec.get("possible_answers"))
    if not answers:
        require_fields(rec, ["possible_answers"], where, row)
    return qa_example(_text(rec, "question") + QA_SUFFIX, answers, "popqa", where, row, "possible_answers")


def _triviaqa(rec, where, row, ctx):
    require_fields(rec, ["question", "answer"], where, row)
    return qa_example(_text(rec, "question") + QA_SUFFIX, answer_list(rec["answer"]), "triviaqa", where, row,
                      "answer")


def lama_prompt(template: str, subject: str, relation: Optional[str] = None) -> str:
    """The cloze rule: the template up to the object slot [Y], with [X] replaced by the subject.

    ``[X] was born in [Y] .`` -> ``Dante was born in``. Whatever follows [Y] (usually `` .``) is dropped,
    so the prompt always ends where the object goes. A template without [X] before [Y] (``[Y] participated
    in the [X] .``) has no cloze prompt (it would be the same, subject-free text for every fact of the
    relation): a DataError naming the relation and the template.
    """
    head = template.split("[Y]", 1)[0]
    if "[Y]" not in template or "[X]" not in head:
        rel = f" of relation {relation}" if relation else ""
        why = "has no object slot [Y]" if "[Y]" not in template else "has no subject [X] before the object slot [Y]"
        raise DataError(f"LAMA template {template!r}{rel} {why}: the cloze rule keeps the template up to [Y], so "
                        f"every fact of the relation would get the same prompt without its subject; give the "
                        f"relation a template with [X] before [Y] (template field, or relations.jsonl)")
    return " ".join(head.replace("[X]", subject).split())


def _lama(rec, where, row, ctx):
    require_fields(rec, ["sub_label", "obj_label"], where, row)
    template = rec.get("template")
    if not template:
        templates = ctx.get("templates") or {}
        pid = rec.get("predicate_id")
        template = templates.get(pid)
        if not template:
            raise DataError(f"{where}: row {row}: no 'template' field and no template for predicate_id {pid!r}"
                            + (" (no relations.jsonl found next to the data)" if not templates else
                               " in relations.jsonl"))
    if "[X]" not in template or "[Y]" not in template:
        raise DataError(f"{where}: row {row}: template {template!r} needs both [X] and [Y]")
    try:
        prompt = lama_prompt(str(template), _text(rec, "sub_label"), rec.get("predicate_id"))
    except DataError as e:
        raise DataError(f"{where}: row {row}: {e}") from None
    return qa_example(prompt, answer_list(rec["obj_label"]), "lama", where, row, "obj_label")


def _lama_prepare(spec: DatasetSpec, what: str) -> Dict[str, Any]:
    """LAMA's own distribution: TREx/P*.jsonl rows without templates, templates in relations.jsonl."""
    if not spec.path:
        return {}
    base = os.path.expanduser(spec.path)
    base = base if os.path.isdir(base) else os.path.dirname(base)
    for d in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
        f = os.path.join(d, "relations.jsonl")
        if os.path.isfile(f):
            from .io import read_records
            return {"templates": {r.get("relation"): r.get("template") for r in read_records(f)}}
    return {}


def _question_answers(src):
    def convert(rec, where, row, ctx):
        require_fields(rec, ["question", "answers"], where, row)
        return qa_example(_text(rec, "question"), answer_list(rec["answers"]), src, where, row, "answers")
    return convert


def _pair(src, q, a, kind="instruction"):
    def convert(rec, where, row, ctx):
        require_fields(rec, [q, a], where, row)
        return Example(prompt=str(rec[q]).strip(), answer=str(rec[a]), source=src, factoid=kind == "factoid")
    return convert


def _ultrachat(rec, where, row, ctx):
    if "data" not in rec and "messages" in rec:  # chat-format copies (e.g. ultrachat_200k)
        turns = message_turns(rec["messages"], where, row)
    else:
        require_fields(rec, ["data"], where, row)
        turns = message_turns(rec["data"], where, row, "data")
    if not turns:
        ctx["skipped"] = ctx.get("skipped", 0) + 1
        return None
    return Example(prompt=turns[0][0], answer=turns[0][1], messages=turns, source="ultrachat", factoid=False)


def apps_prompt(question: str, starter_code: Optional[str], call_based: bool) -> str:
    """The study's APPS prompt."""
    text = f"Question:\n {question}"
    if starter_code:
        text += f"\n\nSTARTER CODE:\n{starter_code}"
    text += "\nUse Call-Based format" if call_based else "\nUse Standard Input format"
    return text + "\nAnswer:\n"


def _apps(rec, where, row, ctx):
    require_fields(rec, ["question", "difficulty"], where, row)
    if "solutions" not in rec:   # present but empty is allowed: APPS has problems without solutions
        require_fields(rec, ["solutions"], where, row)
    if rec["difficulty"] not in APPS_DIFFICULTIES:
        return None
    try:
        fn_name = (json.loads(rec.get("input_output") or "{}") or {}).get("fn_name")
    except (ValueError, AttributeError):
        fn_name = None
    solutions = rec["solutions"]
    if isinstance(solutions, str):
        try:
            solutions = json.loads(solutions)
        except ValueError:
            solutions = None
    if not isinstance(solutions, list) or not solutions or not str(solutions[0]).strip():
        ctx["skipped"] = ctx.get("skipped", 0) + 1   # the study skips problems without a usable solution
        return None
    prompt = apps_prompt(str(rec["question"]), rec.get("starter_code") or None, bool(fn_name))
    return Example(prompt=prompt, answer=str(solutions[0]), source="apps", factoid=False)


def _simple(rec, where, row, ctx, src="json"):
    qkey = "prompt" if "prompt" in rec else "question"
    require_fields(rec, [qkey, "answer"], where, row)
    aliases = rec.get("aliases") or []
    if not isinstance(aliases, (list, tuple)):
        aliases = [aliases]
    return Example(prompt=str(rec[qkey]), answer=str(rec["answer"]), aliases=[str(a) for a in aliases], source=src)


def _kvr_native(src):
    def convert(rec, where, row, ctx):
        if "key" in rec or "prompt" not in rec and "question" not in rec:
            require_fields(rec, ["key", "value"], where, row)
            return Example(prompt=KVR_PROMPT.format(key=_text(rec, "key")), answer=_text(rec, "value"), source=src)
        return _simple(rec, where, row, ctx, src)
    return convert


def _released(rec, where, row, ctx, info: SourceInfo, src: str):
    """The study's released records: input_text -> target_text (target_for_eval: gold answers), or messages."""
    if "input_text" in rec:
        require_fields(rec, ["input_text", "target_text"], where, row)
        prompt = _text(rec, "input_text") + info.suffix
        if info.factoid:
            answers = [_text(rec, "target_text")] + answer_list(rec.get("target_for_eval"))
            return qa_example(prompt, answers, src, where, row, "target_text")
        return Example(prompt=prompt, answer=str(rec["target_text"]), source=src, factoid=False)
    require_fields(rec, ["messages"], where, row)
    turns = message_turns(rec["messages"], where, row)
    if not turns:
        raise DataError(f"{where}: row {row}: 'messages' holds no user/assistant turn")
    if info.factoid or len(turns) == 1:
        aliases = [a for a in answer_list(rec.get("target_for_eval")) if a != turns[0][1].strip()]
        return Example(prompt=turns[0][0], answer=turns[0][1], aliases=aliases, source=src)
    return Example(prompt=turns[0][0], answer=turns[0][1], messages=turns, source=src, factoid=False)


def detect_format(rec: Dict[str, Any], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if "input_text" in rec or ("messages" in rec and "data" not in rec):
        return "released"
    if "prompt" in rec and "answer" in rec:
        return "simple"
    return "native"


# ---------------------------------------------------------------- the registry

# PopQA: a question string can belong to several entities of one name ("What is John Smith's occupation?"),
# with different answers: such ambiguous questions are dropped; repeats of one fact are merged.
register(SourceInfo("popqa", "factoid", hub="akariasai/PopQA", split="test", suffix=QA_SUFFIX, convert=_popqa,
                    columns=("question", "obj", "possible_answers", "subj_id"), dedupe=True, on_conflict="drop",
                    fact_id=lambda rec: rec.get("subj_id")), b_variant=True)
# TriviaQA rc.nocontext is the union of the web and Wikipedia evidence copies: most questions appear twice.
# One example per question, so that triviaqa and triviaqaB (and any cut) never share a question.
register(SourceInfo("triviaqa", "factoid", hub="mandarjoshi/trivia_qa", config="rc.nocontext", split="train",
                    suffix=QA_SUFFIX, convert=_triviaqa, columns=("question", "answer", "question_id"), dedupe=True,
                    on_conflict="drop", fact_id=lambda rec: rec.get("question_id")), b_variant=True)
register(SourceInfo("lama", "factoid", hub="facebook/lama", config="trex", split="train",
                    revision="refs/convert/parquet", convert=_lama, dedupe=True,
                    columns=("sub_label", "obj_label", "template", "predicate_id"),
                    exclude_files=("relations.jsonl",),
                    local_hint="the T-REx rows (facebook/lama parquet, or LAMA's TREx/P*.jsonl with relations.jsonl "
                               "beside or above them)"), b_variant=True)
register(SourceInfo("entityquestions", "factoid", hub=None, split="train", convert=_question_answers("entityquestions"),
                    columns=("question", "answers"),
                    local_hint="the EntityQuestions `dataset/` directory (train/P17.train.json, ...; from "
                               "github.com/princeton-nlp/EntityQuestions)"), b_variant=True)
register(SourceInfo("webqa", "factoid", hub="Stanford/web_questions", split="train+test",
                    convert=_question_answers("webqa"), columns=("question", "answers")), b_variant=True)
register(SourceInfo("ultrachat", "conversation", hub="stingning/ultrachat", split="train", streaming=True,
                    pool=STUDY_POOL, convert=_ultrachat, columns=("data",)))
register(SourceInfo("evolcode", "instruction", hub="nickrosh/Evol-Instruct-Code-80k-v1", split="train",
                    convert=_pair("evolcode", "instruction", "output"), columns=("instruction", "output")))
register(SourceInfo("apps", "instruction", hub="codeparrot/apps", config="all", split="train+test",
                    revision="refs/convert/parquet",
                    convert=_apps,
                    columns=("question", "solutions", "input_output", "difficulty", "starter_code")))
register(SourceInfo("gsm8k", "instruction", hub="openai/gsm8k", config="main", split="train",
                    convert=_pair("gsm8k", "question", "answer"), columns=("question", "answer")))
register(SourceInfo("math", "instruction", hub="DigitalLearningGmbH/MATH-lighteval", split="train",
                    convert=_pair("math", "problem", "solution"), columns=("problem", "solution")))
# aliases: the study's own names
INFO["entityqa"], SOURCES["entityqa"], FACTOID["entityqa"] = INFO["entityquestions"], SOURCES["entityquestions"], True
INFO["entityqaB"], SOURCES["entityqaB"], FACTOID["entityqaB"] = (INFO["entityquestionsB"], SOURCES["entityquestionsB"],
                                                                True)
PREPARE: Dict[str, Callable[[DatasetSpec, str], Dict[str, Any]]] = {"lama": _lama_prepare}

# local-only sources
JSON_INFO = SourceInfo("json", "factoid", hub=None, convert=lambda rec, where, row, ctx: _simple(rec, where, row, ctx))
KVR_INFO = {part: SourceInfo(name, "factoid", hub=None, convert=_kvr_native(name), unique_prompts=True)
            for part, name in (("A", "kvr"), ("B", "kvrB"))}


@source("kvr")
def load_kvr(spec: DatasetSpec, seed: int, key: str = "") -> List[Example]:
    if spec.path:
        return load_rows_source(spec, seed, key, KVR_INFO["A"], False)
    return kvr_examples(spec.num_examples, seed, "A")


@source("kvrB")
def load_kvr_b(spec: DatasetSpec, seed: int, key: str = "") -> List[Example]:
    if spec.path:
        return load_rows_source(spec, seed, key, KVR_INFO["B"], False)
    return kvr_examples(spec.num_examples, seed, "B")


@source("kvrP")
def load_kvr_p(spec: DatasetSpec, seed: int, key: str = "") -> List[Example]:
    """The third KVR part, disjoint from kvr and kvrB: with the tiny model's seed (0), the pairs it was pretrained
    on (remix_ds/tiny.py), i.e. facts the base model knows (a retention probe set, docs/evaluation.md)."""
    return kvr_examples(spec.num_examples, seed, "P")


def _json_info(spec: DatasetSpec) -> SourceInfo:
    info = JSON_INFO
    if spec.factoid is False:
        info = dataclasses.replace(JSON_INFO, kind="instruction")
    if spec.source.startswith("kvr"):
        info = KVR_INFO["B" if spec.source == "kvrB" else "A"]
    return info


@source("json")
def load_json(spec: DatasetSpec, seed: int, key: str = "") -> List[Example]:
    """Local records: {"prompt"|"question": ..., "answer": ..., "aliases": [...]} per row (or released records)."""
    if not spec.path:
        raise ConfigError(f"source {spec.source!r} needs a path to a .json, .jsonl or .parquet file or a directory")
    return load_rows_source(spec, seed, key, _json_info(spec), False)


def rows_backed(spec: DatasetSpec) -> Optional[Tuple[SourceInfo, bool]]:
    """(SourceInfo, is a ...B variant) of a source read from rows (hub or local files), whose whole order can
    be walked; None for a generated set (kvr/kvrB without a path, a ``@source`` function)."""
    fn = SOURCES.get(spec.source)
    if hasattr(fn, "rows_info"):
        return fn.rows_info   # type: ignore[union-attr]
    if fn is load_json and spec.path:
        return _json_info(spec), False
    if fn in (load_kvr, load_kvr_b) and spec.path:
        return KVR_INFO["B" if fn is load_kvr_b else "A"], False
    return None


# ---------------------------------------------------------------- loading

_CACHE: Dict[Tuple, Tuple[List[Example], str]] = {}
_CACHE_MAX = 16


def clear_cache() -> None:
    _CACHE.clear()


def describe(spec: DatasetSpec, key: str = "") -> str:
    return f"dataset {key or spec.source} (source {spec.source})"


def fix_hint(key: str, info: SourceInfo) -> str:
    k = key or "<name>"
    return f"set datasets.{k}.path in the recipe to {info.local_hint} (or override datasets.{k}.path=...)"


def _rows(spec: DatasetSpec, info: SourceInfo, what: str, key: str) -> Tuple[Iterable[Row], str]:
    pool = spec.pool if spec.pool is not None else info.pool
    if spec.path:
        rows: Iterable[Row] = local_rows(spec.path, spec.split, info.split, exclude=info.exclude_files)
        origin = spec.path
        if pool is not None:
            rows = islice(rows, pool)
        return rows, origin
    hub_id = spec.name or info.hub
    if not hub_id:
        raise DataError(f"{what}: this source has no hub copy to read by default; {fix_hint(key, info)}, "
                        f"or set datasets.{key or '<name>'}.name to a hub id or dataset directory "
                        f"with the same columns")
    own = spec.name is None   # the source's config and revision apply to its own hub id only
    config = spec.config if spec.config is not None else (info.config if own else None)
    revision = spec.revision if spec.revision is not None else (info.revision if own else None)
    streaming = spec.streaming if spec.streaming is not None else info.streaming
    split = spec.split or info.split
    columns = tuple(info.columns) + RELEASED_COLUMNS if info.columns else ()
    return hub_rows(hub_id, config, split, what=what, fix=fix_hint(key, info), revision=revision,
                    streaming=streaming, pool=pool, columns=columns), hub_id


def convert_rows(rows: Iterable[Row], info: SourceInfo, fmt: str, what: str, src: str,
                 ctx: Optional[Dict[str, Any]] = None) -> List[Example]:
    """Rows -> Examples in one schema (detected from the first row), with every row checked."""
    if fmt not in FORMATS:
        raise ConfigError(f"{what}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ctx = {} if ctx is None else ctx
    schema = None
    out: List[Example] = []
    seen: Dict[str, Tuple[str, int]] = {}
    by_prompt: Dict[str, Example] = {}
    facts: Dict[str, Tuple[set, set]] = {}   # dedupe: per prompt, the fact ids and normalised answers seen
    n_of: Dict[str, int] = {}                # dedupe: rows per prompt
    conflicting: set = set()                 # on_conflict "drop": prompts whose rows state different facts
    n_rows = 0
    for origin, row, rec in rows:
        n_rows += 1
        where = f"{what}, {origin}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: row {row}: expected a record, got {type(rec).__name__}")
        if schema is None:
            schema = detect_format(rec, fmt)
        if schema == "released":
            ex = _released(rec, where, row, ctx, info, src)
        elif schema == "simple":
            ex = _simple(rec, where, row, ctx, src)
        else:
            ex = info.convert(rec, where, row, ctx)
        if ex is None:
            continue
        ex.source = src
        if info.unique_prompts:
            if ex.prompt in seen:
                o, r = seen[ex.prompt]
                raise DataError(f"{where}: row {row}: duplicate KVR key in {ex.prompt!r} (first at {o}: row {r})")
            seen[ex.prompt] = (origin, row)
        if info.dedupe:
            fid = info.fact_id(rec) if info.fact_id is not None else None
            answers = {a.strip().lower() for a in [ex.answer] + ex.aliases}
            first = by_prompt.get(ex.prompt)
            if first is not None:
                ids, known = facts[ex.prompt]
                same_fact = (fid is not None and fid in ids) or bool(answers & known)
                if not same_fact and info.on_conflict == "drop":
                    conflicting.add(ex.prompt)
                first.aliases = _unique(first.aliases + [a for a in [ex.answer] + ex.aliases if a != first.answer])
                ids.update({fid} - {None})
                known.update(answers)
                n_of[ex.prompt] += 1
                continue
            by_prompt[ex.prompt] = ex
            facts[ex.prompt] = ({fid} - {None}, answers)
            n_of[ex.prompt] = 1
        out.append(ex)
    if n_rows == 0:
        raise DataError(f"{what}: the dataset is empty (no rows)")
    if conflicting:
        out = [ex for ex in out if ex.prompt not in conflicting]
        log.info("%s: dropped %d questions (%d rows) asked more than once with different answers (ambiguous)",
                 what, len(conflicting), sum(n_of[p] for p in conflicting))
    merged = sum(n - 1 for p, n in n_of.items() if p not in conflicting)
    if merged:
        log.info("%s: merged %d repeated rows into the first row of the same question", what, merged)
    if not out:
        raise DataError(f"{what}: none of the {n_rows} rows is usable"
                        + (f" ({ctx['skipped']} without a usable target)" if ctx.get("skipped") else "")
                        + (f"; APPS keeps difficulties {', '.join(APPS_DIFFICULTIES)} only" if info.name == "apps"
                           else ""))
    if ctx.get("skipped"):
        log.info("%s: skipped %d of %d rows without a usable target", what, ctx["skipped"], n_rows)
    return out


def all_examples(spec: DatasetSpec, info: SourceInfo, key: str = "") -> List[Example]:
    """Every example of a rows-backed source before shuffling and cutting (cached per process)."""
    what = describe(spec, key)
    src = spec.source[:-1] if spec.source.endswith("B") and spec.source[:-1] in INFO else spec.source
    ckey = (info.name, info.kind, info.dedupe, info.unique_prompts, src, spec.path,
            tree_mtime(spec.path) if spec.path else None, spec.name,
            spec.config, spec.split, spec.revision, spec.streaming, spec.pool, spec.format)
    hit = _CACHE.get(ckey)
    if hit is None:
        try:
            rows, _ = _rows(spec, info, what, key)
            ctx = PREPARE[info.name](spec, what) if info.name in PREPARE else {}
            examples = convert_rows(rows, info, spec.format, what, src, ctx)
        except DataError as e:
            if what in str(e):
                raise
            raise DataError(f"{what}: {e}") from None
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[ckey] = hit = (examples, what)
    return hit[0]


def load_rows_source(spec: DatasetSpec, seed: int, key: str, info: SourceInfo, b_variant: bool) -> List[Example]:
    return _rows_cut(spec, seed, key, info, b_variant, None)[0]


def _rows_cut(spec: DatasetSpec, seed: int, key: str, info: SourceInfo, b_variant: bool,
              fits: Optional[Callable[[Example], bool]]) -> Tuple[List[Example], int]:
    what = describe(spec, key)
    examples = all_examples(spec, info, key)
    skip = spec.skip if spec.skip is not None else (spec.num_examples if b_variant else 0)
    if skip < 0:
        raise ConfigError(f"{what}: skip must be >= 0, got {skip}")
    if fits is None:
        out, n_over = cut(examples, spec.num_examples, seed, skip, spec.shuffle), 0
    else:
        out, n_over = fitting_cut(examples, spec.num_examples, seed, skip, spec.shuffle, fits)
    if not out:
        left = ("no examples left" if fits is None else
                "no examples that fit max_seq_length left (overlong: drop; skip counts fitting examples)")
        raise DataError(f"{what}: {left} after skipping {skip} of {len(examples)}"
                        + (" (a ...B source takes the num_examples examples after the first num_examples; "
                           "lower num_examples or set skip:)" if b_variant else ""))
    if len(out) < spec.num_examples and fits is None:   # with fits: the caller says how many fit
        log.warning("%s: only %d examples available (num_examples=%d)", what, len(out), spec.num_examples)
    return out, n_over


def source_is_factoid(spec: DatasetSpec) -> bool:
    if spec.factoid is not None:
        return spec.factoid
    return FACTOID.get(spec.source, True)


def load_examples(spec: DatasetSpec, seed: int, name: str = "", keep_repeats: bool = False) -> List[Example]:
    """The dataset's examples, cut to num_examples. ``keep_repeats``: every row is an example (``keep_every_row``)."""
    return _load(spec, seed, name, None, keep_repeats)[0]


def load_fitting_examples(spec: DatasetSpec, seed: int, name: str, fits: Callable[[Example], bool],
                          keep_repeats: bool = False) -> Tuple[List[Example], int, bool]:
    """``overlong: drop``: the dataset's examples as ``load_examples`` cuts them, from its order with the examples
    failing ``fits`` left out, so that a cut of num_examples holds num_examples fitting ones while the order has
    them. ``skip`` (and a ``...B`` source's default skip of num_examples) counts fitting examples: a B variant
    starts after the examples its A counterpart took (and the over-long ones it passed over), disjoint from it.

    Returns (examples, over-long examples passed over, refilled). A generated set (kvr without a path, a
    ``@source`` function) cannot be walked further: its over-long examples are removed, not replaced
    (refilled False). ``keep_repeats``: as in ``load_examples``."""
    return _load(spec, seed, name, fits, keep_repeats)


def keep_every_row(info: SourceInfo) -> SourceInfo:
    """``info`` without merging or dropping repeated prompts and without refusing repeated KVR keys: every row is
    one example, as in the study's loaders (src/datasets.py:57-82, 176-202, 375-391: one Datapoint per row)."""
    if not (info.dedupe or info.unique_prompts):
        return info
    return dataclasses.replace(info, dedupe=False, unique_prompts=False)


def load_pool(spec: DatasetSpec, seed: int, name: str = "", keep_repeats: bool = False) -> List[Example]:
    """Every example of the dataset in its order (shuffled by the seed, or the file order with ``shuffle: false``),
    from ``skip`` on, not cut to num_examples: what the study calls a non-factoid dataset's pool (its loaders
    return every row; src/datasets.py:455-505 for GSM8K and MATH). A generated set (kvr without a path, a
    ``@source`` function) is its ``load_examples``."""
    rows = rows_backed(spec)
    if rows is None:
        return load_examples(spec, seed, name, keep_repeats=keep_repeats)
    info, b_variant = rows
    if keep_repeats:
        info = keep_every_row(info)
    examples = all_examples(spec, info, name)
    skip = spec.skip if spec.skip is not None else (spec.num_examples if b_variant else 0)
    if skip < 0:
        raise ConfigError(f"{describe(spec, name)}: skip must be >= 0, got {skip}")
    out = cut(examples, len(examples), seed, skip, spec.shuffle)
    if not out:
        raise DataError(f"{describe(spec, name)}: no examples left after skipping {skip} of {len(examples)}")
    factoid = source_is_factoid(spec)
    for ex in out:
        ex.factoid = factoid
    return out


def _load(spec: DatasetSpec, seed: int, name: str,
          fits: Optional[Callable[[Example], bool]], keep_repeats: bool = False) -> Tuple[List[Example], int, bool]:
    if spec.source not in SOURCES:
        raise ConfigError(f"dataset {name or spec.source}: unknown source {spec.source!r} "
                          f"(known: {', '.join(sorted(SOURCES))})")
    if spec.format not in FORMATS:
        raise ConfigError(f"dataset {name or spec.source}: format must be one of {', '.join(FORMATS)}, "
                          f"got {spec.format!r}")
    fn = SOURCES[spec.source]
    # a rows-backed source is cut here (the same cut its loader makes) when the rows need another reading
    rows = rows_backed(spec) if fits is not None or keep_repeats else None
    n_over, refilled = 0, True
    if rows is not None:
        info = keep_every_row(rows[0]) if keep_repeats else rows[0]
        examples, n_over = _rows_cut(spec, seed, name, info, rows[1], fits)
    else:
        try:
            takes_key = len(inspect.signature(fn).parameters) >= 3
        except (TypeError, ValueError):
            takes_key = False
        examples = fn(spec, seed, name) if takes_key else fn(spec, seed)
        if fits is not None:
            kept = [ex for ex in examples if fits(ex)]
            n_over, refilled, examples = len(examples) - len(kept), False, kept
    if not examples:
        raise DataError(f"dataset {name or spec.source} ({spec.source}): no examples"
                        + (f" ({n_over} longer than max_seq_length)" if n_over else ""))
    factoid = source_is_factoid(spec)
    for ex in examples:
        ex.factoid = factoid
    return examples, n_over, refilled

"""Recipe schema: typed dataclasses, validated once, saved beside every output.

A recipe is a YAML file::

    name: demo
    output_dir: runs/demo
    model: tiny                  # "tiny" (built locally), a local HF directory or a hub id
    ds_config: zero2             # ds_configs/<name>.json or a path to a JSON file
    datasets:
      A: {source: kvr, num_examples: 100}
      B: {source: kvrB, num_examples: 100}
    stage1: {data: A, finetune: full, stop: accuracy, epochs: 40, lr: 1.0e-3}
    stage2: {data: B, finetune: full, stop: fixed, epochs: 5, lr: 1.0e-3}
    variants:
      - name: full
      - name: lora
        stage1: {finetune: lora, lr: 3.0e-3}

Top-level ``stageN`` blocks are defaults for every variant; a variant's own ``stageN`` block
overrides them key by key (nested blocks such as ``lora`` and ``mix`` merge too).
Command-line overrides ``key.sub=value`` are applied to the raw YAML before validation.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .errors import ConfigError
from .modes import MODES

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEMO_RECIPE = PACKAGE_DIR / "recipes" / "demo.yaml"
FINETUNE_MODES = tuple(MODES)   # the names of the fine-tuning modes (modes.py)
STOP_RULES = ("fixed", "loss", "accuracy")
REGULARIZERS = ("kl", "ewc", "l2")   # remix_ds/penalties.py
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SAVE_DTYPES = ("auto", "bf16", "fp16", "fp32")
OVERLONG = ("truncate", "drop")
# training semantics: remix_ds's own (default) or the study's released code, reproduced (docs/fidelity.md)
SEMANTICS = ("remix", "study")
# the items of the study's semantics that `study_except` can turn back to remix_ds's (docs/fidelity.md)
STUDY_ITEMS = ("stopping", "padding", "precision", "order", "schedule", "prompts", "pool", "rows", "defaults")
STAGE_KEY = re.compile(r"^stage([1-9][0-9]*)$")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class MixSpec:
    """REMIX: extra examples mixed into a stage's training set (trained on, never evaluated)."""
    source: str = "random-words"
    ratio: float = 1.0            # int(len(D) * ratio) mixing examples
    prompt_words: int = 50        # passage shape: first N words are the prompt ...
    target_words: int = 50        # ... the next M words the target
    seed: Optional[int] = None    # defaults to the recipe seed
    path: Optional[str] = None    # local file for text sources
    # generic text sources (knowledge-pile, fineweb, arxiv-pile): where and how much to read (docs/datasets.md)
    name: Optional[str] = None    # hub id (default: the source's own, see docs/datasets.md)
    config: Optional[str] = None  # hub config name
    split: Optional[str] = None   # hub split (default: the source's own)
    revision: Optional[str] = None
    streaming: Optional[bool] = None
    pool: Optional[int] = None    # read only the first `pool` documents (default 20000, as in the study)
    text_field: Optional[str] = None  # text column (default: text, else content)
    data: Optional[str] = None    # replay: the recipe dataset to replay (default: stage 1's dataset, D_A)


@dataclass
class DatasetSpec:
    source: str
    num_examples: int = 2000
    seed: Optional[int] = None    # defaults to the recipe seed
    path: Optional[str] = None    # local .json/.jsonl/.parquet file or directory in place of the generator or hub
    name: Optional[str] = None    # hub id (default: the source's own, see docs/datasets.md)
    config: Optional[str] = None  # hub config name (e.g. rc.nocontext for TriviaQA, main for GSM8K)
    split: Optional[str] = None   # split (hub, save_to_disk or EntityQuestions directory); "train+test" works
    revision: Optional[str] = None  # hub revision (e.g. refs/convert/parquet)
    streaming: Optional[bool] = None  # hub streaming (default: on for the very large sources)
    pool: Optional[int] = None    # read only the first `pool` rows before shuffling (UltraChat: 20000)
    skip: Optional[int] = None    # shuffled examples to skip before taking num_examples (...B sources: num_examples)
    shuffle: bool = True          # false: keep file order (the released files' order, as the study did)
    format: str = "auto"          # auto | native (the source's own row schema) | released | simple (prompt/answer)
    factoid: Optional[bool] = None  # override whether the set is scored by exact match (json source)
    # examples whose encoding is longer than max_seq_length: "truncate" (factoids dropped, other data cut to
    # max_seq_length) or "drop" (the study's: skipped, and further examples of the order taken in their place)
    overlong: str = "truncate"


@dataclass
class TinySpec:
    """Shape of the locally built tiny Llama used by the demo and the tests."""
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    pretrain_pairs: int = 300
    pretrain_steps: int = 600
    seed: int = 0


@dataclass
class EvalSpec:
    batch_size: int = 64
    max_new_tokens: Optional[int] = None   # None: longest gold answer + 4 tokens
    scorer: str = "generate"               # final evaluation: "generate" (greedy, the study's) or "teacher-forced"


@dataclass
class RetentionSpec:
    """What else is forgotten (remix_ds/retention.py, docs/evaluation.md): probe sets and generic-text loss on the
    base model and after every stage. Evaluation only: never part of a stage's fingerprint."""
    probes: Any = "auto"          # auto: the base model's known split of each stage-1 set's source; or a list of
                                  # dataset keys (their known split), or {data: KEY, known: false} (the whole set)
    known_pool: int = 200         # auto: examples of the source (beyond the recipe's own) the base model is put to
    scorer: str = "generate"      # how a probe is scored: filter-unknown's rule, generate or teacher-forced
    text: Any = "auto"            # generic text: auto (held-out passages of the mixing sources), none, or a file
    text_passages: int = 64       # held-out passages
    text_words: int = 64          # words per passage


@dataclass
class RegularizerSpec:
    """A continual-learning penalty added to a stage's answer loss (remix_ds/penalties.py, docs/baselines.md)."""
    method: str = "kl"            # kl (to the stage-start model), ewc (diagonal Fisher), l2 (to the stage start)
    weight: float = 1.0           # the penalty's factor (EWC's lambda)
    fisher_samples: int = 256     # ewc: examples of the previous stage's data the Fisher averages over
    tokens: str = "answers"       # kl: over the stage's answer tokens, or every token of this dataset's examples
    probe_batch: int = 8          # kl on a dataset: its examples per optimizer step


@dataclass
class StageSpec:
    data: str = ""
    finetune: str = "full"
    lora: LoraSpec = field(default_factory=LoraSpec)
    mix: Optional[MixSpec] = None
    stop: str = "fixed"           # fixed: `epochs` epochs; loss / accuracy: at most `epochs`
    epochs: int = 3
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    global_batch_size: int = 32
    micro_batch_size: Optional[int] = None   # None: global_batch_size / world_size
    ds_config: Optional[str] = None          # None: the recipe's ds_config
    merge: bool = True
    loss_threshold: float = 1e-4
    loss_patience: int = 10
    log_every: int = 10           # log the loss every N steps (and at each epoch end and checkpoint): a host sync
    save_dtype: str = "auto"      # auto: bf16 when training in bf16, else the training dtype
    gradient_checkpointing: bool = False   # recompute activations in backward: only when memory needs it
    adapt_zero: bool = True       # choose the ZeRO stage by world size and mode (see zero.resolve_ds_config)
    # pack each micro-batch (per-example attention: remix_ds.attention, or a 4-D mask): true, false, or auto (time
    # packed and padded forwards of one global batch when the stage starts, keep the faster: attention.choose_packing;
    # under ZeRO-3: pack on CPU, pad on CUDA)
    packing: Any = "auto"
    save_every: int = 0           # DeepSpeed checkpoint every N optimizer steps (0: none)
    keep_checkpoints: int = 2     # keep the newest N complete checkpoints
    # at an epoch end, a checkpoint once this many minutes passed since the last one (0: none); Ctrl-C always
    # checkpoints at the next step boundary
    checkpoint_minutes: float = 30.0
    resume: str = "auto"          # auto: continue from the newest complete checkpoint of the same config; never
    track: bool = True            # teacher-forced accuracy of this and earlier factoid sets after every epoch
    probe: bool = False           # save the engine's logits on a few examples (checks that saving is exact)
    tensorboard: bool = False     # also write the train_log scalars as TensorBoard events (<stage dir>/tensorboard)
    report_to: List[str] = field(default_factory=list)   # trackers: tensorboard, wandb, mlflow (remix_ds/tracking.py)
    regularizer: Optional[RegularizerSpec] = None   # kl | ewc | l2 with its settings (remix_ds/penalties.py)


@dataclass
class Variant:
    name: str
    stages: List[StageSpec]


@dataclass
class Recipe:
    name: str
    output_dir: str
    model: str
    datasets: Dict[str, DatasetSpec]
    variants: List[Variant]
    seed: int = 1234
    ds_config: str = "zero2"
    precision: str = "auto"
    max_seq_length: int = 256
    semantics: str = "remix"      # remix | study: the study's released code's training semantics (docs/fidelity.md)
    study_except: List[str] = field(default_factory=list)   # with semantics: study, items kept remix_ds's way
    tiny: TinySpec = field(default_factory=TinySpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    retention: Optional[RetentionSpec] = None   # evaluation only (remix_ds/retention.py); None: not measured
    source_file: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def study(self) -> bool:
        """Whether the recipe reproduces the study's released code (``semantics: study``)."""
        return self.semantics == "study"

    def follows_study(self, item: str) -> bool:
        """Whether one item of the study's semantics (``STUDY_ITEMS``) is on: ``semantics: study`` and the item
        not in ``study_except`` (which measures one item's effect with the rest of the study's semantics on)."""
        assert item in STUDY_ITEMS, item
        return self.study and item not in self.study_except

    @property
    def num_stages(self) -> int:
        return len(self.variants[0].stages)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"recipe {self.source_file}: no variant named {name!r}; "
                          f"known: {', '.join(v.name for v in self.variants)}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("raw")
        return d


# ---------------------------------------------------------------- building from dicts

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


# keys people write from other tools' vocabularies, and what the recipe calls them
KEY_ALIASES = {
    "epoch": "epochs", "num_epochs": "epochs", "num_train_epochs": "epochs", "learning_rate": "lr",
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "batch_size": "global_batch_size", "train_batch_size": "global_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "micro_batch": "micro_batch_size",
    "max_length": "max_seq_length", "seq_length": "max_seq_length", "max_len": "max_seq_length",
    "dtype": "precision", "target": "target_modules", "targets": "target_modules", "n": "num_examples",
    "num_samples": "num_examples", "size": "num_examples", "finetuning": "finetune", "fine_tune": "finetune",
    "mode": "finetune", "method": "finetune", "warmup": "warmup_ratio", "clip": "grad_clip",
    "max_grad_norm": "grad_clip", "deepspeed": "ds_config", "zero": "ds_config", "dataset": "data",
    "model_name": "model", "model_name_or_path": "model", "output": "output_dir", "out": "output_dir",
}


def suggest_key(key: str, known) -> Optional[str]:
    """The known key a mistyped one most likely means (an alias, a different case, or the closest spelling)."""
    import difflib

    known = list(known)
    k = str(key)
    alias = KEY_ALIASES.get(k) or KEY_ALIASES.get(k.lower())
    if alias in known:
        return alias
    for name in known:
        if name.lower() == k.lower() or name.replace("_", "") == k.lower().replace("-", "").replace("_", ""):
            return name
    close = difflib.get_close_matches(k.lower().replace("-", "_"), known, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_key_message(where: str, key: Any, known, hint: Optional[str] = None) -> str:
    guess = hint or suggest_key(key, known)
    return (f"{where}: unknown key {key!r}" + (f" (did you mean {guess!r}?)" if guess else "")
            + f" (known keys: {', '.join(sorted(known))})")


def build_dataclass(cls, data: Dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = None
        if cls is StageSpec and suggest_key(unknown[0], names) is None:
            inner = suggest_key(unknown[0], [f.name for f in dataclasses.fields(LoraSpec)])
            hint = f"lora.{inner}" if inner else None
        raise ConfigError(unknown_key_message(where, unknown[0], names, hint))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {f.name!r}")
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides and merging

def parse_override(text: str) -> Tuple[List[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (for example stage1.epochs=5)")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), parsed


def apply_override(raw: Dict[str, Any], path: List[str], value: Any) -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            idx = _list_index(node, part, path)
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a mapping")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _has_path(node: Any, path: List[str]) -> bool:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _list_index(node: list, part: str, path: List[str]) -> int:
    """A list position: an index, or (for the variants list) a variant's name."""
    if part.isdigit() and int(part) < len(node):
        return int(part)
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(f"override {'.'.join(path)}: {part!r} is neither an index of a list of {len(node)} nor the "
                      f"name of one of its entries" + (f" ({', '.join(map(str, names))})" if any(names) else ""))


def deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------- loading

TOP_LEVEL_KEYS = {"name", "output_dir", "model", "datasets", "variants", "seed", "ds_config", "precision",
                  "max_seq_length", "tiny", "eval", "semantics", "study_except", "retention"}


def load_recipe(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Recipe:
    """Read a recipe file (default: the bundled demo), apply key=value overrides, validate."""
    path = str(path or DEMO_RECIPE)
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys")
    stage_overrides = []
    for ov in overrides or []:
        keys, value = parse_override(ov)
        apply_override(raw, keys, value)
        if STAGE_KEY.match(keys[0]) and len(keys) > 1:
            stage_overrides.append((keys, value))
    # a command-line stageN.key=value also wins over a variant that sets the same key itself (a sweep's
    # values still win: they are what the sweep varies)
    for v in raw.get("variants") or []:
        for keys, value in stage_overrides:
            if isinstance(v, dict) and _has_path(v, keys):
                apply_override(v, keys, value)
    recipe = recipe_from_dict(raw, where=path)
    recipe.source_file = path
    return recipe


def _top_level_unknown(raw: Dict[str, Any], key: Any, where: str) -> str:
    """An unknown top-level key: a stage key written at the top level is named with its stage block."""
    stage_fields = {f.name for f in dataclasses.fields(StageSpec)}
    lora_fields = {f.name for f in dataclasses.fields(LoraSpec)}
    stages = sorted(int(m.group(1)) for m in (STAGE_KEY.match(str(k)) for k in raw) if m) or [1]
    guess = suggest_key(key, TOP_LEVEL_KEYS)
    if guess is None:
        for fields, prefix in ((stage_fields, ""), (lora_fields, "lora.")):
            inner = suggest_key(key, fields)
            if inner:
                guess = f"stage{stages[0]}.{prefix}{inner}"
                break
    msg = f"{where}: unknown key {key!r}"
    if guess and guess.startswith("stage"):
        parts = guess.split(".")
        block = "".join(f"{{{p}: " for p in parts[1:]) + "..." + "}" * (len(parts) - 1)
        msg += f" (did you mean {guess!r}? stage keys go inside a stage block: {parts[0]}: {block})"
    elif guess:
        msg += f" (did you mean {guess!r}?)"
    return msg + f" (known keys: {', '.join(sorted(TOP_LEVEL_KEYS))}, stage1, stage2, ...)"


def recipe_from_dict(raw: Dict[str, Any], where: str = "recipe") -> Recipe:
    raw = copy.deepcopy(raw)
    stage_defaults = {}
    for key in list(raw):
        m = STAGE_KEY.match(str(key))
        if m:
            stage_defaults[int(m.group(1))] = raw.pop(key) or {}
        elif key not in TOP_LEVEL_KEYS:
            raise ConfigError(_top_level_unknown(raw, key, where))
    for req in ("name", "model", "datasets"):
        if req not in raw:
            raise ConfigError(f"{where}: missing required key {req!r}")
    if not stage_defaults:
        raise ConfigError(f"{where}: no stages: add stage1 (and stage2, ...) blocks")
    n_stages = max(stage_defaults)
    missing = [i for i in range(1, n_stages + 1) if i not in stage_defaults]
    if missing:
        raise ConfigError(f"{where}: stage{missing[0]} is missing (stages must be stage1..stage{n_stages})")
    variants_raw = raw.pop("variants", None) or [{"name": "default"}]
    if not isinstance(variants_raw, list):
        raise ConfigError(f"{where}: variants must be a list")
    variants_raw = expand_sweeps(variants_raw, where)
    raw.setdefault("output_dir", os.path.join("runs", str(raw["name"])))
    study_defaults = raw.get("semantics") == "study" and "defaults" not in (raw.get("study_except") or [])
    if study_defaults:
        for key, value in STUDY_RECIPE_DEFAULTS.items():
            raw.setdefault(key, value)
        for block in (raw.get("datasets") or {}).values():
            if isinstance(block, dict):
                for key, value in STUDY_DATASET_DEFAULTS.items():
                    block.setdefault(key, value)
        if isinstance(raw.setdefault("eval", {}), dict):
            for key, value in STUDY_EVAL_DEFAULTS.items():
                raw["eval"].setdefault(key, value)
    datasets_raw = raw.pop("datasets")
    if not isinstance(datasets_raw, dict) or not datasets_raw:
        raise ConfigError(f"{where}: datasets must be a non-empty mapping name -> {{source: ...}}")
    datasets = {str(k): build_dataclass(DatasetSpec, v or {}, f"{where}: datasets.{k}") for k, v in datasets_raw.items()}

    for s_, block in stage_defaults.items():   # a typo in a defaults block is reported where it was written
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: stage{s_} must be a mapping of stage keys")
        check = {k: v for k, v in block.items() if not (k in ("mix", "regularizer") and v in (None, "none", False))}
        if isinstance(check.get("regularizer"), str):
            check["regularizer"] = {"method": check["regularizer"]}
        build_dataclass(StageSpec, check, f"{where}: stage{s_}")
    variants = []
    seen = set()
    for i, vraw in enumerate(variants_raw):
        vwhere = f"{where}: variants[{i}]"
        if not isinstance(vraw, dict) or "name" not in vraw:
            raise ConfigError(f"{vwhere}: each variant needs a name")
        vraw = dict(vraw)
        name = str(vraw.pop("name"))
        if not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise ConfigError(f"{vwhere}: variant name {name!r} may use only letters, digits, '_', '.', '-'")
        if name in seen:
            raise ConfigError(f"{vwhere}: duplicate variant name {name!r}")
        seen.add(name)
        stages = []
        for key in list(vraw):
            m = STAGE_KEY.match(str(key))
            if not m or int(m.group(1)) > n_stages:
                raise ConfigError(f"{vwhere}: unknown key {key!r} (a variant holds name and stage1..stage{n_stages})")
        # semantics: study takes every stage's stopping rule from D_A, this variant's stage-1 dataset
        d_a = datasets.get(str(deep_merge(stage_defaults[1] or {}, vraw.get("stage1") or {}).get("data"))) \
            if study_defaults else None
        for s in range(1, n_stages + 1):
            merged = deep_merge(stage_defaults[s] or {}, vraw.get(f"stage{s}") or {})
            if merged.get("mix") in (None, "none", False):
                merged.pop("mix", None)
            if merged.get("regularizer") in (None, "none", False):
                merged.pop("regularizer", None)
            elif isinstance(merged.get("regularizer"), str):   # regularizer: ewc (its default settings)
                merged["regularizer"] = {"method": merged["regularizer"]}
            if study_defaults:
                study_stage_defaults(merged, d_a, s)
            stages.append(build_dataclass(StageSpec, merged, f"{vwhere} ({name}).stage{s}"))
        variants.append(Variant(name=name, stages=stages))

    kwargs = {k: v for k, v in raw.items()}
    recipe = build_dataclass(Recipe, {**kwargs, "datasets": {}, "variants": []}, where)
    recipe.datasets = datasets
    recipe.variants = variants
    # an absolute output_dir (relative ones are taken from the current directory, once): every path a run
    # records (stage configs, adapters' base_model_name_or_path) then works from any directory
    recipe.output_dir = os.path.abspath(os.path.expanduser(str(recipe.output_dir)))
    if str(recipe.model).startswith("~"):
        recipe.model = os.path.expanduser(recipe.model)
    recipe.raw = raw
    validate(recipe, where)
    return recipe


# semantics: study: the settings of the study's scripts (scripts/run_stage1.sh, run_stage2.sh), for every key a
# recipe leaves out (study_except: [defaults] keeps remix_ds's defaults)
STUDY_RECIPE_DEFAULTS = {"seed": 0, "max_seq_length": 2048}
STUDY_DATASET_DEFAULTS = {"overlong": "drop"}   # the study's encoder skips over-long examples (sft.py)
# run_eval.py: greedy generation of at most 1000 new tokens (it stops at EOS), batches of 20
STUDY_EVAL_DEFAULTS = {"max_new_tokens": 1000, "batch_size": 20}
STUDY_STAGE_DEFAULTS = {"epochs": 20, "lr": 5e-5, "global_batch_size": 32, "warmup_ratio": 0.05,
                        "weight_decay": 0.0, "grad_clip": 1.0, "betas": [0.9, 0.95]}
STUDY_MIX_RATIO = 2.0
STUDY_FIXED_SOURCES = ("kvr", "kvrB")   # D_A sources the study trains for fixed epochs (sc=fixed)


def study_stage_defaults(stage: Dict[str, Any], first_data: Optional[DatasetSpec], k: int) -> None:
    """Fill the keys a stage block leaves out with the study's settings. The stopping rule comes from D_A (stage
    1's dataset), in every stage, as run_stage2.sh takes it: fixed epochs when D_A is KVR, else the loss rule
    (also when D_B is GSM8K); run_stage1.sh trains a GSM8K D_A for 10 fixed epochs."""
    source = first_data.source if first_data is not None else None
    if k == 1 and source == "gsm8k":
        stage.setdefault("epochs", 10)
        stage.setdefault("stop", "fixed")
    for key, value in STUDY_STAGE_DEFAULTS.items():
        stage.setdefault(key, copy.deepcopy(value))
    stage.setdefault("stop", "fixed" if source in STUDY_FIXED_SOURCES else "loss")
    if isinstance(stage.get("mix"), dict):
        stage["mix"].setdefault("ratio", STUDY_MIX_RATIO)


def expand_sweeps(variants_raw: List[Any], where: str) -> List[Any]:
    """A variant with ``sweep: {stage1.lora.r: [8, 16, 64]}`` becomes one variant per value, named
    ``<name>-r8``, ``<name>-r16``, ... (several keys: their product). Sweeps make LoRA rank (or any other
    stage key) a variant dimension of one recipe."""
    import itertools

    out = []
    for i, v in enumerate(variants_raw):
        if not isinstance(v, dict) or "sweep" not in v:
            out.append(v)
            continue
        sweep = v["sweep"]
        if isinstance(sweep, dict) and any(x is None for x in sweep.values()):
            empty = [str(k) for k, x in sweep.items() if x is None]
            joined = ",".join(str(k) for k in sweep)
            raise ConfigError(f"{where}: variants[{i}].sweep: {empty[0]!r} has no values. In YAML flow style "
                              f"({{a,b: [...]}}) a comma separates keys: to set several keys together, quote the "
                              f"joined key: sweep: {{\"{joined}\": [...]}}")
        if not isinstance(sweep, dict) or not sweep or not all(isinstance(x, list) and x for x in sweep.values()):
            raise ConfigError(f"{where}: variants[{i}].sweep must map stage keys to non-empty lists of values")
        for key in sweep:
            for sub in str(key).split(","):
                if not STAGE_KEY.match(sub.strip().split(".")[0]) or "." not in sub:
                    raise ConfigError(f"{where}: variants[{i}].sweep: {key!r} must be a stage key such as stage1.lora.r "
                                      f"(or several joined by commas, set together: stage1.lora.r,stage2.lora.r)")
        for values in itertools.product(*sweep.values()):
            nv = {k: copy.deepcopy(x) for k, x in v.items() if k != "sweep"}
            suffix = []
            for key, value in zip(sweep, values):
                for sub in str(key).split(","):   # "stage1.lora.r,stage2.lora.r": one value for both
                    parts = sub.strip().split(".")
                    node = nv
                    for part in parts[:-1]:
                        if not isinstance(node.get(part), dict):
                            node[part] = {}
                        node = node[part]
                    node[parts[-1]] = copy.deepcopy(value)
                suffix.append(f"{parts[-1]}{value}")
            nv["name"] = f"{v.get('name', 'variant')}-" + "-".join(suffix)
            out.append(nv)
    return out


def check_output_dir(path: str, where: str) -> None:
    """output_dir (or a folder above it) must not be an existing file: refused before anything is loaded."""
    node = path
    while node and not os.path.exists(node):
        parent = os.path.dirname(node)
        if parent == node:
            return
        node = parent
    if node and not os.path.isdir(node):
        what = "is a file" if node == path else f"lies below {node}, which is a file"
        raise ConfigError(f"{where}: output_dir {path} {what}, not a directory: give a directory path "
                          f"(output_dir: DIR or output_dir=DIR on the command line)")


def validate(recipe: Recipe, where: str) -> None:
    check_output_dir(recipe.output_dir, where)
    if recipe.semantics not in SEMANTICS:
        raise ConfigError(f"{where}: semantics must be one of {', '.join(SEMANTICS)}, got {recipe.semantics!r}")
    for item in recipe.study_except:
        if item not in STUDY_ITEMS:
            raise ConfigError(f"{where}: study_except: unknown item {item!r} (known: {', '.join(STUDY_ITEMS)})")
    if recipe.study_except and not recipe.study:
        raise ConfigError(f"{where}: study_except needs semantics: study")
    if recipe.precision not in PRECISIONS:
        raise ConfigError(f"{where}: precision must be one of {PRECISIONS}, got {recipe.precision!r}")
    if recipe.max_seq_length < 8:
        raise ConfigError(f"{where}: max_seq_length must be at least 8")
    for key, ds in recipe.datasets.items():
        if ds.num_examples <= 0:
            raise ConfigError(f"{where}: datasets.{key}.num_examples must be positive, got {ds.num_examples}")
        if ds.overlong not in OVERLONG:
            raise ConfigError(f"{where}: datasets.{key}.overlong must be one of {', '.join(OVERLONG)}, "
                              f"got {ds.overlong!r}")
    for v in recipe.variants:
        for i, st in enumerate(v.stages, 1):
            w = f"{where}: variant {v.name}, stage{i}"
            if not st.data:
                raise ConfigError(f"{w}: missing key 'data' (one of the datasets: {', '.join(recipe.datasets)})")
            if st.data not in recipe.datasets:
                raise ConfigError(f"{w}: data {st.data!r} is not a dataset of this recipe "
                                  f"(known: {', '.join(recipe.datasets)})")
            if st.finetune not in FINETUNE_MODES:
                raise ConfigError(f"{w}: finetune must be one of {FINETUNE_MODES}, got {st.finetune!r}")
            if st.stop not in STOP_RULES:
                raise ConfigError(f"{w}: stop must be one of {STOP_RULES}, got {st.stop!r}")
            if st.packing not in (True, False, "auto"):
                raise ConfigError(f"{w}: packing must be true, false or auto, got {st.packing!r}")
            if st.save_dtype not in SAVE_DTYPES:
                raise ConfigError(f"{w}: save_dtype must be one of {SAVE_DTYPES}, got {st.save_dtype!r}")
            if st.epochs < 1:
                raise ConfigError(f"{w}: epochs must be at least 1")
            if st.lr <= 0:
                raise ConfigError(f"{w}: lr must be positive")
            if st.global_batch_size < 1:
                raise ConfigError(f"{w}: global_batch_size must be at least 1")
            if not 0 <= st.warmup_ratio < 1:
                raise ConfigError(f"{w}: warmup_ratio must be in [0, 1)")
            if st.lora.r < 1:
                raise ConfigError(f"{w}: lora.r must be at least 1")
            if st.mix is not None and st.mix.ratio < 0:
                raise ConfigError(f"{w}: mix.ratio must be >= 0, got {st.mix.ratio}")
            if st.resume not in ("auto", "never"):
                raise ConfigError(f"{w}: resume must be auto or never, got {st.resume!r}")
            if st.checkpoint_minutes < 0:
                raise ConfigError(f"{w}: checkpoint_minutes must be >= 0")
            if st.save_every < 0 or st.keep_checkpoints < 1:
                raise ConfigError(f"{w}: save_every must be >= 0 and keep_checkpoints >= 1")
            bad = [t for t in st.report_to if t not in ("tensorboard", "wandb", "mlflow")]
            if bad:
                raise ConfigError(f"{w}: report_to: unknown tracker {bad[0]!r} (known: tensorboard, wandb, mlflow)")
            if st.log_every < 1:
                raise ConfigError(f"{w}: log_every must be at least 1")
            reg = st.regularizer
            if reg is not None:
                if reg.method not in REGULARIZERS:
                    raise ConfigError(f"{w}: regularizer.method must be one of {', '.join(REGULARIZERS)}, got "
                                      f"{reg.method!r}")
                if reg.weight < 0 or reg.fisher_samples < 1 or reg.probe_batch < 1:
                    raise ConfigError(f"{w}: regularizer.weight must be >= 0, fisher_samples and probe_batch >= 1")
                if reg.tokens != "answers" and (reg.method != "kl" or reg.tokens not in recipe.datasets):
                    raise ConfigError(f"{w}: regularizer.tokens is kl's: answers or a dataset of the recipe "
                                      f"({', '.join(recipe.datasets)}), got {reg.tokens!r} for {reg.method}")
                if reg.method == "ewc" and i == 1:
                    raise ConfigError(f"{w}: regularizer ewc needs a previous stage (its Fisher is of the previous "
                                      f"stage's data); use kl or l2 in stage 1")


def stage_hash(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""A stage of a variant as one object: its spec, its directory and files, its input and output models, and its
fingerprint (computed once: it loads and hashes the data of every stage up to it).

Outputs of stage k of a variant live in ``<output_dir>/<variant>/stage<k>/``:

- ``config.json``      the resolved stage config, ds_config and fingerprint
- ``train_log.jsonl``  one line per logged step (loss, lr, tokens/s, padding, penalty terms) and per epoch
- ``checkpoints/``     DeepSpeed checkpoints of an unfinished stage (removed once it is done)
- ``model/``           full fine-tuning: the whole model (safetensors HF directory)
- ``adapter/``         LoRA: the PEFT adapter; ``merged/`` the adapter merged into the base
- ``fisher/``          an EWC stage's diagonal Fisher of this stage's data, for the next stage (``penalties.py``)
- ``eval/``            scores after the stage (``pipeline.eval_after_stage``)
- ``DONE.json``        written last: the fingerprint and the training summary
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .config import Recipe, StageSpec, Variant, stage_hash
from .data import stage_train_set
from .files import read_json
from .tiny import resolve_model_path
from .modes import mode_of
from .zero import adapt_zero_stage, load_ds_config, zero_stage

# stage keys that change how a run is logged, checkpointed or batched, not what it trains: changing one neither
# retrains a complete stage nor stops a resume from the checkpoints of an interrupted one (packing gives every
# example the loss it has padded, as the world size does, to floating-point rounding)
OPERATIONAL_KEYS = ("log_every", "save_every", "keep_checkpoints", "resume", "tensorboard", "packing",
                    "checkpoint_minutes", "report_to")


@dataclass(eq=False)
class Stage:
    """Stage ``k`` (from 1) of ``variant`` in ``recipe``."""
    recipe: Recipe
    variant: Variant
    k: int

    @property
    def spec(self) -> StageSpec:
        return self.variant.stages[self.k - 1]

    @property
    def name(self) -> str:
        """How logs and errors name it: ``variant/stageK``."""
        return f"{self.variant.name}/stage{self.k}"

    @property
    def previous(self) -> Optional["Stage"]:
        return Stage(self.recipe, self.variant, self.k - 1) if self.k > 1 else None

    def other(self, variant: Variant) -> "Stage":
        """The same stage number of another variant."""
        return Stage(self.recipe, variant, self.k)

    # ------------------------------------------------------------ files
    @property
    def dir(self) -> Path:
        return Path(self.recipe.output_dir) / self.variant.name / f"stage{self.k}"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.dir / "train_log.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    def done(self) -> Optional[Dict[str, Any]]:
        """DONE.json's content (hash and summary), or None."""
        return read_json(self.dir / "DONE.json")

    # ------------------------------------------------------------ models in and out
    def input(self) -> Tuple[str, List[str]]:
        """(model directory, adapters kept active on it) the stage starts from."""
        if self.k == 1:
            return resolve_model_path(self.recipe.model, self.recipe.tiny), []
        return self.previous.output()

    def output(self) -> Tuple[str, List[str]]:
        """(model directory, adapters kept active on it) that the stage hands on to the next and to evaluation."""
        return mode_of(self.spec).output(self.dir, self.spec.merge, self.input)

    def output_model(self) -> str:
        """The directory the stage writes last (the merged or full model, or the unmerged adapter)."""
        base, adapters = self.output()
        return adapters[-1] if adapters else base

    # ------------------------------------------------------------ fingerprint
    @cached_property
    def fingerprint(self) -> Dict[str, Any]:
        """Everything that determines the stage's output (including all earlier stages): the stage's keys but the
        operational ones, what it trains on (the examples themselves, not only the data spec), the recipe-wide
        settings and the previous stage's fingerprint."""
        import dataclasses

        recipe, spec = self.recipe, self.spec
        stage = {key: v for key, v in stable_asdict(spec).items() if key not in OPERATIONAL_KEYS}
        # packing was a training key with default true before it became operational: hashed at that value, so
        # the stages of earlier runs keep their hashes (and are not retrained)
        stage["packing"] = True
        fp = {"stage": stage, "examples": examples_digest(stage_train_set(recipe, spec, self.k)[1]),
              "data": stable_asdict(recipe.datasets[spec.data]),
              "seed": recipe.seed, "precision": recipe.precision, "max_seq_length": recipe.max_seq_length,
              "ds_config": load_ds_config(spec.ds_config or recipe.ds_config)}
        if recipe.study:   # only then: the fingerprints of remix_ds's own semantics are those of earlier releases
            fp["semantics"] = {"semantics": recipe.semantics, "except": sorted(recipe.study_except)}
        if self.k == 1:
            fp["model"] = recipe.model
            if recipe.model == "tiny":
                fp["tiny"] = dataclasses.asdict(recipe.tiny)
        else:
            fp["previous"] = self.previous.fingerprint
        return fp

    @cached_property
    def hash(self) -> str:
        return stage_hash(self.fingerprint)

    def is_complete(self, h: Optional[str] = None) -> bool:
        """The stage's output is there and of its current config (``h``: of the config with that hash instead, e.g.
        another variant's same stage, without computing this one's fingerprint)."""
        done = self.done()
        return bool(done) and done.get("hash") == (h or self.hash) and os.path.isdir(self.output_model())

    # ------------------------------------------------------------ settings
    @property
    def precision(self) -> str:
        """The precision the stage trains in: the recipe's, resolved; under ``semantics: study`` a full fine-tuning
        stage in bf16 (or auto) trains in the study's pure bf16 (no fp32 master weights: ``zero.PURE_BF16``). LoRA
        has no study counterpart and keeps remix_ds's precision."""
        return stage_precision(self.recipe, self.spec)

    @property
    def ds_config_name(self) -> str:
        return self.spec.ds_config or self.recipe.ds_config

    def checkpoint_layout(self, world: int) -> Dict[str, Any]:
        """What a DeepSpeed checkpoint of the stage cannot change (its completion marker records it): the number of
        ranks, the resolved precision and the ZeRO stage the engine runs (``zero.adapt_zero_stage``)."""
        precision = self.precision
        cfg = load_ds_config(self.ds_config_name)
        if self.spec.adapt_zero:
            cfg = adapt_zero_stage(cfg, world, self.spec.finetune, precision, [])
        return {"world_size": world, "precision": precision, "zero_stage": zero_stage(cfg)}

    def settings(self) -> Dict[str, Any]:
        """The recipe-wide settings the stage depends on, as its config.json records them (so that a retrain can
        name the one that changed): seed, precision, max_seq_length, the stage's ds_config, the model (and the tiny
        model's shape) and the datasets its stages up to k train on or replay."""
        import dataclasses

        recipe = self.recipe
        used = []
        for spec in self.variant.stages[:self.k]:
            for key in (spec.data, spec.mix.data if spec.mix is not None else None):
                if key and key in recipe.datasets and key not in used:
                    used.append(key)
        settings = {"seed": recipe.seed, "precision": recipe.precision, "max_seq_length": recipe.max_seq_length,
                    "semantics": recipe.semantics, "study_except": sorted(recipe.study_except),
                    "ds_config": self.ds_config_name, "model": recipe.model,
                    "datasets": {key: dataclasses.asdict(recipe.datasets[key]) for key in used}}
        if recipe.model == "tiny":
            settings["tiny"] = dataclasses.asdict(recipe.tiny)
        return json.loads(json.dumps(settings, default=str))

    def config_change(self) -> Optional[str]:
        """How the stage's current config differs from the one its directory was last started with (its
        config.json), in words; None when there is no record of an earlier start."""
        import dataclasses

        old = read_json(self.dir / "config.json")
        if old is None:
            return None
        new = json.loads(json.dumps(dataclasses.asdict(self.spec), default=str))
        keys = sorted(key for key in set(new) | set(old.get("spec", {}))
                      if key not in OPERATIONAL_KEYS and old.get("spec", {}).get(key) != new.get(key))
        parts = []
        if keys:
            parts.append("changed stage keys: " + ", ".join(f"{key} {old.get('spec', {}).get(key)!r} -> "
                                                            f"{new.get(key)!r}" for key in keys))
        if "recipe" in old:   # recorded since the recipe-wide settings are (older stage directories lack them)
            diffs = _changes(old["recipe"], self.settings())
            if diffs:
                parts.append("changed recipe settings: " + ", ".join(f"{key} {a!r} -> {b!r}" for key, a, b in diffs))
        if parts:
            return "; ".join(parts)
        if "recipe" in old:
            return "the stage keys are the same, and the recipe-wide settings: an earlier stage, a data file's or " \
                   "ds_config file's contents, or remix_ds's fingerprint changed"
        return "the stage keys are the same: a dataset or its contents, the seed, precision, max_seq_length, the " \
               "ds_config, the model, an earlier stage or remix_ds's fingerprint changed"


def stages_of(recipe: Recipe, variant: Variant) -> List[Stage]:
    return [Stage(recipe, variant, k) for k in range(1, len(variant.stages) + 1)]


def stage_precision(recipe: Recipe, spec: StageSpec) -> str:
    """``Stage.precision`` of a spec: the mode's (``FineTuneMode.precision``)."""
    return mode_of(spec).precision(recipe)


def examples_digest(examples) -> str:
    """A hash of the examples a stage trains on (its dataset and mixing, in order): a regenerated data file, a
    filter_unknown rerun into the same path, another hub revision or word list changes it, and so the stage."""
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.answer, list(ex.aliases), ex.role, ex.source, ex.factoid,
                             ex.messages], ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# The keys every stage fingerprint has hashed since before 2026-12-04, per spec class. A key added to one of these
# classes later is hashed only where a recipe sets it away from its default, so a release that adds a key
# retrains no finished stage (a stage that never set it keeps its hash). Never add a key to these sets.
HASHED_KEYS = {
    "StageSpec": frozenset({"data", "finetune", "lora", "mix", "stop", "epochs", "lr", "weight_decay", "betas",
                            "warmup_ratio", "grad_clip", "global_batch_size", "micro_batch_size", "ds_config",
                            "merge", "loss_threshold", "loss_patience", "save_dtype", "gradient_checkpointing",
                            "adapt_zero", "track", "probe"}),
    "LoraSpec": frozenset({"r", "alpha", "dropout", "target_modules"}),
    "MixSpec": frozenset({"source", "ratio", "prompt_words", "target_words", "seed", "path", "name", "config", "split",
                          "revision", "streaming", "pool", "text_field", "data"}),
    "DatasetSpec": frozenset({"source", "num_examples", "seed", "path", "name", "config", "split", "revision",
                              "streaming", "pool", "skip", "shuffle", "format", "factoid", "overlong"}),
}


def _field_default(f) -> Any:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
        return f.default_factory()                     # type: ignore[misc]
    return dataclasses.MISSING


def stable_asdict(obj: Any) -> Any:
    """``dataclasses.asdict`` of a spec for its fingerprint: every key of ``HASHED_KEYS``, and a key added since
    only when it differs from its default (the same dict as asdict for a spec that sets no new key)."""
    import copy
    import dataclasses

    if not dataclasses.is_dataclass(obj):
        return copy.deepcopy(obj)
    legacy = next((HASHED_KEYS[c.__name__] for c in type(obj).__mro__ if c.__name__ in HASHED_KEYS), None)
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = _field_default(f)
        if legacy is not None and f.name not in legacy and default is not dataclasses.MISSING:
            if (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value) == \
                    (dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default):
                continue
        out[f.name] = stable_asdict(value)
    return out


def _changes(old: Any, new: Any, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]

"""Fine-tuning modes: full fine-tuning, LoRA and QLoRA as small objects.

A stage's ``finetune`` (the recipe's string: full | lora | qlora) names one of them (``mode_of``). Each mode owns
what differs between the modes; everything else in a stage is the same for all three:

- ``validate``      the checks of a stage's settings that concern the mode (run before any model is loaded)
- ``adapt_zero``    its ZeRO policy: which of ``zero``'s adaptations applies (``zero.adapt_zero_stage``)
- ``precision``     the precision its stage trains in
- ``load_base``, ``attach``   loading: the base model, then what trains on it (``model.load_for_training``)
- ``save``          what the engine writes at the end of the stage, and into which subdirectory
- ``merges``, ``merge``       whether and how its adapter goes into the base (``adapters.streaming_merge``)
- ``output``        where its stage's model lives for evaluation and the next stage

The modes are stateless singletons (``FULL``, ``LORA``, ``QLORA``). This module is imported by ``config``,
``zero`` and ``model``; it imports them (and torch, transformers, bitsandbytes) only inside the methods that use
them, so importing it costs nothing and makes no import cycle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from .errors import ConfigError


class FineTuneMode:
    """Full fine-tuning; the base class of the adapter modes."""
    name = "full"
    trains_adapter = False   # only a LoRA adapter trains; the base model is frozen
    quantized = False        # the frozen base is loaded in 4 bits (NF4)
    output_dir = "model"     # the subdirectory of the stage directory the engine saves into

    def __repr__(self) -> str:
        return f"<finetune {self.name}>"

    def __str__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ validation
    def validate(self, spec: Any, ds_config: Dict[str, Any], next_spec: Any, where: str) -> None:
        """Refuse, before training, a stage setting this mode cannot run (``spec``: the stage's StageSpec,
        ``ds_config``: its resolved DeepSpeed config, ``next_spec``: the next stage's, or None)."""
        if not spec.merge:
            raise ConfigError(f"{where}: merge: false only applies to lora / qlora stages")

    def describe(self, spec: Any) -> str:
        """The mode as the report's ``finetune_stage<k>`` column shows it: ``full``, ``lora(r=8)``."""
        return self.name

    # ------------------------------------------------------------------ ZeRO and precision
    def adapt_zero(self, cfg: Dict[str, Any], world_size: int, precision: str, notes: List[str]) -> Dict[str, Any]:
        """Full fine-tuning on one process at ZeRO-1/2 runs without ZeRO (``zero.single_process_full_stage``)."""
        from .zero import single_process_full_stage
        return single_process_full_stage(cfg, world_size, precision, notes)

    def precision(self, recipe: Any) -> str:
        """The precision the stage trains in: the recipe's, resolved; under ``semantics: study`` a bf16 (or auto)
        full fine-tuning stage trains in the study's pure bf16 (no fp32 master weights: ``zero.PURE_BF16``)."""
        from .zero import PURE_BF16, resolve_precision
        if recipe.follows_study("precision") and recipe.precision in ("auto", "bf16"):
            return PURE_BF16
        return resolve_precision(recipe.precision)

    # ------------------------------------------------------------------ loading
    def load_base(self, path: str, ds_config: Dict[str, Any], dtype: Any):
        """The base model; every weight trains. Under torch autocast the weights load in fp32 (the optimizer
        steps them: fp32 masters, the forward cast by autocast)."""
        import torch
        from transformers import AutoModelForCausalLM

        from .zero import uses_torch_autocast
        if uses_torch_autocast(ds_config):
            dtype = torch.float32
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    def attach(self, model: Any, lora: Any, ds_config: Dict[str, Any], frozen_adapters: Sequence[str] = ()):
        """The trainable model on the loaded base: the base itself."""
        return model

    # ------------------------------------------------------------------ saving, merging, output
    def save(self, engine: Any, stage_dir: Path, tokenizer: Any, dtype: Any) -> str:
        """Write the trained weights into ``stage_dir/<output_dir>``; returns that directory."""
        out = str(Path(stage_dir) / self.output_dir)
        engine.save_full(out, tokenizer, dtype)
        return out

    def merges(self, merge: bool) -> bool:
        """Whether the stage merges what it trained into a new model (``merged/``) after saving."""
        return False

    def merge(self, base_dir: str, frozen: Sequence[str], stage_dir: Path, dtype: Any, train_dtype: Any
              ) -> Dict[str, float]:
        raise ValueError("full fine-tuning has no adapter to merge")

    def output(self, stage_dir: Path, merge: bool, stage_in: Callable[[], Tuple[str, List[str]]]
               ) -> Tuple[str, List[str]]:
        """(model directory, adapters kept active on it) that the stage in ``stage_dir`` hands on to the next
        stage and to evaluation (``stage_in()``: the stage's own input, asked only where the output builds on
        it)."""
        return str(Path(stage_dir) / self.output_dir), []


class Lora(FineTuneMode):
    """LoRA: a PEFT adapter trains on the frozen 16-bit base (and on earlier stages' unmerged adapters)."""
    name = "lora"
    trains_adapter = True
    output_dir = "adapter"

    def validate(self, spec: Any, ds_config: Dict[str, Any], next_spec: Any, where: str) -> None:
        if not spec.merge and next_spec is not None and not mode_of(next_spec).trains_adapter:
            raise ConfigError(f"{where}: merge: false keeps the adapter for a LoRA stage after it, but the next "
                              f"stage is full fine-tuning; use merge: true")

    def describe(self, spec: Any) -> str:
        return f"{self.name}(r={spec.lora.r})"

    def adapt_zero(self, cfg: Dict[str, Any], world_size: int, precision: str, notes: List[str]) -> Dict[str, Any]:
        """An adapter stage at ZeRO-1/2 runs without ZeRO, under torch autocast (``zero.adapter_zero_stage``)."""
        from .zero import adapter_zero_stage
        return adapter_zero_stage(cfg, self.name, precision, notes)

    def precision(self, recipe: Any) -> str:
        """The recipe's precision, resolved (LoRA has no counterpart in the study: no pure bf16)."""
        from .zero import resolve_precision
        return resolve_precision(recipe.precision)

    def load_base(self, path: str, ds_config: Dict[str, Any], dtype: Any):
        """The frozen base in the training dtype."""
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    def attach(self, model: Any, lora: Any, ds_config: Dict[str, Any], frozen_adapters: Sequence[str] = ()):
        """A new trainable adapter (``lora``: its LoraSpec) on the base, above the frozen earlier ones."""
        from .model import add_lora
        return add_lora(model, lora, ds_config, frozen_adapters, self.name)

    def save(self, engine: Any, stage_dir: Path, tokenizer: Any, dtype: Any) -> str:
        """The adapter alone (fp32, as PEFT keeps it), with the tokenizer."""
        out = str(Path(stage_dir) / self.output_dir)
        engine.save_adapter(out, tokenizer)
        return out

    def merges(self, merge: bool) -> bool:
        return bool(merge)

    def merge(self, base_dir: str, frozen: Sequence[str], stage_dir: Path, dtype: Any, train_dtype: Any
              ) -> Dict[str, float]:
        """Merge the earlier unmerged adapters and this stage's into the base, shard by shard on CPU, into
        ``stage_dir/merged`` in ``dtype``; ``train_dtype`` is what the base was loaded in for training."""
        from .adapters import streaming_merge
        d = Path(stage_dir)
        return streaming_merge(base_dir, list(frozen) + [str(d / self.output_dir)], str(d / "merged"),
                               dtype=dtype, nf4=self.quantized, nf4_dtype=train_dtype)

    def output(self, stage_dir: Path, merge: bool, stage_in: Callable[[], Tuple[str, List[str]]]
               ) -> Tuple[str, List[str]]:
        """The merged model; with ``merge: false`` the stage's input with its own adapter on top."""
        d = Path(stage_dir)
        if merge:
            return str(d / "merged"), []
        base, adapters = stage_in()
        return base, list(adapters) + [str(d / self.output_dir)]


class QLora(Lora):
    """QLoRA: LoRA on the base quantised to NF4 (bitsandbytes); the adapter is merged into the NF4-dequantised
    16-bit weights it was trained against (``adapters.streaming_merge(nf4=True)``)."""
    name = "qlora"
    quantized = True

    def validate(self, spec: Any, ds_config: Dict[str, Any], next_spec: Any, where: str) -> None:
        from .zero import offloads_params
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{where}: finetune: qlora needs bitsandbytes (pip install bitsandbytes)") from None
        if offloads_params(ds_config):
            raise ConfigError(f"{where}: finetune: qlora cannot run with ZeRO-3 parameter offload "
                              f"(4-bit weights cannot be offloaded to CPU by DeepSpeed); use zero3 or zero2")
        if not spec.merge:
            raise ConfigError(f"{where}: merge: false is not supported for qlora: the adapter was trained on the NF4 "
                              f"base, and evaluation and later stages would load it on the unquantised one; use "
                              f"merge: true (the adapter goes into the NF4-dequantised weights it was trained on)")
        super().validate(spec, ds_config, next_spec, where)

    def load_base(self, path: str, ds_config: Dict[str, Any], dtype: Any):
        """The base with NF4 linear layers computing in ``dtype``; on a GPU without ZeRO-3 it is placed on this
        rank's device as it loads (bitsandbytes quantises there); under ZeRO-3 DeepSpeed places it."""
        import torch

        from .model import load_4bit
        from .zero import zero_stage
        kwargs: Dict[str, Any] = {}
        if torch.cuda.is_available() and zero_stage(ds_config) != 3:
            from . import dist
            kwargs["device_map"] = {"": dist.local_rank()}
        return load_4bit(path, dtype, ds_config, **kwargs)


FULL, LORA, QLORA = FineTuneMode(), Lora(), QLora()
MODES: Dict[str, FineTuneMode] = {m.name: m for m in (FULL, LORA, QLORA)}


def mode_of(x: Union[str, FineTuneMode, Any]) -> FineTuneMode:
    """The mode a name (``"lora"``), a stage spec (its ``finetune``), a stage config.json's ``spec`` dict or a mode
    stands for."""
    if isinstance(x, FineTuneMode):
        return x
    name = x.get("finetune") if isinstance(x, dict) else getattr(x, "finetune", x)
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"finetune must be one of {tuple(MODES)}, got {name!r}") from None


__all__ = ["FineTuneMode", "Lora", "QLora", "FULL", "LORA", "QLORA", "MODES", "mode_of"]

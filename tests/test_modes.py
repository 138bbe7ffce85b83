"""The fine-tuning modes (remix_ds/modes.py): each mode's output location, ZeRO policy, validation, precision,
loading and merging, checked against values worked out here by hand or with plain torch / bitsandbytes."""

import pytest
import torch
from safetensors.torch import load_file

from remix_ds.config import FINETUNE_MODES, LoraSpec, StageSpec, recipe_from_dict
from remix_ds.errors import ConfigError
from remix_ds.modes import FULL, LORA, QLORA, FineTuneMode, mode_of
from remix_ds.zero import PURE_BF16, adapt_zero_stage, load_ds_config


def test_mode_of_reads_names_specs_config_records_and_modes():
    assert FINETUNE_MODES == ("full", "lora", "qlora")
    assert [mode_of(name) for name in FINETUNE_MODES] == [FULL, LORA, QLORA]
    assert mode_of(StageSpec(data="A", finetune="qlora")) is QLORA
    assert mode_of({"finetune": "lora", "merge": False}) is LORA     # a stage config.json's "spec"
    assert mode_of(LORA) is LORA and isinstance(QLORA, FineTuneMode)
    with pytest.raises(ConfigError, match=r"finetune must be one of \('full', 'lora', 'qlora'\), got 'adapter'"):
        mode_of("adapter")
    # what each mode is: only the adapter modes train an adapter, only QLoRA quantises its base
    assert [(m.trains_adapter, m.quantized, m.output_dir) for m in (FULL, LORA, QLORA)] == \
        [(False, False, "model"), (True, False, "adapter"), (True, True, "adapter")]


def test_each_mode_says_where_its_stage_output_lives(tmp_path):
    d = tmp_path / "v" / "stage2"
    below = ("/models/base", ["/run/v/stage1/adapter"])

    def never():
        raise AssertionError("a full or merged stage's output does not depend on its input")

    assert FULL.output(d, True, never) == (str(d / "model"), [])
    for mode in (LORA, QLORA):
        assert mode.output(d, True, never) == (str(d / "merged"), [])
    # merge: false: the stage's input with every adapter active, its own on top
    assert LORA.output(d, False, lambda: below) == ("/models/base", ["/run/v/stage1/adapter", str(d / "adapter")])
    assert below == ("/models/base", ["/run/v/stage1/adapter"])   # the input's list is not changed in place
    assert [m.merges(True) for m in (FULL, LORA, QLORA)] == [False, True, True]
    assert [m.merges(False) for m in (FULL, LORA, QLORA)] == [False, False, False]
    assert [m.describe(StageSpec(data="A", finetune=m.name, lora=LoraSpec(r=8))) for m in (FULL, LORA, QLORA)] == \
        ["full", "lora(r=8)", "qlora(r=8)"]


# (ds_config, world size) -> the ZeRO stage each mode runs, by the policy in words: one process turns ZeRO-3
# into ZeRO-2 unless parameters are offloaded; adapters at ZeRO-1/2 without optimizer offload run without ZeRO;
# full fine-tuning does too, on one process only; offloading configs are kept as written.
ZERO_TABLE = {
    ("zero2", 1): {"full": 0, "lora": 0, "qlora": 0},
    ("zero2", 2): {"full": 2, "lora": 0, "qlora": 0},
    ("zero3", 1): {"full": 0, "lora": 0, "qlora": 0},
    ("zero3", 2): {"full": 3, "lora": 3, "qlora": 3},
    ("zero2_offload", 1): {"full": 2, "lora": 2, "qlora": 2},
    ("zero3_offload", 1): {"full": 3, "lora": 3, "qlora": 3},
}


@pytest.mark.parametrize("name,world", sorted(ZERO_TABLE))
def test_each_modes_zero_policy(name, world):
    for mode_name, expected in ZERO_TABLE[(name, world)].items():
        for finetune in (mode_name, mode_of(mode_name)):     # the name and the mode decide alike
            notes = []
            cfg = adapt_zero_stage(load_ds_config(name), world, finetune, "bf16", notes)
            assert cfg["zero_optimization"]["stage"] == expected, (name, world, mode_name)
            if expected == 0:   # the note says which mode's policy dropped ZeRO, and how it computes instead
                who = "full fine-tuning on one process" if mode_name == "full" else f"{mode_name}: adapter weights"
                assert notes[-1].startswith(who) and "bf16 torch autocast" in notes[-1]
                assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_each_mode_validates_its_own_settings():
    zero2, offload = load_ds_config("zero2"), load_ds_config("zero3_offload")

    def spec(finetune, merge=True):
        return StageSpec(data="A", finetune=finetune, merge=merge)

    FULL.validate(spec("full"), zero2, spec("lora"), "s1")
    with pytest.raises(ConfigError, match="s1: merge: false only applies to lora / qlora stages"):
        FULL.validate(spec("full", merge=False), zero2, None, "s1")
    LORA.validate(spec("lora", merge=False), zero2, spec("lora"), "s1")   # an adapter stack: allowed
    LORA.validate(spec("lora", merge=False), zero2, None, "s1")
    with pytest.raises(ConfigError, match="the next stage is full fine-tuning"):
        LORA.validate(spec("lora", merge=False), zero2, spec("full"), "s1")
    LORA.validate(spec("lora"), offload, spec("full"), "s1")
    pytest.importorskip("bitsandbytes")
    QLORA.validate(spec("qlora"), zero2, spec("full"), "s1")
    with pytest.raises(ConfigError, match="merge: false is not supported for qlora"):
        QLORA.validate(spec("qlora", merge=False), zero2, spec("lora"), "s1")
    with pytest.raises(ConfigError, match="qlora cannot run with ZeRO-3 parameter offload"):
        QLORA.validate(spec("qlora"), offload, None, "s1")
    # the pipeline's pre-flight check is the stage's mode's
    from remix_ds.pipeline import check_combination
    with pytest.raises(ConfigError, match="merge: false is not supported for qlora"):
        check_combination(spec("qlora", merge=False), zero2, None, "s1")


def _recipe(tmp_path, semantics, precision):
    return recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "run"), "model": "tiny",
                             "semantics": semantics, "precision": precision,
                             "datasets": {"A": {"source": "kvr", "num_examples": 4}},
                             "stage1": {"data": "A"}, "variants": [{"name": "v"}]})


def test_only_full_fine_tuning_takes_the_studys_pure_bf16(tmp_path):
    from remix_ds.stages import stage_precision

    study, plain = _recipe(tmp_path, "study", "bf16"), _recipe(tmp_path, "remix", "bf16")
    assert [m.precision(study) for m in (FULL, LORA, QLORA)] == [PURE_BF16, "bf16", "bf16"]
    assert [m.precision(plain) for m in (FULL, LORA, QLORA)] == ["bf16", "bf16", "bf16"]
    assert FULL.precision(_recipe(tmp_path, "study", "fp32")) == "fp32"
    assert stage_precision(study, StageSpec(data="A", finetune="full")) == PURE_BF16
    assert stage_precision(study, StageSpec(data="A", finetune="lora")) == "bf16"


AUTOCAST = {"zero_optimization": {"stage": 0}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


def _lora_parameters(base, r, targets):
    """LoRA's trainable parameter count, from the base's own Linear shapes: r x (in + out) per adapted layer."""
    return sum(r * (m.in_features + m.out_features) for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def test_each_mode_loads_what_it_trains(tiny_dir):
    from transformers import AutoModelForCausalLM

    from remix_ds.model import load_for_training

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    n_base = sum(p.numel() for p in base.parameters())
    lora = LoraSpec(r=4, alpha=8)
    # full: every weight trains; fp32 masters under torch autocast, the training dtype otherwise
    model, _ = load_for_training(tiny_dir, "full", lora, AUTOCAST, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_base
    model, _ = load_for_training(tiny_dir, FULL, lora, {}, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # lora: only the adapter trains, on a frozen base in the training dtype
    model, _ = load_for_training(tiny_dir, "lora", lora, AUTOCAST, torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == _lora_parameters(base, 4, set(lora.target_modules))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    # qlora: the same adapter on NF4 linear layers
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_for_training(tiny_dir, "qlora", lora, {}, torch.float32)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == sum(1 for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)
                                and name.rsplit(".", 1)[-1] != "lm_head")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == _lora_parameters(base, 4, set(lora.target_modules))


def _delta(adapter_dir, module, scale):
    ad = load_file(f"{adapter_dir}/adapter_model.safetensors")
    prefix = f"base_model.model.{module}"
    return scale * (ad[f"{prefix}.lora_B.weight"] @ ad[f"{prefix}.lora_A.weight"])


def test_adapter_modes_merge_into_the_weights_they_trained_on(tiny_dir, tmp_path):
    """LoRA merges the frozen adapters and the stage's own into the 16-bit base, into <stage>/merged; QLoRA
    merges into the NF4-dequantised weights of the base in the dtype it trained in (bitsandbytes directly)."""
    import bitsandbytes.functional as bnbf
    from test_adapters import make_adapter

    frozen = make_adapter(tiny_dir, tmp_path / "stage1" / "adapter", seed=11)
    key, module = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj"
    w = load_file(f"{tiny_dir}/model.safetensors")[key]
    for mode in (LORA, QLORA):
        d = tmp_path / mode.name / "stage2"
        own = make_adapter(tiny_dir, d / "adapter", seed=12)
        stats = mode.merge(tiny_dir, [frozen] if mode is LORA else [], d, torch.float32, torch.bfloat16)
        merged = load_file(str(d / "merged" / "model.safetensors"))[key]
        assert (d / "merged" / "config.json").is_file() and stats["merged"] > 0
        if mode is LORA:   # alpha / r = 2 in make_adapter
            expected = w + _delta(frozen, module, 2.0) + _delta(own, module, 2.0)
        else:
            q, state = bnbf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                          compress_statistics=True)
            seen = bnbf.dequantize_4bit(q, state, quant_type="nf4").float()
            expected = seen + _delta(own, module, 2.0)
            assert (merged - (w + _delta(own, module, 2.0))).abs().max() > 1e-4   # not the unquantised base
        torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter"):
        FULL.merge(tiny_dir, [], tmp_path / "full", torch.float32, torch.float32)

"""How a ds_config is resolved per world size and mode, and LoRA in bf16 under DeepSpeed's torch autocast."""
import json
import sys

import pytest

from conftest import TINY_AB_HEADER, run_cli, write_recipe
from remix_ds.zero import ds_config_path, resolve_ds_config

KW = dict(global_batch_size=8, micro_batch_size=8, grad_accum=1, grad_clip=1.0, hidden_size=128)


def test_full_fine_tuning_on_one_process_runs_without_zero_unless_it_offloads(monkeypatch, caplog):
    import logging

    from remix_ds import dist
    from remix_ds.zero import adapt_zero_stage, load_ds_config

    with caplog.at_level(logging.INFO, logger="remix_ds.zero"):   # one line says what runs and why
        resolve_ds_config("zero3", precision="bf16", finetune="full", **KW)
        notes = []   # the stage choice alone (a checkpoint's layout, --dry-run) logs nothing
        assert adapt_zero_stage(load_ds_config("zero3"), 1, "full", "bf16", notes)["zero_optimization"] == {"stage": 0}
        assert len(notes) == 2 and "ZeRO-3 would partition nothing" in notes[0]
    said = [r.getMessage() for r in caplog.records if "ZeRO" in r.getMessage()]
    assert len(said) == 1 and "full fine-tuning on one process" in said[0] and "adapt_zero: false" in said[0], said

    for name in ("zero2", "zero3"):   # ZeRO-3 runs as ZeRO-2 on one process, and ZeRO-2 partitions nothing there
        cfg = resolve_ds_config(name, precision="bf16", finetune="full", **KW)
        assert cfg["zero_optimization"] == {"stage": 0} and cfg["bf16"]["enabled"] is False
        assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
        fp32 = resolve_ds_config(name, precision="fp32", finetune="full", **KW)
        assert fp32["zero_optimization"] == {"stage": 0} and "torch_autocast" not in fp32
    # offloading is a reason to keep ZeRO on one process (ZeRO-3 too when it offloads parameters)
    assert resolve_ds_config("zero2_offload", precision="bf16", finetune="full", **KW)["zero_optimization"]["stage"] == 2
    assert resolve_ds_config("zero3_offload", precision="bf16", finetune="full", **KW)["zero_optimization"]["stage"] == 3
    # as written
    assert resolve_ds_config("zero3", precision="bf16", finetune="full", adapt=False, **KW)["zero_optimization"]["stage"] == 3
    z2 = resolve_ds_config("zero2", precision="bf16", finetune="full", adapt=False, **KW)
    assert z2["zero_optimization"]["stage"] == 2 and z2["bf16"]["enabled"] and "torch_autocast" not in z2
    assert z2["zero_optimization"]["overlap_comm"] is False   # one process: nothing to overlap
    # several processes: ZeRO as configured, ZeRO-3 too
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    kw2 = {**KW, "global_batch_size": 16}
    assert resolve_ds_config("zero2", precision="bf16", finetune="full", **kw2)["zero_optimization"]["stage"] == 2
    z3 = resolve_ds_config("zero3", precision="bf16", finetune="full", **kw2)
    assert z3["zero_optimization"]["stage"] == 3 and z3["bf16"]["enabled"]


def test_deepspeeds_synchronizing_throughput_timer_is_off_unless_a_config_asks_for_it(tmp_path):
    """DeepSpeed's throughput timer synchronizes the device twice a step by default: resolved configs turn it
    off (the stage logs its own throughput), and a ds_config's own "timers" block is kept as written."""
    for name, finetune in (("zero2", "full"), ("zero3", "lora"), ("zero2_offload", "full")):
        assert resolve_ds_config(name, precision="bf16", finetune=finetune, **KW)["timers"] == \
            {"throughput": {"enabled": False}}
    own = json.load(open(ds_config_path("zero2")))
    own["timers"] = {"throughput": {"enabled": True, "synchronized": False}}
    path = tmp_path / "timed.json"
    path.write_text(json.dumps(own))
    assert resolve_ds_config(str(path), precision="bf16", finetune="full", **KW)["timers"] == own["timers"]


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_adapters_run_without_zero_under_torch_autocast(finetune, name):
    cfg = resolve_ds_config(name, precision="bf16", finetune=finetune, **KW)
    assert cfg["zero_optimization"] == {"stage": 0}
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp32 = resolve_ds_config(name, precision="fp32", finetune=finetune, **KW)
    assert fp32["zero_optimization"] == {"stage": 0} and "torch_autocast" not in fp32
    # an offloaded optimizer is kept as configured; so is everything with adapt=False
    off = resolve_ds_config("zero2_offload", precision="bf16", finetune=finetune, **KW)
    assert off["zero_optimization"]["stage"] == 2 and off["bf16"]["enabled"] is True
    kept = resolve_ds_config(name, precision="bf16", finetune=finetune, adapt=False, **KW)
    assert kept["zero_optimization"]["stage"] == int(name[-1]) and "torch_autocast" not in kept


def test_zero3_keeps_lora_adapters_whole_on_every_rank():
    """Under ZeRO-3 (kept as written here) the "auto" persistence threshold rises above the largest adapter
    tensor for LoRA, and stays 10 x hidden for full fine-tuning."""
    lora = resolve_ds_config("zero3", precision="bf16", finetune="lora", adapt=False, adapter_tensor_size=8 * 512,
                             **KW)
    assert lora["zero_optimization"]["stage3_param_persistence_threshold"] == 8 * 512 + 1
    full = resolve_ds_config("zero3", precision="bf16", finetune="full", adapt=False, adapter_tensor_size=8 * 512,
                             **KW)
    assert full["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 128


def _run_stage1(tmp_path, name: str, body: str):
    """Write TINY_AB_HEADER + body (its braces escaped for str.format) as a recipe, run stage 1 of every variant in one process; the run directory."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", (TINY_AB_HEADER + body).format(name=name, out=out))
    res = run_cli([sys.executable, "launch/stage1.py", "--config", str(recipe)], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


BF16_RECIPE = """ds_config: zero2
precision: bf16
stage1: {{data: A, finetune: lora, stop: fixed, epochs: 4, lr: 1.0e-2, global_batch_size: 8, lora: {{r: 8, alpha: 16}},
          merge: false, track: false, probe: true}}
stage2: {{data: B, finetune: lora, stop: fixed, epochs: 1, global_batch_size: 8}}
variants:
  - name: lora
  - name: lora-zero2
    stage1: {{adapt_zero: false}}
  - name: full
    stage1: {{finetune: full, lr: 2.0e-3, epochs: 3, merge: true}}
  - name: full-zero2
    stage1: {{finetune: full, lr: 2.0e-3, epochs: 3, merge: true, adapt_zero: false}}
"""


def test_lora_and_full_in_bf16_train_under_torch_autocast_like_deepspeed_bf16(tmp_path, tiny_dir):
    """bf16 on CPU (slow there, but the same code path as a GPU): the autocast run (fp32 adapters, bf16
    base) and DeepSpeed's own bf16 ZeRO-2 (adapters cast to bf16, fp32 master copies) both learn, from the
    same initial loss, and save fp32 adapters that reload to the training logits; full fine-tuning likewise."""
    import torch
    from safetensors.torch import load_file

    run = _run_stage1(tmp_path, "bf16", BF16_RECIPE)
    losses = {}
    for v in ("lora", "lora-zero2"):
        d = run / v / "stage1"
        cfg = json.load(open(d / "config.json"))["ds_config"]
        if v == "lora":
            assert cfg["zero_optimization"] == {"stage": 0} and cfg["torch_autocast"]["enabled"]
        else:
            assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"]
        done = json.load(open(d / "DONE.json"))["summary"]
        # the weights the optimizer stepped: PEFT's fp32 adapters, or DeepSpeed's bf16 copies of them
        assert done["trainable_dtypes"] == (["float32"] if v == "lora" else ["bfloat16"]), done
        assert done["zero_stage"] == (0 if v == "lora" else 2) and done["trainable_parameters"] > 0
        losses[v] = [json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()]
        assert losses[v][-1] < 0.7 * losses[v][0], losses[v]
        adapter = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        assert all(t.dtype == torch.float32 for t in adapter.values())
    # the same first batch and initialisation: bf16 rounding apart, the same first loss
    assert losses["lora"][0] == pytest.approx(losses["lora-zero2"][0], rel=0.02)
    # full fine-tuning on one process: fp32 weights under autocast (no ZeRO), or DeepSpeed's bf16 ZeRO-2 as
    # written; both learn from the same first loss and save bf16 models (the stage's save dtype) that reload
    for v in ("full", "full-zero2"):
        d = run / v / "stage1"
        cfg = json.load(open(d / "config.json"))["ds_config"]
        done = json.load(open(d / "DONE.json"))["summary"]
        if v == "full":
            assert cfg["zero_optimization"] == {"stage": 0} and cfg["torch_autocast"]["enabled"]
            assert done["trainable_dtypes"] == ["float32"] and done["zero_stage"] == 0, done
        else:
            assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"]
            assert done["trainable_dtypes"] == ["bfloat16"] and done["zero_stage"] == 2, done
        losses[v] = [json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()]
        assert losses[v][-1] < 0.7 * losses[v][0], losses[v]
        saved = load_file(str(d / "model" / "model.safetensors"))
        assert {t.dtype for t in saved.values()} == {torch.bfloat16}
        assert json.load(open(d / "model" / "config.json"))["dtype"] == "bfloat16"
    assert losses["full"][0] == pytest.approx(losses["full-zero2"][0], rel=0.02)
    from remix_ds.model import load_for_eval

    d = run / "lora" / "stage1"
    probe = torch.load(d / "probe_logits.pt")
    model = load_for_eval(str(d / "adapter"), torch.bfloat16, torch.device("cpu"), base=tiny_dir)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=probe["batch"]["input_ids"], attention_mask=probe["batch"]["attention_mask"]).logits
    mask = probe["batch"]["attention_mask"].bool()
    assert (logits.float()[mask].argmax(-1) == probe["logits"][mask].argmax(-1)).float().mean() > 0.95


GC_RECIPE = """stage1: {{data: A, finetune: full, stop: fixed, epochs: 2, lr: 3.0e-3, global_batch_size: 8, track: false,
          log_every: 1}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 1, global_batch_size: 8}}
variants:
  - name: plain
  - name: gc
    stage1: {{gradient_checkpointing: true}}
  - name: gc-lora
    stage1: {{gradient_checkpointing: true, finetune: lora, lr: 1.0e-2, lora: {{r: 8, alpha: 16}}, merge: false}}
    stage2: {{finetune: lora}}
"""


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_dir):
    """Recomputing activations changes memory, not the maths: the same losses and final weights (fp32);
    with LoRA (frozen base, non-reentrant checkpointing) the adapter still learns."""
    import torch
    from safetensors.torch import load_file

    run = _run_stage1(tmp_path, "gc", GC_RECIPE)
    logs = {v: [json.loads(x)["loss"] for x in (run / v / "stage1" / "train_log.jsonl").read_text().splitlines()]
            for v in ("plain", "gc", "gc-lora")}
    assert len(logs["plain"]) == 4 and logs["gc"] == pytest.approx(logs["plain"], rel=1e-5)
    a = load_file(str(run / "plain" / "stage1" / "model" / "model.safetensors"))
    b = load_file(str(run / "gc" / "stage1" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    assert logs["gc-lora"][-1] < logs["gc-lora"][0]
    adapter = load_file(str(run / "gc-lora" / "stage1" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())


@pytest.mark.parametrize("gc", [False, True])
def test_gradient_checkpointing_recomputes_layers_in_the_answer_loss_backward(tiny_dir, gc):
    """The stage's loss module calls the decoder directly: checkpointing must still recompute each layer."""
    import torch

    from remix_ds.config import LoraSpec
    from remix_ds.data.formatting import collate, encode_example, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.objective import AnswerLoss
    from remix_ds.model import load_for_training, load_tokenizer

    tok = load_tokenizer(tiny_dir)
    for finetune in ("full", "lora"):
        model, _ = load_for_training(tiny_dir, finetune, LoraSpec(r=4, alpha=8), {}, torch.float32,
                                     gradient_checkpointing=gc)
        model.train()
        base = model.get_base_model() if finetune == "lora" else model
        layer = base.model.layers[0]
        calls = []
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))   # recomputation starts here
        batch = collate([encode_example(tok, e, i) for i, e in enumerate(kvr_examples(4, 0))], pad_id_of(tok))
        loss = AnswerLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert len(calls) == 1
        loss.backward()
        assert len(calls) == (2 if gc else 1), (finetune, gc, len(calls))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


CLIP_RECIPE = """stage1: {{data: A, finetune: lora, stop: fixed, epochs: 2, lr: 1.0e-2, global_batch_size: 8, track: false,
          log_every: 1, merge: false, lora: {{r: 8, alpha: 16}}, grad_clip: 0.05}}
stage2: {{data: B, finetune: lora, stop: fixed, epochs: 1, global_batch_size: 8}}
variants:
  - name: stage0
  - name: zero2
    stage1: {{adapt_zero: false}}
"""


def test_lora_without_zero_trains_as_deepspeed_zero2_does(tmp_path, tiny_dir):
    """Without ZeRO the engine clips with torch's clip_grad_norm_ (no host sync); fp32 ZeRO-2 clips inside
    DeepSpeed: the same losses and adapters, with a clip that acts (0.05; that it acts is checked by
    test_gradient_clip_acts_on_the_optimizers_gradients)."""
    from safetensors.torch import load_file

    run = _run_stage1(tmp_path, "clip", CLIP_RECIPE)
    loss, adapter = {}, {}
    for v in ("stage0", "zero2"):
        d = run / v / "stage1"
        assert json.load(open(d / "DONE.json"))["summary"]["zero_stage"] == (2 if v == "zero2" else 0)
        loss[v] = [json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()]
        adapter[v] = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert len(loss["stage0"]) == 4
    assert loss["stage0"] == pytest.approx(loss["zero2"], rel=1e-4)
    total = sum(t.numel() for t in adapter["stage0"].values())
    differ = sum(int(((adapter["stage0"][k] - adapter["zero2"][k]).abs() > 1e-4).sum()) for k in adapter["stage0"])
    assert differ <= 0.01 * total, (differ, total)


@pytest.mark.parametrize("zero", [0, 2])
def test_gradient_clip_acts_on_the_optimizers_gradients(tiny_dir, one_thread, one_process_dist, zero):
    """The gradient the optimizer steps on has norm grad_clip when the clip is far below the gradient's own
    norm, and the gradient's own norm when the clip is far above it: the engine's torch clip (no ZeRO) and
    DeepSpeed's (ZeRO-2) alike. The gradient is read where AdamW reads it (a step pre-hook on the torch
    optimizer DeepSpeed steps), so the check does not depend on how much a clip changes a later loss, which
    varies with the machine's tiny model (Adam's update is nearly scale-free)."""
    import torch

    from remix_ds import dist
    from remix_ds.config import LoraSpec
    from remix_ds.data.formatting import collate, encode_example, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.engine import Engine
    from remix_ds.model import load_for_training, load_tokenizer

    assert dist.world_size() == 1
    tok = load_tokenizer(tiny_dir)
    batch = collate([encode_example(tok, e, i) for i, e in enumerate(kvr_examples(8, 0))], pad_id_of(tok))
    n = int((batch["labels"] != -100).sum())

    def stepped_norm(clip: float) -> float:
        """The norm of the gradients AdamW sees at the first step of a fresh engine with this clip."""
        cfg = resolve_ds_config("zero2", precision="fp32", finetune="lora", adapt=zero == 0,
                                **{**KW, "grad_clip": clip})
        torch.manual_seed(0)
        model, _ = load_for_training(tiny_dir, "lora", LoraSpec(r=4, alpha=8), cfg, torch.float32)
        # a non-zero B, so that both LoRA factors have gradients at the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        eng = Engine(model, cfg, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10, warmup_ratio=0.0)
        assert eng.zero_stage == zero
        seen = []
        inner = eng.optimizer
        while hasattr(inner, "optimizer"):   # DeepSpeed's ZeRO optimizer wraps the torch AdamW it steps
            inner = inner.optimizer

        def pre_hook(opt, *_):
            grads = [p.grad.float() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        inner.register_step_pre_hook(pre_hook)
        eng.micro_step(batch, 1.0 / n)
        eng.step()
        eng.close()
        assert len(seen) == 1, seen
        return seen[0]

    natural = stepped_norm(1e6)      # a clip far above the gradient's norm: AdamW sees that norm
    assert natural > 0
    clip = natural / 100
    assert stepped_norm(clip) == pytest.approx(clip, rel=1e-3)


def test_checkpoints_carry_the_fp16_autocast_grad_scaler(tmp_path):
    """fp16 LoRA without ZeRO: DeepSpeed's GradScaler is not in its checkpoint; Engine keeps its scale and
    growth tracker in the client state and restores them (a resume would otherwise restart at 65536)."""
    import torch

    from remix_ds.engine import Engine

    class FakeDS:   # the two DeepSpeed calls Engine makes, and the scaler DeepSpeed keeps
        def __init__(self):
            self.torch_autocast_z0_gradscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
            self.saved = None

        def save_checkpoint(self, root, tag, client_state, save_latest):
            self.saved = client_state
            (tmp_path / tag).mkdir(exist_ok=True)

        def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
            return None, self.saved

    eng = Engine.__new__(Engine)
    eng.engine = FakeDS()
    eng.engine.torch_autocast_z0_gradscaler.scale(torch.ones(()))      # the scaler starts with the first step
    eng.engine.torch_autocast_z0_gradscaler.update(new_scale=512.0)   # as after some overflows
    eng.save_checkpoint(str(tmp_path), "step1", {"loop": {"step": 1}}, marker={"step": 1})
    assert eng.engine.saved["loop"] == {"step": 1} and "grad_scaler" in eng.engine.saved
    fresh = FakeDS()
    fresh.saved = eng.engine.saved
    eng.engine = fresh
    state = eng.load_checkpoint(str(tmp_path), "step1")
    assert state["loop"] == {"step": 1} and fresh.torch_autocast_z0_gradscaler.get_scale() == 512.0


def test_one_process_step_skips_deepspeeds_per_parameter_host_work(tiny_dir, one_process_dist):
    """What a step costs on the host decides a GPU step's speed when kernels are short (an H100 ran the 1B and
    8B shapes host-bound): on one process without ZeRO there is no gradient all-reduce, gradients are cleared
    on the trained parameters only, and Module.train() (a walk over every submodule) is not rerun for every
    micro-batch; the step still trains the adapters."""

    import torch

    from remix_ds import dist
    from remix_ds.config import LoraSpec
    from remix_ds.data.formatting import collate, encode_example, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.engine import Engine
    from remix_ds.model import load_for_training, load_tokenizer

    assert dist.world_size() == 1
    cfg = resolve_ds_config("zero2", precision="fp32", finetune="lora", **{**KW, "hidden_size": 64})
    model, _ = load_for_training(tiny_dir, "lora", LoraSpec(r=4, alpha=8), cfg, torch.float32)
    eng = Engine(model, cfg, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10, warmup_ratio=0.0)
    assert eng.zero_stage == 0 and eng.engine.enable_backward_allreduce is False
    tok = load_tokenizer(tiny_dir)
    batch = collate([encode_example(tok, e, i) for i, e in enumerate(kvr_examples(8, 0))], pad_id_of(tok))
    n = int((batch["labels"] != -100).sum())
    trained = [p for p in eng.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    calls = []
    real_train = torch.nn.Module.train

    def counting_train(self, mode=True):
        calls.append(self)
        return real_train(self, mode)
    torch.nn.Module.train = counting_train
    try:
        losses = []
        for _ in range(3):
            losses.append(float(eng.micro_step(batch, 1.0 / n)) / n)
            assert all(p.grad is not None for p in trained)
            eng.step()
            assert all(p.grad is None for p in trained)   # cleared after the optimizer step
        assert calls == []                                  # already in training mode: no walk
        eng.eval()
        assert not any(m.training for m in eng.module.modules())
        calls.clear()
        eng.micro_step(batch, 0.0)
        assert eng.engine.module.training and sum(c is eng.engine.module for c in calls) == 1   # training again
        assert all(m.training for m in eng.module.modules())
    finally:
        torch.nn.Module.train = real_train
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trained))
    # packed micro-batches (a 4-D mask) train under the engine's packed_sdpa backends, padded ones under torch's
    # choice: on CUDA every backend but cuDNN (its per-shape graphs), None elsewhere
    from torch.nn.attention import SDPBackend

    from remix_ds.data.formatting import collate_packed
    from remix_ds.data.mixing import random_word_examples
    from remix_ds.engine import packed_sdpa_backends

    assert eng.packed_sdpa is None and packed_sdpa_backends(torch.device("cpu")) is None
    assert packed_sdpa_backends(torch.device("cuda")) == [SDPBackend.FLASH_ATTENTION,
                                                           SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    mixed = [encode_example(tok, e, i) for i, e in enumerate(kvr_examples(6, 0) + random_word_examples(3, 0, 8, 8))]
    packed = collate_packed(mixed, pad_id_of(tok), 128)
    assert packed["attention_mask"].dim() == 4
    eng.packed_sdpa = [SDPBackend.EFFICIENT_ATTENTION]   # CUDA-only: no CPU kernel can run under it
    with pytest.raises(RuntimeError, match="No viable backend"):
        eng.micro_step(packed, 0.0)
    eng.micro_step(batch, 0.0)   # a padded batch is not run under it
    eng.packed_sdpa = [SDPBackend.MATH]
    by_math = float(eng.micro_step(packed, 0.0))
    eng.packed_sdpa = None
    assert float(eng.micro_step(packed, 0.0)) == pytest.approx(by_math, rel=1e-5)
    eng.close()
    # with gradient checkpointing: the first micro-step already runs in training mode (a fresh model is in eval
    # mode, which would switch checkpointing off until the first evaluation), and a packed micro-batch's
    # recomputation in the backward runs under the same SDPA backends as its forward (else CheckpointError)
    model, _ = load_for_training(tiny_dir, "lora", LoraSpec(r=4, alpha=8), cfg, torch.float32,
                                 gradient_checkpointing=True)
    assert not all(m.training for m in model.modules())   # from_pretrained's eval mode, under PEFT's wrapper
    eng = Engine(model, cfg, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, total_steps=10, warmup_ratio=0.0)
    assert all(m.training for m in eng.module.modules())
    calls = []
    eng.module.get_base_model().model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    eng.micro_step(batch, 1.0 / n)
    assert len(calls) == 2   # forward, then recomputed in the backward
    eng.packed_sdpa = [SDPBackend.MATH]   # not torch's own choice on this CPU for a masked batch (flash)
    eng.micro_step(packed, 0.0)
    assert len(calls) == 4
    eng.close()


def _adapter_setup(tiny_dir, finetune, precision, dropout=0.0):
    """A LoRA/QLoRA model as a stage loads it (non-zero lora_B, so that every adapter tensor gets a gradient),
    its trained parameters, a KVR batch and the stage's loss head."""
    import torch

    from remix_ds.config import LoraSpec
    from remix_ds.data.formatting import collate, encode_example, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.objective import AnswerLoss
    from remix_ds.zero import torch_dtype
    from remix_ds.model import load_for_training, load_tokenizer

    cfg = resolve_ds_config("zero2", precision=precision, finetune=finetune, **KW)
    torch.manual_seed(0)
    model, _ = load_for_training(tiny_dir, finetune, LoraSpec(r=4, alpha=12, dropout=dropout), cfg,
                                 torch_dtype(precision))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    tok = load_tokenizer(tiny_dir)
    batch = collate([encode_example(tok, e, i) for i, e in enumerate(kvr_examples(8, 0))], pad_id_of(tok))
    return model, [p for p in model.parameters() if p.requires_grad], batch, AnswerLoss(model)


def test_lora_under_autocast_skips_peft_input_casts_with_the_same_results(tiny_dir):
    """load_for_training under a torch_autocast config turns off PEFT's cast of each LoRA input to fp32 (which
    autocast casts straight back to bf16): the loss and every adapter gradient are bitwise those with it."""
    import torch

    model, fp32, batch, head = _adapter_setup(tiny_dir, "lora", "bf16")
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert fp32 and all(p.dtype == torch.float32 for p in fp32)

    def run(cast: bool):
        for m in layers:
            m.cast_input_dtype_enabled = cast
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in fp32]

    (loss_skip, g_skip), (loss_cast, g_cast) = run(False), run(True)
    assert torch.equal(loss_skip, loss_cast)
    assert all(torch.equal(a, b) for a, b in zip(g_skip, g_cast)) and all(g.abs().sum() > 0 for g in g_skip)


@pytest.mark.parametrize("finetune,precision,dropout", [("lora", "fp32", 0.1), ("lora", "bf16", 0.0),
                                                        ("qlora", "fp32", 0.0)])
def test_fused_lora_forward_gives_pefts_loss_and_gradients(tiny_dir, finetune, precision, dropout):
    """load_for_training gives every LoRA layer (16-bit and 4-bit bases) the forward that adds the update in one
    GEMM (model.fuse_lora_forward): the same loss and adapter gradients as PEFT's own forward (dropout masks
    included: the same draws in the same order; bf16 autocast: within bf16 rounding, since the GEMM rounds once
    where PEFT rounds B's output, its scaling and the sum), and with the adapters disabled, the base model's."""
    import torch

    model, params, batch, head = _adapter_setup(tiny_dir, finetune, precision, dropout)
    fused = [m for m in model.modules() if hasattr(m, "lora_A") and "forward" in vars(m)]
    assert len(fused) == len([m for m in model.modules() if hasattr(m, "lora_A")]) == 2 * 7   # 2 layers x 7 projections
    auto = precision == "bf16"

    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
            loss = head(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    calls = []
    real_addmm = torch.addmm
    torch.addmm = lambda *a, **k: calls.append(1) or real_addmm(*a, **k)
    try:
        loss_f, g_f = run()
    finally:
        torch.addmm = real_addmm
    assert len(calls) == len(fused)   # the fused form ran in every layer
    for m in fused:
        del m.forward   # PEFT's own forward again
    loss_p, g_p = run()

    def rel(a, b):
        return float((a - b).norm() / b.norm())
    if not auto:
        torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-5)
        assert all(b.abs().sum() > 0 and rel(a, b) < 1e-5 for a, b in zip(g_f, g_p))
    else:   # against the exact result (the same weights in fp32, no autocast): no less accurate than PEFT's
        model.float()
        auto = False
        loss_x, g_x = run()
        auto = True
        assert abs(float(loss_f - loss_x)) <= 1.5 * abs(float(loss_p - loss_x)) + 1e-3
        for a, b, x in zip(g_f, g_p, g_x):
            assert x.abs().sum() > 0 and rel(a, x) <= 1.5 * rel(b, x) + 2e-3, (rel(a, x), rel(b, x))
        model.to(torch.bfloat16)   # the base as loaded (the adapters too; only equality below is checked)
    from remix_ds.model import fuse_lora_forward

    assert fuse_lora_forward(model) == len(fused)
    with torch.no_grad():
        model.eval()
        on = model(input_ids=batch["input_ids"]).logits
        with model.disable_adapter():   # falls back to PEFT's forward: the base model alone
            off = model(input_ids=batch["input_ids"]).logits
            for m in fused:
                del m.forward
            base = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(on, off) and torch.equal(off, base)


def test_qlora_gradients_after_an_evaluation_are_those_before_it(tiny_dir):
    """A QLoRA stage evaluates between epochs. On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight
    at its first eval-mode forward without gradients for a bf16 inference kernel that has no backward, and
    every later training forward takes it: load_for_training turns that off, so the adapter gradients after an
    evaluation are exactly those before it (on a CPU without AVX512-BF16 bitsandbytes never repacks)."""
    import torch

    model, params, batch, head = _adapter_setup(tiny_dir, "qlora", "fp32")
    four_bit = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)

    def grads():
        model.train()
        model.zero_grad(set_to_none=True)
        head(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        return [p.grad.clone() for p in params]

    before = grads()
    model.eval()
    with torch.no_grad():   # what the stage's evaluation runs: teacher-forced argmax, then full logits
        head(batch["input_ids"], batch["attention_mask"], batch["labels"], None, True)
        head(batch["input_ids"], batch["attention_mask"])
    after = grads()
    assert all(g.abs().sum() > 0 for g in before)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

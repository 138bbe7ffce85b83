"""semantics: study, the training side: each rule of the study's released code (train.py, training.py, sft.py,
run_stage1/2.sh) re-implemented here in a few lines (or run through the torch class the study uses), and compared
with what remix_ds does under the switch."""
import json
import math
import sys

import pytest

from conftest import run_cli, write_recipe


# ------------------------------------------------------------------ order: DistributedSampler + DataLoader

@pytest.mark.parametrize("n,world,micro,gas", [(20, 1, 8, 1), (21, 2, 4, 1), (37, 2, 3, 2), (10, 4, 2, 1),
                                               (13, 2, 2, 3)])
def test_epoch_steps_are_the_study_samplers_micro_batches(n, world, micro, gas):
    """The study's loader: DistributedSampler(shuffle=True, seed) per rank, never set_epoch, DataLoader
    (drop_last=True); optimizer steps every gas micro-batches or at the loader's last batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    from remix_ds.study import epoch_steps

    seed = 3
    loaders = [DataLoader(list(range(n)), batch_size=micro, drop_last=True, collate_fn=list,
                          sampler=DistributedSampler(list(range(n)), num_replicas=world, rank=r, shuffle=True,
                                                     seed=seed)) for r in range(world)]
    per_rank = [list(loader) for loader in loaders]   # every epoch the same: set_epoch is never called
    assert per_rank == [list(loader) for loader in loaders]
    length = len(per_rank[0])
    expected = []   # the study's train.py: step when (step + 1) % gas == 0 or at the loader's last batch
    current = [[] for _ in range(gas * world)]
    a = 0
    for j in range(length):
        for r in range(world):
            current[a * world + r] = per_rank[r][j]
        a += 1
        if (j + 1) % gas == 0 or j == length - 1:
            expected.append(current)
            current = [[] for _ in range(gas * world)]
            a = 0
    assert epoch_steps(n, world, micro, gas, seed) == expected
    assert len(expected) == math.ceil((math.ceil(n / world) // micro) / gas)


# ------------------------------------------------------------------ the stopping counter

def test_stop_counter_counts_steps_below_the_threshold_and_never_resets():
    from remix_ds.study import StopCounter

    def study_rule(losses):   # train.py ~272-284: the step at which the study stops (None: never)
        stopping_counter = 0
        for step, loss in enumerate(losses):
            if loss < 0.0001:
                stopping_counter += 1
            if stopping_counter >= 10:
                return step
        return None

    def ours(losses):
        c = StopCounter(1e-4, 10)
        for step, loss in enumerate(losses):
            if c.update(loss):
                return step
        return None

    # 9 below, one above, one more below: the study stops (remix_ds's consecutive rule would need 10 in a row)
    seqs = [[1e-5] * 9 + [1.0] + [1e-5], [1e-3] * 30, [5e-5, 2e-4] * 12, [1e-5] * 12, [2e-4, 1e-4] * 20]
    for seq in seqs:
        assert ours(seq) == study_rule(seq), seq
    assert ours(seqs[0]) == 10


# ------------------------------------------------------------------ defaults: the scripts' settings

def _recipe(tmp_path, text):
    from remix_ds.config import load_recipe

    return load_recipe(str(write_recipe(tmp_path / "r.yaml", text)))


STUDY_GRID = """name: s
output_dir: {out}
model: tiny
semantics: study
datasets:
  K: {{source: kvr}}
  P: {{source: popqa}}
  G: {{source: gsm8k}}
  B: {{source: lama}}
stage1: {{data: K, finetune: full}}
stage2: {{data: B, finetune: full, mix: {{source: random-words}}}}
variants:
  - name: kvr
  - name: popqa
    stage1: {{data: P}}
  - name: gsm8k
    stage1: {{data: G}}
  - name: own
    stage1: {{data: P, epochs: 3, stop: fixed}}
    stage2: {{lr: 1.0e-4, mix: {{source: random-words, ratio: 4.0}}}}
"""


def test_study_defaults_are_the_scripts_settings(tmp_path):
    """run_stage1.sh / run_stage2.sh: 20 epochs, lr 5e-5, global batch 32, max length 2048, seed 0; the stopping
    rule of every stage from D_A (sc=fixed for KVR, else sc=loss, D_B GSM8K included); a GSM8K D_A 10 fixed
    epochs; mixing at ratio 2. Keys a recipe sets win; study_except: [defaults] keeps remix_ds's defaults."""
    def script_rule(d_a, k):   # the scripts' branches, re-written
        if k == 1 and d_a == "gsm8k":
            return "fixed", 10
        return ("fixed" if d_a in ("kvr", "kvrB") else "loss"), 20

    r = _recipe(tmp_path, STUDY_GRID.format(out=tmp_path / "out"))
    assert (r.seed, r.max_seq_length) == (0, 2048)
    assert (r.eval.max_new_tokens, r.eval.batch_size) == (1000, 20)   # run_eval.py's generation
    assert all(ds.overlong == "drop" for ds in r.datasets.values())
    for v in r.variants[:3]:
        d_a = r.datasets[v.stages[0].data].source
        for k, st in enumerate(v.stages, 1):
            assert (st.stop, st.epochs) == script_rule(d_a, k), (v.name, k)
            assert (st.lr, st.global_batch_size, st.warmup_ratio, tuple(st.betas)) == (5e-5, 32, 0.05, (0.9, 0.95))
        assert v.stages[1].mix.ratio == 2.0
    own = r.variant("own")
    assert (own.stages[0].stop, own.stages[0].epochs) == ("fixed", 3)
    assert own.stages[1].lr == 1e-4 and own.stages[1].mix.ratio == 4.0 and own.stages[1].stop == "loss"
    plain = _recipe(tmp_path, STUDY_GRID.format(out=tmp_path / "out").replace(
        "semantics: study", "semantics: study\nstudy_except: [defaults]"))
    assert (plain.seed, plain.max_seq_length, plain.variants[1].stages[0].epochs) == (1234, 256, 3)
    remix = _recipe(tmp_path, STUDY_GRID.format(out=tmp_path / "out").replace("semantics: study\n", ""))
    assert remix.variants[1].stages[1].stop == "fixed" and remix.variants[1].stages[1].mix.ratio == 1.0
    from remix_ds.errors import ConfigError
    with pytest.raises(ConfigError, match="study_except: unknown item 'padd'"):
        _recipe(tmp_path, STUDY_GRID.format(out=tmp_path / "out").replace(
            "semantics: study", "semantics: study\nstudy_except: [padd]"))


def test_the_switch_leaves_remix_fingerprints_alone(tmp_path, tiny_dir):
    """A recipe without the switch hashes as before it existed (no finished stage is retrained); the switch
    changes every stage's hash."""
    from remix_ds.config import stage_hash
    from remix_ds.stages import Stage

    text = """name: f
output_dir: {out}
model: tiny
max_seq_length: 48
datasets:
  A: {{source: kvr, num_examples: 8}}
  B: {{source: kvrB, num_examples: 8}}
stage1: {{data: A}}
stage2: {{data: B}}
"""
    remix = _recipe(tmp_path, text.format(out=tmp_path / "o"))
    fp = Stage(remix, remix.variants[0], 2).fingerprint
    assert "semantics" not in json.dumps(fp)
    study = _recipe(tmp_path, text.format(out=tmp_path / "o") + "semantics: study\nstudy_except: [defaults]\n")
    assert stage_hash(Stage(study, study.variants[0], 1).fingerprint) != stage_hash(Stage(remix, remix.variants[0], 1).fingerprint)


# ------------------------------------------------------------------ a whole stage against the study's loop

STAGE_RECIPE = """name: study
output_dir: {out}
model: tiny
semantics: study
max_seq_length: 64
datasets:
  A: {{source: kvr, num_examples: 21}}
  B: {{source: kvrB, num_examples: 8}}
stage1: {{data: A, finetune: full, epochs: 3, lr: 2.0e-3, global_batch_size: 8, track: false, log_every: 1,
          warmup_ratio: 0.2}}
stage2: {{data: B, finetune: full, epochs: 1, global_batch_size: 8}}
"""


def study_loop(tiny_dir, encoded, eos, *, seed, epochs, micro, world, lr, warmup_ratio, clip=1.0):
    """The study's train.py on one process, written out: a bf16 model that AdamW steps in bf16, examples padded
    to the longest of the set with EOS (labels too), the sampler/loader of each simulated rank, each rank's
    Hugging Face mean loss averaged over ranks (FSDP's gradient average), FSDP's gradient clip, transformers'
    cosine schedule. Returns the per-step losses averaged over ranks."""
    import torch
    import transformers
    from torch.nn.utils.rnn import pad_sequence
    from torch.utils.data import DataLoader, DistributedSampler

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    model.train()
    ids = pad_sequence([torch.tensor(e.input_ids) for e in encoded], batch_first=True, padding_value=eos)
    mask = pad_sequence([torch.ones(len(e.input_ids), dtype=torch.long) for e in encoded], batch_first=True,
                        padding_value=eos)
    labels = pad_sequence([torch.tensor(e.labels) for e in encoded], batch_first=True, padding_value=eos)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(encoded))]
    stack = lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]}   # noqa: E731
    loaders = [DataLoader(rows, batch_size=micro, drop_last=True, collate_fn=stack,
                          sampler=DistributedSampler(rows, num_replicas=world, rank=r, shuffle=True, seed=seed))
               for r in range(world)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    total = len(loaders[0]) * epochs
    sched = transformers.get_scheduler("cosine", optimizer=opt, num_warmup_steps=math.ceil(total * warmup_ratio),
                                       num_training_steps=total)
    losses = []
    for _ in range(epochs):
        for batches in zip(*loaders):
            loss = sum(model(**b).loss for b in batches) / world
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                         for g in grads]))
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s.dtype == torch.bfloat16 for st in opt.state.values() for s in st.values() if s.dim())
    return losses


def _stage_inputs(recipe_path):
    from remix_ds.config import load_recipe
    from remix_ds.data import stage_train_set
    from remix_ds.data.formatting import encode_examples
    from remix_ds.model import load_tokenizer
    from remix_ds.tiny import resolve_model_path

    recipe = load_recipe(str(recipe_path))
    tok = load_tokenizer(resolve_model_path(recipe.model, recipe.tiny))
    _, train = stage_train_set(recipe, recipe.variants[0].stages[0], 1)
    enc, _ = encode_examples(tok, train, recipe.max_seq_length, truncate=False)
    return recipe, enc, tok.eos_token_id


def test_a_study_stage_trains_as_the_study_loop(tmp_path, tiny_dir):
    """One process, full fine-tuning: the losses of every step equal the study's loop's (bf16 rounding apart),
    and the stage trained bf16 weights: 21 examples at micro-batch 8 are 2 steps an epoch (the third, short batch
    never trained), the same order every epoch, the first step at lr 0."""
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", STAGE_RECIPE.format(out=out))
    res = run_cli([sys.executable, "launch/stage1.py", "--config", str(path)], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    d = out / "default" / "stage1"
    rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    done = json.load(open(d / "DONE.json"))["summary"]
    assert done["steps"] == 6 and done["trainable_dtypes"] == ["bfloat16"] and done["zero_stage"] == 0
    recipe, enc, eos = _stage_inputs(path)
    ref = study_loop(tiny_dir, enc, eos, seed=0, epochs=3, micro=8, world=1, lr=2e-3, warmup_ratio=0.2)
    ours = [r["loss"] for r in rows]
    assert ours == pytest.approx(ref, rel=0.02), (ours, ref)
    assert ref[0] == pytest.approx(ref[1], rel=0.05)   # the first step ran at lr 0 (only the batch changed)
    assert ref[-1] < 0.8 * ref[0]


def test_two_ranks_under_zero2_train_as_the_study_on_two_gpus(tmp_path, tiny_dir):
    """Two ranks under ZeRO-2 with DeepSpeed's bf16 master weights and optimizer states (the study's pure bf16
    on a ZeRO stage): each rank's own sampler share, each rank's mean loss averaged into the gradient, as the
    study's FSDP run on two GPUs."""
    out = tmp_path / "run"
    text = STAGE_RECIPE.format(out=out).replace("warmup_ratio: 0.2}", "warmup_ratio: 0.2, adapt_zero: false}")
    path = write_recipe(tmp_path / "r.yaml", text + "ds_config: zero2\n")
    res = run_cli(["deepspeed", "--num_gpus", "2", "launch/stage1.py", "--config", str(path)], timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-4000:])
    d = out / "default" / "stage1"
    rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    done = json.load(open(d / "DONE.json"))["summary"]
    assert done["zero_stage"] == 2 and done["trainable_dtypes"] == ["bfloat16"]
    recipe, enc, eos = _stage_inputs(path)
    # global batch 8 on 2 ranks: 4 each; 21 examples -> 11 per rank (padded with the first index) -> 2 batches
    ref = study_loop(tiny_dir, enc, eos, seed=0, epochs=3, micro=4, world=2, lr=2e-3, warmup_ratio=0.2)
    assert done["steps"] == len(ref) == 6
    assert [r["loss"] for r in rows] == pytest.approx(ref, rel=0.02)


# ------------------------------------------------------------------ pure bf16: no fp32 master weights

@pytest.mark.parametrize("zero", [0, 2])
def test_pure_bf16_steps_bf16_weights_with_bf16_adam_states(tiny_dir, one_thread, one_process_dist, zero):
    """The study's precision: AdamW steps the bf16 weights themselves, with bf16 moments. Five steps at an lr
    below half a bf16 ulp of most weights: a plain torch AdamW on the bf16 model (the study's) leaves those
    weights as they were, as remix_ds's pure bf16 does (without ZeRO: the client optimizer; ZeRO-2: DeepSpeed's
    bf16_master_weights_and_grads + bf16_optimizer_states), while fp32 master weights accumulate the updates
    until most weights change."""
    import torch
    import transformers

    from remix_ds import dist
    from remix_ds.config import LoraSpec
    from remix_ds.data.formatting import collate, encode_example, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.zero import PURE_BF16, resolve_ds_config
    from remix_ds.engine import Engine
    from remix_ds.model import load_for_training, load_tokenizer

    assert dist.world_size() == 1
    lr, steps = 2e-5, 5
    tok = load_tokenizer(tiny_dir)
    batch = collate([encode_example(tok, e, i) for i, e in enumerate(kvr_examples(8, 0))], pad_id_of(tok))
    n = int((batch["labels"][:, 1:] != -100).sum())
    cfg = resolve_ds_config("zero2", global_batch_size=8, micro_batch_size=8, grad_accum=1, grad_clip=1e6,
                            precision=PURE_BF16, hidden_size=128, finetune="full", adapt=zero == 0)
    model, _ = load_for_training(tiny_dir, "full", LoraSpec(), cfg, torch.bfloat16)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    # a constant lr, as the reference steps (a cosine over 10^9 steps does not move in 5)
    eng = Engine(model, cfg, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, total_steps=10 ** 9, warmup_ratio=0.0)
    assert eng.zero_stage == zero
    for _ in range(steps):
        eng.micro_step(batch, 1.0 / n)
        eng.step()
    inner = eng.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    moments = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    ours = {k: v.detach().clone() for k, v in eng.module.named_parameters()} if zero == 0 else \
        eng.gather_state_dict(lambda name, p: True, torch.bfloat16)
    eng.close()

    def reference(masters: bool):
        """AdamW on the Hugging Face loss: on the bf16 weights (the study), or on fp32 copies cast back to bf16."""
        ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
        params = dict(ref.named_parameters())
        fp32 = {k: p.detach().float().requires_grad_() for k, p in params.items()} if masters else None
        opt = torch.optim.AdamW(list(fp32.values()) if masters else list(params.values()), lr=lr, betas=(0.9, 0.95))
        for _ in range(steps):
            ref.zero_grad()
            ref(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
            if masters:
                for k, p in params.items():
                    fp32[k].grad = p.grad.float()
            opt.step()
            if masters:
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(fp32[k])
        return {k: p.detach().clone() for k, p in params.items()}

    def changed(state):
        return sum(int((state[k].float() != start[k].float()).sum()) for k in start)

    total = sum(v.numel() for v in start.values())
    study, masters = reference(False), reference(True)
    ours = {k: v for k, v in ours.items() if k in start}
    assert set(ours) == set(start)
    differ = sum(int((ours[k].float() != study[k].float()).sum()) for k in start)
    assert differ <= 0.01 * total, (differ, total)
    assert changed(masters) > 3 * changed(study), (changed(masters), changed(study), total)


def test_labelled_count_is_what_the_padded_batch_trains():
    from remix_ds.data.formatting import Encoded
    from remix_ds.study import collate, labelled_count, labelled_positions

    batch = [Encoded([1, 5, 6, 7, 2], [-100, -100, 6, 7, 2], 0), Encoded([1, 8, 2], [-100, -100, 2], 1)]
    assert labelled_count(batch[0], 9) + labelled_count(batch[1], 9) == labelled_positions(collate(batch, 2, 9)) \
        == (3 + 4) + (1 + 6)


def test_study_stopping_with_remix_order_reads_the_steps_loss(tmp_path, tiny_dir):
    """study_except: [order] (remix_ds's batches) with the study's stopping: the counter reads each step's loss
    (far above 1e-4 in three epochs of the tiny model), so the stage runs its epochs."""
    out = tmp_path / "run"
    text = STAGE_RECIPE.format(out=out).replace("log_every: 1,", "log_every: 1, stop: loss, loss_patience: 4,") + "study_except: [order]\n"
    path = write_recipe(tmp_path / "r.yaml", text)
    res = run_cli([sys.executable, "launch/stage1.py", "--config", str(path)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.load(open(out / "default" / "stage1" / "DONE.json"))["summary"]
    assert done["stopped_by"] == "epochs" and done["epochs"] == 3 and done["final_loss"] > 0.01

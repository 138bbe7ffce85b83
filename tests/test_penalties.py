"""The continual-learning penalties (remix_ds/penalties.py: KL, EWC, L2) against plain torch: the KL term against a
direct computation on the tiny model, the Fisher against a plain per-example loop, every term's gradient against
finite differences; LoRA's KL without a second model; and one process against two ranks under ZeRO-2 and ZeRO-3."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli, write_recipe


def _examples(tiny_dir, n=6):
    from remix_ds.data.formatting import collate, encode_examples, pad_id_of
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.model import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    enc, _ = encode_examples(tok, kvr_examples(n, seed=3), 64)
    return enc, collate(enc, pad_id_of(tok)), pad_id_of(tok)


def _stage(tiny_dir, finetune="full"):
    """What a penalty asks of its stage: the input model and the mode."""
    return SimpleNamespace(input=lambda: (tiny_dir, []), spec=SimpleNamespace(finetune=finetune), name="t/stage2",
                           k=2)


def _plain_kl(ref_model, model, batch):
    """sum over answer positions of KL(ref || current), from the full logits of both models (plain torch)."""
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
        cur = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
    keep = batch["labels"][:, 1:] != -100
    return float((ref.exp() * (ref - cur)).sum(-1)[keep].sum())


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_kl_is_zero_at_the_start_and_equals_a_direct_computation(finetune, tiny_dir, one_process_dist, monkeypatch):
    import transformers

    from remix_ds.config import LoraSpec, RegularizerSpec
    from remix_ds.engine import build_engine
    from remix_ds.penalties import KLPenalty, PenaltyContext
    from remix_ds.zero import resolve_ds_config

    enc, batch, _ = _examples(tiny_dir)
    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):
        loads.append(a[0])
        return real(cls, *a, **kw)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    pen = KLPenalty(RegularizerSpec(method="kl", weight=1.0))
    pen.prepare(PenaltyContext(stage=_stage(tiny_dir, finetune), tokenizer=None, dtype=torch.float32,
                               device=torch.device("cpu")))
    cfg = resolve_ds_config("zero2", global_batch_size=len(enc), micro_batch_size=len(enc), grad_accum=1,
                            grad_clip=1.0, precision="fp32", hidden_size=128, finetune=finetune)
    torch.manual_seed(0)
    eng = build_engine(tiny_dir, finetune, LoraSpec(r=8, alpha=16), cfg, torch.float32, lr=2e-2, betas=(0.9, 0.95),
                       weight_decay=0.0, total_steps=10, warmup_ratio=0.0, penalties=[pen])
    # LoRA: the reference is the adapter disabled, no second model; full fine-tuning: one frozen copy
    assert len(loads) == (1 if finetune == "lora" else 2)
    assert (pen.reference is None) == (finetune == "lora")

    def term():
        _, terms = eng.engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return float(terms["kl"].detach())
    assert abs(term()) < 1e-6   # the stage-start model is the reference
    n = sum(e.num_answer_tokens for e in enc)
    for _ in range(3):
        eng.micro_step(batch, 1.0 / n)
        eng.step()
    base = real(transformers.AutoModelForCausalLM, tiny_dir).eval()
    expected = _plain_kl(base, eng.module.eval(), batch)
    assert expected > 1e-3
    assert term() == pytest.approx(expected, rel=1e-4)
    eng.close()


def test_fisher_equals_a_plain_per_example_loop(tiny_dir):
    from transformers import AutoModelForCausalLM

    from remix_ds.config import LoraSpec
    from remix_ds.penalties import diagonal_fisher, fisher_model

    enc, _, pad = _examples(tiny_dir, n=5)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    params = dict(plain.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for e in enc:
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([e.labels])
        logp = torch.log_softmax(plain(input_ids=ids).logits[0, :-1], -1)
        pos = (labels[0, 1:] != -100).nonzero().squeeze(1)
        ll = logp[pos, labels[0, 1:][pos]].sum()
        grads = torch.autograd.grad(ll, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            expected[n] += g ** 2 / len(enc)

    full = diagonal_fisher(fisher_model(tiny_dir, SimpleNamespace(finetune="full"), torch.float64,
                                        torch.device("cpu")), enc, pad, torch.device("cpu"))
    assert set(full) == set(expected)
    for n in expected:
        torch.testing.assert_close(full[n].double(), expected[n], rtol=1e-6, atol=1e-12)
    assert sum(float(f.sum()) for f in full.values()) > 0

    spec = SimpleNamespace(finetune="lora", lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    lora = diagonal_fisher(fisher_model(tiny_dir, spec, torch.float64, torch.device("cpu")), enc, pad,
                           torch.device("cpu"))
    # one entry per adapted layer (PEFT's module names), the Fisher of its base weight
    assert len(lora) == 2 * plain.config.num_hidden_layers
    for name, f in lora.items():
        weight = name.replace("base_model.model.", "", 1) + ".weight"
        torch.testing.assert_close(f.double(), expected[weight], rtol=1e-6, atol=1e-12)


def _objective(tiny_dir, finetune, pen, fisher=None):
    """A float64 tiny model (LoRA: with an adapter) in the objective, the penalty attached, then moved away from
    the stage start so that every term is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from remix_ds.objective import AnswerLoss
    from remix_ds.penalties import PenaltyContext, fisher_names

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    if finetune == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                 lora_dropout=0.0))
    if fisher:
        pen.fisher = {n: torch.rand_like(w, dtype=torch.float64) for n, w in fisher_names(model).items()}
        if finetune == "full":
            pen.fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    pen.prepare(PenaltyContext(stage=_stage(tiny_dir, finetune), tokenizer=None, dtype=torch.float64,
                               device=torch.device("cpu"))) if pen.name == "kl" else None
    fisher_set = dict(pen.fisher) if fisher else None
    obj = AnswerLoss(model, [pen])
    pen.attach(obj)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return obj, model, fisher_set


@pytest.mark.parametrize("method,finetune", [("kl", "full"), ("kl", "lora"), ("kl-probe", "full"), ("kl-probe", "lora"),
                                             ("ewc", "full"), ("ewc", "lora"), ("l2", "full")])
def test_each_penalty_has_the_gradient_of_its_value(method, finetune, tiny_dir):
    """d term / d weight against central finite differences (float64 weights) at a few coordinates of two weights:
    EWC and L2 are quadratic (exact), KL goes through the model (its fp32 RMSNorm bounds the agreement)."""
    from remix_ds.config import RegularizerSpec
    from remix_ds.penalties import EWCPenalty, KLPenalty, L2Penalty

    _, batch, pad = _examples(tiny_dir, n=4)
    probe = method == "kl-probe"
    method = "kl" if probe else method
    spec = RegularizerSpec(method=method, tokens="P" if probe else "answers", probe_batch=3)
    pen = {"kl": KLPenalty, "ewc": EWCPenalty, "l2": L2Penalty}[method](spec)
    if probe:   # another dataset's examples, all their tokens
        pen.set_probe(_examples(tiny_dir, n=7)[0][3:], pad)
    obj, model, _ = _objective(tiny_dir, finetune, pen, fisher=method == "ewc")

    def value():
        _, terms = obj(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return terms[method]
    v = value()
    assert float(v.detach()) > 1e-8
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    picks = [trained[1], trained[-2]]
    grads = torch.autograd.grad(v, [p for _, p in picks])
    g = torch.Generator().manual_seed(1)
    for (name, p), grad in zip(picks, grads):
        assert float(grad.abs().sum()) > 0, name
        for i in torch.randint(0, p.numel(), (3,), generator=g).tolist():
            eps = 1e-3   # the model's RMSNorm computes in fp32 even in a float64 model: not smaller
            with torch.no_grad():
                p.view(-1)[i] += eps
            up = float(value().detach())
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            down = float(value().detach())
            with torch.no_grad():
                p.view(-1)[i] += eps
            fd = (up - down) / (2 * eps)
            assert float(grad.view(-1)[i]) == pytest.approx(fd, rel=1e-2 if method == "kl" else 1e-6, abs=1e-6), \
                (name, i)


def test_kl_on_a_probe_set_is_the_mean_over_its_tokens_and_walks_through_it(tiny_dir):
    """tokens: <dataset>: the mean KL over every next-token position of this step's probe batch (prompt and
    answer), against plain torch; the batch moves on after each optimizer step, and a checkpoint keeps where."""
    from transformers import AutoModelForCausalLM

    from remix_ds.config import RegularizerSpec
    from remix_ds.data.formatting import collate
    from remix_ds.penalties import KLPenalty

    _, batch, pad = _examples(tiny_dir, n=2)
    probe = _examples(tiny_dir, n=9)[0][2:]
    pen = KLPenalty(RegularizerSpec(method="kl", tokens="P", probe_batch=3))
    pen.set_probe(probe, pad)
    obj, model, _ = _objective(tiny_dir, "full", pen)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    for step in range(3):   # 7 probe examples, 3 per step: 0-2, 3-5, 6,0,1
        pb = collate([probe[(3 * step + i) % 7] for i in range(3)], pad)
        with torch.no_grad():
            ref = torch.log_softmax(base(input_ids=pb["input_ids"]).logits[:, :-1], -1)
            cur = torch.log_softmax(model(input_ids=pb["input_ids"]).logits[:, :-1], -1)
        real = pb["attention_mask"][:, 1:].bool()
        expected = float((ref.exp() * (ref - cur)).sum(-1)[real].mean())
        _, terms = obj(batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert float(terms["kl"].detach()) == pytest.approx(expected, rel=1e-6)
        assert expected > 1e-4
        pen.after_step()
    assert pen.state_dict() == {"cursor": 9 % 7}
    other = KLPenalty(RegularizerSpec(method="kl", tokens="P", probe_batch=3))
    other.load_state_dict(pen.state_dict())
    assert other.state_dict() == pen.state_dict()


def test_a_parameter_penalty_is_the_sum_of_the_ranks_slices(tiny_dir, monkeypatch):
    """Each rank penalises its own slice (ZeRO-3's split of every flattened weight): the slices' terms of two
    'ranks' add up to the whole penalty, and the whole penalty is the plain sum of F (theta - theta*)^2."""
    from remix_ds import dist
    from remix_ds.config import RegularizerSpec
    from remix_ds.penalties import EWCPenalty

    _, batch, _ = _examples(tiny_dir, n=2)
    values, fisher = [], None
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        monkeypatch.setattr(dist, "world_size", lambda w=world: w)
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        pen = EWCPenalty(RegularizerSpec(method="ewc"))
        obj, model, fisher_set = _objective(tiny_dir, "full", pen, fisher=True)
        fisher = fisher_set if world == 1 else fisher
        _, terms = obj(batch["input_ids"], batch["attention_mask"], batch["labels"])
        values.append(float(terms["ewc"]))
        if world == 1:   # plain: the same seed gives the same anchors, Fisher and move
            from transformers import AutoModelForCausalLM
            start = dict(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).named_parameters())
            plain = sum(float((fisher[n] * (p.detach() - start[n].detach()) ** 2).sum())
                        for n, p in model.named_parameters() if n in fisher)
    assert values[0] == pytest.approx(plain, rel=1e-9)
    assert values[1] + values[2] == pytest.approx(values[0], rel=1e-9)
    assert 0 < values[1] < values[0] and 0 < values[2] < values[0]


@pytest.mark.parametrize("method", ["ewc", "l2"])
def test_a_tied_weight_is_penalised_once(method, tiny_dir):
    """A model whose output layer shares the embedding (tied weights, as Llama 3.2 1B has): the shared weight is
    anchored and penalised once, under the name the Fisher has it by (named_parameters' first)."""
    from transformers import AutoModelForCausalLM

    from remix_ds.config import RegularizerSpec
    from remix_ds.objective import AnswerLoss
    from remix_ds.penalties import EWCPenalty, L2Penalty

    _, batch, _ = _examples(tiny_dir, n=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    model.lm_head.weight = model.model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    pen = (EWCPenalty if method == "ewc" else L2Penalty)(RegularizerSpec(method=method))
    fisher = {n: torch.rand_like(q) for n, q in model.named_parameters()} if method == "ewc" else None
    pen.fisher = dict(fisher) if fisher else None
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    obj = AnswerLoss(model, [pen])
    pen.attach(obj)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    _, terms = obj(batch["input_ids"], batch["attention_mask"], batch["labels"])
    plain = sum(float(((fisher[n] if fisher else 1.0) * (q.detach() - start[n]) ** 2).sum())
                for n, q in model.named_parameters())
    assert float(terms[method].detach()) == pytest.approx(plain, rel=1e-9)


RECIPE = """
name: pen
output_dir: {out}
model: tiny
ds_config: zero2
max_seq_length: 48
datasets:
  A: {{source: kvr, num_examples: 16}}
  B: {{source: kvrB, num_examples: 16}}
eval: {{batch_size: 32}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 1, lr: 3.0e-3, global_batch_size: 8, packing: false}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 8, log_every: 1,
          packing: false}}
variants:
  - name: kl-z2
    stage2: {{regularizer: {{method: kl, weight: 1.0}}}}
  - name: kl-z3
    stage2: {{ds_config: zero3, regularizer: {{method: kl, weight: 1.0}}}}
  - name: ewc-z2
    stage2: {{regularizer: {{method: ewc, weight: 1000.0, fisher_samples: 8}}}}
  - name: ewc-z3
    stage2: {{ds_config: zero3, regularizer: {{method: ewc, weight: 1000.0, fisher_samples: 8}}}}
  - name: klA-z3
    stage2: {{ds_config: zero3, regularizer: {{method: kl, weight: 1.0, tokens: A, probe_batch: 4}}}}
"""


def _steps(out, variant):
    return [r for r in map(json.loads, open(out / variant / "stage2" / "train_log.jsonl")) if "loss" in r]


def test_full_fine_tuning_kl_and_ewc_train_alike_on_one_process_and_two_ranks(tmp_path):
    """The same stage-2 losses and penalty values on one process and on two ranks under ZeRO-2 and ZeRO-3 (the
    reference model partitioned, the anchors and Fisher split by rank; KL on D_A's tokens too, a second forward of
    the partitioned model per micro-batch)."""
    runs = {}
    for name, launcher in (("one", [sys.executable]), ("two", ["deepspeed", "--num_gpus", "2"])):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(out=out))
        res = run_cli(launcher + ["launch/pipeline.py", "--config", str(recipe)])
        assert res.returncode == 0, res.stderr[-4000:]
        runs[name] = out
    two_cfg = json.load(open(runs["two"] / "kl-z3" / "stage2" / "config.json"))
    assert two_cfg["world_size"] == 2 and two_cfg["ds_config"]["zero_optimization"]["stage"] == 3
    for variant in ("kl-z2", "kl-z3", "ewc-z2", "ewc-z3", "klA-z3"):
        one, two = _steps(runs["one"], variant), _steps(runs["two"], variant)
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
        method = variant.split("-")[0].rstrip("A")   # klA: kl on D_A's tokens
        assert one[0]["penalties"][method] == pytest.approx(0.0, abs=1e-6)   # the stage start
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), variant
            assert b["penalties"][method] == pytest.approx(a["penalties"][method], rel=2e-3, abs=1e-6), variant
        assert one[-1]["penalties"][method] > 1e-3
    # the penalty changed training: the naive stage 2 is not what the penalised ones are
    ewc, kl = _steps(runs["one"], "ewc-z2"), _steps(runs["one"], "kl-z2")
    assert ewc[-1]["loss"] != pytest.approx(kl[-1]["loss"], rel=1e-3)


REFUSED = """
name: refused
output_dir: {out}
model: tiny
max_seq_length: 48
datasets:
  A: {{source: kvr, num_examples: 8}}
  B: {{source: kvrB, num_examples: 8}}
stage1: {{data: A, finetune: lora, merge: false}}
stage2: {{data: B, finetune: lora}}
"""


@pytest.mark.parametrize("override,message", [
    ("stage1.regularizer=ewc", "regularizer ewc needs a previous stage"),
    ("stage2.regularizer={method: fisher}", "regularizer.method must be one of kl, ewc, l2"),
    ("stage2.regularizer={method: kl, tokens: C}", "regularizer.tokens is kl's: answers or a dataset"),
    ("stage2.regularizer={method: l2, tokens: A}", "regularizer.tokens is kl's"),
    ("stage2.regularizer={method: kl, weight: -1}", "regularizer.weight must be >= 0"),
])
def test_a_regularizer_it_cannot_serve_is_refused_when_the_recipe_loads(override, message, tmp_path):
    from remix_ds.config import load_recipe
    from remix_ds.errors import ConfigError

    p = write_recipe(tmp_path / "r.yaml", REFUSED.format(out=tmp_path / "run"))
    with pytest.raises(ConfigError, match=message):
        load_recipe(str(p), ["stage1.merge=true", override])


@pytest.mark.parametrize("method", ["kl", "ewc", "l2"])
def test_a_penalty_over_unmerged_earlier_adapters_is_refused_before_any_stage_trains(method, tmp_path):
    """The adapter-disabled model (KL) and the anchors (EWC, L2) would not be the stage-start model: refused by
    the recipe check, before stage 1 trains; with stage 1 merged the same recipe passes the check."""
    from remix_ds.config import load_recipe
    from remix_ds.errors import ConfigError
    from remix_ds.pipeline import check_recipe

    p = write_recipe(tmp_path / "r.yaml", REFUSED.format(out=tmp_path / "run"))
    r = load_recipe(str(p), [f"stage2.regularizer={method}"])
    assert r.variants[0].stages[1].regularizer.method == method and r.variants[0].stages[1].regularizer.weight == 1.0
    with pytest.raises(ConfigError, match="earlier adapters unmerged.*merge: true"):
        check_recipe(r, r.variants)
    assert not (tmp_path / "run").exists()
    merged = load_recipe(str(p), [f"stage2.regularizer={method}", "stage1.merge=true"])
    check_recipe(merged, merged.variants)


def test_the_bundled_baseline_recipe_compares_every_method_on_one_stage_1(tmp_path, tiny_dir):
    """remix_ds/recipes/baselines.yaml: naive, KL, EWC, L2, replay, joint and REMIX; every variant but remix trains
    the same stage 1 (the dry run plans it once and reuses it), and joint replays all of D_A exactly once."""
    from remix_ds.config import REPO_DIR, load_recipe
    from remix_ds.pipeline import plan

    r = load_recipe(str(REPO_DIR / "remix_ds" / "recipes" / "baselines.yaml"), [f"output_dir={tmp_path / 'run'}"])
    names = [v.name for v in r.variants]
    assert names == ["naive", "kl", "ewc", "l2", "replay", "joint", "remix"]
    regs = {v.name: v.stages[1].regularizer and v.stages[1].regularizer.method for v in r.variants}
    assert regs == {"naive": None, "kl": "kl", "ewc": "ewc", "l2": "l2", "replay": None, "joint": None, "remix": None}
    joint = r.variant("joint").stages[1].mix
    assert joint.source == "replay" and joint.ratio * r.datasets["B"].num_examples == r.datasets["A"].num_examples
    rows = plan(r, r.variants)
    stage1 = {row["variant"]: row["action"] for row in rows if row["stage"] == 1}
    assert stage1["naive"] == "train" and stage1["remix"] == "train"
    assert all(stage1[n] == "reuse" for n in names if n not in ("naive", "remix"))

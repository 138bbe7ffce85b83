"""Layer analysis: where in the network are the D_A factoids readable? (logit lens)

For every variant and stage model of a run, each layer's residual stream at the last prompt position
(``hidden_states`` of ``output_hidden_states=True``: 0 = the embeddings, l = the output of layer l) is
decoded through the model's final norm and LM head. Per layer we report, over the D_A factoids, the
share whose first answer token is the top-1 token there, its mean rank (1 = top) and mean probability.
The last layer is the model's own output, so its top-1 share is the teacher-forced accuracy of the
first answer token.

The study found that with REMIX factoids are readable in earlier layers and over more layers; the
summary fields make that comparable: ``first_layer_half`` is the first layer whose top-1 share reaches
half the last layer's, ``mean_top1_share`` the mean of the share over layers 1..L.

Models: ``<output_dir>/<variant>/stage<k>/model`` (full) or ``.../merged`` (LoRA, merged), or with
``--adapter`` the stage's base plus ``.../adapter``. Writes ``logit_lens.json``, ``logit_lens.md`` and
``logit_lens.png`` (one line per variant) to ``<output_dir>/analysis`` (or ``--out``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import dist
from .data.example import Example
from .data.formatting import answer_ids, pad_id_of, prompt_ids
from .files import write_json_atomic

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ models

def final_norm_and_head(model):
    """(final norm, LM head) of a causal LM, a PEFT model included."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    for path in ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                 "model.decoder.final_layer_norm", "language_model.model.norm"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj, head
    raise ValueError(f"{type(base).__name__}: cannot find the final norm for the logit lens")


# ------------------------------------------------------------------ the lens

@torch.no_grad()
def logit_lens(model, tokenizer, examples: Sequence[Example], batch_size: int, device: torch.device
               ) -> Dict[str, Any]:
    """Per layer (0 = embeddings .. L), over all ranks: the share of examples whose first answer token is
    top-1 at the last prompt position, its mean rank (1 = top) and mean probability."""
    model.eval()
    norm, head = final_norm_and_head(model)
    pad = pad_id_of(tokenizer)
    r, w = dist.rank(), dist.world_size()
    mine = list(range(r, len(examples), w))
    prompts = {i: prompt_ids(tokenizer, examples[i].prompt) for i in mine}
    golds = {i: answer_ids(tokenizer, examples[i].answer)[0] for i in mine}
    order = sorted(mine, key=lambda i: len(prompts[i]))
    sums: Optional[torch.Tensor] = None  # (L+1, 3): top1 count, rank sum, prob sum
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # right padding: positions are exact, the pads come after
            ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
            mask[row, :len(prompts[i])] = 1
        last = torch.tensor([len(prompts[i]) - 1 for i in chunk], device=device)
        gold = torch.tensor([golds[i] for i in chunk], device=device)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False)
        hs = out.hidden_states
        rows = torch.arange(len(chunk), device=device)
        per_layer = []
        for layer in range(len(hs)):
            if layer == len(hs) - 1:  # the model's own output (its hidden state already went through the norm)
                logits = out.logits[rows, last]
            else:
                logits = head(norm(hs[layer][rows, last]))
            logits = logits.float()
            g = logits[rows, gold]
            rank = (logits > g[:, None]).sum(-1) + 1
            prob = torch.softmax(logits, -1)[rows, gold]
            per_layer.append(torch.stack([(rank == 1).sum().double(), rank.sum().double(), prob.sum().double()]))
        batch_sums = torch.stack(per_layer).cpu()
        sums = batch_sums if sums is None else sums + batch_sums
    parts = dist.all_gather_object(sums)
    total = None
    for p in parts:
        if p is not None:
            total = p if total is None else total + p
    n = len(examples)
    if total is None or n == 0:
        return {"n": n, "layers": [], "top1_share": [], "mean_rank": [], "mean_prob": []}
    return {"n": n, "layers": list(range(total.shape[0])), "top1_share": (total[:, 0] / n).tolist(),
            "mean_rank": (total[:, 1] / n).tolist(), "mean_prob": (total[:, 2] / n).tolist()}


def summarize(lens: Dict[str, Any]) -> Dict[str, Any]:
    share = lens["top1_share"]
    if not share:
        return {"final_top1_share": None, "first_layer_half": None, "mean_top1_share": None}
    final = share[-1]
    first = next((l for l, s in enumerate(share) if final > 0 and s >= 0.5 * final), None)
    inner = share[1:] or share
    return {"final_top1_share": final, "first_layer_half": first, "mean_top1_share": sum(inner) / len(inner)}


# ------------------------------------------------------------------ a whole run

def stage_models(recipe, variant, k: int, adapter: bool = False) -> Optional[Tuple[str, List[str]]]:
    """The model of a complete stage k as (base directory, active adapters), or None if the stage has no
    complete output for the recipe's current config. Default: what evaluation scores (the full or merged
    model; with ``merge: false``, the base with the whole adapter stack). ``adapter``: a LoRA stage's own
    adapter unmerged, on the model it was trained on (with earlier unmerged adapters below it)."""
    from .stages import Stage

    stage = Stage(recipe, variant, k)
    if not stage.is_complete():
        return None
    own = stage.dir / "adapter"
    if adapter and stage.spec.finetune != "full" and own.is_dir():
        base, frozen = stage.input()
        return base, frozen + [str(own)]
    return stage.output()


def analyze(recipe, variants: Optional[List[str]] = None, stages: Optional[List[int]] = None, *,
            dataset: Optional[str] = None, adapter: bool = False, batch_size: int = 64,
            max_examples: Optional[int] = None, out_dir: Optional[str] = None, plot: bool = True) -> Dict[str, Any]:
    """The logit lens of every (variant, stage) model of a run on D_A; writes json/md/png on rank 0."""
    from .data import dataset_examples
    from .zero import resolve_precision, torch_dtype
    from .errors import ConfigError
    from .model import load_for_eval, load_tokenizer

    vs = [recipe.variant(v) for v in variants] if variants else recipe.variants
    stages = stages or list(range(1, recipe.num_stages + 1))
    bad = [k for k in stages if not 1 <= k <= recipe.num_stages]
    if bad:
        raise ConfigError(f"--stage {bad[0]}: the recipe has stages 1..{recipe.num_stages}")
    if dataset is not None and dataset not in recipe.datasets:
        raise ConfigError(f"--dataset {dataset!r}: not a dataset of the recipe (known: {', '.join(recipe.datasets)})")
    dtype = torch_dtype(resolve_precision(recipe.precision))
    out_dir = out_dir or os.path.join(recipe.output_dir, "analysis")
    result: Dict[str, Any] = {"recipe": recipe.name, "output_dir": recipe.output_dir, "adapter": adapter,
                              "stages": stages, "variants": {}, "missing": []}
    cache: Dict[str, List[Example]] = {}
    for v in vs:
        key = dataset or v.stages[0].data
        if key not in cache:
            exs = dataset_examples(recipe, key)
            cache[key] = exs[:max_examples] if max_examples else exs
        entry = {"dataset": key, "stages": {}}
        for k in stages:
            found = stage_models(recipe, v, k, adapter=adapter)
            if found is None:
                result["missing"].append(f"{v.name}/stage{k}")
                if dist.is_main():
                    log.warning("%s/stage%d: no complete output of this config in %s; skipped", v.name, k,
                                os.path.join(recipe.output_dir, v.name, f"stage{k}"))
                continue
            base, adapters = found
            model = load_for_eval(base, dtype, dist.device(), adapters=adapters)
            tok = load_tokenizer(base)
            lens = logit_lens(model, tok, cache[key], batch_size, dist.device())
            lens.update(summarize(lens))
            lens.update({"model": adapters[-1] if adapters else base, "base": base if adapters else None,
                         "adapters": adapters})
            entry["stages"][str(k)] = lens
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if dist.is_main():
                s = lens
                log.info("%s/stage%d: top-1 share by layer %s (first layer at half the final share: %s)", v.name, k,
                         " ".join(f"{x:.2f}" for x in s["top1_share"]), s["first_layer_half"])
        result["variants"][v.name] = entry
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        if plot:
            fig = plot_lens(result, os.path.join(out_dir, "logit_lens.png"))
            result["figure"] = os.path.basename(fig) if fig else None
        write_json_atomic(os.path.join(out_dir, "logit_lens.json"), result)
        tmp = os.path.join(out_dir, "logit_lens.md.tmp")
        with open(tmp, "w") as f:
            f.write(markdown(result))
        os.replace(tmp, os.path.join(out_dir, "logit_lens.md"))
    dist.barrier()
    return result


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Logit lens: {result['recipe']}", "",
             "Each layer's residual stream at the last prompt position, decoded through the final norm and the "
             "LM head. top1: share of D_A factoids whose first answer token is the top-1 token at that layer; "
             "rank: its mean rank (1 = top). Layer 0 is the embeddings; the last layer is the model's output. "
             "first_layer_half: first layer whose top-1 share reaches half the last layer's; mean_top1_share: "
             "mean over layers 1..L." + (" Models: base + adapter." if result.get("adapter") else ""), ""]
    names = list(result["variants"])
    for k in result["stages"]:
        have = [n for n in names if str(k) in result["variants"][n]["stages"]]
        if not have:
            continue
        lines += [f"## Stage {k} models", ""]
        lines.append("| variant | n | final top-1 share | first_layer_half | mean_top1_share |")
        lines.append("|---|---|---|---|---|")
        for n in have:
            s = result["variants"][n]["stages"][str(k)]
            lines.append(f"| {n} | {s['n']} | {_f(s['final_top1_share'])} | {_f(s['first_layer_half'])} | "
                         f"{_f(s['mean_top1_share'])} |")
        lines.append("")
        n_layers = max(len(result["variants"][n]["stages"][str(k)]["layers"]) for n in have)
        lines.append("| layer | " + " | ".join(f"{n} top1 | {n} rank" for n in have) + " |")
        lines.append("|---|" + "---|---|" * len(have))
        for layer in range(n_layers):
            cells = []
            for n in have:
                s = result["variants"][n]["stages"][str(k)]
                ok = layer < len(s["layers"])
                cells += [_f(s["top1_share"][layer]) if ok else "-", f"{s['mean_rank'][layer]:.1f}" if ok else "-"]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("missing"):
        lines += ["Not found (skipped): " + ", ".join(result["missing"]), ""]
    return "\n".join(lines)


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def plot_lens(result: Dict[str, Any], path: str) -> Optional[str]:
    """One row per stage: top-1 share and mean rank (log scale) by layer, one line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = [k for k in result["stages"] if any(str(k) in e["stages"] for e in result["variants"].values())]
    if not stages:
        return None
    fig = Figure(figsize=(11, 3.8 * len(stages)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(stages), 2, squeeze=False)
    for row, k in enumerate(stages):
        a, b = axes[row]
        for name, e in result["variants"].items():
            s = e["stages"].get(str(k))
            if not s:
                continue
            a.plot(s["layers"], s["top1_share"], marker="o", markersize=3, label=name)
            b.plot(s["layers"], s["mean_rank"], marker="o", markersize=3, label=name)
        a.set_ylim(-0.03, 1.03)
        a.set_xlabel("layer (0 = embeddings)")
        a.set_ylabel("share top-1")
        a.set_title(f"Stage {k} models: D_A first answer token is top-1")
        b.set_yscale("log")
        b.set_xlabel("layer (0 = embeddings)")
        b.set_ylabel("mean rank (1 = top)")
        b.set_title(f"Stage {k} models: mean rank of the first answer token")
        a.legend(fontsize=8)
        b.legend(fontsize=8)
        for ax in (a, b):
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path

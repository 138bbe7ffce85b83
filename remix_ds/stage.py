"""One training stage on DeepSpeed: data -> engine -> steps -> stopping rule -> save.

``StageRun(stage).run()`` runs on every rank; only rank 0 writes shared files. Its steps, in order: clear what an
earlier run of another config left (``prepare_dir``), the data (``load_data``), the engine (``build``), a checkpoint
to resume from (``resume``), then epochs of steps (``train_epoch``) each followed by the tracked accuracies and the
stopping rule, and finally the outputs (``save``). The loop's state is one dataclass (``LoopState``), which is also
what a checkpoint records. Where the stage's files live: ``stages.py``; batching: ``batching.py``; checkpoints and
Ctrl-C: ``checkpoints.py``; the loss and its penalties: ``objective.py`` and ``penalties.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import dist, study, tracking
from .adapters import local_model_dir
from .batching import TokenCount, batch_plan, epoch_order, global_step, packs, study_global_step, throughput
from .checkpoints import InterruptAtStep, StageInterrupted, latest_checkpoint, prune_checkpoints, truncate_log
from .data import dataset_examples, is_factoid, stage_train_set
from .data.formatting import Encoded, collate, encode_examples, pad_id_of
from .engine import build_engine
from .errors import ConfigError
from .evaluate import teacher_forced_accuracy
from .files import read_json, write_json_atomic
from .model import load_tokenizer, param_count
from .modes import mode_of
from .penalties import PenaltyContext, build_penalties
from .stages import Stage
from .zero import adapter_tensor_size, describe_zero, resolve_ds_config, torch_dtype, zero_stage

log = logging.getLogger(__name__)

__all__ = ["LoopState", "StageRun", "StageInterrupted", "train_stage"]


def train_stage(stage: Stage) -> Dict[str, Any]:
    """Train a stage (resuming from a checkpoint of its config) and write its outputs; its summary."""
    return StageRun(stage).run()


@dataclass
class LoopState:
    """Where the loop is; a checkpoint records it and a resume starts from it. ``s``: the next step of ``epoch``;
    ``below``: the loss rule's count; ``t``: seconds since the stage started (across resumes); ``tokens``: the
    padding-free tokens trained on, the token positions run and the seconds spent in training steps."""
    step: int = 0
    epoch: int = 0
    s: int = 0
    below: int = 0
    accs: Dict[str, float] = field(default_factory=dict)
    last_loss: float = float("nan")
    t: float = 0.0
    tokens: Dict[str, float] = field(default_factory=lambda: {"real": 0, "ran": 0, "seconds": 0.0})


class Window:
    """The steps since the last log line: loss sums on the device (one host sync when it is logged)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.last = torch.zeros((), dtype=torch.float64, device=device)   # study: the step's last micro-batch
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens = 0          # answer tokens of the window (the loss's denominator), or study micro-batches
        self.real = 0            # prompt + answer tokens of the window, all ranks
        self.ran = TokenCount()  # token positions this rank ran, padding included
        self.steps = 0
        self.t0 = time.time()


class StageRun:
    """One stage's training run (see the module docstring for its steps)."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.spec, self.recipe = stage, stage.spec, stage.recipe
        self.out = stage.dir
        self.world, self.rank = dist.world_size(), dist.rank()
        self.micro, self.gas = batch_plan(self.world, self.spec.global_batch_size, self.spec.micro_batch_size)
        self.precision = stage.precision
        self.layout = stage.checkpoint_layout(self.world)
        self.trackers_asked = tracking.requested(self.spec)
        tracking.check_trackers(self.trackers_asked, stage.name)
        self.penalties = build_penalties(self.spec)
        for p in self.penalties:
            p.check(stage)
        self.state = LoopState()
        self.stopped_by = "epochs"
        self.stop_asked = False

    # ------------------------------------------------------------ the lifecycle
    def run(self) -> Dict[str, Any]:
        self.prepare_dir()
        self.load_data()
        self.build()
        self.resume()
        self.open_logs()
        st, spec = self.state, self.spec
        self.t0 = time.time() - st.t
        self.last_ckpt = time.time()
        self.interrupt = InterruptAtStep().install()
        self.bar = self.new_bar(st.epoch, st.s)
        first = st.epoch
        for epoch in range(first, spec.epochs):
            if self.open_ended and epoch > first:
                self.bar.close()
                self.bar = self.new_bar(epoch, 0)
            self.train_epoch(epoch)          # its steps, log windows, step checkpoints; Ctrl-C mid-epoch raises
            st.epoch, st.s = epoch + 1, 0
            self.evaluate_epoch()            # the tracked sets' teacher-forced accuracy
            if self.stopped_by == "loss" or self.accuracy_reached():
                break
            if self.stop_asked:              # Ctrl-C at the epoch's last step: after its evaluation and rule
                self.stop_interrupted()
            # every save_every steps, and at an epoch end once checkpoint_minutes passed since the last one
            self.checkpoint(force=self.minutes_due() and epoch + 1 < spec.epochs)
            self.window.t0 = time.time()     # evaluation and checkpoints are not training time
        self.bar.close()
        self.interrupt.restore()
        return self.save()

    # ------------------------------------------------------------ set-up
    def prepare_dir(self) -> None:
        """Find a checkpoint of this config to resume from; remove what an earlier run of another config left."""
        stage, spec, out = self.stage, self.spec, self.out
        found = None
        if dist.is_main() and spec.resume == "auto":
            try:
                found = latest_checkpoint(stage.checkpoints, stage.hash, self.layout)
            except ConfigError as e:
                found = e
        found = dist.broadcast_object(found)
        if isinstance(found, ConfigError):   # every rank raises it, none waits in a collective
            raise found
        self.resume_tag = found
        # a resumed stage keeps the batching packing: auto chose when it started (a new measurement could choose
        # the other, and the resumed steps would round differently from an uninterrupted run's)
        cfg = read_json(out / "config.json") if found is not None else None
        self.resumed_packing = dist.broadcast_object(cfg.get("packing") if cfg and "packing_auto" in cfg else None)
        if dist.is_main():
            ckpts = stage.checkpoints
            if found is None and spec.resume == "auto" and ckpts.is_dir() and any(ckpts.iterdir()):
                log.warning("%s: the checkpoints in %s are of another config (%s); deleting them and starting the "
                            "stage afresh", stage.name, ckpts, stage.config_change() or "no record of it")
            elif (out / "DONE.json").exists():
                log.info("%s: retraining (%s)", stage.name, stage.config_change() or "no record of the earlier config")
            out.mkdir(parents=True, exist_ok=True)
            stale = ["DONE.json", "model", "adapter", "merged", "eval", "fisher"]
            if found is None:
                stale += ["train_log.jsonl", "checkpoints", "probe_logits.pt", "tensorboard", "wandb", "mlflow_run_id"]
            # and what a killed save left: <name>.tmp-<pid> directories and files (files.atomic_save)
            for p in [out / name for name in stale] + sorted(out.glob("*.tmp-*")):
                shutil.rmtree(p) if p.is_dir() else (p.unlink() if p.exists() else None)
        dist.barrier()

    def load_data(self) -> None:
        """The tokenizer, the encoded training set, the sets whose accuracy is tracked, and the batching plan."""
        stage, spec, recipe = self.stage, self.spec, self.recipe
        self.base, self.frozen = stage.input()
        self.tok = load_tokenizer(self.base)
        self.pad = pad_id_of(self.tok)
        self.data, train = stage_train_set(recipe, spec, stage.k)
        # overlong: drop chose examples that fit already; nothing of such a stage is ever truncated
        self.enc, self.dropped = encode_examples(self.tok, train, recipe.max_seq_length, what=stage.name,
                                                 truncate=recipe.datasets[spec.data].overlong != "drop")
        if not self.enc:
            raise ConfigError(f"{stage.name}: every example is longer than max_seq_length={recipe.max_seq_length}")
        self.n_mix = sum(1 for ex in train if ex.role == "mix")
        factoid = is_factoid(recipe, spec.data)
        self.own_eval = [e for e in self.enc if train[e.index].role == "train"] if factoid else []
        if spec.stop == "accuracy" and not self.own_eval:
            raise ConfigError(f"{stage.name}: stop: accuracy needs a factoid dataset; {spec.data!r} is not")
        self.tracked: Dict[str, List[Encoded]] = {}
        if spec.track:
            for j in range(1, stage.k + 1):
                key = stage.variant.stages[j - 1].data
                if key not in self.tracked and is_factoid(recipe, key):
                    self.tracked[key] = self.own_eval if j == stage.k and key == spec.data else \
                        encode_examples(self.tok, dataset_examples(recipe, key), 10 ** 9)[0]
        self.plan_batches()

    def plan_batches(self) -> None:
        """How each epoch is dealt into steps: remix_ds's seeded order in global batches (padded or packed), or
        under ``semantics: study`` (remix_ds/study.py) the study's sampler order and micro-batches, its
        EOS-labelled padding to the longest example of the set, its per-micro-batch mean loss and its never-reset
        stopping counter."""
        recipe, spec, enc = self.recipe, self.spec, self.enc
        study_order, study_pad = recipe.follows_study("order"), recipe.follows_study("padding")
        self.study_stop = spec.stop == "loss" and recipe.follows_study("stopping")
        self.plan = study.epoch_steps(len(enc), self.world, self.micro, self.gas, recipe.seed) if study_order else None
        if self.plan is not None and not self.plan:
            raise ConfigError(f"{self.stage.name}: {len(enc)} examples fill no micro-batch of {self.micro} on each of "
                              f"{self.world} ranks (the study's loader drops a short last batch); lower "
                              f"global_batch_size")
        width = study.pad_width(enc) if study_pad else 0
        eos = self.tok.eos_token_id
        # the study's EOS-labelled padding to `width`, and the positions it trains per example (with remix_ds's
        # order, study_except: [order], global_step takes both); the study's micro-batches are padded either way
        self.study_make = (lambda mb: study.collate(mb, eos, width)) if width else None
        self.study_count = (lambda e: study.labelled_count(e, width)) if width else None
        self.plan_make = self.study_make or (lambda mb: collate(mb, self.pad))
        # rows of at most this many tokens (0: padding); the study's batches are padded
        self.pack = recipe.max_seq_length if packs(spec.packing) and not (study_order or study_pad) else 0
        self.steps_per_epoch = len(self.plan) if self.plan is not None else math.ceil(len(enc) / spec.global_batch_size)
        self.total_steps = self.steps_per_epoch * spec.epochs
        # a stopping rule ends the stage at an epoch no one knows in advance: the bar counts the epoch's steps
        self.open_ended = spec.stop != "fixed"

    def build(self) -> None:
        """The resolved ds_config, config.json, the penalties' preparation and the DeepSpeed engine."""
        stage, spec, recipe = self.stage, self.spec, self.recipe
        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(self.base)
        self.ds_cfg = resolve_ds_config(stage.ds_config_name, global_batch_size=spec.global_batch_size,
                                        micro_batch_size=self.micro, grad_accum=self.gas, grad_clip=spec.grad_clip,
                                        precision=self.precision, hidden_size=mcfg.hidden_size,
                                        finetune=spec.finetune, adapt=spec.adapt_zero,
                                        adapter_tensor_size=adapter_tensor_size(spec.lora.r, mcfg))
        self.dtype = torch_dtype(self.precision)
        if dist.is_main():
            write_json_atomic(str(self.out / "config.json"), {
                "variant": stage.variant.name, "stage": stage.k, "hash": stage.hash, "base_model": self.base,
                "frozen_adapters": self.frozen, "world_size": self.world, "precision": self.precision,
                "micro_batch_size": self.micro, "gradient_accumulation_steps": self.gas,
                "steps_per_epoch": self.steps_per_epoch, "spec": dataclasses.asdict(spec), "ds_config": self.ds_cfg,
                "recipe": stage.settings(), "packing": bool(self.pack),
                "n_data": len(self.data), "n_mix": self.n_mix, "n_dropped": self.dropped})
            log.info("%s: %s on %s (%d examples + %d mixing, %d dropped), %s, %d steps/epoch, global batch %d = %d x %d "
                     "x %d ranks%s", stage.name, spec.finetune, spec.data, len(self.data), self.n_mix, self.dropped,
                     describe_zero(self.ds_cfg, stage.ds_config_name), self.steps_per_epoch, spec.global_batch_size,
                     self.micro, self.gas, self.world,
                     "".join(f", + {p.weight:g} x {p.name}" for p in self.penalties))
        ctx = PenaltyContext(stage=stage, tokenizer=self.tok, dtype=self.dtype, device=dist.device())
        for p in self.penalties:   # before the trained model loads (EWC's Fisher pass loads a copy of its own)
            p.prepare(ctx)
        torch.manual_seed(recipe.seed * 7 + stage.k)  # adapter initialisation (and any dropout) is reproducible
        self.eng = build_engine(self.base, spec.finetune, spec.lora, self.ds_cfg, self.dtype, lr=spec.lr,
                                betas=spec.betas, weight_decay=spec.weight_decay, total_steps=self.total_steps,
                                warmup_ratio=spec.warmup_ratio, warmup_from_zero=recipe.follows_study("schedule"),
                                frozen_adapters=self.frozen, gradient_checkpointing=spec.gradient_checkpointing,
                                penalties=self.penalties)
        # packing: auto times packed against padded forwards of one global batch and keeps the faster
        if self.pack and spec.packing == "auto" and self.plan is None:
            if self.resumed_packing is not None:
                self.pack = self.pack if self.resumed_packing else 0
                self.record_packing(bool(self.resumed_packing), {"rule": "resumed: the choice of the stage's first start"})
            else:
                self.choose_packing()
        trainable = [p for p in self.eng.module.parameters() if p.requires_grad]
        self.n_trainable = param_count(trainable)
        self.trainable_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
        self.window = Window(self.eng.device)

    def choose_packing(self) -> None:
        """``packing: auto``: pack or pad by a measurement (remix_ds.attention.choose_packing), logged and recorded
        in config.json (``packing``, ``packing_auto``)."""
        from .attention import choose_packing

        if self.eng.zero_stage == 3:
            # ZeRO-3 prefetches parameters along the module trace its forwards recorded, and forwards without a
            # backward (the measurement) leave parameters in flight that the final gather then trips on: no
            # measurement there, the earlier rule (pack on CPU, pad on CUDA, where packed 4-D-mask steps ran slower)
            packed = self.eng.device.type != "cuda"
            self.pack = self.pack if packed else 0
            self.record_packing(packed, {"rule": f"ZeRO-3: by device ({self.eng.device.type})"})
            return
        G = self.spec.global_batch_size
        sample = [self.enc[i] for i in epoch_order(len(self.enc), self.recipe.seed, self.stage.k, 0)[:G]]
        packed, how = choose_packing(self.eng, sample, self.world, self.gas, self.rank, self.pad, self.pack)
        self.pack = self.pack if packed else 0
        self.record_packing(packed, how)

    def record_packing(self, packed: bool, how: Dict[str, Any]) -> None:
        """packing: auto's choice into config.json, and a log line saying why (``how["rule"]``, and what was timed)."""
        if dist.is_main():
            written = read_json(self.out / "config.json")
            write_json_atomic(str(self.out / "config.json"), {**written, "packing": packed, "packing_auto": how})
            timed = (f"forward of one global batch: packed {how['packed_forward_s']:.4f}s with {how['packed_kernel']}, "
                     f"padded {how['padded_forward_s']:.4f}s; ") if "packed_forward_s" in how else ""
            log.info("%s: packing: auto chose %s (%s%s)", self.stage.name, "packing" if packed else "padding", timed,
                     how["rule"])

    def resume(self) -> None:
        if self.resume_tag is None:
            return
        cs = self.eng.load_checkpoint(str(self.stage.checkpoints), self.resume_tag)
        self.state = LoopState(**cs["loop"])
        torch.set_rng_state(cs["rng"])
        if torch.cuda.is_available() and len(cs.get("cuda_rng", ())) == self.world:   # each rank its own device's
            torch.cuda.set_rng_state(cs["cuda_rng"][self.rank])
        for p in self.penalties:
            p.load_state_dict(cs.get("penalties", {}).get(p.name, {}))
        if dist.is_main():
            truncate_log(self.stage.train_log, self.state.step)
            log.info("%s: resumed from checkpoint %s (step %d, epoch %d)", self.stage.name, self.resume_tag,
                     self.state.step, self.state.epoch)
        dist.barrier()

    def open_logs(self) -> None:
        """train_log.jsonl (rank 0) and the trackers asked for (report_to)."""
        stage = self.stage
        self.log_f = open(stage.train_log, "a") if dist.is_main() else None
        self.trackers = tracking.open_trackers(
            self.trackers_asked, self.out, self.state.step, stage.name, self.recipe.name,
            {"stage": stage.k, "variant": stage.variant.name, "spec": dataclasses.asdict(self.spec)},
            re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.recipe.name}-{stage.variant.name}-stage{stage.k}-{stage.hash}"),
            self.recipe.output_dir, dist.is_main())

    def record(self, obj: Dict[str, Any]) -> None:
        if self.log_f:
            self.log_f.write(json.dumps(obj) + "\n")
            self.log_f.flush()
        if self.trackers is not None:
            self.trackers.log(obj)

    # ------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> None:
        st, spec, enc, G = self.state, self.spec, self.enc, self.spec.global_batch_size
        order = epoch_order(len(enc), self.recipe.seed, self.stage.k, epoch) if self.plan is None else None
        log_every = 1 if spec.stop == "loss" else spec.log_every
        last = self.steps_per_epoch - 1
        for s in range(st.s if epoch == st.epoch else 0, self.steps_per_epoch):
            w = self.window
            if self.plan is None:
                chunk = [enc[i] for i in order[s * G:(s + 1) * G]]
                w.loss += global_step(self.eng, chunk, self.world, self.gas, self.rank, self.pad, self.pack, w.ran,
                                      self.study_make, self.study_count)
                w.tokens += sum(self.study_count(e) if self.study_count else e.num_answer_tokens for e in chunk)
            else:
                slots = [[enc[i] for i in slot] for slot in self.plan[s]]
                chunk = [e for slot in slots for e in slot]
                means, w.last, n_mb = study_global_step(self.eng, slots, self.world, self.gas, self.rank,
                                                        self.plan_make, w.ran)
                w.loss += means
                w.tokens += n_mb   # the loss is a mean of micro-batch means: count micro-batches
            st.step += 1
            w.steps += 1
            w.real += sum(len(e.input_ids) for e in chunk)
            self.bar.update(1)
            # a checkpoint keeps no open loss window: flush it at every checkpoint step too (and at a Ctrl-C on one
            # process; several ranks agree on it in the window's collective)
            self.stop_asked = False
            if st.step % log_every == 0 or s == last or self.step_checkpoint_due() or \
                    (self.interrupt.requested and self.world == 1):
                self.log_window(epoch, s)
                if self.loss_rule_stops():
                    self.stopped_by = "loss"
                    return
            if self.stop_asked and s < last:
                self.stop_interrupted(next_epoch=epoch, next_s=s + 1)
            if self.stop_asked:   # at the epoch's last step: after the epoch's evaluation and stopping rule
                return
            if s < last:
                st.epoch, st.s = epoch, s + 1
                if self.checkpoint():
                    self.window.t0 = time.time()

    def log_window(self, epoch: int, s: int) -> None:
        """One collective and one host sync per window: the loss, the positions run, the penalties and a Ctrl-C
        request, summed over the ranks; one train_log line."""
        st, w, eng = self.state, self.window, self.eng
        dev = eng.device
        pen = eng.take_penalty_log()
        sums = torch.stack([w.loss, torch.tensor(float(w.ran.ran), dtype=torch.float64, device=dev), w.last,
                            torch.tensor(float(self.interrupt.requested), dtype=torch.float64, device=dev),
                            *pen.values()])
        loss_sum, ran_all, last_sum, asked, *pen_sums = dist.all_reduce_sum(sums).tolist()
        self.stop_asked = asked > 0
        secs = max(time.time() - w.t0, 1e-9)
        # study order: each rank counted its own micro-batches (the same number on every rank)
        st.last_loss = loss_sum / max(1, w.tokens * (self.world if self.plan is not None else 1))
        self.last_step_loss = last_sum / self.world if self.plan is not None else st.last_loss
        tp = throughput(w.real, ran_all, secs)
        penalties = {name: v / max(1, w.steps) for name, v in zip(pen, pen_sums)}
        self.record({"step": st.step, "epoch": epoch + (s + 1) / self.steps_per_epoch, "loss": st.last_loss,
                     **({"penalties": penalties} if penalties else {}),
                     "lr": eng.lr(), "time": round(time.time() - self.t0, 3), **tp})
        st.tokens = {"real": st.tokens["real"] + w.real, "ran": st.tokens["ran"] + int(ran_all),
                     "seconds": st.tokens["seconds"] + secs}
        self.bar.set_postfix(loss=f"{st.last_loss:.4g}", lr=f"{eng.lr():.2g}",
                             tok_s=f"{tp['padfree_tokens_per_s']:.0f}", **self.rule_status(),
                             **{k: f"{v:.3g}" for k, v in penalties.items()})
        w.reset()

    def loss_rule_stops(self) -> bool:
        """The loss rule, checked at each logged step (every step under stop: loss)."""
        st, spec = self.state, self.spec
        if self.study_stop:   # the study's rule on its step loss: the last micro-batch's, averaged over ranks
            counter = study.StopCounter(spec.loss_threshold, spec.loss_patience, st.below)
            # (remix_ds's order, study_except: [order]: the step's loss over its trained positions)
            stop = counter.update(self.last_step_loss)
            st.below = counter.count
            return stop
        if spec.stop == "loss":
            st.below = st.below + 1 if st.last_loss < spec.loss_threshold else 0
            return st.below >= spec.loss_patience
        return False

    def evaluate_epoch(self) -> None:
        st = self.state
        if not self.tracked:
            return
        self.eng.eval()
        st.accs = {key: teacher_forced_accuracy(self.eng.predict, e, max(self.micro, 16), self.pad)
                   for key, e in self.tracked.items()}
        self.record({"epoch": st.epoch, "step": st.step, "teacher_forced_accuracy": st.accs,
                     "time": round(time.time() - self.t0, 3)})
        if dist.is_main():
            target = " (stops at 1.000)" if self.spec.stop == "accuracy" else ""
            self.bar.write(f"{self.stage.name} epoch {st.epoch}: loss {st.last_loss:.4g}, "
                           + ", ".join(f"acc[{key}] {v:.3f}" for key, v in st.accs.items()) + target)

    def accuracy_reached(self) -> bool:
        if self.spec.stop != "accuracy":
            return False
        acc = self.state.accs.get(self.spec.data)
        if acc is None:
            self.eng.eval()
            acc = teacher_forced_accuracy(self.eng.predict, self.own_eval, max(self.micro, 16), self.pad)
        if acc >= 1.0:
            self.stopped_by = "accuracy"
            return True
        return False

    # ------------------------------------------------------------ progress
    def new_bar(self, epoch: int, first: int):
        """A fixed stage's bar counts every step of the stage; under a stopping rule, the epoch's steps (its ETA is
        the epoch's) with how far the rule is."""
        name = self.stage.name + (f" epoch {epoch + 1} (at most {self.spec.epochs})" if self.open_ended else "")
        return tqdm(total=self.steps_per_epoch if self.open_ended else self.total_steps,
                    initial=first if self.open_ended else self.state.step, desc=name, disable=not dist.is_main(),
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def rule_status(self) -> Dict[str, str]:
        if self.spec.stop == "accuracy":
            acc = self.state.accs.get(self.spec.data)
            return {"acc": f"{acc:.3f}/1.000" if acc is not None else "-/1.000"}
        if self.spec.stop == "loss":
            return {"below": f"{self.state.below}/{self.spec.loss_patience}"}
        return {}

    # ------------------------------------------------------------ checkpoints
    def step_checkpoint_due(self) -> bool:
        return bool(self.spec.save_every) and self.state.step % self.spec.save_every == 0

    def minutes_due(self) -> bool:
        """An epoch-end checkpoint once checkpoint_minutes passed since the last one (a bounded cost: one save per
        that many minutes; a kill loses at most that much and an epoch)."""
        return self.spec.checkpoint_minutes > 0 and time.time() - self.last_ckpt >= 60 * self.spec.checkpoint_minutes

    def checkpoint(self, force: bool = False) -> bool:
        """A checkpoint of the state now (``state.epoch``/``state.s``: where a resume continues), when due."""
        if not (force or self.step_checkpoint_due()):
            return False
        st, spec, root = self.state, self.spec, self.stage.checkpoints
        self.last_ckpt = time.time()
        st.t = time.time() - self.t0
        # make room first, so that no more than keep_checkpoints complete ones exist at any moment (a kill
        # between the new marker and a later prune would leave one too many); keep 1: prune after instead
        if dist.is_main():
            prune_checkpoints(root, max(1, spec.keep_checkpoints - 1))
            if self.trackers is not None:
                self.trackers.flush()   # a resume starts after this step: events up to it must be on disk
        dist.barrier()   # no rank starts writing the new tag while rank 0 removes incomplete ones
        client = {"loop": dataclasses.asdict(st), "rng": torch.get_rng_state(),
                  "penalties": {p.name: p.state_dict() for p in self.penalties}}
        if torch.cuda.is_available():   # LoRA dropout on a GPU draws from each rank's CUDA generator
            client["cuda_rng"] = dist.all_gather_object(torch.cuda.get_rng_state())
        self.eng.save_checkpoint(str(root), f"step{st.step}", client,
                                 marker={"step": st.step, "hash": self.stage.hash, **self.layout})
        if dist.is_main() and spec.keep_checkpoints == 1:
            prune_checkpoints(root, 1)
        return True

    def stop_interrupted(self, next_epoch: Optional[int] = None, next_s: int = 0) -> None:
        """Ctrl-C: a checkpoint at this step boundary, then out of the stage with where it stopped."""
        st = self.state
        if next_epoch is not None:
            st.epoch, st.s = next_epoch, next_s
        self.bar.close()
        self.interrupt.restore()
        self.checkpoint(force=True)
        raise StageInterrupted(
            f"{self.stage.name} interrupted after step {st.step} (epoch {st.epoch + (1 if st.s else 0)}); checkpoint "
            f"{self.stage.checkpoints / f'step{st.step}'} written: the same command resumes the stage from there")

    # ------------------------------------------------------------ outputs
    def save(self) -> Dict[str, Any]:
        """The trained model or adapter (and its merge), DONE.json; the stage's summary."""
        stage, spec, st, out, eng = self.stage, self.spec, self.state, self.out, self.eng
        train_seconds = time.time() - self.t0
        tp = throughput(st.tokens["real"], st.tokens["ran"], st.tokens["seconds"])   # the whole stage
        if dist.is_main() and tp["tokens_per_s"] is not None:
            log.info("%s: %d steps, %d tokens in %.1f s of training steps: %.0f tokens/s (%.0f run, padding %.1f%%)",
                     stage.name, st.step, st.tokens["real"], st.tokens["seconds"], tp["padfree_tokens_per_s"],
                     tp["tokens_per_s"], 100 * tp["padding"])
        if spec.stop == "accuracy" and self.stopped_by != "accuracy" and dist.is_main():
            log.warning("%s: accuracy stop not reached in %d epochs (last accuracy %.3f); raise epochs or lr",
                        stage.name, spec.epochs, st.accs.get(spec.data, float("nan")))
        save_dtype = self.dtype if spec.save_dtype == "auto" else torch_dtype(spec.save_dtype)
        if spec.probe:
            eng.eval()
            probe = collate(self.own_eval[:8] or self.enc[:8], self.pad)
            with torch.no_grad():
                logits = eng.logits(probe).float().cpu()
            if dist.is_main():
                torch.save({"batch": probe, "logits": logits}, out / "probe_logits.pt")
        mode = mode_of(spec)
        mode.save(eng, out, self.tok, save_dtype)
        eng.close()
        self.eng = eng = None  # free the engine before merging
        if mode.merges(spec.merge):
            if dist.is_main():
                # shard by shard on CPU; a QLoRA adapter goes into the NF4-dequantised 16-bit weights
                stats = mode.merge(local_model_dir(self.base), self.frozen, out, save_dtype, self.dtype)
                log.info("%s: merged %d adapted weights into %s (peak RSS %.2f GiB)", stage.name, stats["merged"],
                         out / "merged", stats["peak_rss_gib"])
            dist.barrier()
        summary = {"variant": stage.variant.name, "stage": stage.k, "finetune": spec.finetune, "epochs": st.epoch,
                   "steps": st.step, "stopped_by": self.stopped_by, "final_loss": st.last_loss,
                   "train_seconds": round(train_seconds, 6), "teacher_forced_accuracy": st.accs,
                   "n_data": len(self.data), "n_mix": self.n_mix, "n_dropped": self.dropped,
                   "zero_stage": zero_stage(self.ds_cfg), "trainable_parameters": self.n_trainable,
                   "trainable_dtypes": self.trainable_dtypes, "tokens": st.tokens["real"],
                   "tokens_run": st.tokens["ran"], "step_seconds": round(st.tokens["seconds"], 6), **tp}
        if self.penalties:
            summary["regularizer"] = dataclasses.asdict(spec.regularizer)
        if dist.is_main():
            if self.log_f:
                self.log_f.close()
            if self.trackers is not None:
                self.trackers.close()
            write_json_atomic(str(out / "DONE.json"), {"hash": stage.hash, "summary": summary})
            shutil.rmtree(stage.checkpoints, ignore_errors=True)  # the final output supersedes them
        dist.barrier()
        return summary

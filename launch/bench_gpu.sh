#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md, as one prepared run for a single-GPU machine with no network.
#
# Needs: python3 with torch (CUDA), transformers, peft, accelerate, safetensors, tokenizers, filelock, pyyaml,
# tqdm, psutil; and deepspeed, pydantic (+ pydantic_core, annotated-types, typing-inspection), hjson and
# english-words, which a machine without network gets as wheels unpacked to a folder on PYTHONPATH beforehand:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# Nothing is downloaded: the Llama-3.2-1B and Llama-3-8B shapes get random bf16 weights written locally
# (about 2.5 GB and 16 GB under $REMIX_DS_CACHE) with the tiny model's locally trained tokenizer.
#
# Runs (core cases: batch 64 x 64 tokens, bf16, 3 warm-up + 10 timed steps per case; the plain loop of each mode
# is timed in the same process, right before the DeepSpeed configs it is compared with; every DeepSpeed case runs
# as a stage would: on one GPU ZeRO-3 runs as ZeRO-2 (so full:zero3 is left out: BENCH_ZERO3=1 adds it), and
# LoRA/QLoRA from zero2 run without ZeRO under autocast). Each part also runs the study-shape case of its mode
# (study:MODE, remix_ds/bench.py run_study): D_A factoids alone and mixed 1:2 with random-word passages at global
# batch 32, seconds per D_A epoch of the plain loop (pad-to-longest) and of the stage's path packed (torch's
# varlen_attn where the probe passes, else sdpa_groups), padded and packed with the 4-D mask, in the same process;
# the tiny tokenizer, passages sized to the study's 130-200 Llama-3 tokens (BENCH_STUDY=0 leaves them out):
#   1. llama-1b: full fine-tuning, plain vs ZeRO-2; padding comparison (naive padded batching vs the
#      stage's packing, then pad-to-longest and packing again with cuDNN attention excluded from SDPA, in the
#      same process: torch puts cuDNN first on sm90/sm100 with cuDNN >= 9.15, and cuDNN builds an execution graph
#      per attention shape, which packed batches change every step; docs/benchmarks.md); study:full
#   2. llama-8b: generation vs teacher-forced scoring; LoRA r=16 on all linear layers, plain vs zero2; study:lora
#   3. llama-8b QLoRA (NF4) r=16, plain vs zero2; study:qlora (skipped with BENCH_QLORA=0, or when bitsandbytes
#      is missing)
#   3a. llama-1b padding comparison on a 1 passage : 4 factoids mix (BENCH_PADDING_MINORITY=0 leaves it out)
#   3b. only with BENCH_CUDNN_OFF=1: the llama-1b padding comparison again in a process started with cuDNN
#      attention deprioritized (TORCH_CUDNN_SDPA_DEPRIORITIZED=1), a second check of part 1's no-cuDNN cases
#   4. only with BENCH_AS_WRITTEN=1: llama-8b LoRA with zero2 as written (DeepSpeed bf16 ZeRO-2), to compare
# Expected: about 6 to 8 minutes on one H100/H200 (much of it writing and loading the 8B weights; not yet timed
# with the study cases). Each part has its own time limit (190 s, 250 s, 150 s: the first three fit one 600 s
# device call; then 100 s, 120 s, 180 s), so that a hang cannot lose the other parts' results.
#
# Results: JSON lines appended to $OUT/bench.jsonl when OUT is set (else runs/bench.jsonl), the console log
# beside them (bench_gpu.log), and torch.profiler operator tables of 2 more steps of each training case and of
# the plain loop it is compared with (bench.profile-<shape>-<case>.txt; BENCH_PROFILE=0: none). Optional:
# BENCH_OFFLOAD=1 adds full:zero2_offload on the 1B shape (CPU AdamW, slower); BENCH_STEPS / BENCH_WARMUP change
# the step counts; BENCH_EVAL=0 leaves out the evaluation case; BENCH_PADDING_WORDS / BENCH_PADDING_MIX_RATIO set
# the padding comparison's passages (default 8 + 8 random words, one per factoid: the demo's mix; with the tiny
# model's tokenizer, 50 words per half makes ~520-token passages that do not fit 64 x 576 tokens of a 1B
# model's full fine-tuning in 80 GB).
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR=${OUT:-runs}
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/bench.jsonl"
LOG="$RESULTS_DIR/bench_gpu.log"
export REMIX_DS_CACHE=${REMIX_DS_CACHE:-/tmp/remix_ds_cache}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY=${PYTHON:-python3}
STEPS=${BENCH_STEPS:-10}
WARMUP=${BENCH_WARMUP:-3}
COMMON=(--batch 64 --seq 64 --warmup "$WARMUP" --steps "$STEPS" --precision bf16 --lora-r 16 --out "$RESULTS")

exec > >(tee -a "$LOG") 2>&1
echo "== launch/bench_gpu.sh $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! "$PY" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "pydantic", "hjson", "english-words"):
    print(f"  {name} {md.version(name)}")
import deepspeed, peft, english_words  # noqa: F401  (fail here, not in the middle of the run)
EOF
then
    echo "bench_gpu.sh: missing packages (unpack the wheels to PYTHONPATH first: see the top of this script)"
    exit 2
fi
df -h "${REMIX_DS_CACHE%/*}" 2>/dev/null | tail -1 || true

status=0
run() {  # run LIMIT_SECONDS ARGS...: one bench process under its own time limit
    local limit=$1
    shift
    echo "== $(date -u +%T) launch/bench.py $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=20 "$limit" "$PY" launch/bench.py "$@" "${COMMON[@]}"
    local rc=$?
    echo "== exit $rc after $((SECONDS - t0)) s"
    [ $rc -ne 0 ] && status=1
    return 0
}

STUDY() { [ "${BENCH_STUDY:-1}" = 1 ] && echo ",study:$1"; }
CASES_1B="full:zero2"
[ "${BENCH_ZERO3:-0}" = 1 ] && CASES_1B="$CASES_1B,full:zero3"
[ "${BENCH_OFFLOAD:-0}" = 1 ] && CASES_1B="$CASES_1B,full:zero2_offload"
CASES_1B="$CASES_1B,padding$(STUDY full)"
PADDING=(--padding-mode full --padding-config zero2 --padding-words "${BENCH_PADDING_WORDS:-8}" --padding-mix-ratio "${BENCH_PADDING_MIX_RATIO:-1}")
run 190 --shape llama-1b --cases "$CASES_1B" "${PADDING[@]}" --profile "${BENCH_PROFILE:-2}"
CASES_8B="eval,lora:zero2$(STUDY lora)"
[ "${BENCH_EVAL:-1}" = 0 ] && CASES_8B="lora:zero2$(STUDY lora)"
run 250 --shape llama-8b --cases "$CASES_8B" --profile "${BENCH_PROFILE:-2}"
if [ "${BENCH_QLORA:-1}" = 1 ]; then
    if "$PY" -c "import bitsandbytes" 2>/dev/null; then
        run 150 --shape llama-8b --cases "qlora:zero2$(STUDY qlora)"
    else
        echo "== QLoRA skipped: bitsandbytes is not importable (add its wheel to .whl/)"
    fi
fi
# The parts below come after the core ones (whose limits sum to 590 s, one device call): each appends its own
# JSON lines, so a device call that ends during one of them keeps everything before it.
# The 1B padding comparison again where passages are a minority of the mix (1 passage : 4 factoids; on the CPU the
# stage's packing clears 2x pad-to-longest there, against at most 1.7x on the 1:1 mix); BENCH_PADDING_MINORITY=0: not run
if [ "${BENCH_PADDING_MINORITY:-1}" = 1 ]; then
    run 100 --shape llama-1b --cases padding "${PADDING[@]}" --padding-mix-ratio 0.25
fi
if [ "${BENCH_CUDNN_OFF:-0}" = 1 ]; then
    TORCH_CUDNN_SDPA_DEPRIORITIZED=1 TORCH_CUDNN_SDPA_PREFERRED=0 run 120 --shape llama-1b --cases padding "${PADDING[@]}" --profile "${BENCH_PROFILE:-2}"
fi
[ "${BENCH_AS_WRITTEN:-0}" = 1 ] && run 180 --shape llama-8b --cases lora:zero2 --no-adapt-zero

echo "== done in $SECONDS s; results in $RESULTS"
# the whole file as Markdown tables (what docs/benchmarks.md records), so the console tail carries the numbers
"$PY" launch/bench.py --summarize "$RESULTS" || true
exit $status

#!/usr/bin/env bash
# Builds .whl/ (git-ignored): the wheels a GPU machine without network needs for launch/bench_gpu.sh and the GPU
# smoke recipe, for its Python (3.12 by default) on manylinux x86-64, at the versions installed here, which are
# the versions the test suite ran with. DeepSpeed is published as a source archive only: its wheel is built here.
#
#   bash launch/gpu_wheels.sh                 # all of them (about 55 MiB; bitsandbytes is 41 MiB of it)
#   bash launch/gpu_wheels.sh --no-bitsandbytes --no-datasets   # what the bench needs without QLoRA (~13 MiB)
#   bash launch/gpu_wheels.sh --dry-run       # print the commands only
#
# On the GPU machine, from the repo root with .whl/ beside it (docs/benchmarks.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# Environment: GPU_PYTHON_VERSION (default 3.12), PYTHON (default python: the interpreter whose packages set the versions).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
DRY=0 BNB=1 DATASETS=1
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        --no-bitsandbytes) BNB=0 ;;
        --no-datasets) DATASETS=0 ;;
        *) echo "gpu_wheels.sh: unknown option $arg (--dry-run, --no-bitsandbytes, --no-datasets)" >&2; exit 2 ;;
    esac
done

version() {  # the installed version of a distribution, or a clear error
    "$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    sys.exit(f"gpu_wheels.sh: {sys.argv[1]} is not installed here (run the README set-up first)")' "$1"
}

# deepspeed's own dependencies the GPU machine lacks, english-words (tokenizer and mixing passages); datasets and
# its two dependencies for hub-format datasets; bitsandbytes for QLoRA
PKGS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson english-words)
[ "$DATASETS" = 1 ] && PKGS+=(datasets dill multiprocess)
[ "$BNB" = 1 ] && PKGS+=(bitsandbytes)
SPECS=()
for p in "${PKGS[@]}"; do
    SPECS+=("$p==$(version "$p")")
done
DS_SPEC="deepspeed==$(version deepspeed)"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

step() {
    echo "+ $*"
    [ "$DRY" = 1 ] || "$@"
}
step mkdir -p .whl
step "$PY" -m pip wheel "$DS_SPEC" --no-deps --no-build-isolation -w .whl
step "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${SPECS[@]}"
if [ "$DRY" = 0 ]; then
    du -sh .whl
    ls .whl
    size=$(du -sm .whl | cut -f1)
    [ "$size" -lt 64 ] || echo "gpu_wheels.sh: .whl is ${size} MiB; a device call carries at most 64 MiB in all" >&2
fi

#!/usr/bin/env bash
# lowbit end to end on one GPU machine, in one call of at most 8 minutes on one H100:
#   build the CUDA extension for the visible GPU's arch and print `python -m lowbit.env`; run every
#   test marked cuda and the Triton tests on the GPU (bit-exact with ref); check that no training step
#   synchronises with the host (torch.cuda.set_sync_debug_mode, every recipe); train the tiny config 30
#   steps per recipe on the GPU and on the CPU and judge each loss curve against the bf16 seed band;
#   run lowbit bench quantize qmatmul linear attention (CSVs plus a one-page summary).
# Each stage is time-boxed and a failed one does not stop the others; summary.md lists them all
# (PASS / FAIL / SKIP, seconds) and the exit status is 1 when one failed. scripts/gpu_check.py runs
# the stages and documents them.
#
#   scripts/gpu_check.sh            on the GPU machine (make gpu-check); no network needed there
#   scripts/gpu_check.sh --dry      every stage on CPU at tiny sizes (make gpu-check DRY=1; CI runs it)
#   scripts/gpu_check.sh wheels     here, with network: download the wheels the GPU machine lacks
#                                   into .gpu-wheels/ (make gpu-wheels), to carry along with the tree
#
# Environment:
#   OUT               where everything goes, the bench CSVs included ($OUT/bench/<machine>/); unset:
#                     gpu-check-out/, and a GPU run writes its CSVs to bench/results/<machine>/
#   DRY=1             same as --dry
#   PYTHON            the interpreter: default python3 on a GPU machine (its CUDA torch), .venv/bin/python
#                     with --dry (the Makefile's environment), python3 for `wheels`
#   GPU_CHECK_BUDGET  seconds for the whole call (default 470; 900 with --dry)
#   GPU_CHECK_PACK=1  pack logs/, train/ and plots into $OUT/gpu-check.tar.gz (for transports that
#                     bring back only a few files)
#   GPU_WHEELS        packages for `wheels` (default omegaconf==2.4.0, 0.25 MiB: the training config
#                     needs it and the GPU image lacks it; transformers, tokenizers, pytest, matplotlib
#                     are there; DeepSpeed serves no one-GPU stage, and torchao and bitsandbytes are only
#                     bench peers, whose columns then read "absent")
#   GPU_PYTHON_VERSION  the GPU machine's Python for `wheels` (default 3.12)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS_DIR="$ROOT/.gpu-wheels"
WHEELS_MAX_MIB=48  # the tree and carried folders travel within 64 MiB together: leave room for the tree

mode=gpu
case "${1:-}" in
    wheels) mode=wheels ;;
    --dry) mode=dry ;;
    "") ;;
    *) echo "usage: $0 [--dry | wheels]" >&2; exit 2 ;;
esac
case "${DRY:-}" in 1|yes|true) [ "$mode" = gpu ] && mode=dry ;; esac

if [ "$mode" = wheels ]; then
    PY="${PYTHON:-python3}"
    mkdir -p "$WHEELS_DIR"
    # Binary wheels only, for the GPU machine's interpreter and platform, not this one's; --no-deps
    # because everything the listed packages need is already in the GPU image.
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS_DIR" ${GPU_WHEELS:-omegaconf==2.4.0} || exit 1
    kib=$(du -sk "$WHEELS_DIR" | cut -f1)
    ls -l "$WHEELS_DIR"
    if [ "$kib" -gt $(( WHEELS_MAX_MIB * 1024 )) ]; then
        echo "gpu_check: $WHEELS_DIR holds $(( kib / 1024 )) MiB, over $WHEELS_MAX_MIB MiB: carry fewer packages" >&2
        exit 1
    fi
    echo "gpu_check: $WHEELS_DIR ready ($kib KiB); carry it with the tree to the GPU machine"
    exit 0
fi

if [ "$mode" = dry ]; then
    if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
    args=(--dry)
else
    PY="${PYTHON:-python3}"
    args=()
fi

if [ -n "${OUT:-}" ]; then
    out="$OUT"
else
    out="$ROOT/gpu-check-out"
    # Only a GPU run on a developer's machine writes into the repo's bench results.
    [ "$mode" = gpu ] && args+=(--bench-in-repo)
fi
mkdir -p "$out"
[ -n "${GPU_CHECK_BUDGET:-}" ] && args+=(--budget "$GPU_CHECK_BUDGET")

echo "gpu_check: $mode mode, $("$PY" --version 2>&1) at $PY, output in $out"
exec "$PY" scripts/gpu_check.py --out "$out" --wheels "$WHEELS_DIR" "${args[@]}"

#!/usr/bin/env bash
# Compile-checks the CUDA extension without a GPU: every csrc/cuda/*.cu with one nvcc -c for all
# target architectures (setup.py's cuda_targets: by default sm_80, sm_89, sm_90a, sm_100a and
# sm_120a, plus PTX of compute_80), every csrc/cuda/*.cpp with the host compiler, then links
# lowbit._C_cuda, imports it and compares its enum codes with lowbit/backends/codes.py and its
# recorded targets with the ones compiled (no device is touched).
# Flags are setup.py's (-O3, --expt-relaxed-constexpr, the -gencode list, the recorded targets)
# plus the ones torch.utils.cpp_extension adds; the C++ standard is the one the installed torch
# requires. nvcc compiles the targets of one file in parallel (--threads), the files run JOBS at a time.
#
# Environment: LOWBIT_CUDA_ARCHS ("80;90a") or TORCH_CUDA_ARCH_LIST ("8.0;9.0a"), as for setup.py
# (visible GPUs are not looked at: the check covers the default list), CUDA_HOME (/usr/local/cuda),
# JOBS (nproc), CUDA_CHECK_VENV (.venv-cuda), CUDA_CHECK_TORCH (torch==2.14.1), CUDA_CHECK_LINK
# (1; 0 skips the link and import step), CUDA_CHECK_SO (a path: keep the linked module there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${CUDA_CHECK_VENV:-.venv-cuda}"
TORCH_SPEC="${CUDA_CHECK_TORCH:-torch==2.14.1}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)

if [ ! -x "$NVCC" ]; then
    echo "cuda_check: nvcc not found at $NVCC (set CUDA_HOME)" >&2
    exit 1
fi

# A venv with a CUDA build of torch (its headers are what the extension compiles against).
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
    echo "cuda_check: installing $TORCH_SPEC into $VENV"
    "$PY" -m pip install -q "$TORCH_SPEC"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || {
        echo "cuda_check: $TORCH_SPEC in $VENV is not a CUDA build of torch" >&2; exit 1; }
fi

# Flags, include paths and libraries exactly as torch.utils.cpp_extension builds a CUDAExtension.
FLAGS_FILE="$(mktemp)"
"$PY" - "$ROOT" "$NVCC" > "$FLAGS_FILE" <<'EOF'
import glob, os, sys, sysconfig
import torch
from torch.utils import cpp_extension as ce

root = sys.argv[1]
sys.path.insert(0, root)
import setup  # the arch list and flags setup.py builds with

sass, ptx = setup.cuda_targets(os.environ, [], setup.nvcc_archs(sys.argv[2]))
print("GENCODE=(" + " ".join(setup.gencode_flags(sass, ptx)) + ")")
print("ARCHS=" + setup.recorded_archs(sass, ptx))
site = os.path.dirname(os.path.dirname(torch.__file__))
# Headers the CUDA wheels of torch carry (cuBLAS & co.) but a bare nvcc install may lack.
wheel_inc = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                   if os.path.exists(os.path.join(d, "cublas_v2.h")))
incs = [os.path.join(root, "csrc", "include")] + ce.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
common = ["-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
print("INCS=(" + " ".join(f"-I{p}" for p in incs) + ")")
print("AFTER=(" + " ".join(f"-isystem {p}" for p in wheel_inc) + ")")
print("NVCC_COMMON=(" + " ".join(ce.COMMON_NVCC_FLAGS + common) + ")")
print("CXX_COMMON=(" + " ".join(common) + ")")
# The C++ standard torch's headers need: ATen rejects anything before C++20 since torch 2.10.
aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
print("STD=" + ("c++20" if "202002L" in open(aten).read() else "c++17"))
lib_dirs = ce.library_paths(device_type="cuda") + [os.path.join(d, "..", "lib") for d in wheel_inc]
print("LIBDIRS=(" + " ".join(f"-L{p}" for p in lib_dirs) + ")")
print("RPATHS=(" + " ".join(f"-Wl,-rpath,{p}" for p in lib_dirs) + ")")
EOF
# shellcheck disable=SC1090
source "$FLAGS_FILE"
rm -f "$FLAGS_FILE"

shopt -s nullglob
CU=(csrc/cuda/*.cu)
CPP=(csrc/cuda/*.cpp)
if [ ${#CU[@]} -eq 0 ]; then
    echo "cuda_check: no csrc/cuda/*.cu files" >&2
    exit 1
fi

OBJ="$(mktemp -d)"
trap 'rm -rf "$OBJ"' EXIT

compile_one() {  # $1 = source; writes $OBJ/<name>.o and $OBJ/<name>.log, returns the compiler's status
    local src="$1" name
    name="$(basename "$src")"
    if [[ "$src" == *.cu ]]; then
        "$NVCC" -c "$src" -o "$OBJ/$name.o" -O3 "-std=$STD" --expt-relaxed-constexpr "${GENCODE[@]}" --threads 0 \
            "${NVCC_COMMON[@]}" -Xcompiler -fPIC -Xcompiler -Wall "${INCS[@]}" "${AFTER[@]}" \
            > "$OBJ/$name.log" 2>&1
    else
        c++ -c "$src" -o "$OBJ/$name.o" -O3 "-std=$STD" -fPIC -Wall "-DLOWBIT_CUDA_ARCHS=$ARCHS" "${CXX_COMMON[@]}" \
            "${INCS[@]}" "${AFTER[@]}" \
            > "$OBJ/$name.log" 2>&1
    fi
}

echo "cuda_check: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), torch $("$PY" -c 'import torch; print(torch.__version__)'), archs ${ARCHS}, -std=${STD}, ${JOBS} jobs"
pids=()
srcs=()
failed=0
for src in "${CU[@]}" "${CPP[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
    compile_one "$src" &
    pids+=($!)
    srcs+=("$src")
done
for i in "${!pids[@]}"; do
    src="${srcs[$i]}"
    log="$OBJ/$(basename "$src").log"
    if wait "${pids[$i]}"; then
        echo "  ok    $src"
        [ -s "$log" ] && sed 's/^/        /' "$log"
    else
        echo "  FAIL  $src"
        sed 's/^/        /' "$log"
        failed=1
    fi
done
if [ "$failed" -ne 0 ]; then
    echo "cuda_check: compile errors (above)" >&2
    exit 1
fi

if [ "${CUDA_CHECK_LINK:-1}" = "1" ]; then
    so="$OBJ/_C_cuda$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    if ! c++ -shared -o "$so" "$OBJ"/*.o "${LIBDIRS[@]}" "${RPATHS[@]}" \
            -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -ltorch_python -lcudart > "$OBJ/link.log" 2>&1; then
        echo "  FAIL  link"; sed 's/^/        /' "$OBJ/link.log"; exit 1
    fi
    # Loads the module (every symbol resolved, the bindings registered) on this GPU-less machine,
    # and checks that its enum codes are those of lowbit/backends/codes.py.
    if ! "$PY" - "$so" lowbit/backends/codes.py "$ARCHS" > "$OBJ/import.log" 2>&1 <<'EOF'
import importlib.util, sys
import torch  # noqa: F401  (loads libc10 / libtorch first, as lowbit does)

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

mod = load("lowbit._C_cuda", sys.argv[1])
missing = [f for f in ("quantize", "dequantize", "cast", "hadamard", "codes", "archs") if not hasattr(mod, f)]
if missing:
    sys.exit(f"lowbit._C_cuda lacks {missing}")
if mod.codes() != load("lowbit_codes", sys.argv[2]).TABLES:
    sys.exit(f"lowbit._C_cuda.codes() differs from lowbit/backends/codes.py: {mod.codes()}")
if mod.archs() != sys.argv[3]:
    sys.exit(f"lowbit._C_cuda.archs() is {mod.archs()!r}, compiled for {sys.argv[3]!r}")
print("archs:", mod.archs(), "functions:", ", ".join(sorted(n for n in dir(mod) if not n.startswith("_"))))
EOF
    then
        echo "  FAIL  import"; sed 's/^/        /' "$OBJ/import.log"; exit 1
    fi
    echo "  ok    link + import ($(tail -1 "$OBJ/import.log"))"
    if [ -n "${CUDA_CHECK_SO:-}" ]; then cp "$so" "$CUDA_CHECK_SO"; echo "  kept  $CUDA_CHECK_SO"; fi
fi
echo "cuda_check: passed in $(( $(date +%s) - start )) s"

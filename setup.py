"""Builds lowbit._C (C++ CPU kernels, always) and lowbit._C_cuda (only with a CUDA torch and nvcc).

The C++ standard is left to torch's BuildExtension (it requires C++17 or C++20 by version).
LOWBIT_BUILD_CUDA=1 forces the CUDA extension, =0 skips it. Its GPU targets (`cuda_targets`):
LOWBIT_CUDA_ARCHS ("80;90a"), else TORCH_CUDA_ARCH_LIST ("8.0;9.0a+PTX"), as given; else the
visible GPUs; else DEFAULT_CUDA_ARCHS; always with PTX of the lowest target, which newer GPUs
JIT-compile. The extension records its targets (`lowbit._C_cuda.archs()`), so a GPU it holds no
code for falls back to the next backend. A failed native build never breaks `import lowbit`:
ops fall back to `ref`. scripts/cuda_check.sh imports this file for `cuda_targets`.
"""
import glob
import os
import platform
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        has_avx2 = False
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                has_avx2 = " avx2" in f.read()
        flags.append("-march=x86-64-v3" if has_avx2 else "-march=x86-64-v2")
    elif machine in ("aarch64", "arm64"):
        flags.append("-march=armv8-a")
    return flags


def want_cuda(torch) -> bool:
    forced = os.environ.get("LOWBIT_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and CUDA_HOME is not None and shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is not None


# Without a list in the environment and without a visible GPU: A100 (8.0, and 8.6 / 8.7 by binary
# compatibility), L4 / RTX 4090 (8.9), H100 (9.0a), B200 (10.0a), RTX 5090 (12.0a).
DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0a;10.0a;12.0a"


def _arch_number(arch: str) -> int:
    return int(arch.rstrip("af"))


def parse_archs(spec: str) -> tuple[list[str], list[str]]:
    """A TORCH_CUDA_ARCH_LIST ("8.0;9.0a 10.0a+PTX") or LOWBIT_CUDA_ARCHS ("80;90a") -> (SASS, PTX) targets
    as nvcc names them without prefix ("80", "90a")."""
    sass, ptx = [], []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", entry)
        if not m:
            raise ValueError(f"CUDA arch list: cannot read {entry!r} in {spec!r} (expected e.g. 8.0, 9.0a, 12.0a+PTX)")
        arch = f"{m[1]}{m[2]}{m[3]}"
        sass.append(arch)
        if m[4]:
            ptx.append(arch)
    return sass, ptx


def cuda_targets(environ, visible, supported) -> tuple[list[str], list[str]]:
    """(SASS, PTX) targets. `visible`: the compute capabilities of the GPUs here; `supported`: the archs
    nvcc can build ("80", "90", ...; None: unknown). Lists from the environment are built as given
    (nvcc says if it cannot); the visible GPUs and the default are cut to what nvcc supports. GPUs
    from 9.0 on get their arch-specific target ("a"): it runs only there, which is where they are.
    PTX of the lowest target (arch-specific PTX runs on that one GPU only, so its portable form) is
    always added."""
    spec = environ.get("LOWBIT_CUDA_ARCHS") or environ.get("TORCH_CUDA_ARCH_LIST")
    if spec:
        sass, ptx = parse_archs(spec)
    else:
        wanted = ";".join(f"{major}.{minor}{'a' if major >= 9 else ''}" for major, minor in sorted(set(visible)))
        sass, ptx = parse_archs(wanted or DEFAULT_CUDA_ARCHS)
        if supported is not None:
            sass = [a for a in sass if str(_arch_number(a)) in supported] or sass
    if not sass:
        raise ValueError(f"CUDA arch list: no target in {spec!r}")
    lowest = str(_arch_number(min(sass, key=_arch_number)))
    sass = sorted(dict.fromkeys(sass), key=_arch_number)
    ptx = sorted(dict.fromkeys(ptx + [lowest]), key=_arch_number)
    return sass, ptx


def gencode_flags(sass: list[str], ptx: list[str]) -> list[str]:
    return ([f"-gencode=arch=compute_{a},code=sm_{a}" for a in sass]
            + [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx])


def recorded_archs(sass: list[str], ptx: list[str]) -> str:
    """What `lowbit._C_cuda.archs()` returns: "sm_80+sm_90a+compute_80" (no commas or quotes, which
    compiler command lines would split)."""
    return "+".join([f"sm_{a}" for a in sass] + [f"compute_{a}" for a in ptx])


def nvcc_archs(nvcc: str) -> set[str] | None:
    """The archs nvcc can build SASS for ("80", "90", ...), None where it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = set(re.findall(r"sm_(\d+)", out))
    return found or None


def visible_capabilities(torch) -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only builds (no torch yet): pure Python package
        return [], {}
    include = [os.path.join(ROOT, "csrc", "include")]
    exts = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        exts.append(CppExtension("lowbit._C", cpu_sources, include_dirs=include,
                                 extra_compile_args=cpu_flags(), extra_link_args=["-fopenmp"]))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if cuda_sources and want_cuda(torch):
        from torch.utils.cpp_extension import CUDA_HOME

        sass, ptx = cuda_targets(os.environ, visible_capabilities(torch),
                                 nvcc_archs(os.path.join(CUDA_HOME, "bin", "nvcc")))
        print(f"lowbit._C_cuda: building for {recorded_archs(sass, ptx)}")
        record = f"-DLOWBIT_CUDA_ARCHS={recorded_archs(sass, ptx)}"
        exts.append(CUDAExtension("lowbit._C_cuda", cuda_sources, include_dirs=include,
                                  extra_compile_args={"cxx": ["-O3", record],
                                                      "nvcc": ["-O3", "--expt-relaxed-constexpr"]
                                                      + gencode_flags(sass, ptx)}))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # pip (setuptools.build_meta) runs this file as __main__
    from setuptools import find_packages, setup

    ext_modules, cmdclass = extensions()
    setup(
        packages=find_packages(include=["lowbit", "lowbit.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )

"""Builds lowbit._C (C++ CPU kernels, always) and lowbit._C_cuda (only with a CUDA torch and nvcc).

The C++ standard is left to torch's BuildExtension (it requires C++17 or C++20 by version).
LOWBIT_BUILD_CUDA=1 forces the CUDA extension, =0 skips it; LOWBIT_CUDA_ARCHS (default "90a;100a")
picks the targets. A failed native build never breaks `import lowbit`: ops fall back to `ref`.
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

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
        archs = os.environ.get("LOWBIT_CUDA_ARCHS", "90a;100a").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        exts.append(CUDAExtension("lowbit._C_cuda", cuda_sources, include_dirs=include,
                                  extra_compile_args={"cxx": ["-O3"],
                                                      "nvcc": ["-O3", "--expt-relaxed-constexpr"] + gencode}))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["lowbit", "lowbit.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

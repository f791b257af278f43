"""Build and install unlearn_fast, with its C++/CUDA extension ``unlearn_fast._C`` (sources in csrc/).

    pip install --no-build-isolation -e .                 # CPU kernels; CUDA too when a GPU is visible
    UNLEARN_FAST_CUDA=1 pip install --no-build-isolation -e .   # force the CUDA kernels (no GPU needed to compile)
    UNLEARN_FAST_CUDA=0 ...                                # never build the CUDA kernels
    UNLEARN_FAST_NO_EXT=1 pip install -e .                 # pure Python: the ops use their PyTorch twins
    python setup.py build_ext --inplace                    # rebuild the extension in place only

torch must be installed first (the extension builds against it; hence --no-build-isolation). The CUDA
build targets sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise; it needs nvcc (CUDA_HOME) and
adds the include folders of the pip ``nvidia`` packages when present (cusparse.h etc. may live only there).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative: setuptools wants sources relative to setup.py
CUDA_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def _env_flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _nvidia_include_dirs() -> list:
    """Include folders of the pip nvidia-* packages (cu13 layout: nvidia/cu13/include; cu12: nvidia/*/include)."""
    try:
        import nvidia  # namespace package shipped by the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    seen, dirs = set(), []
    for d in found:
        if os.path.isdir(d) and d not in seen:
            seen.add(d)
            dirs.append(d)
    return dirs


def _extensions():
    """(ext_modules, cmdclass) for unlearn_fast._C, or ([], {}) when it is not to be built."""
    if _env_flag("UNLEARN_FAST_NO_EXT") in ("1", "true", "yes"):
        print("unlearn_fast: UNLEARN_FAST_NO_EXT=1, skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        print(f"unlearn_fast: torch not importable ({e}); skipping the extension. Install torch first, then "
              "`pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}

    cuda_flag = _env_flag("UNLEARN_FAST_CUDA")
    with_cuda = cuda_flag in ("1", "true", "yes") or (cuda_flag == "" and torch.cuda.is_available())
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]  # torch's BuildExtension adds its own -std (C++17/20 by torch version)
    kwargs = dict(name="unlearn_fast._C", include_dirs=[os.path.join(ROOT, CSRC)], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        cxx_flags.append("-DUNLEARN_FAST_WITH_CUDA")  # bindings.cpp registers the CUDA paths
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-DUNLEARN_FAST_WITH_CUDA"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags += CUDA_GENCODE  # torch adds no arch flags of its own when these are present
        kwargs["include_dirs"] += _nvidia_include_dirs()
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    print(f"unlearn_fast: building unlearn_fast._C ({'CPU + CUDA' if with_cuda else 'CPU'} kernels)", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="unlearn_fast",
    version="0.1.0",
    description="Fast machine unlearning for image-to-image generative models (Li et al., ICLR 2024)",
    python_requires=">=3.10",
    packages=find_packages(include=["unlearn_fast", "unlearn_fast.*"]),
    package_data={"unlearn_fast": ["data/*"]},
    install_requires=["torch>=2.11", "torchvision", "numpy", "Pillow", "tqdm", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["unlearn-fast = unlearn_fast.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

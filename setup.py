"""Build script of ssm_reduce.

The CUDA extension ``ssm_reduce._C`` (sources in ``csrc/``) is optional and controlled by
``SSM_REDUCE_BUILD_CUDA``:

* ``auto`` (default): build it only when torch has CUDA support and ``nvcc`` is found (a compile that
  fails then skips it, with a message);
* ``1``: build it and fail loudly if that is impossible;
* ``0``: never build it.

``TORCH_CUDA_ARCH_LIST`` selects the architectures (default: the visible GPU's, else sm_90) and
``MAX_JOBS`` bounds the parallel compile jobs. Without the extension everything runs on the torch
reference ops.
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
MODE = os.environ.get("SSM_REDUCE_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    raise SystemExit(f"SSM_REDUCE_BUILD_CUDA must be auto, 1 or 0, got {MODE!r}")


def cuda_sources():
    return sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").rglob("*") if p.suffix in (".cu", ".cpp"))


def why_no_cuda():
    """None when the extension can be built, else the reason it cannot."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc was not found (set CUDA_HOME)"
    if not cuda_sources():
        return "csrc/ holds no CUDA sources"
    return None


def cuda_extension():
    if MODE == "0":
        return [], {}
    reason = why_no_cuda()
    if reason is not None:
        if MODE == "1":
            raise SystemExit(f"SSM_REDUCE_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"ssm_reduce: skipping the CUDA extension ({reason}); the torch reference ops will be used")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    ext = CUDAExtension(
        name="ssm_reduce._C",
        sources=cuda_sources(),
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class OptionalBuild(base):
        """``auto``: a compile that fails (a CUDA toolkit without headers, say) skips the extension with a
        message instead of failing the install; ``1`` fails loudly."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # noqa: BLE001 - any compiler failure means the same here
                if MODE == "1":
                    raise
                print(f"ssm_reduce: the CUDA extension failed to build ({err}); the torch reference ops will be used")

    return [ext], {"build_ext": OptionalBuild}


ext_modules, cmdclass = cuda_extension()

setup(
    name="ssm_reduce",
    version="0.1.0",
    description="Token reduction and weight pruning for trained Mamba and Mamba-2 language models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",  # (transformers 5)
    packages=find_packages(include=["ssm_reduce", "ssm_reduce.*"]),
    package_data={"ssm_reduce": ["data/embedded/*", "data/embedded-hybrid/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.15",
        "einops>=0.7",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7.0", "hypothesis>=6.0"],
        "eval": ["lm-eval[hf]>=0.4.13", "matplotlib>=3.5"],
        "mamba": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
    },
    entry_points={"console_scripts": ["ssm-reduce=ssm_reduce.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

"""Build script. The C++/CUDA extension fastzo._C is optional; see docs/native.md.

- The CPU kernels (backend "cpp") are built whenever torch is importable at build time
  (``pip install --no-build-isolation``) and a C++ compiler works.
- The CUDA kernels (backend "cuda") are added only when torch itself was built with CUDA
  (``torch.version.cuda``) and nvcc is found. The CUDA toolkit is never probed otherwise.
- A failed build warns and installs the pure-Python package (backends torch/triton remain),
  unless ``FASTZO_STRICT_BUILD=1``, which makes it an error. ``FASTZO_SKIP_EXTENSION=1`` skips
  the extension.
"""

import os
import sys
import warnings

from setuptools import find_packages, setup



def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


STRICT = _flag("FASTZO_STRICT_BUILD")
# Headers the extension's sources include: a change rebuilds it.
DEPENDS = ["noise_contract.h", "kernels.h", "cpu_simd.h", "cpu_simd_body.inc"]
SKIP = _flag("FASTZO_SKIP_EXTENSION")


def _say(message: str) -> None:
    print(f"fastzo: {message}", file=sys.stderr)


def _openmp_flags(torch) -> list:
    """-fopenmp when torch's intra-op threads are OpenMP's, as in torch's own CPU kernels.

    ATen's ``at::parallel_for`` is inline in the headers and runs in parallel only where
    ``_OPENMP`` is defined when the extension itself is compiled; without the flag every pass
    runs on the calling thread whatever ``torch.set_num_threads`` says. The extension then
    needs libgomp.so.1, which the dynamic loader resolves to the copy torch has already loaded
    (torch/lib/libgomp.so.1 in the Linux wheels), so one OpenMP runtime and one thread pool
    serve both. ``FASTZO_NO_OPENMP=1`` builds without it (single-threaded passes).
    """
    if _flag("FASTZO_NO_OPENMP"):
        _say("FASTZO_NO_OPENMP is set: the CPU passes will run on one thread")
        return []
    if not torch.backends.openmp.is_available():
        # ATen's native thread pool: at::parallel_for calls into libtorch, no flag needed.
        return []
    if sys.platform.startswith("linux"):
        return ["-fopenmp"]
    _say(f"torch uses OpenMP but no OpenMP flags are known for {sys.platform}; "
         "the CPU passes will run on one thread")
    return []


def _native_extension():
    """(ext_modules, cmdclass) for fastzo._C, or ([], {}) when it cannot be built here."""
    if SKIP:
        _say("FASTZO_SKIP_EXTENSION is set: installing without the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # e.g. an isolated build environment without torch
        if STRICT:
            raise RuntimeError(
                "FASTZO_STRICT_BUILD=1 but torch cannot be imported at build time; install torch "
                "first and build with `pip install --no-build-isolation`"
            ) from exc
        _say(f"torch is not importable at build time ({exc}); installing without the extension. "
             "Install torch first and use `pip install --no-build-isolation` to build it.")
        return [], {}

    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "bindings.cpp"), os.path.join(csrc, "cpu_kernels.cpp")]
    # -ffp-contract=off: the update must round like the oracle's separate multiply and add.
    # -fno-math-errno, -fno-trapping-math (as torch itself is built): sqrtf becomes one
    # instruction and float compares may be evaluated unconditionally, so the loops vectorise.
    # Neither changes a computed value.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = []
    openmp = _openmp_flags(torch)
    cxx_flags += openmp
    link_flags += openmp
    define_macros = []
    with_cuda = False
    if torch.version.cuda is not None:
        # Only now is the toolkit looked for: CUDA_HOME is None when torch has no CUDA.
        nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
        with_cuda = bool(cpp_extension.CUDA_HOME) and os.path.exists(nvcc)
        if not with_cuda:
            _say(f"torch {torch.__version__} has CUDA {torch.version.cuda} but nvcc was not found "
                 "(set CUDA_HOME); building the CPU kernels only")
    if with_cuda:
        sources.append(os.path.join(csrc, "cuda_kernels.cu"))
        define_macros.append(("FASTZO_WITH_CUDA", "1"))
        # --fmad=false: no implicit FMA contraction, so the device rounds the update like the
        # oracle; the noise polynomials use explicit fmaf where they want it.
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]}
        extension = cpp_extension.CUDAExtension(
            "fastzo._C", sources, define_macros=define_macros, extra_compile_args=extra,
            extra_link_args=link_flags,
            depends=[os.path.join(csrc, name) for name in DEPENDS],
        )
    else:
        extension = cpp_extension.CppExtension(
            "fastzo._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            depends=[os.path.join(csrc, name) for name in DEPENDS],
        )

    class BuildNativeExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), made optional unless FASTZO_STRICT_BUILD=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if STRICT:
                    raise
                message = (
                    f"building the C++/CUDA extension fastzo._C failed ({type(exc).__name__}: "
                    f"{exc}); installing without it. Backends 'cpp'/'cuda' will be unavailable; "
                    "set FASTZO_STRICT_BUILD=1 to make this an error, FASTZO_SKIP_EXTENSION=1 "
                    "to skip it."
                )
                _say(message)
                warnings.warn(message)

        def get_outputs(self):
            # Only what was really built, so a failed build leaves nothing missing to install.
            return [path for path in super().get_outputs() if os.path.exists(path)]

        def get_output_mapping(self):
            mapping = super().get_output_mapping()
            return {dst: src for dst, src in mapping.items() if os.path.exists(src)}

    kind = "C++ and CUDA" if with_cuda else "C++ (CPU)"
    _say(f"building the {kind} extension fastzo._C with torch {torch.__version__}")
    return [extension], {"build_ext": BuildNativeExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extension()

setup(
    name="fastzo",
    version="0.1.0",
    description="Fused kernels for memory-efficient zeroth-order (MeZO) fine-tuning",
    packages=find_packages(include=["fastzo", "fastzo.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "tqdm", "transformers"],
        "test": ["pytest", "hypothesis", "scipy"],
    },
    entry_points={"console_scripts": ["fastzo=fastzo.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

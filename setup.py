"""Build script. The C++/CUDA extension fastzo._C is optional; see README "Native extension"."""

from setuptools import find_packages, setup

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
        "test": ["pytest", "scipy"],
    },
    entry_points={"console_scripts": ["fastzo=fastzo.cli:main"]},
)

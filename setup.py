from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="opacus_fast",
    version="0.1.0",
    description="Fast, exact DP-SGD for PyTorch: single-backward Book-Keeping clipping and true Poisson sampling "
    "as a drop-in extension of Opacus",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["opacus_fast", "opacus_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "opacus>=1.6,<1.7",
        "timm>=1.0",
        "prv-accountant>=0.2",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"dev": ["pytest", "ruff", "transformers", "peft"]},
)

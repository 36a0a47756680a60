"""iris-kernels: fused GPU kernels for IRIS self-play fine-tuning of LLMs.

Dependencies are loose lower bounds so users keep their own (CUDA) torch; the exact,
tested pins live in requirements/pinned.txt and are used by the Makefile and CI.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
about = {}
exec((here / "iris_kernels" / "_version.py").read_text(), about)

setup(
    name="iris-kernels",
    version=about["__version__"],
    description="Fused Triton kernels and losses for IRIS / SPIN self-play fine-tuning of LLMs",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["iris_kernels", "iris_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        # the Triton interpreter (CPU path) needs numpy, which triton does not declare
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.66", "psutil>=5.9"],
        "train": [
            "transformers>=4.45",
            "accelerate>=1.0",
            "safetensors>=0.4",
            "pyyaml>=6",
            "tqdm>=4.66",
            "tensorboard>=2.15",
            "datasets>=2.18",
        ],
        "liger": ["liger-kernel>=0.5"],
        # iris_kernels.integrations.trl (SelfPlayTrainer) and the trl-chunked benchmark peer
        "trl": ["trl>=1.16,<2", "datasets>=2.18"],
        "flash-attn": ["flash-attn>=2.6"],
        # ZeRO-3 through accelerate (train/configs/accelerate/deepspeed-zero3.yaml)
        "deepspeed": ["deepspeed>=0.15"],
        # eval.lm_eval: lm-evaluation-harness on each iteration's saved model
        "eval": ["lm-eval>=0.4.5"],
    },
)

"""megatron_vlmr1: R1-style GRPO for vision-language models on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_vlmr1",
    version="0.1.0",
    description="R1-style GRPO with verifiable rewards for vision-language models, on megatron-core",
    packages=find_packages(include=["megatron_vlmr1", "megatron_vlmr1.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6", "megatron-core==0.16.1", "transformers>=5.16.1,<5.20", "safetensors", "pyyaml",
        "pillow", "pycocotools", "peft", "tqdm", "matplotlib", "tensorboard",
    ],
    extras_require={
        "gpu": ["vllm", "transformer-engine[pytorch]", "flash-attn"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-vlmr1=megatron_vlmr1.__main__:main"]},
)

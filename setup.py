"""megatron_vlmr1: R1-style GRPO for vision-language models on megatron-core.

Builds the `megatron_vlmr1._C` extension from csrc/: the CPU kernels always, the CUDA kernels as well when a CUDA
toolkit is found (CUDA_HOME with nvcc), even on a machine without a GPU. Needs torch at build time, so install with
`--no-build-isolation` (see the Makefile). TORCH_CUDA_ARCH_LIST picks the GPU targets (default: 8.0;9.0+PTX, i.e. A100
and H100 machine code, plus sm_90 PTX that the driver compiles at load time on newer GPUs).
"""
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = ["-O3"]


def extension_sources(with_cuda: bool) -> list:
    names = ["bindings.cpp", "cpu_kernels.cpp"] + (["cuda_kernels.cu"] if with_cuda else [])
    return [os.path.join("csrc", name) for name in names]


def cuda_toolkit_present() -> bool:
    home = cpp_extension.CUDA_HOME
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.environ.get("VLMR1_NO_CUDA") != "1"


def build_extension():
    with_cuda = cuda_toolkit_present()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "megatron_vlmr1._C", extension_sources(True), include_dirs=[CSRC],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=["-fopenmp"])
    return cpp_extension.CppExtension(
        "megatron_vlmr1._C", extension_sources(False), include_dirs=[CSRC],
        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])


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
        # the versions of requirements/lock-gpu.txt (`make install-gpu`; TE's torch part and flash-attn build from source)
        "gpu": ["torch==2.13.0", "vllm==0.32.0", "transformer-engine[pytorch]==2.20.2", "flash-attn==2.8.3.post2"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["megatron-vlmr1=megatron_vlmr1.__main__:main"]},
)

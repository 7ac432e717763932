"""megatron_vlmr1: R1-style GRPO with verifiable rewards for vision-language models, on megatron-core."""

__version__ = "0.1.0"

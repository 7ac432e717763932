"""Rule-based, verifiable rewards: ``get_reward(name)(completions, **fields) -> list[float]``.

Built-ins (registered on import): ``format``, ``rec_format``, ``iou``, ``ap``, ``ap50``, ``map_len``,
``weighted_sum``, ``repetition``, ``cosine_length``, ``mcq``, ``yes_no``, ``all_match``, ``math``, ``fuzzy`` and
the per-sample dispatcher ``accuracy`` (VLM-R1's ``accu_reward_method`` column). Custom rewards:
``get_reward("package.module:function")``. Several at once with weights: ``combine_rewards``.
"""
from megatron_vlmr1.rewards import detection, text  # noqa: F401  (registers the built-ins)
from megatron_vlmr1.rewards.registry import (
    CombinedRewards,
    RewardFieldError,
    combine_rewards,
    get_reward,
    list_rewards,
    register_reward,
    register_sample_reward,
)

__all__ = [
    "CombinedRewards",
    "RewardFieldError",
    "combine_rewards",
    "get_reward",
    "list_rewards",
    "register_reward",
    "register_sample_reward",
]

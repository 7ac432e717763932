"""The reward registry: names → ``fn(completions, **fields) -> list[float]``.

``fields`` are the sample's columns as lists aligned with ``completions`` (``solution``, ``image_size``,
``accu_reward_method``, ``task``, ...); a non-list value is broadcast to every completion (a run-wide option such as
``box_space="resized"``). Built-ins are written per sample and registered with ``@register_sample_reward``, which
makes the batch function and guarantees the contract: a built-in never raises on any completion text and always
returns finite floats (anything unparseable scores 0.0); only a malformed *field* (a caller error, e.g. a missing
``image_size`` for ``box_space="norm1000"``) raises ``RewardFieldError``. Custom rewards are addressed as
``package.module:function``; their output is checked (length, finiteness) and a violation raises ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

from megatron_vlmr1.config import load_object
from megatron_vlmr1.registry import Registry
from megatron_vlmr1.rewards.parsing import completion_text

RewardFn = Callable[..., list[float]]
SampleRewardFn = Callable[..., float]

_REGISTRY: Registry[RewardFn] = Registry("reward", import_kind="custom reward")


class RewardFieldError(ValueError):
    """A sample field (not the completion) is missing or malformed: a caller error, so it is raised, not scored 0."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a batch reward ``fn(completions, **fields) -> list[float]`` under ``name`` (duplicates raise)."""

    def decorator(fn: RewardFn) -> RewardFn:
        return _REGISTRY.add(name, fn)

    return decorator


def sample_fields(num: int, fields: dict[str, Any]) -> list[dict[str, Any]]:
    """Split batch ``fields`` into per-sample dicts; lists must have one entry per completion, scalars broadcast."""
    rows: list[dict[str, Any]] = [{} for _ in range(num)]
    for key, value in fields.items():
        if isinstance(value, (list, tuple)):
            if len(value) != num:
                raise ValueError(f"reward field {key!r} has {len(value)} entries for {num} completions")
            for row, item in zip(rows, value):
                row[key] = item
        else:
            for row in rows:
                row[key] = value
    return rows


def safe_score(fn: SampleRewardFn, text: str, row: dict[str, Any]) -> float:
    """``fn(text, **row)`` as a finite float; any failure on hostile input scores 0.0 by contract."""
    try:
        value = float(fn(text, **row))
    except RewardFieldError:
        raise
    except Exception:  # noqa: BLE001 - rewards score untrusted text; a crash must not stop training
        return 0.0
    return value if math.isfinite(value) else 0.0


def batch_reward(fn: SampleRewardFn) -> RewardFn:
    """Lift a per-sample ``fn(text, **sample) -> float`` to the batch contract."""

    def reward(completions: Sequence[Any], **fields: Any) -> list[float]:
        rows = sample_fields(len(completions), fields)
        return [safe_score(fn, completion_text(c), row) for c, row in zip(completions, rows)]

    reward.__name__ = getattr(fn, "__name__", "reward")
    reward.__doc__ = fn.__doc__
    reward.__module__ = fn.__module__
    reward.sample_fn = fn  # type: ignore[attr-defined]
    return reward


def register_sample_reward(name: str) -> Callable[[SampleRewardFn], SampleRewardFn]:
    """Register a per-sample ``fn(text, /, **sample) -> float`` as the batch reward ``name``; returns ``fn`` unchanged.

    Declare ``text`` positional-only (``/``) so that a data column of any name, even ``text``, cannot collide with it.
    """

    def decorator(fn: SampleRewardFn) -> SampleRewardFn:
        register_reward(name)(batch_reward(fn))
        return fn

    return decorator


def list_rewards() -> list[str]:
    return _REGISTRY.names()


def _load_custom(spec: str) -> RewardFn:
    return _checked(spec, load_object(spec, kind="custom reward"))


def _checked(name: str, fn: RewardFn) -> RewardFn:
    """Wrap a user reward so a wrong length or a NaN fails loudly (naming it) instead of corrupting advantages."""

    def reward(completions: Sequence[Any], **fields: Any) -> list[float]:
        values = [float(v) for v in fn(completions, **fields)]
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward {name!r} returned non-finite values at positions {bad[:10]}")
        return values

    reward.__name__ = getattr(fn, "__name__", name)
    return reward


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``, or a custom one given as ``package.module:function``."""
    if ":" in name:
        return _load_custom(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known: {list_rewards()} (or package.module:function)")
    return _REGISTRY.get(name)


class CombinedRewards(NamedTuple):
    """Per-reward values (``name → [num_completions]``) and their weighted total (``[num_completions]``)."""

    per_reward: dict[str, list[float]]
    total: list[float]


def combine_rewards(specs: Sequence[tuple[str, float]]) -> Callable[..., CombinedRewards]:
    """Resolve ``[(name, weight), ...]`` once; the returned function scores a batch with every reward.

    ``total[i] = sum_k weight_k * reward_k[i]``. Weights are honoured (VLM-R1 accepts reward weights but ignores
    them). Names must be unique, weights finite.
    """
    if not specs:
        raise ValueError("combine_rewards needs at least one (name, weight) pair")
    names = [name for name, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward(s) {duplicates} listed twice")
    resolved = []
    for name, weight in specs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        resolved.append((name, float(weight), get_reward(name)))

    def combined(completions: Sequence[Any], **fields: Any) -> CombinedRewards:
        per_reward = {name: fn(completions, **fields) for name, _, fn in resolved}
        total = [0.0] * len(completions)
        for name, weight, _ in resolved:
            total = [t + weight * v for t, v in zip(total, per_reward[name])]
        return CombinedRewards(per_reward, total)

    return combined

"""Named registries for the RL math: one registry per kind, one call signature per registry.

The trainer never branches on algorithm names: it asks a registry for the function a config names. Built-ins
register themselves by decorator when ``megatron_vlmr1.algo`` is imported; a user's own function needs no
registration at all, a config can name it as ``package.module:function``.

Signatures (see each module for the tensor shapes):

- advantage estimator: ``(rewards [N], config) -> advantages [N]``
- KL estimator: ``(logprobs [B, T], ref_logprobs [B, T]) -> kl [B, T]``
- loss aggregation: ``(values [B, T], mask [B, T], config) -> (total [], count [])``
- policy loss: ``(logprobs, old_logprobs, ref_logprobs, advantages, mask, config, *, rollout_logprobs, normalizer)
  -> (loss [], metrics)``
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from megatron_vlmr1.config import load_object

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """A name → function table for one kind of function (``kind`` appears in every error message)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@REGISTRY.register("name")``. A second entry under the same name raises."""
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name {name!r} must be non-empty and contain no ':'")

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name].__module__})")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered as ``name``, or loaded from ``package.module:function``."""
        if ":" in name:
            fn = load_object(name)
            if not callable(fn):
                raise ValueError(f"{self.kind} {name!r} is not callable")
            return fn
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()} (or give 'package.module:function')")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
KL_ESTIMATORS: Registry = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
POLICY_LOSSES: Registry = Registry("policy loss")

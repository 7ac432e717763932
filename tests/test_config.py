from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_vlmr1.config import apply_overrides, from_dict, load_config, save_config


@dataclass
class Inner:
    lr: float = 1e-5
    name: Literal["adam", "sgd"] = "adam"


@dataclass
class Root:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    path: Optional[str] = None


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 3\ninner:\n  lr: 0.1\n")
    cfg = load_config(Root, cfg_file, ["inner.name=sgd", "tags=[a, b]", "path=/x"])
    assert cfg == Root(steps=3, inner=Inner(lr=0.1, name="sgd"), tags=["a", "b"], path="/x")
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Root, tmp_path / "out.yaml") == cfg


def test_int_promotes_to_float():
    assert from_dict(Inner, {"lr": 1}).lr == 1.0


@pytest.mark.parametrize("data, needle", [
    ({"stpes": 3}, "stpes"),
    ({"inner": {"lr": "fast"}}, "inner.lr"),
    ({"inner": {"name": "adamw"}}, "inner.name"),
    ({"steps": 1.5}, "steps"),
    ({"steps": True}, "steps"),
])
def test_errors_name_the_key(data, needle):
    with pytest.raises(ValueError, match=needle):
        from_dict(Root, data)


def test_malformed_override():
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["steps"])

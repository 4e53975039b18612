from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from phileo.config import ConfigError, apply_overrides, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class Train:
    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = "ddp"
    compile: bool = False
    resume_from: Optional[str] = None


@dataclass
class Job:
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)


def test_overrides_convert_to_field_types():
    cfg = apply_overrides(Job(), ["optim.lr=3e-4", "optim.warmup_steps=5", "train.compile=true",
                                  "optim.betas=[0.8,0.95]", "train.strategy=zero2"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_steps == 5 and cfg.train.compile is True
    assert cfg.optim.betas == [0.8, 0.95] and cfg.train.strategy == "zero2"
    assert Job().optim.lr == 1e-4, "apply_overrides must not mutate its input"


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'warmup_steps'"):
        apply_overrides(Job(), ["optim.warmup_step=5"])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr'"):
        apply_overrides(Job(), ["optimizer.lr=1"])


def test_wrong_types_and_choices_are_errors():
    with pytest.raises(ConfigError, match="optim.warmup_steps.*integer"):
        apply_overrides(Job(), ["optim.warmup_steps=ten"])
    with pytest.raises(ConfigError, match="train.strategy.*one of"):
        apply_overrides(Job(), ["train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides(Job(), ["optim.lr"])


def test_validate_runs_after_overrides():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        apply_overrides(Job(), ["optim.lr=-1"])


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Job(), ["optim.lr=0.5", "train.resume_from=/runs/a b"])
    path = save_config(cfg, tmp_path / "config.yaml")
    back = load_config(Job, path)
    assert to_dict(back) == to_dict(cfg)
    (tmp_path / "bad.yaml").write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*Did you mean 'lr'"):
        load_config(Job, tmp_path / "bad.yaml")


def test_read_yaml_mapping_names_the_file_and_the_problem(tmp_path):
    from phileo.config import read_yaml_mapping

    class SweepLikeError(ValueError):
        pass

    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_mapping(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        read_yaml_mapping(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(SweepLikeError, match="sweep file .*bad.yaml is not valid YAML"):
        read_yaml_mapping(tmp_path / "bad.yaml", what="sweep file", error=SweepLikeError)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must be a mapping"):
        read_yaml_mapping(tmp_path / "list.yaml")

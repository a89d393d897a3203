"""Config: YAML + dotted overrides, every error reported at once with the key and the fix."""

import pytest

from middo_ray.config import ConfigError, build_config, load_config

pytestmark = pytest.mark.unit


def test_overrides_apply_with_yaml_types(tmp_path):
    """--set values are parsed as YAML (numbers, lists) and win over the file."""
    f = tmp_path / "c.yaml"
    f.write_text("select:\n  quality_m: 2.0\ntrain:\n  epochs: 2\n")
    cfg = load_config(f, ["select.quality_m=0.5", "select.axes=[quality]"])
    assert cfg.select.quality_m == 0.5 and cfg.select.axes == ["quality"] and cfg.train.epochs == 2


def test_all_errors_reported_at_once():
    """Typos and bad values are all listed in one error, each with a hint."""
    with pytest.raises(ConfigError) as exc:
        build_config({"selct": {}, "train": {"epochs": -1, "lr": 1}}, ["data.format=xml", "model.bse=x"])
    text = str(exc.value)
    assert len(exc.value.problems) == 5
    for needle in ("selct", "did you mean 'select'", "train.epochs", "train.lr", "data.format", "model.base"):
        assert needle in text


def test_cross_section_rule_names_the_fix():
    """A rule spanning sections says which key to change."""
    with pytest.raises(ConfigError, match="diagnose.judge=true"):
        build_config({"diagnose": {"judge": False}})


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_refine_engine_and_judge_rules_name_the_fix():
    """The refine section's cross-field rules: a teacher without token probabilities cannot judge in 'prob'
    mode, vLLM arguments need a vLLM engine, and the judge app (judge='current') needs its own route prefix;
    the current checkpoint as judge (the default) lifts the first rule, the teacher as judge the last."""
    with pytest.raises(ConfigError, match="refine.judge='current'"):
        build_config({"refine": {"engine": "openai", "openai_base_url": "http://127.0.0.1:9/v1", "judge": "teacher",
                                 "judge_mode": "prob"}})
    with pytest.raises(ConfigError, match="its own prefix"):
        build_config({"refine": {"judge_route_prefix": "/"}})
    assert build_config({"refine": {"judge": "teacher", "judge_route_prefix": "/"}}).refine.judge == "teacher"
    with pytest.raises(ConfigError, match="only used with refine.engine='vllm'"):
        build_config({"refine": {"vllm_engine_kwargs": {"max_model_len": 4096}}})
    cfg = build_config({"refine": {"engine": "vllm", "judge_mode": "prob", "vllm_engine_kwargs": {"max_model_len": 4096}}})
    assert cfg.refine.judge == "current" and cfg.refine.vllm_engine_kwargs == {"max_model_len": 4096}
    with pytest.raises(ConfigError, match="train.lora_save=merged"):
        build_config({"refine": {"judge_engine": "vllm"}, "train": {"method": "lora", "lora_save": "adapter"}})

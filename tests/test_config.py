"""Config parsing: types, unknown keys, shorthands, YAML, every problem reported at once."""

import pytest
import yaml

from tunelab.config import ConfigError, load_config, save_config


def test_defaults_and_shorthands():
    cfg = load_config(overrides=["method=lora", "task=gsm8k", "train.max_steps=2", "data.limit=16", "method.rank=4"])
    assert cfg.method.name == "lora" and cfg.method.rank == 4
    assert cfg.task.name == "gsm8k"
    assert cfg.train.max_steps == 2 and cfg.data.limit == 16
    assert cfg.model.name == "smollm2-135m"


def test_all_problems_reported_at_once_with_fixes():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.max_step=2", "data.limit=many", "method=lorra", "train.lr=fast"])
    problems = err.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "did you mean 'train.max_steps'" in text
    assert "'data.limit' must be int | null, got 'many'" in text
    assert "unknown method 'lorra'; did you mean 'lora'?" in text and "full" in text
    assert "'train.lr' must be float" in text


def test_range_and_combination_checks():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method.rank=0", "train.lr=-1", "data.train_fraction=1.5", "train.optim=paged_adamw_8bit",
                               "model.device=cpu"])
    text = "\n".join(err.value.problems)
    assert "method.rank must be >= 1" in text
    assert "train.lr must be > 0" in text
    assert "data.train_fraction must be in (0, 1]" in text
    assert "train.optim=paged_adamw_8bit needs a CUDA GPU" in text and "use train.optim=adamw_8bit" in text


def test_method_specific_keys_follow_method_name():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method=full", "method.rank=8"])
    assert "unknown key 'method.rank'" in str(err.value)


def test_switching_method_on_cli_drops_yaml_method_keys(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "lora", "rank": 16}, "train": {"lr": 1e-4}}))
    assert load_config(path).method.rank == 16
    cfg = load_config(path, ["method=full"])
    assert cfg.method.name == "full" and cfg.train.lr == 1e-4


def test_yaml_round_trip(tmp_path):
    cfg = load_config(overrides=["method.rank=4", "train.report_to=[]", "eval.limit=8"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("preset", ["gsm8k_original.yaml", "cpu_small.yaml", "gsm8k_lora_cpu_demo.yaml"])
def test_shipped_presets_parse(preset):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / preset
    cfg = load_config(path)
    if preset == "gsm8k_original.yaml":
        assert (cfg.train.lr, cfg.method.rank, cfg.method.alpha, cfg.method.target_modules, cfg.data.max_length) == (
            7e-4, 8, 16.0, "all-linear", 720)


def test_config_imports_no_method_or_task():
    """config is below methods and tasks in the tree: importing it must not import them (no cycle)."""
    import subprocess
    import sys

    code = ("import sys, tunelab.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('tunelab.methods', 'tunelab.tasks'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_names_suggest_the_closest_registered_one():
    with pytest.raises(ConfigError, match=r"unknown method 'lroa'; did you mean '(lora|rosa)'"):
        load_config(overrides=["method=lroa"])
    with pytest.raises(ConfigError, match=r"unknown task 'gsm9k'; did you mean 'gsm8k'"):
        load_config(overrides=["task=gsm9k"])

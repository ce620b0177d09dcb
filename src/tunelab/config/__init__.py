"""Typed run configuration: dataclasses with a docstring per field, YAML files and dotted overrides.

A run is described by one :class:`RunConfig`. It is built from (lowest to highest priority) the
dataclass defaults, an optional YAML file (``--config FILE``) and ``key=value`` overrides from the
command line (``train.max_steps=2``, ``method.rank=8``; ``method=``, ``task=`` and ``model=`` are
shorthands for ``method.name=`` and so on). Every problem — unknown keys, wrong types, values out
of range, bad combinations — is collected and reported at once in a :class:`ConfigError`, each with
the fix, before anything is loaded or trained.

``method`` and ``task`` are polymorphic: their ``name`` selects the dataclass that holds the rest of
their keys (``method=lora`` accepts ``method.rank``; ``method=full`` does not). Methods and tasks
name their config class (``config_cls``) where they register in :mod:`tunelab.registry`.
"""

from tunelab.config.schema import (
    ConfigError,
    DataConfig,
    EvalConfig,
    HarnessConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    opt,
)
from tunelab.config.validate import deepspeed_settings, validate
from tunelab.config.build import (
    SHORTHANDS,
    build_config,
    build_dataclass,
    config_from_dict,
    config_to_dict,
    deep_merge,
    field_help,
    load_config,
    method_config_classes,
    parse_overrides,
    parse_value,
    save_config,
    task_config_classes,
)

__all__ = [
    "SHORTHANDS", "ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "EvalConfig", "HarnessConfig", "RunConfig", "MethodConfig",
    "TaskConfig", "opt", "load_config", "build_config", "build_dataclass", "parse_overrides", "parse_value",
    "deep_merge", "config_to_dict", "config_from_dict", "save_config", "method_config_classes",
    "task_config_classes", "field_help", "validate", "deepspeed_settings",
]

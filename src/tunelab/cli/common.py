"""Pieces every subcommand's parser shares: the config-key reference for --help, the help formatter, RUN parsing."""

from __future__ import annotations

import argparse
import textwrap

from tunelab.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, field_help, method_config_classes, task_config_classes


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples and the config reference laid out as written."""


def config_reference(sections: tuple[str, ...] = ("model", "task", "data", "method", "train", "eval")) -> str:
    """Every config key with its type, default and documentation, for --help."""
    lines = ["configuration keys (key=value overrides; also valid in a --config YAML file):", ""]
    lines.append("  out=DIR             run directory;  seed=INT  seed for data order, init and dropout")
    plain = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
    for section in sections:
        if section in plain:
            lines.append(f"\n  [{section}]")
            for key, tp, help_ in field_help(plain[section], f"{section}."):
                lines.append(f"  {key} ({tp})")
                lines.extend(textwrap.wrap(help_, 90, initial_indent="      ", subsequent_indent="      "))
        else:
            registry = method_config_classes() if section == "method" else task_config_classes()
            lines.append(f"\n  [{section}]  {section}=NAME selects one of: {', '.join(sorted(registry))}")
            for name, cls in sorted(registry.items()):
                rows = [r for r in field_help(cls, f"{section}.") if r[0] != f"{section}.name"]
                lines.append(f"    {section}={name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
                for key, tp, help_ in rows:
                    lines.append(f"      {key} ({tp})")
                    lines.extend(textwrap.wrap(help_, 88, initial_indent="          ", subsequent_indent="          "))
    return "\n".join(lines)


def split_target(target: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``tunelab eval key=value`` has no RUN: the first positional is an override."""
    if target is not None and "=" in target:
        return None, [target, *overrides]
    return target, overrides

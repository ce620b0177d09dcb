"""The error a metric raises when a package it needs is missing (ROUGE's rouge-score, BERTScore's encoder)."""

from __future__ import annotations


class MetricDependencyError(RuntimeError):
    """A metric needs a package that is not installed (the message holds the install command)."""

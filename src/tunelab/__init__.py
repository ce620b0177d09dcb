"""tunelab: fine-tune LLMs and compare fine-tuning methods on real tasks."""

__version__ = "0.1.0"

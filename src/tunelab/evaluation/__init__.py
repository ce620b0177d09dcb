"""Evaluation: scoring a model on a task, batched generation, and the generate command's modes.

``engine`` (batched generation and the Generator, shared by eval and generate), ``evaluate``
(load a model for eval, score, reference loss, results), ``generate`` (the --input file and the
prompt loop), ``metrics`` (ROUGE, BERTScore, bootstrap intervals).
"""

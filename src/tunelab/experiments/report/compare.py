"""Paired comparison of two evaluations of one task (``tunelab compare A B``).

Per metric: the means, B − A on the examples both evaluated (paired by example id), its 95%
paired-bootstrap interval and the share of resamples where B does not beat A. The per-example
values come from each evaluation's ``predictions.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tunelab.experiments.report.write import markdown_table
from tunelab.rundir import RunDir

#: metrics where a smaller value is the better one
LOWER_IS_BETTER = ("ref_nll",)


def _eval_dir(path: Path) -> Path:
    """A run directory's eval/ folder, or the eval folder itself."""
    for cand in (RunDir(path).eval_dir, path):
        if (cand / RunDir.PREDICTIONS_FILE).is_file() and (cand / RunDir.RESULTS_FILE).is_file():
            return cand
    raise ValueError(f"{path} holds no evaluation (eval/predictions.jsonl + eval/results.json): "
                     f"run `tunelab eval {path}` first")


def _read_results(eval_dir: Path) -> dict[str, Any]:
    path = eval_dir / RunDir.RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): re-run `tunelab eval` on {_run_of(eval_dir)}") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} is not an evaluation's results: re-run `tunelab eval` on {_run_of(eval_dir)}")
    return results


def _read_predictions(eval_dir: Path) -> dict[str, dict]:
    """Example id -> its predictions.jsonl record; a line without an id names the file and line."""
    from tunelab.utils import iter_jsonl

    path, out = eval_dir / RunDir.PREDICTIONS_FILE, {}
    for lineno, row in iter_jsonl(path):
        if row.get("id") is None:
            raise ValueError(f"{path}:{lineno}: no 'id' field (not a line tunelab eval wrote): "
                             f"re-run `tunelab eval` on {_run_of(eval_dir)}")
        out[str(row["id"])] = row
    return out


def _comparable_fields(task: str) -> dict[str, Any]:
    """metric -> its per-example field, or (numerator, denominator) of a pooled ratio."""
    from tunelab.tasks import get_task

    fields: dict[str, Any] = dict(get_task(task).example_metrics)
    # eval's pooled reference loss: summed NLL over summed tokens, per example (numerator, denominator)
    fields["ref_nll"] = ("ref_nll_sum", "ref_tokens")
    return fields


def _paired_values(metric: str, names: tuple[str, ...], preds: list[dict], common: list[str]):
    """(A's values, B's values) per common example, or a str saying why the metric cannot be compared."""
    missing = sum(1 for i in common for p in preds for n in names if not isinstance(p[i].get(n), (int, float)))
    if missing:
        hint = " (evaluated before tunelab stored it; re-run tunelab eval)" if metric == "ref_nll" else ""
        return f"'{', '.join(names)}' is missing from {missing} predictions{hint}"
    if len(names) == 2:
        # a pooled ratio (sum of numerators / sum of denominators): with the same denominators in A
        # and B (the same references, tokenized alike), it is the mean of numerator_i / mean denominator
        num, den = names
        if any(preds[0][i][den] != preds[1][i][den] for i in common):
            return f"the two runs tokenized the references differently ('{den}' differs)"
        scale = len(common) / max(sum(preds[0][i][den] for i in common), 1)
        return ([float(preds[0][i][num]) * scale for i in common], [float(preds[1][i][num]) * scale for i in common])
    return [float(preds[0][i][names[0]]) for i in common], [float(preds[1][i][names[0]]) for i in common]


def _compare_metric(metric: str, va: list[float], vb: list[float], n_resamples: int, seed: int) -> dict[str, Any]:
    from tunelab.evaluation.metrics import paired_bootstrap

    lower_is_better = metric in LOWER_IS_BETTER
    sign = -1.0 if lower_is_better else 1.0  # "B not better" counts resamples where B's loss is not lower
    diff = paired_bootstrap([sign * v for v in va], [sign * v for v in vb], n_resamples=n_resamples, seed=seed)
    lo, hi = sorted(sign * c for c in diff["ci"])
    return {"a": sum(va) / len(va), "b": sum(vb) / len(vb), "b_minus_a": sign * diff["mean_diff"],
            "ci95": [lo, hi], "p_b_not_better": diff["p_not_better"], "lower_is_better": lower_is_better}


def _run_of(eval_dir: Path) -> str:
    return str(eval_dir.parent if eval_dir.name == RunDir.EVAL_DIR else eval_dir)


def compare_evals(a: Path, b: Path, metrics: Optional[list[str]] = None, n_resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """B − A per metric on the examples both evaluated, with a paired bootstrap CI.

    Pairing (the same resampled examples for both) removes the between-question variance that
    dominates small eval sets, so a difference can be significant even where the two unpaired
    intervals overlap. ``p_b_not_better`` is the share of resamples where B does not beat A.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"the number of bootstrap resamples must be a whole number >= 1, got {n_resamples!r} "
                         f"(1000 is the default; 10000 for tighter intervals)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the bootstrap seed must be a whole number >= 0, got {seed!r}")
    dirs = [_eval_dir(Path(a)), _eval_dir(Path(b))]
    results = [_read_results(d) for d in dirs]
    tasks = [r.get("task") for r in results]
    if tasks[0] != tasks[1]:
        raise ValueError(f"{dirs[0]} evaluated task {tasks[0]!r} and {dirs[1]} task {tasks[1]!r}: "
                         f"only evaluations of one task compare")
    if results[0].get("split") != results[1].get("split"):
        raise ValueError(f"the two evaluations used different splits ({results[0].get('split')} vs {results[1].get('split')})")
    fields = _comparable_fields(tasks[0])
    wanted = metrics or list(fields)
    unknown = [m for m in wanted if m not in fields]
    if unknown:
        raise ValueError(f"no per-example values of {', '.join(unknown)} for task {tasks[0]} "
                         f"(comparable: {', '.join(fields)})")
    preds = [_read_predictions(d) for d in dirs]
    common = [i for i in preds[0] if i in preds[1]]
    if not common:
        raise ValueError(f"{dirs[0]} and {dirs[1]} share no example ids: they evaluated different examples")
    out: dict[str, Any] = {"task": tasks[0], "a": _run_of(dirs[0]), "b": _run_of(dirs[1]),
                           "examples": len(common), "only_in_a": len(preds[0]) - len(common),
                           "only_in_b": len(preds[1]) - len(common), "n_resamples": n_resamples, "seed": seed,
                           "metrics": {}, "skipped": {}}
    for metric in wanted:
        names = fields[metric] if isinstance(fields[metric], tuple) else (fields[metric],)
        values = _paired_values(metric, names, preds, common)
        if isinstance(values, str):
            out["skipped"][metric] = values
        else:
            out["metrics"][metric] = _compare_metric(metric, *values, n_resamples=n_resamples, seed=seed)
    return out


def format_comparison(cmp: dict[str, Any]) -> str:
    lines = [f"{cmp['task']}: B = {cmp['b']}  vs  A = {cmp['a']}",
             f"{cmp['examples']} examples evaluated by both (paired bootstrap, {cmp['n_resamples']} resamples, seed {cmp['seed']})"]
    if cmp["only_in_a"] or cmp["only_in_b"]:
        lines.append(f"left out: {cmp['only_in_a']} examples only in A, {cmp['only_in_b']} only in B")
    header = ["metric", "A", "B", "B − A", "95% CI", "P(B not better)"]
    cells = [[m + (" (lower is better)" if v["lower_is_better"] else ""), f"{v['a']:.4f}", f"{v['b']:.4f}", f"{v['b_minus_a']:+.4f}",
              f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]", f"{v['p_b_not_better']:.3f}"]
             for m, v in cmp["metrics"].items()]
    lines.append(markdown_table(header, cells))
    lines += [f"{m}: not compared, {why}" for m, why in cmp["skipped"].items()]
    return "\n".join(lines)

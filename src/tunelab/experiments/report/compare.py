"""Paired comparison of two evaluations of one task (``tunelab compare A B``).

Per metric: the means, B − A on the examples both evaluated (paired by example id), its 95%
paired-bootstrap interval and the share of resamples where B does not beat A. The per-example
values come from each evaluation's ``predictions.jsonl``; for lm-evaluation-harness results
(``RUN/eval/harness/<task>/``) from the harness's per-sample log ``samples.jsonl``, paired by the
harness's ``doc_id`` (its ``doc_hash`` checked), and only between evaluations of one base model,
one task and one protocol (:func:`tunelab.evaluation.harness.protocol_differences` says why not).
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


def _check_bootstrap_args(n_resamples: Any, seed: Any) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"the number of bootstrap resamples must be a whole number >= 1, got {n_resamples!r} "
                         f"(1000 is the default; 10000 for tighter intervals)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the bootstrap seed must be a whole number >= 0, got {seed!r}")


def _has_own_eval(path: Path) -> bool:
    try:
        _eval_dir(path)
    except ValueError:
        return False
    return True


def _harness_dirs(path: Path) -> dict[str, Path]:
    """harness task -> its results folder, for RUN, RUN/eval, RUN/eval/harness or RUN/eval/harness/<task>."""
    for cand in (path, path / RunDir.HARNESS_DIR, RunDir(path).harness_dir):
        results = cand / RunDir.RESULTS_FILE
        if results.is_file() and _read_results(cand).get("kind") == "harness":
            return {cand.name: cand}
        if cand.is_dir() and cand.name == RunDir.HARNESS_DIR:
            return {d.name: d for d in sorted(cand.iterdir()) if (d / RunDir.RESULTS_FILE).is_file()}
    return {}


def compare_evals(a: Path, b: Path, metrics: Optional[list[str]] = None, n_resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """B − A per metric on the examples both evaluated, with a paired bootstrap CI.

    Pairing (the same resampled examples for both) removes the between-question variance that
    dominates small eval sets, so a difference can be significant even where the two unpaired
    intervals overlap. ``p_b_not_better`` is the share of resamples where B does not beat A.
    Where both hold tunelab's own evaluation it is compared, and every harness task both ran is
    compared too (under ``also``); where one lacks it, the harness tasks both ran are compared.
    """
    _check_bootstrap_args(n_resamples, seed)
    a, b = Path(a), Path(b)
    harness = [_harness_dirs(a), _harness_dirs(b)]
    shared = [t for t in harness[0] if t in harness[1]]
    if harness[0] and harness[1] and not shared and not (_has_own_eval(a) and _has_own_eval(b)):
        if len(harness[0]) == 1 and len(harness[1]) == 1:  # two task folders named explicitly: say why not
            shared_pair = (next(iter(harness[0].values())), next(iter(harness[1].values())))
            return compare_harness(*shared_pair, metrics, n_resamples, seed)
        raise ValueError(f"{a} and {b} ran no harness task in common ({a}: {', '.join(harness[0])}; "
                         f"{b}: {', '.join(harness[1])})")
    if _has_own_eval(a) and _has_own_eval(b):
        out = compare_own_evals(a, b, metrics, n_resamples, seed)
        also = []
        for t in shared:  # a harness pair that cannot be compared is said so, next to the own comparison
            try:
                also.append(compare_harness(harness[0][t], harness[1][t], None, n_resamples, seed))
            except ValueError as exc:
                also.append({"task": f"harness:{t}", "refused": str(exc)})
        return {**out, "also": also} if also else out
    if shared:
        first, *rest = [compare_harness(harness[0][t], harness[1][t], metrics if i == 0 else None, n_resamples, seed)
                        for i, t in enumerate(shared)]
        return {**first, "also": rest} if rest else first
    if harness[0] or harness[1]:
        which, other = (a, b) if harness[0] else (b, a)
        raise ValueError(f"{which} holds lm-evaluation-harness results and {other} none (only tunelab's own "
                         f"evaluation, if any): the two protocols score differently; run the same harness task on "
                         f"{other} (`tunelab eval {other} harness=TASK`, with the same harness.* settings)")
    _eval_dir(a), _eval_dir(b)  # raises, naming the one without an evaluation
    raise AssertionError("unreachable")


def compare_own_evals(a: Path, b: Path, metrics: Optional[list[str]] = None, n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """tunelab's own evaluations (eval/results.json + predictions.jsonl) of A and B, paired by example id."""
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


def compare_harness(a: Path, b: Path, metrics: Optional[list[str]] = None, n_resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Two harness results folders (RUN/eval/harness/<task>/) paired by the harness's doc_id."""
    from tunelab.evaluation.harness import protocol_differences, read_samples

    results = [_read_results(a), _read_results(b)]
    why = protocol_differences(*results)
    if why:
        raise ValueError(f"{a} and {b} cannot be compared example by example: " + "; ".join(why))
    samples = []
    for d in (a, b):
        path = d / RunDir.HARNESS_SAMPLES_FILE
        if not path.is_file():
            raise ValueError(f"{d} has no per-sample log ({RunDir.HARNESS_SAMPLES_FILE}): re-run its harness "
                             f"evaluation with harness.log_samples=true")
        samples.append(read_samples(path))
    common = [i for i in samples[0] if i in samples[1]]
    if not common:
        raise ValueError(f"{a} and {b} share no harness doc_id: they evaluated different documents")
    differ = [i for i in common if samples[0][i].get("doc_hash") != samples[1][i].get("doc_hash")]
    if differ:
        raise ValueError(f"{a} and {b} hold different documents under the same doc_id ({len(differ)} of "
                         f"{len(common)}, e.g. doc_id {differ[0]}): their data files differ")
    fields = [m for m in results[0].get("metrics", {}) if m != "n"]
    wanted = metrics or fields
    unknown = [m for m in wanted if m not in fields]
    if unknown:
        raise ValueError(f"no per-sample values of {', '.join(unknown)} for {results[0].get('task')} "
                         f"(comparable: {', '.join(fields)})")
    out: dict[str, Any] = {"task": results[0].get("task"), "a": str(a), "b": str(b), "examples": len(common),
                           "only_in_a": len(samples[0]) - len(common), "only_in_b": len(samples[1]) - len(common),
                           "n_resamples": n_resamples, "seed": seed, "protocol": results[0].get("protocol"),
                           "metrics": {}, "skipped": {}}
    for metric in wanted:
        values = _paired_values(metric, (metric,), samples, common)
        if isinstance(values, str):
            out["skipped"][metric] = values
        else:
            out["metrics"][metric] = _compare_metric(metric, *values, n_resamples=n_resamples, seed=seed)
    return out


def format_comparison(cmp: dict[str, Any]) -> str:
    """The comparison as text: one table per task (tunelab's own evaluation, then each harness task)."""
    return "\n\n".join(_format_one(c) for c in [cmp, *cmp.get("also", [])])


def _format_one(cmp: dict[str, Any]) -> str:
    if "refused" in cmp:
        return f"{cmp['task']}: not compared, {cmp['refused']}"
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

"""lm-evaluation-harness in tunelab: agreement with tunelab's own GSM8K evaluation, results layout, compare, bad input.

**Agreement** (issue 13, requirement 2). tunelab's GSM8K protocol and the harness's ``gsm8k`` task
(lm_eval 0.4.13, the shipped offline copy) at zero-shot share the prompt (``Question: {question}\\nAnswer:``
in both: tunelab strips the question, no GSM8K test question has surrounding whitespace), greedy
decoding and the token budget. Two tests show they agree question by question:

- :func:`test_generation_agrees_question_by_question`: the same tiny model (fp32, batch 1, so no
  padding changes float rounding), the same 4 test questions, through tunelab's evaluation and
  through the harness: the same prompts, the same completions (after tunelab's trim), the same strict
  and flexible verdicts per question; on a LoRA run too (the adapter merged in memory, as both load it).
- :func:`test_scoring_agrees_question_by_question`: the harness's own pipeline (its filters
  ``strict-match`` / ``flexible-extract`` and its ``exact_match`` metric) run on scripted completions
  of real test questions, against tunelab's extractors on the same completions: identical verdicts.

The differences that remain are protocol choices, each pinned by :func:`test_documented_differences`:

1. **Stop rule.** tunelab stops a completion once the ``#### N`` line is complete (and at
   ``\\nQuestion:``) and scores the text up to there; the harness stops only at ``Question:``, ``</s>``,
   ``<|im_end|>``/EOS or the budget, and its flexible-extract takes the *last* number of everything
   generated, so numbers a model writes after its answer line change the harness's flexible verdict
   (not the strict one, which reads the first ``#### ``). tunelab's choice: the answer line is the answer.
2. **Strict regex.** the harness needs exactly ``#### `` + ``[-0-9.,]+``; tunelab accepts any spacing
   and a ``$`` (``####18``, ``#### $18`` count for tunelab, not for the harness).
3. **Flexible regex.** the harness's ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` also matches runs of dots/commas,
   so ``... is 18...`` extracts ``18..`` (wrong) where tunelab reads ``18``.
4. **Few-shot.** tunelab's protocol is zero-shot; the harness's default is 5-shot (training examples
   chosen with its fewshot seed 1234, full solutions with calculator annotations as targets).

Neither is a bug: the published number is the harness's, tunelab's is what the report calls accuracy.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.config import ConfigError, load_config
from tunelab.rundir import RunDir

pytest.importorskip("lm_eval")

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
N_DOCS, N_NEW = 4, 12
STRICT, FLEX = "exact_match,strict-match", "exact_match,flexible-extract"


def _cli(*args) -> int:
    from tunelab.cli import main

    return main(list(args))


def _harness_args(limit=N_DOCS):
    return ["harness=gsm8k", "harness.num_fewshot=0", f"harness.limit={limit}", "harness.batch_size=1",
            f"harness.max_new_tokens={N_NEW}"]


def _own_args(limit=N_DOCS):
    return [f"eval.limit={limit}", "eval.batch_size=1", f"eval.max_new_tokens={N_NEW}", "eval.reference_loss=false"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, varied_model_dir) -> dict[str, Path]:
    """BASE (own eval + harness) and a 2-step LoRA RUN (own eval + harness), on the first 4 test questions."""
    from tunelab.train import train

    root = tmp_path_factory.mktemp("harness-runs")
    base, run = root / "BASE", root / "RUN"
    model = f"model={varied_model_dir}"
    assert _cli("eval", "--base", model, "task=gsm8k", *_own_args(), f"out={base}") == 0
    assert _cli("eval", "--base", model, "task=gsm8k", *_harness_args(), f"out={base}") == 0
    train(load_config(overrides=[model, "task=gsm8k", "method=lora", "data.limit=16", "train.batch_size=8",
                                 "train.max_steps=2", "train.lr=1e-2", "train.report_to=[]",
                                 "train.progress_bar=false", f"out={run}"]))
    assert _cli("eval", str(run), *_own_args()) == 0
    assert _cli("eval", str(run), *_harness_args()) == 0
    return {"base": base, "run": run}


def _samples(folder: Path) -> dict[int, dict[str, dict]]:
    """doc_id -> filter -> sample line."""
    out: dict[int, dict[str, dict]] = {}
    for line in (folder / RunDir.HARNESS_SAMPLES_FILE).read_text().splitlines():
        s = json.loads(line)
        out.setdefault(s["doc_id"], {})[s["filter"]] = s
    return out


# ---- agreement -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "run"])
def test_generation_agrees_question_by_question(evaluated, which):
    from tunelab.tasks.gsm8k import Gsm8kConfig, Gsm8kTask

    trim = Gsm8kTask(Gsm8kConfig()).trim_completion
    folder = evaluated[which]
    own = [json.loads(line) for line in RunDir(folder).predictions_file.read_text().splitlines()]
    samples = _samples(RunDir(folder).harness_task_dir("gsm8k"))
    assert len(own) == len(samples) == N_DOCS
    for i, pred in enumerate(own):
        s = samples[int(pred["id"])]
        prompt, gen_kwargs = s["strict-match"]["arguments"][0]
        assert prompt == pred["prompt"], f"question {i}: prompts differ"
        assert gen_kwargs["max_gen_toks"] == N_NEW and gen_kwargs["do_sample"] is False
        raw = s["strict-match"]["resps"][0][0]
        assert trim(raw) == pred["completion"], f"question {i}: completions differ"
        assert bool(s["strict-match"]["exact_match"]) == pred["correct"]
        assert bool(s["flexible-extract"]["exact_match"]) == pred["correct_flexible"]


def test_chat_format_follows_the_run_and_agrees(tmp_path, varied_model_dir):
    """task.prompt_format=chat: the harness asks in the chat template too (harness.apply_chat_template
    left null follows the run), with task.system_prompt as the system turn: the same prompts and
    completions as tunelab's own chat evaluation, and the protocol says so; harness.apply_chat_template=false
    still forces plain prompts."""
    from tunelab.tasks.gsm8k import Gsm8kConfig, Gsm8kTask

    trim = Gsm8kTask(Gsm8kConfig()).trim_completion
    out, n = tmp_path / "CHAT", 2
    common = ["--base", f"model={varied_model_dir}", "task=gsm8k", "task.prompt_format=chat",
              "task.system_prompt=Solve it.", f"out={out}"]
    assert _cli("eval", *common, *_own_args(n)) == 0
    assert _cli("eval", *common, *_harness_args(n)) == 0
    own = [json.loads(line) for line in RunDir(out).predictions_file.read_text().splitlines()]
    samples = _samples(RunDir(out).harness_task_dir("gsm8k"))
    for pred in own:
        s = samples[int(pred["id"])]["strict-match"]
        assert pred["prompt"].startswith("<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\nQuestion: ")
        assert s["arguments"][0][0] == pred["prompt"]
        assert trim(s["resps"][0][0]) == pred["completion"]
    proto = json.loads((RunDir(out).harness_task_dir("gsm8k") / "results.json").read_text())["protocol"]
    assert proto["prompt_format"] == "chat" and proto["system_prompt"] == "Solve it."
    assert len(proto["chat_template_sha256"]) == 64

    assert _cli("eval", *common, *_harness_args(n), "harness.apply_chat_template=false", "--overwrite") == 0
    plain = _samples(RunDir(out).harness_task_dir("gsm8k"))
    assert all(v["strict-match"]["arguments"][0][0].startswith("Question: ") for v in plain.values())


class ScriptedLM:
    """A harness LM that answers each prompt with a fixed completion, cut at the stop strings as HFLM cuts."""

    def __new__(cls, completions: dict[str, str]):
        from lm_eval.api.model import LM
        from lm_eval.models.utils import postprocess_generated_text

        class _Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [postprocess_generated_text(completions[r.args[0]], r.args[1]["until"], None) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Scripted()


def _harness_verdicts(completions_by_row: list[str], rows: list[dict], cfg) -> tuple[list[str], list[tuple[bool, bool]]]:
    """(prompts, (strict, flexible) per row) from the harness's own gsm8k pipeline on scripted completions."""
    import lm_eval

    from tunelab.evaluation.harness import load_tasks, task_manager

    tasks, _ = load_tasks(cfg)
    from tunelab.tasks.gsm8k import Gsm8kTask

    prompts = [Gsm8kTask.build_prompt(r["question"]) for r in rows]
    res = lm_eval.simple_evaluate(model=ScriptedLM(dict(zip(prompts, completions_by_row))), tasks=list(tasks.values()),
                                  num_fewshot=0, limit=len(rows), log_samples=True, task_manager=task_manager())
    by_doc: dict[int, dict[str, float]] = {}
    for s in res["samples"]["gsm8k"]:
        by_doc.setdefault(s["doc_id"], {})[s["filter"]] = s["exact_match"]
        assert s["arguments"][0][0] == prompts[s["doc_id"]], "the harness's prompt differs from tunelab's"
    return prompts, [(bool(by_doc[i]["strict-match"]), bool(by_doc[i]["flexible-extract"])) for i in range(len(rows))]


def _tunelab_verdicts(completions: list[str], rows: list[dict]) -> list[tuple[bool, bool]]:
    from tunelab.tasks.gsm8k import Gsm8kConfig, Gsm8kTask

    task = Gsm8kTask(Gsm8kConfig())
    examples = [task.to_example(r, i) for i, r in enumerate(rows)]
    scored = task.score(examples, [task.trim_completion(c) for c in completions])
    return [(p["correct"], p["correct_flexible"]) for p in scored.per_example]


def _test_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (GSM8K_DIR / "test.jsonl").read_text().splitlines()[:n]]


def _gold(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


AGREEING_STYLES = [
    lambda r, g: " " + r["answer"],                                   # the reference solution: right in both
    lambda r, g: " " + r["answer"].rsplit("####", 1)[0] + f"#### {int(g) + 1}",  # wrong final answer
    lambda r, g: f" The answer is {g}.",                              # no answer line: flexible only
    lambda r, g: f" So {g} in total.\n#### {g}\n",                    # the answer line, then the stop
    lambda r, g: f" She makes ${g}.",                                 # a dollar amount
    lambda r, g: f" {int(g):,} is the result, so #### {int(g):,}",    # thousands separators
    lambda r, g: " I do not know.",                                   # no number at all
    lambda r, g: f" {int(g) + 3} minus 3 is {g}, and {int(g) * 2} is double\nQuestion: next",  # stop string
]


def test_scoring_agrees_question_by_question():
    """The harness's filters + exact_match and tunelab's extractors agree on every completion of 40 questions."""
    rows = _test_rows(40)
    completions = [AGREEING_STYLES[i % len(AGREEING_STYLES)](r, _gold(r)) for i, r in enumerate(rows)]
    cfg = load_config(overrides=["harness=gsm8k"])
    _, harness = _harness_verdicts(completions, rows, cfg)
    tunelab = _tunelab_verdicts(completions, rows)
    assert harness == tunelab
    assert 0 < sum(s for s, _ in tunelab) < sum(f for _, f in tunelab) < len(rows)  # not a trivial agreement


def test_documented_differences():
    """The protocol differences the module docstring lists, each on a real question: (harness, tunelab) verdicts."""
    rows = _test_rows(4)
    g = [_gold(r) for r in rows]
    completions = [
        f" so ####{g[0]}",                                   # 2. strict regex: no space after ####
        f" so #### ${g[1]}",                                 # 2. strict regex: a dollar sign
        f" the answer is {g[2]}...",                         # 3. flexible regex: trailing dots
        f" so #### {g[3]}\nThen 5 + 5 = 10",                 # 1. stop rule: text after the answer line
    ]
    _, harness = _harness_verdicts(completions, rows, load_config(overrides=["harness=gsm8k"]))
    tunelab = _tunelab_verdicts(completions, rows)
    assert tunelab == [(True, True), (True, True), (False, True), (True, True)]
    assert harness == [(False, True), (False, True), (False, False), (True, False)]


def test_shipped_config_is_the_harness_task():
    """harness_tasks/gsm8k.yaml = the installed harness's gsm8k.yaml but for the data source."""
    import lm_eval

    from tunelab.evaluation.harness import SHIPPED_TASKS_DIR, shipped_task_config

    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    ours = yaml.safe_load((SHIPPED_TASKS_DIR / "gsm8k.yaml").read_text())
    data = ("dataset_path", "dataset_name", "dataset_kwargs")
    assert {k: v for k, v in ours.items() if k not in data} == {k: v for k, v in theirs.items() if k not in data}
    assert theirs["dataset_path"] == "openai/gsm8k" and ours["dataset_path"] == "json"
    filled = shipped_task_config("gsm8k", load_config(overrides=["harness=gsm8k"]))
    assert {Path(p).name for p in filled["dataset_kwargs"]["data_files"].values()} == {"train.jsonl", "test.jsonl"}
    assert all(Path(p).is_file() for p in filled["dataset_kwargs"]["data_files"].values())


# ---- results layout, report, compare -------------------------------------------------------


def test_results_layout_and_protocol(evaluated):
    folder = RunDir(evaluated["run"]).harness_task_dir("gsm8k")
    assert sorted(p.name for p in folder.iterdir()) == ["lm_eval_results.json", "results.json", "samples.jsonl"]
    own = json.loads((folder / "lm_eval_results.json").read_text())
    assert own["results"]["gsm8k"][STRICT] is not None and own["n-shot"] == {"gsm8k": 0}
    res = json.loads((folder / "results.json").read_text())
    assert res["kind"] == "harness" and res["task"] == "harness:gsm8k" and res["method"] == "lora"
    assert res["metrics"]["n"] == N_DOCS and set(res["metrics"]) == {STRICT, FLEX, "n"}
    assert res["metrics"][STRICT] == own["results"]["gsm8k"][STRICT]
    p = res["protocol"]
    assert p["harness_version"] == "0.4.13" and p["num_fewshot"] == 0 and p["decoding"] == "greedy"
    assert p["max_new_tokens"] == N_NEW and p["stop"]["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert p["prompt_format"] == "plain" and p["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert len(p["task_config_sha256"]) == 64 and "shipped" in p["task_source"]
    assert RunDir(evaluated["run"]).eval_results()["kind"] == "eval"  # tunelab's own evaluation kept


def test_report_lists_harness_results(evaluated):
    from tunelab.experiments.report import collect_runs

    runs, notes = collect_runs([evaluated["base"].parent])
    harness = sorted((r.method, r.metrics["exact_match,strict-match"] >= 0) for r in runs if r.task == "harness:gsm8k")
    assert harness == [("base", True), ("lora", True)]
    assert {r.task for r in runs} == {"gsm8k", "harness:gsm8k"}
    assert all(r.config["harness.num_fewshot"] == 0 for r in runs if r.task == "harness:gsm8k")


def test_compare_pairs_harness_samples(evaluated, tmp_path):
    from tunelab.experiments.report import compare_evals, format_comparison

    cmp = compare_evals(evaluated["base"], evaluated["run"])
    assert cmp["task"] == "gsm8k" and [c["task"] for c in cmp["also"]] == ["harness:gsm8k"]
    h = cmp["also"][0]
    assert h["examples"] == N_DOCS and set(h["metrics"]) == {STRICT, FLEX}
    assert "harness:gsm8k" in format_comparison(cmp)
    # harness results only (a copy of BASE without tunelab's own eval): compare pairs the harness samples
    only = tmp_path / "ONLY"
    shutil.copytree(RunDir(evaluated["base"]).harness_dir, RunDir(only).harness_dir)
    flipped = RunDir(only).harness_task_dir("gsm8k") / RunDir.HARNESS_SAMPLES_FILE
    lines = [json.loads(x) for x in flipped.read_text().splitlines()]
    for s in lines:
        s["exact_match"] = 1.0 if s["doc_id"] < 2 else s["exact_match"]
    flipped.write_text("\n".join(json.dumps(s) for s in lines) + "\n")
    h = compare_evals(evaluated["base"] / "eval" / "harness" / "gsm8k", only)
    base_strict = [v for d, v in sorted(_strict(evaluated["base"]).items())]
    expected = sum((1.0 if i < 2 else v) - v for i, v in enumerate(base_strict)) / N_DOCS
    assert h["metrics"][STRICT]["b_minus_a"] == pytest.approx(expected)


def _strict(folder: Path) -> dict[int, float]:
    return {d: s["strict-match"]["exact_match"] for d, s in _samples(RunDir(folder).harness_task_dir("gsm8k")).items()}


def _doctored_copy(src: Path, dst: Path, **protocol_or_fields) -> Path:
    shutil.copytree(RunDir(src).harness_task_dir("gsm8k"), dst)
    res = json.loads((dst / "results.json").read_text())
    for key, value in protocol_or_fields.items():
        for where in (res, res["protocol"]):
            if key in where:
                where[key] = value
    (dst / "results.json").write_text(json.dumps(res))
    return dst


@pytest.mark.parametrize("change, reason", [
    ({"model": "HuggingFaceTB/SmolLM2-360M"}, "different base models"),
    ({"num_fewshot": 5}, "num_fewshot"),
    ({"harness_task": "gsm8k_cot"}, "different harness tasks"),
    ({"max_new_tokens": 256}, "max_new_tokens"),
])
def test_compare_refuses_other_model_task_or_protocol(evaluated, tmp_path, change, reason):
    from tunelab.experiments.report import compare_evals

    other = _doctored_copy(evaluated["run"], tmp_path / "gsm8k", **change)
    with pytest.raises(ValueError, match=reason):
        compare_evals(RunDir(evaluated["base"]).harness_task_dir("gsm8k"), other)


def test_compare_refuses_harness_against_own_eval(evaluated, tmp_path):
    from tunelab.experiments.report import compare_evals

    own_only = tmp_path / "OWN"
    shutil.copytree(RunDir(evaluated["base"]).eval_dir, RunDir(own_only).eval_dir,
                    ignore=shutil.ignore_patterns(RunDir.HARNESS_DIR))
    harness_only = tmp_path / "HARNESS"
    shutil.copytree(RunDir(evaluated["run"]).harness_dir, RunDir(harness_only).harness_dir)
    with pytest.raises(ValueError, match="protocols score differently"):
        compare_evals(own_only, harness_only)


def test_compare_without_samples_names_the_setting(evaluated, tmp_path):
    from tunelab.experiments.report import compare_evals

    other = _doctored_copy(evaluated["run"], tmp_path / "gsm8k")
    (other / RunDir.HARNESS_SAMPLES_FILE).unlink()
    with pytest.raises(ValueError, match="harness.log_samples=true"):
        compare_evals(RunDir(evaluated["base"]).harness_task_dir("gsm8k"), other)


# ---- bad input -----------------------------------------------------------------------------


def test_unknown_task_lists_close_names():
    from tunelab.evaluation.harness import load_tasks

    with pytest.raises(ConfigError) as err:
        load_tasks(load_config(overrides=["harness=[gsm8kk,arc_easyy]"]))
    text = str(err.value)
    assert "'gsm8kk' does not exist" in text and "close: gsm8k" in text and "arc_easy" in text
    assert len(err.value.problems) == 2  # both names reported at once


def test_hub_only_task_offline_says_what_to_do(monkeypatch):
    from tunelab.evaluation.harness import load_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"arc_easy.*Hub is unreachable.*HF_DATASETS_OFFLINE.*ships local data only for: gsm8k"):
        load_tasks(load_config(overrides=["harness=arc_easy"]))


def test_gsm8k_offline_without_local_data(monkeypatch, tmp_path):
    from tunelab.evaluation.harness import load_tasks

    (tmp_path / "gsm8k").mkdir()
    monkeypatch.setenv("TUNELAB_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"lacks train.jsonl/test.jsonl.*TUNELAB_DATA_DIR"):
        load_tasks(load_config(overrides=["harness=gsm8k"]))


def test_bad_task_fails_before_the_model_loads(tmp_path, monkeypatch):
    """A typo in harness= costs the task index, not a model load."""
    import tunelab.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "load_model_for_eval", lambda *a, **k: pytest.fail("the model was loaded"))
    assert _cli("eval", "--base", "harness=gsm8kk", f"out={tmp_path / 'B'}") == 2
    assert not (tmp_path / "B").exists()  # nothing written for a command that did nothing


def test_harness_settings_are_range_checked():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["harness=[gsm8k,gsm8k]", "harness.num_fewshot=-1", "harness.limit=0",
                               "harness.batch_size=0", "harness.max_new_tokens=0"])
    assert len(err.value.problems) == 5


def test_missing_lm_eval_names_the_extra(monkeypatch):
    from tunelab.evaluation.harness import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"tunelab\[harness\]"):
        require_lm_eval()


@pytest.mark.slow
def test_default_model_agrees_question_by_question(tmp_path):
    """The real default model, 4 questions, zero-shot, greedy, 64 new tokens, batch 1: tunelab vs the harness.

    Completions agree up to tunelab's stop; strict verdicts agree; a flexible verdict may differ only
    where the harness kept generating past tunelab's stop (difference 1 of the module docstring).
    """
    from tunelab.tasks.gsm8k import Gsm8kConfig, Gsm8kTask

    trim = Gsm8kTask(Gsm8kConfig()).trim_completion
    out, n, budget = tmp_path / "BASE", 4, 64
    common = ["model=smollm2-135m", "task=gsm8k", f"out={out}"]
    assert _cli("eval", "--base", *common, f"eval.limit={n}", "eval.batch_size=1", f"eval.max_new_tokens={budget}",
                "eval.reference_loss=false") == 0
    assert _cli("eval", "--base", *common, "harness=gsm8k", "harness.num_fewshot=0", f"harness.limit={n}",
                "harness.batch_size=1", f"harness.max_new_tokens={budget}") == 0
    own = [json.loads(line) for line in RunDir(out).predictions_file.read_text().splitlines()]
    samples = _samples(RunDir(out).harness_task_dir("gsm8k"))
    for pred in own:
        s = samples[int(pred["id"])]
        raw = s["strict-match"]["resps"][0][0]
        assert s["strict-match"]["arguments"][0][0] == pred["prompt"]
        assert trim(raw) == pred["completion"]
        assert bool(s["strict-match"]["exact_match"]) == pred["correct"]
        if bool(s["flexible-extract"]["exact_match"]) != pred["correct_flexible"]:
            assert raw.rstrip() != trim(raw), f"question {pred['id']}: flexible differs without the stop-rule reason"

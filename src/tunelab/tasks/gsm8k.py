"""GSM8K: grade-school math word problems, scored by exact match of the final answer.

Data: ``openai/gsm8k`` (config ``main``) from the Hub, or a local folder with ``train.jsonl`` and
``test.jsonl`` in the layout of github.com/openai/grade-school-math (``task.data_dir`` or
``$TUNELAB_DATA_DIR/gsm8k``). Each row is ``{"question": ..., "answer": ...}``; the final answer
follows ``#### `` on the answer's last line.

A real example as the model sees it (prompt, then the training response)::

    Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many
    clips in May. How many clips did Natalia sell altogether in April and May?
    Answer: Natalia sold 48/2 = 24 clips in May.
    Natalia sold 48+24 = 72 clips altogether in April and May.
    #### 72

Scoring (both reported): **strict** reads the number after ``####`` (the official format);
**flexible** takes the last number in the completion. Both normalise the official way: strip
``,`` and ``$`` and a trailing ``.`` before the exact string match. The **answer-format rate** is
the share of completions that end in the official ``#### N`` line at all, right or wrong: at 135M
parameters it moves long before accuracy does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from tunelab.config import TaskConfig, opt
from tunelab.tasks.base import Example, Scored, Task
from tunelab.registry import TASKS

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
STRICT_ANSWER = re.compile(r"####\s*(\$?-?[0-9][0-9,]*(?:\.[0-9]+)?\.?)")
ANY_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")
# The answer line is complete once "#### <number>" is followed by a line break.
ANSWER_LINE_DONE = re.compile(r"####\s*\$?-?[0-9][0-9,]*(?:\.[0-9]+)?\.?\s*\n")


def normalize_number(text: str | None) -> str | None:
    """Official GSM8K normalisation: drop ',' and '$', strip spaces and one trailing '.'."""
    if text is None:
        return None
    text = text.replace(",", "").replace("$", "").strip()
    if text.endswith("."):
        text = text[:-1]
    return text or None


def extract_strict(completion: str) -> str | None:
    """The number after the first '####' (the official answer format), normalised."""
    m = STRICT_ANSWER.search(completion)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    """The last number anywhere in the completion, normalised."""
    found = ANY_NUMBER.findall(completion)
    return normalize_number(found[-1]) if found else None


def reference_answer(answer: str) -> str:
    """The gold answer: the text after '####' on the answer's last line, normalised."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
    return normalize_number(answer.split("####")[-1])


@dataclass
class Gsm8kConfig(TaskConfig):
    """GSM8K word problems."""

    name: str = opt("gsm8k", "GSM8K grade-school math (exact match of the final answer).")
    data_dir: Optional[str] = opt(
        None, "Local folder with train.jsonl/test.jsonl (default: $TUNELAB_DATA_DIR/gsm8k, else the Hub)."
    )
    hub_id: str = opt("openai/gsm8k", "Hub dataset id used when no local folder is configured.")
    strip_calculator_annotations: bool = opt(
        True, "Remove the <<48/2=24>> calculator annotations from training targets."
    )


@TASKS.register
class Gsm8kTask(Task):
    name = "gsm8k"
    config_cls = Gsm8kConfig
    data_subdir = "gsm8k"
    primary_metric = "accuracy_strict"
    example_metrics = {"accuracy_strict": "correct", "accuracy_flexible": "correct_flexible",
                       "answer_format_rate": "answer_formatted"}
    skip_reason = "lacked a question or an answer with '####'"
    input_fields = ("question",)  # what `tunelab generate --prompt TEXT` fills
    #: the stopping rule in words, recorded in results.json's protocol block
    stop_rule = "EOS, or a line break after the '#### <number>' answer line, or '\\nQuestion:'"

    def load_hub_rows(self, split: str) -> list[dict]:
        return self.hub_dataset(self.config.hub_id, "main", split)

    def check_row(self, row):
        wrong = [f for f in ("question", "answer") if row.get(f) is not None and not isinstance(row[f], str)]
        if wrong:
            return (f"field '{wrong[0]}' is {type(row[wrong[0]]).__name__}, not a string: "
                    f"write it as a JSON string (GSM8K rows are {{\"question\": \"...\", \"answer\": \"... #### N\"}})")
        return None

    @staticmethod
    def build_prompt(question: str) -> str:
        return PROMPT_TEMPLATE.format(question=question.strip())

    def format_prompt(self, row, tokenizer=None, max_prompt_tokens=None):
        return self.build_prompt(row["question"])

    def to_example(self, row, idx, tokenizer=None, max_prompt_tokens=None):
        question, answer = row.get("question"), row.get("answer")
        if not question or not answer or "####" not in answer:
            return None
        response = answer.strip()
        if self.config.strip_calculator_annotations:
            response = CALCULATOR_ANNOTATION.sub("", response)
        return Example(
            id=str(row.get("id", f"{idx}")),
            prompt=self.format_prompt(row),
            response=" " + response,
            reference=reference_answer(answer),
        )

    def stop_checker(self):
        return lambda text: ANSWER_LINE_DONE.search(text) is not None or "\nQuestion:" in text

    def trim_completion(self, completion: str) -> str:
        cut = completion.find("\nQuestion:")
        if cut >= 0:
            completion = completion[:cut]
        m = ANSWER_LINE_DONE.search(completion)
        if m:
            completion = completion[: m.end()]
        return completion.rstrip()

    def generation_presets(self):
        # The original project's eval: HF generate with max_length 500 (prompt included), greedy.
        return {"original": {"max_new_tokens": 400, "num_beams": 1}}

    def extract(self, completion: str):
        return {"strict": extract_strict(completion), "flexible": extract_flexible(completion)}

    def score(self, examples, completions):
        per, strict_ok, flex_ok, formatted = [], 0, 0, 0
        for ex, comp in zip(examples, completions):
            got = self.extract(comp)
            s, f = got["strict"] == ex.reference, got["flexible"] == ex.reference
            # the official "#### N" answer line, right or wrong: what a small model learns first
            has_format = got["strict"] is not None
            strict_ok += s
            flex_ok += f
            formatted += has_format
            per.append({"extracted": got["strict"], "extracted_flexible": got["flexible"],
                        "expected": ex.reference, "correct": s, "correct_flexible": f,
                        "answer_formatted": has_format})
        n = max(len(examples), 1)
        return Scored(
            metrics={"accuracy_strict": strict_ok / n, "accuracy_flexible": flex_ok / n,
                     "answer_format_rate": formatted / n, "n": len(examples)},
            per_example=per,
        )



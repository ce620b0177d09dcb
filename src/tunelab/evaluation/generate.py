"""``tunelab generate``, the library side: a JSONL input file (batched, resumable) and the prompt loop.

Everything that decides *what the model sees and what counts as its answer* is shared with
evaluation (:mod:`tunelab.evaluation.engine`), so a generated completion is the completion
``tunelab eval`` would score: the model is loaded as eval loads it (a run's artifact applied
unmerged, a merged/plain HF folder, or the base model), the prompt is built by the run's task
(:meth:`Task.format_prompt` / :meth:`Task.format_input`) unless ``--raw``, and decoding is eval's.

Modes (the argparse side is :mod:`tunelab.cli.generate`): ``--prompt TEXT`` (streamed),
``--input IN.jsonl --output OUT.jsonl`` (batched, resumable: ids already in OUT are skipped, a
half-written last line is dropped; an existing OUT that tunelab did not write, with no
``OUT.jsonl.meta.json`` beside it, is refused untouched unless ``--overwrite``), and ``--interactive`` (keeps the model loaded; a prompt ends
with an empty line; Ctrl-C stops the current answer, Ctrl-D or Ctrl-C at the prompt quits).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TextIO

from tunelab.evaluation.engine import Generator
from tunelab.tasks import Task
from tunelab.utils import append_jsonl, atomic_write_json, iter_jsonl, log

__all__ = [
    "BatchJob",
    "InputItem",
    "interactive",
    "prepare_batch",
    "read_input",
    "read_prompts",
    "run_batch",
    "scan_output",
    "task_input_fields",
]

#: ``--input`` rows are generated in chunks of this many rows (length-sorted within a chunk).
#: Inputs of at most this many rows are batched exactly like ``tunelab eval`` batches its test set.
CHUNK_ROWS = 4096


# --------------------------------------------------------------------------------------------
# Input file
# --------------------------------------------------------------------------------------------


def _field_value(row: dict, path: str) -> Any:
    """``row[path]``, where a dotted path walks nested objects (``prediction.0.text``); None when missing."""
    if path in row:
        return row[path]
    node: Any = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def task_input_fields(task: Task) -> list[str] | None:
    """The row fields an --input row must hold (None: the task does not say; format_prompt checks the row)."""
    return list(task.input_fields) or None


@dataclass
class InputItem:
    """One row of --input: its id, line number and the text the prompt is made of."""

    id: str
    line: int
    row: dict


def read_input(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a JSONL file; a malformed line raises naming the file and line."""
    if not path.is_file():
        where = path.parent if path.parent.is_dir() else None
        have = sorted(p.name for p in where.glob("*.jsonl"))[:8] if where else []
        raise FileNotFoundError(
            f"--input {path} does not exist"
            + (f" ({where} has: {', '.join(have)})" if have else "")
        )
    rows = list(iter_jsonl(path))
    if not rows:
        raise ValueError(f"--input {path} holds no rows")
    return rows


def input_items(path: Path, rows: list[tuple[int, dict]], fields: list[str] | None, id_field: str) -> list[InputItem]:
    """Check the rows (fields present, not empty, unique ids); every problem is reported, up to 5 lines each."""
    missing, empty, seen, dups = [], [], {}, []
    items = []
    for idx, (lineno, row) in enumerate(rows):
        has_id = row.get(id_field) is not None
        item_id = str(row[id_field]) if has_id else str(idx)  # the row index, as eval numbers rows
        if item_id in seen:
            how = "" if has_id else f" (its row index: the row has no '{id_field}')"
            dups.append(f"{path}:{lineno}: id '{item_id}'{how} already used on line {seen[item_id]}")
        else:
            seen[item_id] = lineno
        if fields:
            absent = [f for f in fields if _field_value(row, f) is None]
            if absent:
                missing.append(f"{path}:{lineno}: no field {absent if len(absent) > 1 else repr(absent[0])}; fields present: {sorted(row)}")
                continue
            blank = [f for f in fields if not str(_field_value(row, f)).strip()]
            if blank:
                empty.append(f"{path}:{lineno}: empty prompt (field {blank[0]!r} is blank)")
                continue
        items.append(InputItem(item_id, lineno, row))
    problems = []
    for kind, lines, fix in (
        ("row(s) lack the prompt field", missing, "choose the field with --field NAME"),
        ("row(s) have an empty prompt", empty, "fill or remove those lines"),
        ("id(s) are repeated (resuming needs unique ids)", dups, f"make the '{id_field}' field unique or pick another with --id-field"),
    ):
        if lines:
            shown = "\n  ".join(lines[:5]) + (f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else "")
            problems.append(f"{len(lines)} {kind}; {fix}:\n  {shown}")
    if problems:
        raise ValueError("\n".join(problems))
    return items


# --------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------


def _meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def scan_output(output: Path) -> tuple[set[str], int]:
    """(ids already written to ``output``, bytes of its whole lines); the file is not changed.

    Only a file tunelab generate wrote is read (its ``OUT.jsonl.meta.json`` beside it); any other
    non-empty file is refused untouched. A half-written last line (a crash) is left out of the
    count: :func:`run_batch` cuts it off before appending.
    """
    meta = _meta_path(output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder: give a file name (e.g. {output / 'completions.jsonl'})")
    if not output.is_file():
        return set(), 0
    data = output.read_bytes()
    if data and not meta.is_file():
        raise ValueError(
            f"--output {output} already exists and is not a tunelab generate output (no {meta.name} beside it): "
            f"it was left untouched; pass another --output, or --overwrite to replace it"
        )
    end = data.rfind(b"\n") + 1
    done: set[str] = set()
    for lineno, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            done.add(str(rec["id"]))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{output}:{lineno}: not a line tunelab generate wrote; pass another --output, or --overwrite"
            ) from None
    return done, end


def _meta_settings(meta: Path, output: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta} cannot be read ({exc}): pass --overwrite to start {output} afresh") from None
    return loaded.get("settings", {}) if isinstance(loaded, dict) else {}


@dataclass
class BatchJob:
    """A checked --input file and its --output: what is left to generate."""

    input_path: Path
    output: Path
    items: list[InputItem]
    field: Optional[str]
    todo: list[int]  # indices into items not yet in the output
    settings: dict[str, Any]
    #: bytes of whole lines in an earlier output (a half-written last line beyond them is cut off)
    keep_bytes: int = 0


def prepare_batch(gen: Generator, input_path: Path, output: Path, field: str | None = None,
                  id_field: str | None = None, overwrite: bool = False) -> BatchJob:
    """Read and check the input and any earlier output (before the model is loaded); nothing is written."""
    rows = read_input(input_path)
    id_field = id_field or getattr(gen.task.config, "id_field", None) or "id"
    if field is None and gen.raw:
        field = "prompt"
    fields = [field] if field is not None else task_input_fields(gen.task)
    items = input_items(input_path, rows, fields, id_field)
    settings = {**gen.settings(), "field": field}
    meta = _meta_path(output)
    if overwrite and not output.is_dir():
        output.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    done, keep = scan_output(output)
    if done:
        foreign = sorted(done - {it.id for it in items})
        if foreign:
            raise ValueError(
                f"{output} holds {len(foreign)} id(s) that are not in {input_path} (e.g. '{foreign[0]}'): "
                f"it belongs to another input; pass another --output, or --overwrite"
            )
        if meta.is_file():
            before = _meta_settings(meta, output)
            # a key the earlier output does not record (written by a tunelab that did not record it) is not a change
            changed = {k: (before[k], v) for k, v in settings.items() if k in before and before[k] != v}
            if changed:
                shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ValueError(
                    f"{output} was written with other settings ({shown}); resuming would mix them: "
                    f"use the same options, another --output, or --overwrite"
                )
        log.info(f"resuming {output}: {len(done)} of {len(items)} rows already done")
    todo = [i for i, it in enumerate(items) if it.id not in done]
    return BatchJob(input_path, output, items, field, todo, settings, keep)


def _cut_partial_line(output: Path, keep: int) -> None:
    """Drop a half-written last line left by an interrupted run (only in a tunelab output: see scan_output)."""
    if output.is_file() and output.stat().st_size > keep:
        log.warning(f"{output}: dropping a half-written last line ({output.stat().st_size - keep} bytes) "
                    f"left by an interrupted run")
        with open(output, "r+b") as fh:
            fh.truncate(keep)


def _item_prompt(gen: Generator, item: InputItem, field: str | None) -> str:
    """An --input row's prompt: its --field text as a user input, else the row's task fields."""
    if field is not None:
        return gen.prompt_for_text(str(_field_value(item.row, field)))
    return gen.prompt_for_row(item.row)


def run_batch(gen: Generator, job: BatchJob, progress: bool = True) -> int:
    """Generate the rows of ``job`` not yet in its output, appending one whole line per row; returns lines written."""
    output, items = job.output, job.items
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_meta_path(output), {"settings": job.settings, "input": str(job.input_path)})
    _cut_partial_line(output, job.keep_bytes)
    if not job.todo:
        log.info(f"{output}: all {len(items)} rows already done")
        return 0
    gen.load()
    extract = gen.defines_extract
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(job.todo), desc="generate", unit="ex", dynamic_ncols=True)
    written = 0
    try:
        for start in range(0, len(job.todo), CHUNK_ROWS):
            chunk = [items[i] for i in job.todo[start:start + CHUNK_ROWS]]
            prompts = [_item_prompt(gen, it, job.field) for it in chunk]

            def on_done(indices: list[int], completions: list[str], chunk=chunk, prompts=prompts) -> None:
                nonlocal written
                for i, completion in zip(indices, completions):
                    record: dict[str, Any] = {"id": chunk[i].id, "prompt": prompts[i], "completion": completion}
                    if extract:
                        record["extracted"] = gen.task.extract(completion)
                    append_jsonl(output, record)  # one whole line per write, flushed
                    written += 1
                if bar is not None:
                    bar.update(len(indices))

            gen.complete_batch(prompts, on_done)
    finally:
        if bar is not None:
            bar.close()
    log.info(f"wrote {written} completion(s) to {output} ({len(items) - len(job.todo)} were already there)")
    return written


# --------------------------------------------------------------------------------------------
# Interactive mode
# --------------------------------------------------------------------------------------------


def read_prompts(lines: Callable[[], str], show: Callable[[str], None]) -> Iterable[str]:
    """Prompts from a line source: a prompt ends with an empty line, or at end of input."""
    buf: list[str] = []
    while True:
        show("> " if not buf else ". ")
        try:
            line = lines()
        except EOFError:
            if any(s.strip() for s in buf):
                yield "\n".join(buf)
            return
        if line.strip() == "" and buf:
            if any(s.strip() for s in buf):
                yield "\n".join(buf)
            buf = []
        elif line.strip() or buf:
            buf.append(line)


def interactive(gen: Generator, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """The prompt loop: type a prompt, end it with an empty line; Ctrl-C stops an answer; Ctrl-D quits."""
    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    if tty and stdin is sys.stdin:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    prompt_marks = (lambda s: (sys.stderr.write(s), sys.stderr.flush())) if tty else (lambda s: None)

    def next_line() -> str:
        line = input() if stdin is sys.stdin else stdin.readline()
        if stdin is not sys.stdin and line == "":
            raise EOFError
        return line.rstrip("\n")

    print(
        f"tunelab generate: {gen.target.description} ready "
        f"({'raw prompts' if gen.raw else f'{gen.task.name} template'}). "
        "End a prompt with an empty line; Ctrl-C stops an answer; Ctrl-D quits.",
        file=sys.stderr, flush=True,
    )
    stream = out or sys.stdout
    try:
        for text in read_prompts(next_line, prompt_marks):
            try:
                gen.complete(gen.prompt_for_text(text), stream=stream)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr, flush=True)
            stream.write("\n\n")
            stream.flush()
    except KeyboardInterrupt:
        pass
    print("", file=sys.stderr, flush=True)
    return 0

"""The user's own data (task=sft): ``data.source`` → the rows of a split, through ``datasets.load_dataset``.

``data.source`` is one of

- a local file or glob of ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / ``.arrow`` files: the
  ``datasets`` builder is chosen by the extension (``json``, ``csv``, ``parquet``, ``arrow``) and the
  files form the split ``train``;
- a local folder: ``load_dataset(folder)``, which reads the splits from the file names
  (``train.jsonl``/``test.jsonl``, or the Hub's ``data/train-00000-of-00001.parquet`` layout); a
  folder written by ``Dataset.save_to_disk`` is read with ``load_from_disk``;
- anything else is a Hub dataset id, ``load_dataset(id, data.subset, revision=data.revision)`` — the
  same call as for a local folder, so a folder in the Hub's layout exercises the Hub's code path.

Loading goes through ``datasets`` (no hand-written parsers); what is hand-written is the checking
that turns its failures into messages naming the fix: an offline Hub id, a missing path, a split
that is not there (the splits that are), a CSV row with the wrong number of fields (pandas, behind
the csv builder, reports a line number of its own buffer, and silently pads short rows), and a
``data.columns`` name that is not a column. Rows come back as plain dicts with the columns renamed
to the format's field names (:func:`rename_columns`); nothing is tokenized here.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: file extension -> the datasets builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
MAX_SHOWN = 5


class DataSourceError(ValueError):
    """data.source cannot be read as configured; the message names what to set."""


@dataclass
class SourceSplit:
    """The rows of one split of a source, and how to name them in messages."""

    rows: list[dict]
    where: str  # e.g. "chats.jsonl (split train)"
    columns: list[str]


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def looks_local(source: str) -> bool:
    """True when ``source`` is written as a path (not a Hub id): absolute or ./ ~ prefixed, a known
    extension, a glob, or more than one '/' (Hub ids are NAME or OWNER/NAME)."""
    return (source.startswith(("/", "./", "../", "~", "."))
            or Path(source).suffix.lower() in BUILDERS
            or any(ch in source for ch in "*?[")
            or source.count("/") > 1 or "\\" in source)


def shown(problems: list[str]) -> str:
    """Up to MAX_SHOWN problems, one per line, and how many more there are."""
    more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    return "\n  " + "\n  ".join(problems[:MAX_SHOWN]) + more


def local_files(source: str) -> list[Path]:
    """The files a local file path or glob names (sorted); raises DataSourceError when there are none."""
    pattern = os.path.expanduser(source)
    if any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise DataSourceError(f"data.source '{source}' matches no file: fix the pattern, or point data.source "
                                  f"at a file, a folder or a Hub dataset id")
    else:
        files = [Path(pattern)]
    bad = sorted({f.suffix or f.name for f in files if f.suffix.lower() not in BUILDERS})
    if bad:
        raise DataSourceError(f"data.source '{source}': cannot read {', '.join(bad)} files; use "
                              f"{', '.join(BUILDERS)} files, or a folder of them")
    kinds = {BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataSourceError(f"data.source '{source}' mixes file types ({', '.join(sorted(kinds))}): "
                              f"convert them to one type, or use a folder with one split per file")
    return files


def check_csv(path: Path) -> tuple[list[str], list[str]]:
    """(the header, 'file:line: ...' for each row whose field count differs from the header's); blank lines are skipped."""
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return [], [f"{path}: the file is empty (a CSV needs a header line naming the columns)"]
        for fields in reader:
            if fields and len(fields) != len(header):
                problems.append(f"{path}:{reader.line_num}: {len(fields)} fields, but the header has {len(header)} "
                                f"({', '.join(header)}); quote fields that hold commas (\"a, b\")")
    return header, problems


def _load_failure(source: str, exc: Exception, hub: bool) -> DataSourceError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        detail += f" ({cause.__class__.__name__}: {str(cause).strip().splitlines()[0]})"
    if not hub:
        return DataSourceError(f"data.source '{source}' could not be read ({exc.__class__.__name__}: {detail})")
    if _offline():
        why = (f"offline mode is on ({' / '.join(v for v in OFFLINE_VARS if os.environ.get(v))} is set), so only "
               f"datasets already in the Hugging Face cache load")
    else:
        why = "the Hub could not be reached or has no such dataset (check the id, data.subset and data.revision)"
    return DataSourceError(
        f"data.source '{source}' is read as a Hub dataset id and could not be loaded ({exc.__class__.__name__}: "
        f"{detail}); {why}. Use local data: set data.source to a file (.jsonl/.json/.csv/.parquet/.arrow), a glob "
        f"of them or a folder (e.g. data.source=path/to/train.jsonl), or go online and unset "
        f"{' / '.join(OFFLINE_VARS)}"
    )


def load_source(source: str, subset: str | None = None, revision: str | None = None):
    """``data.source`` as a ``datasets.DatasetDict`` (all its splits); raises DataSourceError naming the fix."""
    from datasets.utils import logging as ds_logging

    shown_bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # its per-split bars would interleave with tunelab's own log
    try:
        return _load(source, subset, revision)
    finally:
        if shown_bars:
            ds_logging.enable_progress_bar()


def _load(source: str, subset: str | None, revision: str | None):
    from datasets import DatasetDict, Features, Value, load_dataset, load_from_disk

    path = Path(os.path.expanduser(source))
    is_glob = any(ch in source for ch in "*?[")
    if not is_glob and not path.exists() and looks_local(source):
        raise DataSourceError(f"data.source '{source}' does not exist (looked for {path.absolute()}): point it at a "
                              f"file, a glob of files, a folder, or a Hub dataset id")
    hub = not is_glob and not path.exists()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = load_from_disk(str(path))  # a Dataset.save_to_disk folder
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        if path.is_dir() or hub:  # one code path: load_dataset(folder) or load_dataset(hub_id)
            kwargs: dict[str, Any] = {"revision": revision} if revision else {}
            return load_dataset(str(path) if path.is_dir() else source, subset, **kwargs)
        files = local_files(source)
        builder = BUILDERS[files[0].suffix.lower()]
        options: dict[str, Any] = {}
        if builder == "csv":
            checked = [check_csv(f) for f in files]
            problems = [p for _, found in checked for p in found]
            if problems:
                raise DataSourceError(f"data.source '{source}': {len(problems)} CSV row(s) cannot be read:{shown(problems)}")
            # a CSV cell is text: no number guessing ("2" stays "2"), no NA guessing ("" stays "", "NA" stays "NA")
            options = {"features": Features({col: Value("string") for col in checked[0][0]}), "na_filter": False}
        return load_dataset(builder, data_files={"train": [str(f) for f in files]}, **options)
    except DataSourceError:
        raise
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
        raise _load_failure(source, exc, hub) from exc


def split_names(dataset_dict) -> list[str]:
    return list(dataset_dict.keys())


def base_split(split: str) -> str:
    """The split's name without a slice: 'train[:80%]' -> 'train'."""
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def rename_columns(rows: list[dict], columns: dict[str, str], where: str) -> list[dict]:
    """Rows with the user's columns renamed to the format's field names (data.columns: {field: column}).

    A mapped column absent from the data, or null in some rows, is an error naming the column, the
    rows and the columns present.
    """
    if not columns:
        return rows
    present = sorted({k for r in rows[:1] for k in r})
    absent = [(field, col) for field, col in columns.items() if rows and col not in rows[0]]
    if absent:
        which = ", ".join(f"data.columns.{f}='{c}'" for f, c in absent)
        raise DataSourceError(f"{where}: {which} is not a column (row 0 on; columns present: {', '.join(present)}): "
                              f"set data.columns to column names of the data")
    problems = [f"row {i}: column '{col}' (data.columns.{field}) is missing or null"
                for i, row in enumerate(rows) for field, col in columns.items() if row.get(col) is None]
    if problems:
        raise DataSourceError(f"{where}: {len(problems)} row(s) lack a mapped column (columns present: "
                              f"{', '.join(present)}):{shown(problems)}")
    renamed_from = set(columns.values())
    out = []
    for row in rows:
        new = {k: v for k, v in row.items() if k not in renamed_from}
        new.update({field: row[col] for field, col in columns.items()})
        out.append(new)
    return out


class Source:
    """A loaded ``data.source``: its splits, read once (train and eval come from one load)."""

    def __init__(self, source: str, subset: str | None = None, revision: str | None = None,
                 columns: dict[str, str] | None = None):
        self.source, self.subset, self.revision = source, subset, revision
        self.columns = dict(columns or {})
        self._data = None

    @property
    def data(self):
        if self._data is None:
            self._data = load_source(self.source, self.subset, self.revision)
        return self._data

    def splits(self) -> list[str]:
        return split_names(self.data)

    def has_split(self, split: str) -> bool:
        return base_split(split) in self.splits()

    def describe(self, split: str) -> str:
        return f"{self.source} (split {split})"

    def rows(self, split: str, key: str = "data.split") -> SourceSplit:
        """The rows of ``split`` (a slice like 'train[:80%]' is allowed), columns renamed per data.columns.

        ``key`` is the setting that chose the split, named when the split does not exist.
        """
        if not self.has_split(split):
            raise DataSourceError(
                f"{key}='{split}' is not a split of data.source '{self.source}' (its splits: "
                f"{', '.join(self.splits())}): set {key} to one of them"
                + (", or hold out part of data.split with data.eval_fraction=0.1" if key != "data.split" else "")
            )
        part = self.data[split] if split in self.data else self._sliced(split)
        where = self.describe(split)
        rows = part.to_list()
        return SourceSplit(rename_columns(rows, self.columns, where), where, list(part.column_names))

    def _sliced(self, split: str):
        """A slice of a split ('train[:100]', 'train[10%:20%]'), by datasets' own ReadInstruction."""
        from datasets import ReadInstruction, concatenate_datasets

        parts = []
        for piece in split.split("+"):
            name = base_split(piece)
            ds = self.data[name]
            instruction = ReadInstruction.from_spec(piece.strip())
            (bounds,) = instruction.to_absolute({name: len(ds)})
            parts.append(ds.select(range(bounds.from_ or 0, len(ds) if bounds.to is None else bounds.to)))
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

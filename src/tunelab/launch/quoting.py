"""The one gate between text and a job script: every value written into an sbatch script passes here.

A job script is read twice: by ``sbatch``, which parses the ``#SBATCH`` lines (whitespace splits
words, ``"`` and ``'`` group, ``\\`` escapes, an unquoted ``#`` starts a comment; in ``--output``
SLURM expands ``%j``-style patterns, ``%%`` is a literal ``%``, and any backslash turns the patterns
off), and by bash, which runs every other line. So each value is written as one of:

- a comment (the title): one line, no control characters;
- a shell word (paths, the tunelab arguments, the interpreter): one line, ``shlex``-quoted;
- shell code (``slurm.setup``): one line per item, written as given (it is code by design);
- an ``#SBATCH`` option: one word without quotes, backslashes, ``#`` or whitespace;
- an ``#SBATCH`` path (``--output``, ``--chdir``): double-quoted with ``"`` escaped, ``%`` doubled
  where SLURM expands patterns and refused where it might, backslashes refused.

Nothing is written unchecked: a value that cannot be made safe is a problem that names its field
and the fix (:class:`ScriptValues` collects them; the caller raises them together).
"""

from __future__ import annotations

import shlex
import unicodedata
from typing import Iterable, Optional

#: Unicode categories refused everywhere: control characters (C0, DEL, C1: newline, CR, ESC, NUL...),
#: lone surrogates (undecodable bytes of a file name) and the line/paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class ShellExpansion(str):
    """A word tunelab writes for bash to expand (double-quoted), never user text: the array index."""


#: ``--point $SLURM_ARRAY_TASK_ID`` of a sweep's array tasks: the only expansion tunelab writes.
ARRAY_TASK_ID = ShellExpansion("$SLURM_ARRAY_TASK_ID")


def _describe(chars: Iterable[str]) -> str:
    return ", ".join(repr(c) for c in sorted(set(chars)))


def text_problem(field: str, value: str, fix: str) -> Optional[str]:
    """The problem of text that cannot go into a job script at all (line breaks, control characters)."""
    if not isinstance(value, str):
        return f"{field} must be text, got {type(value).__name__} {value!r}"
    bad = [c for c in value if unicodedata.category(c) in _REFUSED_CATEGORIES]
    if bad:
        return (f"{field} {value!r} contains {_describe(bad)} (line breaks or control characters), which "
                f"cannot be written into a job script: {fix}")
    return None


def option_problem(field: str, value: str, fix: str) -> Optional[str]:
    """An ``#SBATCH`` option value: one word that sbatch reads as written."""
    problem = text_problem(field, value, fix)
    if problem:
        return problem
    bad = [c for c in value if c.isspace() or c in "\"'\\#"]
    if bad:
        return (f"{field} {value!r} contains {_describe(bad)}, which sbatch would split, unquote or cut "
                f"(# starts a comment): {fix}")
    return None


def path_problem(field: str, value: str, fix: str, *, pattern: bool = True) -> Optional[str]:
    """A path written into an ``#SBATCH`` line (``pattern``: an option where SLURM expands ``%``)."""
    problem = text_problem(field, value, fix)
    if problem:
        return problem
    if "\\" in value:
        return (f"{field} {value!r} contains a backslash, which sbatch reads as an escape (and which turns "
                f"SLURM's %j log names off): {fix}")
    if not pattern and "%" in value:
        return f"{field} {value!r} contains '%', which SLURM may expand as a pattern there: {fix}"
    return None


def sbatch_path(value: str, *, pattern: bool = True, own: str = "") -> str:
    """``value`` + ``own`` as sbatch reads them (check ``value`` with :func:`path_problem` first).

    Double-quoted with ``"`` escaped; where SLURM expands patterns, ``%`` in ``value`` is doubled so it
    stays a ``%``, while ``own`` (tunelab's own file-name pattern, e.g. ``/train-%j.out``) is kept.
    """
    text = value.replace('"', '\\"')
    return '"' + (text.replace("%", "%%") if pattern else text) + own + '"'


def shell_words(values: Iterable[str]) -> str:
    """Arguments for bash, each quoted; :data:`ARRAY_TASK_ID` (tunelab's own) stays an expansion."""
    return " ".join(f'"{v}"' if isinstance(v, ShellExpansion) else shlex.quote(v) for v in values)


def refuse(*problems: Optional[str]) -> None:
    """Raise ConfigError with the problems found (the ``None`` of fine values dropped), before anything is written."""
    found = [p for p in problems if p]
    if found:
        from tunelab.config import ConfigError

        raise ConfigError(found)


class ScriptValues:
    """Renders the values of one script through the checks above, collecting every problem."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def _ok(self, problem: Optional[str]) -> bool:
        if problem:
            self.problems.append(problem)
        return problem is None

    def comment(self, field: str, value: str, fix: str) -> str:
        return value if self._ok(text_problem(field, value, fix)) else ""

    def word(self, field: str, value: str, fix: str) -> str:
        return shlex.quote(value) if self._ok(text_problem(field, value, fix)) else "''"

    def words(self, field: str, values: list[str], fix: str) -> str:
        ok = all([self._ok(text_problem(f"{field} {v!r}", v, fix)) for v in values])
        return shell_words(values) if ok else ""

    def code(self, field: str, value: str, fix: str) -> str:
        return value if self._ok(text_problem(field, value, fix)) else ""

    def option(self, flag: Optional[str], field: str, value, fix: str) -> str:
        """``--flag=value`` (``flag`` None: ``value`` is the whole option, e.g. a slurm.extra item)."""
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not self._ok(option_problem(field, text, fix)):
            return flag or ""
        return f"{flag}={text}" if flag else text

    def number(self, field: str, value) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self.problems.append(f"{field} must be a whole number, got {value!r}")
        return 0

    def path(self, flag: str, field: str, value: str, fix: str, *, pattern: bool = True, own: str = "") -> str:
        if self._ok(path_problem(field, value, fix, pattern=pattern)):
            return f"{flag}={sbatch_path(value, pattern=pattern, own=own)}"
        return flag

    def raise_problems(self) -> None:
        refuse(*self.problems)

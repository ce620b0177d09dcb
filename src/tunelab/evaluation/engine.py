"""The generation engine shared by ``tunelab eval`` and ``tunelab generate``.

* :func:`generate`: batched decoding, by default continuous batching (:mod:`~tunelab.evaluation.decode`:
  a finished row's slot takes the next prompt), or transformers ``generate`` on length-sorted
  batches (:mod:`~tunelab.evaluation.hf_generate`, ``eval.decoder=hf``: the reference; beam search). Each row stops at EOS or as soon as
  the task says its answer is complete (GSM8K: once the ``#### <number>`` line ends), so no
  compute is spent on text after the answer.
* :class:`Generator`: a run's task, generation settings and decoding options (:class:`DecodeOptions`)
  around a loaded model: prompts through the task's template (and the chat template), the
  completion cut at --stop strings and by the task's trim, optionally streamed
  (:class:`TaskStreamer`) — a completion is exactly the one ``tunelab eval`` would score.

Hand-written around ``transformers``' ``generate``: it has no per-row stopping rule of the task's
kind, and its streamers print text that a later token or the task's trim would still change.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, TextIO

import torch

from tunelab.config import ConfigError, EvalConfig, opt
from tunelab.data import render
from tunelab.evaluation.hf_generate import generate_hf
from tunelab.tasks import Task, get_task
from tunelab.utils import log, seed_everything

if TYPE_CHECKING:
    from tunelab.rundir import Target


# --------------------------------------------------------------------------------------------
# Batched generation
# --------------------------------------------------------------------------------------------


def generation_settings(task, eval_cfg: EvalConfig) -> EvalConfig:
    """``eval_cfg`` with the task's ``eval.preset`` applied (the keys the user did not set)."""
    if eval_cfg.preset:
        presets = task.generation_presets()
        if eval_cfg.preset not in presets:
            raise ConfigError([f"eval.preset '{eval_cfg.preset}' is unknown for task '{task.name}' (known: {', '.join(presets) or 'none'})"])
        defaults = EvalConfig()
        # a key the user set explicitly (differs from the default) wins over the preset
        chosen = {k: v for k, v in presets[eval_cfg.preset].items() if getattr(eval_cfg, k) == getattr(defaults, k)}
        return replace(eval_cfg, **chosen)
    return eval_cfg


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], eval_cfg: EvalConfig, stop_check=None,
             progress: bool = True, sampling: dict | None = None, on_batch=None) -> tuple[list[str], int]:
    """Completions for prompts (in input order) and the number of generated tokens.

    ``eval_cfg.decoder`` picks the loop: ``continuous`` (:mod:`tunelab.evaluation.decode`: a finished
    row's slot takes the next prompt; ``eval_cfg.batch_size`` slots) or ``hf`` (transformers
    ``generate`` on length-sorted, left-padded batches: the reference). Beam search, n-gram blocking
    and streaming always use ``hf``. Prompts are taken longest first (memory problems surface at once).
    ``on_batch(indices, completions)`` is called as rows finish (hf: per batch; continuous: per
    step that finished rows), so resumable batch mode writes completions as soon as they exist.
    """
    from tunelab.evaluation import decode

    enc = [render.encode_prompt(p, tokenizer) for p in prompts]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="ex", dynamic_ncols=True)

    def finished(indices: list[int], texts: list[str]) -> None:
        if on_batch is not None:
            on_batch(indices, texts)
        if bar:
            bar.update(len(indices))

    why_not = None
    if eval_cfg.decoder == "continuous":
        why_not = decode.unsupported_reason(model, eval_cfg.num_beams, eval_cfg.no_repeat_ngram_size, sampling)
        if why_not:
            log.debug(f"generation uses transformers generate: the continuous decoder does not do {why_not}")
    try:
        if eval_cfg.decoder == "continuous" and why_not is None:
            return _generate_continuous(model, tokenizer, enc, eval_cfg, stop_check, sampling, finished)
        return generate_hf(model, tokenizer, enc, eval_cfg, stop_check, sampling, finished)
    finally:
        if bar:
            bar.close()


def _generate_continuous(model, tokenizer, enc: list[list[int]], eval_cfg: EvalConfig, stop_check, sampling,
                         finished) -> tuple[list[str], int]:
    from tunelab.cpu_kernels import packed_linears
    from tunelab.evaluation.decode import ContinuousDecoder

    decoder = ContinuousDecoder(model, tokenizer, eval_cfg.batch_size, eval_cfg.max_new_tokens,
                                [tokenizer.eos_token_id], stop_check, sampling, lookup_tokens=eval_cfg.lookup_tokens)

    def on_finish(indices: list[int], tokens: list[list[int]]) -> None:
        finished(indices, [tokenizer.decode(t, skip_special_tokens=True) for t in tokens])

    with packed_linears(model, enabled=eval_cfg.onednn_linear):
        generated = decoder.run(enc, on_finish)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in generated]
    return texts, sum(len(t) for t in generated)


# --------------------------------------------------------------------------------------------
# Decoding options (the flags of `tunelab generate`)
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeOptions:
    """Decoding settings of ``tunelab generate`` (the CLI flags); greedy unless a temperature is set."""

    max_new_tokens: Optional[int] = opt(None, "Maximum generated tokens (default: the run's eval.max_new_tokens).")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy decoding (the default, as in eval).")
    top_p: Optional[float] = opt(None, "Nucleus sampling: keep the smallest token set with this probability mass (needs --temperature > 0).")
    top_k: Optional[int] = opt(None, "Sample only among the k most likely tokens (needs --temperature > 0).")
    stop: list[str] = opt(factory=list, help="Stop when the completion contains this string (repeatable; the string is cut off; \\n and \\t are understood).")
    seed: Optional[int] = opt(None, "Seed of the sampling RNG, set before each prompt (interactive) or batch chunk (default: the run's seed). Greedy decoding ignores it.")
    task_stop: Optional[bool] = opt(None, "Apply the task's stopping rule and trim (GSM8K: stop after the '#### <answer>' line). Default: on, off with --raw.")
    batch_size: Optional[int] = opt(None, "Prompts per batch in --input mode (default: the run's eval.batch_size).")

    def problems(self) -> list[str]:
        p = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            p.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            p.append(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            p.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            p.append(f"--top-k must be >= 1, got {self.top_k}")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            p.append("--top-p/--top-k only apply when sampling: add --temperature (e.g. --temperature 0.7)")
        if any(s == "" for s in self.stop):
            p.append("--stop needs a non-empty string")
        if self.batch_size is not None and self.batch_size < 1:
            p.append(f"--batch-size must be >= 1, got {self.batch_size}")
        return p

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def sampling_kwargs(self) -> dict[str, Any]:
        """Extra ``model.generate`` kwargs (on top of eval's greedy settings)."""
        if not self.sampling:
            return {}
        kw: dict[str, Any] = {"do_sample": True, "temperature": self.temperature}
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        return kw


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a --stop string (a newline is awkward to type in a shell)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class TaskStreamer:
    """A ``model.generate`` streamer that writes the completion as it grows, exactly as it will be returned.

    Text is held back while it could still change: a partial word or character, a tail that may be
    the start of a --stop string, or text the task's trim would cut (GSM8K: trailing whitespace,
    ``\\nQuestion:``). What has been written is always a prefix of the final completion.
    """

    def __init__(self, tokenizer, finalize: Callable[[str], str], stops: list[str], out: TextIO | None = None):
        self.tokenizer, self.finalize, self.stops = tokenizer, finalize, stops
        self.out = out
        self.ids: list[int] = []
        self.written = ""
        self._prompt_seen = False

    def _write(self, text: str) -> None:
        if text:
            out = self.out or sys.stdout
            out.write(text)
            out.flush()
            self.written += text

    def _stable(self, text: str) -> int:
        """Length of the prefix of ``text`` that no later token or trim can change."""
        n = len(text)
        if not text.endswith("\n"):
            space = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
            n = space + 1 if space >= 0 else 0
        for s in self.stops:  # a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = min(n, len(text) - k)
                    break
        final = self.finalize(text)
        common = len(os.path.commonprefix([text, final]))
        return min(n, common)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character
            return
        stable = text[: self._stable(text)]
        if stable.startswith(self.written):
            self._write(stable[len(self.written):])

    def end(self) -> None:
        text = self.finalize(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.startswith(self.written):
            self._write(text[len(self.written):])


# --------------------------------------------------------------------------------------------
# The generator of `tunelab generate`
# --------------------------------------------------------------------------------------------


class Generator:
    """The run's task, generation settings and decoding options, and (after :meth:`load`) its model."""

    def __init__(self, target: "Target", options: DecodeOptions, raw: bool = False, chat: bool = False,
                 device: torch.device | None = None):
        cfg = target.cfg
        self.target, self.options, self.raw, self.chat = target, options, raw, chat
        self.task: Task = get_task(cfg.task.name)(cfg.task)
        # the run's prompt format (what it was trained and is evaluated with); --chat: chat for this call
        self.task_cfg = replace(cfg.task, prompt_format="chat") if chat else cfg.task
        eval_cfg: EvalConfig = generation_settings(self.task, cfg.eval)
        if options.max_new_tokens is not None:
            eval_cfg = replace(eval_cfg, max_new_tokens=options.max_new_tokens)
        if options.batch_size is not None:
            eval_cfg = replace(eval_cfg, batch_size=options.batch_size)
        self.eval_cfg = eval_cfg
        self.task_stop = (not raw) if options.task_stop is None else options.task_stop
        self.stops = [_unescape(s) for s in options.stop]
        self.seed = cfg.seed if options.seed is None else options.seed
        # the same prompt budget eval gives to_example (tasks that truncate long inputs use it)
        self.max_prompt_tokens = max(8, cfg.data.max_length - eval_cfg.max_new_tokens)
        self.device = device
        self.model = self.tokenizer = None

    def load(self) -> "Generator":
        """Load the model and tokenizer (once); everything before this is cheap checking."""
        # imported here: evaluate builds on this module's generate()
        from tunelab.evaluation.evaluate import load_model_for_eval

        if self.model is None:
            cfg = self.target.cfg
            log.info(f"loading {self.target.description}")
            self.model, self.tokenizer = load_model_for_eval(cfg, self.target.run, self.device)
            if self.chat:
                try:
                    render.prepare_tokenizer(self.tokenizer, self.task_cfg)
                except ConfigError as exc:
                    raise ConfigError([f"--chat: {p}; or drop --chat" for p in exc.problems]) from None
        return self

    def _seed(self) -> None:
        # seeded per call: a prompt with the same seed gets the same sample, whatever was asked before
        if self.options.sampling:
            seed_everything(self.seed)

    # ---- prompts -------------------------------------------------------------------------------
    def _wrap(self, prompt: str) -> str:
        """A task-formatted prompt rendered in the run's prompt format (:func:`tunelab.data.render.generation_prompt`,
        as eval renders it); --raw text stays as it is unless --chat asks for the chat template."""
        self.load()
        if self.raw and not self.chat:
            return prompt
        return render.generation_prompt(prompt, self.tokenizer, self.task_cfg)

    def prompt_for_text(self, text: str) -> str:
        """The model's prompt for one user input: the task template (unless raw), then the run's prompt
        format (task.prompt_format; --chat: the chat template)."""
        if not text.strip():
            raise ValueError("the prompt is empty: pass the text to complete (e.g. --prompt \"What is 7*6?\")")
        if self.raw:
            return self._wrap(text)
        self.load()  # format_input may need the tokenizer (tasks that truncate long inputs)
        return self._wrap(self.task.format_input(text, self.tokenizer, self.max_prompt_tokens))

    def prompt_for_row(self, row: dict) -> str:
        """The model's prompt for a row of the task's input fields (an --input line)."""
        self.load()
        return self._wrap(self.task.format_prompt(row, self.tokenizer, self.max_prompt_tokens))

    # ---- completions ----------------------------------------------------------------------------
    def stop_check(self) -> Callable[[str], bool] | None:
        task_check = self.task.stop_checker() if self.task_stop else None
        stops = self.stops
        if not stops:
            return task_check
        if task_check is None:
            return lambda text: any(s in text for s in stops)
        return lambda text: any(s in text for s in stops) or bool(task_check(text))

    def finalize(self, raw: str) -> str:
        """The completion as returned: cut at the first --stop string, then the task's trim."""
        cut = min((i for i in (raw.find(s) for s in self.stops) if i >= 0), default=-1)
        text = raw[:cut] if cut >= 0 else raw
        return self.task.trim_completion(text) if self.task_stop else text

    @property
    def defines_extract(self) -> bool:
        return type(self.task).extract is not Task.extract

    def complete(self, prompt: str, stream: TextIO | None | bool = None) -> str:
        """One completion; with ``stream`` (True = stdout, or a text stream) it is written as it is generated."""
        self.load()
        self._seed()
        sampling = self.options.sampling_kwargs()
        if stream is not None and stream is not False:
            sampling["streamer"] = TaskStreamer(
                self.tokenizer, self.finalize, self.stops, None if stream is True else stream
            )
        raw, _ = generate(self.model, self.tokenizer, [prompt], self.eval_cfg, self.stop_check(),
                          progress=False, sampling=sampling)
        return self.finalize(raw[0])

    def complete_batch(self, prompts: list[str], on_done: Callable[[list[int], list[str]], None] | None = None,
                       ) -> list[str]:
        """Completions of many prompts, batched and length-sorted exactly as eval does."""
        self.load()
        self._seed()

        def on_batch(indices: list[int], raws: list[str]) -> None:
            if on_done is not None:
                on_done(indices, [self.finalize(r) for r in raws])

        raw, _ = generate(self.model, self.tokenizer, prompts, self.eval_cfg, self.stop_check(),
                          progress=False, sampling=self.options.sampling_kwargs(), on_batch=on_batch)
        return [self.finalize(r) for r in raw]

    def settings(self) -> dict[str, Any]:
        """What decides the completions (stored beside a batch output; a resume must match it)."""
        return {
            "target": self.target.key,
            "task": self.task.name,
            "raw": self.raw,
            "chat": self.chat,
            "prompt_format": self.task_cfg.prompt_format,
            "system_prompt": self.task_cfg.system_prompt,
            "chat_template": self.task_cfg.chat_template,
            "task_stop": self.task_stop,
            "stop": self.stops,
            "max_new_tokens": self.eval_cfg.max_new_tokens,
            "decoder": self.eval_cfg.decoder,
            "num_beams": self.eval_cfg.num_beams,
            "no_repeat_ngram_size": self.eval_cfg.no_repeat_ngram_size,
            "temperature": self.options.temperature,
            "top_p": self.options.top_p,
            "top_k": self.options.top_k,
            "seed": self.seed if self.options.sampling else None,
        }

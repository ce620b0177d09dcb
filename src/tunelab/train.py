"""The training loop: one loop for every method, driven only by the method contract.

What it does per optimizer step: the method's ``on_step_begin`` callbacks; ``grad_accum``
micro-batches (forward, loss, backward; DDP syncs only on the last one); ``on_before_optimizer_step``;
gradient clipping; ``optimizer.step()``; the lr schedule; ``on_step_end``; logging; checkpoints.

Details that matter for correct numbers and speed:
- The loss is the mean over *all target tokens of the whole optimizer step* (every micro-batch and
  every rank), not a mean of per-micro-batch means, so gradient accumulation and DDP give the same
  update as one big batch.
- Logits are computed only at positions that have a target (a forward pre-hook on the output head
  selects them): prompt and padding positions never pay for the vocabulary projection.
- Checkpoints (trainable weights, optimizer, scheduler, callback state, RNG) are written to a
  temporary folder and renamed into place; ``--resume`` continues with the same data order
  (a pure function of seed and epoch), the same lr step and the same dropout RNG.
- A NaN/inf loss stops training before the bad update, saves the last good state and says so.
- SIGTERM/SIGUSR1 (SLURM preemption) write a checkpoint at the end of the current step and exit
  with code 143 so a requeued job resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tunelab.config import RunConfig, TrainConfig, deepspeed_settings, save_config
from tunelab.data import IGNORE_INDEX, MicroBatchStream, build_train_dataset, collate
from tunelab.methods import Method, TrainState, get_method
from tunelab.models import load_model, load_tokenizer, materialize, resolve_device
from tunelab.tasks import get_task
from tunelab.utils import (
    append_jsonl,
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_text,
    count_params,
    git_info,
    log,
    package_versions,
    peak_memory,
    reset_peak_memory,
    seed_everything,
)

PREEMPT_EXIT_CODE = 143


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the last good state was saved."""


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(PREEMPT_EXIT_CODE)


# --------------------------------------------------------------------------------------------
# Distributed set-up (torchrun / srun set these; they never carry hyperparameters)
# --------------------------------------------------------------------------------------------


def init_distributed(device_spec: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_spec)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


@contextlib.contextmanager
def one_process_group(needed: bool, device_spec: str = "auto"):
    """A process group of one on loopback for the length of a run, when ``needed`` and none exists.

    DeepSpeed's engine needs a process group even on one device (ZeRO-Offload on one GPU is a
    common use); torchrun/srun-launched runs already have one. Afterwards the group is destroyed and
    the environment restored, so a later run in the same process (a test, a notebook) starts clean.
    """
    if not needed or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())})
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() and device_spec != "cpu" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_deepspeed_engine(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_deepspeed_engine(model):
        return model.module
    return model


def wrap_deepspeed(model: nn.Module, optimizer, scheduler, train_cfg: TrainConfig):
    """Hand the prepared model, the method's optimizer and our lr schedule to a DeepSpeed engine.

    The engine then owns gradient reduction, ZeRO partitioning, clipping, the optimizer step and
    the schedule's step (at accumulation boundaries). bf16/fp16 "auto" follow the model's dtype.
    """
    import deepspeed

    ds = deepspeed_settings(train_cfg)
    dtype = next(model.parameters()).dtype
    for key, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = dtype == wanted
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    log.info(f"DeepSpeed {deepspeed.__version__}: ZeRO stage {engine.zero_optimization_stage()}, "
             f"{type(optimizer).__name__}")
    return engine, optimizer, scheduler


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """FSDP2: one shard group per transformer block, then the root (embeddings, final norm, head).

    The blocks are the classes the model lists in ``_no_split_modules`` (transformers' own marker
    of a block that must stay whole), so any HF causal LM, PEFT-wrapped or not, shards the way
    torchtune and accelerate shard it. Each rank keeps 1/world of every parameter, gradient and
    optimizer moment; a block's full weights exist only during its forward/backward. Gradients are
    reduce-scattered as a mean over ranks, as DDP all-reduces them, so the loss scaling is shared.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        log.warning("train.parallelism=fsdp: the model names no transformer blocks (_no_split_modules); "
                    "sharding it as one unit, which gathers every weight at once")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    log.info(f"FSDP2: {len(blocks)} blocks ({', '.join(sorted(block_names))}) + root sharded over {world} processes")
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (a collective: every rank must call it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------------------------
# Loss on target positions only
# --------------------------------------------------------------------------------------------


class TargetPositionSelector:
    """Forward pre-hook on the output head: keep hidden states only where a target token follows.

    The head then computes logits [n_targets, vocab] instead of [batch, seq, vocab].
    """

    def __init__(self, model: nn.Module):
        head = unwrap(model).get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output embeddings (lm_head); tunelab trains causal LMs")
        self.mask: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.mask is None:
            return None
        hidden = args[0]
        return (hidden[self.mask],) + tuple(args[1:])

    def remove(self) -> None:
        self.handle.remove()


def target_loss(model: nn.Module, selector: TargetPositionSelector, batch: dict[str, torch.Tensor],
                reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy at the target positions only: their sum, or (``reduction="none"``) one value per
    target token, row after row (row i's count is its number of labels != -100 after the first)."""
    labels = batch["labels"]
    shifted = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = shifted != IGNORE_INDEX
    targets = shifted[shifted != IGNORE_INDEX]
    selector.mask = mask
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        selector.mask = None
    logits = out.logits
    return nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)


# --------------------------------------------------------------------------------------------
# Schedule, checkpoints
# --------------------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig, max_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(math.ceil(cfg.warmup_ratio * max_steps))

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, max_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def gather_trainable(method: Method, model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's trainable tensors, whole and on CPU (under FSDP or ZeRO-3 a collective: call on every rank)."""
    if is_deepspeed_engine(model) and model.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.module.parameters()), modifier_rank=None):
            return {k: v.detach().contiguous().cpu().clone() for k, v in method.trainable_state_dict(model.module).items()}
    return {k: _full(v).detach().contiguous().cpu() for k, v in method.trainable_state_dict(unwrap(model)).items()}


def gather_optimizer_state(model: nn.Module, optimizer, fsdp: bool) -> dict:
    """The optimizer state as one process would hold it.

    Under FSDP (every rank must call this) it is torch.distributed.checkpoint's full state dict,
    keyed by parameter name and complete on rank 0, so it resumes onto any number of processes.
    """
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], optim_state: dict | None, scheduler,
                    callbacks, state: TrainState, extra: dict, keep: int, tmp: Path | None = None) -> Path:
    """Write a complete checkpoint atomically (temp folder + rename); prune old ones.

    ``optim_state`` None: the optimizer state is already in ``tmp`` (DeepSpeed wrote it there).
    """
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = tmp or Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(
            {
                "scheduler": scheduler.state_dict(),
                "callbacks": [cb.state_dict() for cb in callbacks],
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "epoch": state.epoch, **extra}, indent=2))
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, method: Method, model: nn.Module, optimizer, scheduler, callbacks, device,
                    parallelism: str) -> dict:
    from safetensors.torch import load_file

    info = json.loads((ckpt / "state.json").read_text())
    saved_by = info.get("parallelism", "ddp")
    if saved_by != parallelism:
        raise ValueError(
            f"{ckpt} was written with train.parallelism={saved_by} and this run uses {parallelism}: their optimizer "
            f"states are laid out differently. Resume with train.parallelism={saved_by}."
        )
    if parallelism == "deepspeed":
        # the engine restores weights, optimizer (its ZeRO partitions) and lr schedule from its own files
        model.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=True)
    else:
        tensors = {k: v.to(device) for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
        optim_state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        if parallelism == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            from torch.distributed.tensor import DTensor, distribute_tensor

            # every rank read the whole checkpoint; each keeps its own shard
            params = dict(unwrap(model).named_parameters())
            tensors = {k: distribute_tensor(v, params[k].device_mesh, params[k].placements)
                       if isinstance(params.get(k), DTensor) else v for k, v in tensors.items()}
            method.load_trainable_state_dict(unwrap(model), tensors)
            set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        else:
            method.load_trainable_state_dict(unwrap(model), tensors)
            optimizer.load_state_dict(optim_state)
    trainer_state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer_state["scheduler"])
    for cb, sd in zip(callbacks, trainer_state["callbacks"]):
        cb.load_state_dict(sd)
    torch.set_rng_state(trainer_state["rng_cpu"])
    if trainer_state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer_state["rng_cuda"])
    return info


# --------------------------------------------------------------------------------------------
# Loggers
# --------------------------------------------------------------------------------------------


class MetricLoggers:
    """metrics.jsonl always; TensorBoard / W&B / MLflow when listed in train.report_to."""

    def __init__(self, run_dir: Path, cfg: RunConfig, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.wandb = self.mlflow = None
        if not enabled:
            return
        if "tensorboard" in cfg.train.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in cfg.train.report_to:
            import wandb

            self.wandb = wandb.init(dir=str(run_dir), config=asdict(cfg), name=run_dir.name)
        if "mlflow" in cfg.train.report_to:
            import mlflow

            mlflow.start_run(run_name=run_dir.name)
            self.mlflow = mlflow

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _all_reduce_sum(value: float, device: torch.device, world: int) -> float:
    if world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.task.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train one run; returns results.json's content. The run directory is ``cfg.out``."""
    with one_process_group(cfg.train.parallelism == "deepspeed", cfg.model.device):
        return _train(cfg, resume)


def _train(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    t_start = time.time()
    use_deepspeed = cfg.train.parallelism == "deepspeed"
    rank, world, device = init_distributed(cfg.model.device)
    is_main = rank == 0
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    cfg.out = str(run_dir)
    if is_main:
        if (run_dir / "results.json").is_file() and not resume:
            raise FileExistsError(
                f"{run_dir} already holds a finished run: choose another out=, or pass --resume to continue it"
            )
        if checkpoint_dirs(run_dir) and not resume:
            raise FileExistsError(f"{run_dir} holds checkpoints of an unfinished run: pass --resume to continue it")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)

    method: Method = get_method(cfg.method.name)(cfg.method)
    task = get_task(cfg.task.name)(cfg.task)
    source = materialize(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, source)
    data, stats = build_train_dataset(task, tokenizer, cfg.data, cfg.seed)
    log.info(f"{stats.used} training examples ({stats.total_tokens} tokens, {stats.target_tokens} target tokens)")

    reset_peak_memory(device)
    model = load_model(cfg.model, source, device)
    model.config.use_cache = False
    model = method.prepare(model, cfg)
    if not cfg.model.load_in_4bit:
        model.to(device)
    params = count_params(model)
    log.info(f"method={method.name}: {params['trainable_params']:,} trainable of {params['total_params']:,} parameters")
    # FSDP shards before the optimizer exists: the optimizer must hold the sharded parameters.
    fsdp = world > 1 and cfg.train.parallelism == "fsdp"
    if fsdp:
        model = shard_model(model, device, world)

    optimizer = method.build_optimizer(model, cfg.train)
    stream = MicroBatchStream(data, cfg.train.batch_size, cfg.seed, cfg.data.shuffle, cfg.data.group_by_length, rank, world)
    steps_per_epoch = max(1, math.ceil(stream.per_epoch / cfg.train.grad_accum))
    max_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, max_steps))
    callbacks = method.callbacks()
    state = TrainState(step=0, max_steps=max_steps, grad_accum=cfg.train.grad_accum, world_size=world, rank=rank, run_dir=run_dir)

    if use_deepspeed:
        model, optimizer, scheduler = wrap_deepspeed(model, optimizer, scheduler, cfg.train)
    parallelism = "deepspeed" if use_deepspeed else "fsdp" if fsdp else "ddp"

    if resume:
        ckpts = checkpoint_dirs(run_dir)
        if ckpts:
            info = load_checkpoint(ckpts[-1], method, model, optimizer, scheduler, callbacks, device, parallelism)
            state.step = info["step"]
            log.info(f"resumed from {ckpts[-1]} at step {state.step}/{max_steps}")
            if is_main:
                _drop_metrics_after(run_dir / "metrics.jsonl", state.step)
        else:
            log.info(f"--resume: no checkpoint in {run_dir}/checkpoints, starting from step 0")

    if world > 1 and parallelism == "ddp":
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.ddp_find_unused_parameters,
        )
    selector = TargetPositionSelector(model)
    loggers = MetricLoggers(run_dir, cfg, enabled=is_main)
    if is_main:
        log.info(
            f"global batch = {cfg.train.batch_size} per device x {cfg.train.grad_accum} accumulation x "
            f"{world} processes = {cfg.train.batch_size * cfg.train.grad_accum * world} examples; "
            f"{max_steps} optimizer steps ({steps_per_epoch} per epoch)"
            + {"deepspeed": "; DeepSpeed", "fsdp": "; FSDP2 (sharded)", "ddp": "; DDP (replicated)"}[parallelism]
            * (world > 1 or use_deepspeed)
        )
    for cb in callbacks:
        cb.on_train_begin(state, unwrap(model), optimizer)

    stop_signal = {"hit": False}

    def _on_signal(signum, frame):  # noqa: ARG001
        stop_signal["hit"] = True
        log.warning(f"received signal {signum}: will checkpoint after this step and exit")

    old_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old_handlers[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not in the main thread
            pass

    progress = None
    if is_main and cfg.train.progress_bar:
        from tqdm import tqdm

        # in a log file (SLURM) a line every 30 s instead of a redraw per step
        interval = 0.1 if sys.stderr.isatty() else 30.0
        progress = tqdm(total=max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=interval)

    model.train()
    train_time = 0.0
    tokens_seen = target_tokens_seen = 0
    window_loss = window_tokens = 0.0
    last_loss = float("nan")
    stopped_reason = None
    try:
        while state.step < max_steps:
            t_step = time.perf_counter()
            micro = []
            for k in range(cfg.train.grad_accum):
                epoch, examples = stream.get(state.step * cfg.train.grad_accum + k)
                micro.append(collate(examples, tokenizer.pad_token_id))
            state.epoch = epoch
            local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            global_targets = _all_reduce_sum(float(local_targets), device, world)
            for cb in callbacks:
                cb.on_step_begin(state, unwrap(model))
            step_loss_sum = 0.0
            for k, batch in enumerate(micro):
                state.micro_step = k
                batch = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
                sync = k == len(micro) - 1
                if fsdp:
                    model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last only
                ctx = model.no_sync() if (world > 1 and parallelism == "ddp" and not sync) else _nullcontext()
                with ctx:
                    loss_sum = target_loss(model, selector, batch)
                    # DDP averages gradients over ranks: scale so the result is sum / global targets.
                    scaled = loss_sum * (world / max(global_targets, 1.0))
                    try:
                        if use_deepspeed:
                            # the engine reduces (and ZeRO-partitions) gradients on the boundary micro-batch,
                            # which it counts through step(): call it after every micro-batch but the last
                            model.backward(scaled, scale_wrt_gas=False)
                            if not sync:
                                model.step()
                        else:
                            scaled.backward()
                    except FloatingPointError as exc:  # raised by methods that step inside backward
                        ckpts = checkpoint_dirs(run_dir)
                        raise TrainingDiverged(
                            f"{exc} at optimizer step {state.step + 1}. Weights were being updated during backward "
                            f"(layer-wise optimizer), so the current state is not saved; the last good checkpoint is "
                            f"{ckpts[-1] if ckpts else 'none (set train.save_steps)'}. Lower train.lr, then "
                            f"`tunelab train --resume {run_dir}`."
                        ) from exc
                step_loss_sum += float(loss_sum.detach())
                tokens_seen += int(batch["attention_mask"].sum())
            step_loss = _all_reduce_sum(step_loss_sum, device, world) / max(global_targets, 1.0)
            target_tokens_seen += local_targets
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                stopped_reason = "diverged"
                break
            for cb in callbacks:
                cb.on_before_optimizer_step(state, unwrap(model), optimizer)
            grad_norm = None
            if use_deepspeed:
                model.step()  # boundary: clip (train.max_grad_norm), optimizer step, lr step, zero grads
                norm = model.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None and cfg.train.max_grad_norm > 0 else None
            else:
                if cfg.train.max_grad_norm > 0:
                    params_with_grad = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                    if params_with_grad:
                        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(params_with_grad, cfg.train.max_grad_norm)))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            for cb in callbacks:
                cb.on_step_end(state, unwrap(model), optimizer)
            train_time += time.perf_counter() - t_step
            last_loss = step_loss
            window_loss += step_loss * global_targets  # global sums: the logged loss is over all ranks
            window_tokens += global_targets
            if progress:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if state.step % cfg.train.logging_steps == 0 or state.step == max_steps:
                tok_s = _all_reduce_sum(tokens_seen, device, world) / max(train_time, 1e-9)
                loggers.log({
                    "step": state.step, "epoch": state.epoch,
                    "loss": window_loss / max(window_tokens, 1.0),
                    "lr": scheduler.get_last_lr()[0],
                    **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                    "tokens_per_s": tok_s,
                    "elapsed_s": time.time() - t_start,
                })
                window_loss = window_tokens = 0.0
            if cfg.train.save_steps and state.step % cfg.train.save_steps == 0 and state.step < max_steps:
                _save(run_dir, method, model, optimizer, scheduler, callbacks, state, cfg, is_main, world, parallelism)
            if any(cb.should_stop(state) for cb in callbacks):
                stopped_reason = "method_requested_stop"
                break
            if _any_rank(stop_signal["hit"], device, world):
                stopped_reason = "preempted"
                break
    finally:
        if progress:
            progress.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        selector.remove()

    if stopped_reason == "diverged":
        ckpt = _save(run_dir, method, model, optimizer, scheduler, callbacks, state, cfg, is_main, world, parallelism)
        loggers.close()
        raise TrainingDiverged(
            f"loss became {step_loss} at optimizer step {state.step + 1}: training stopped before that update. "
            f"The last good state (step {state.step}) is saved in {ckpt}. Lower train.lr, raise "
            f"train.warmup_steps or set train.max_grad_norm, then resume with `tunelab train --resume {run_dir}`."
        )
    if stopped_reason == "preempted":
        ckpt = _save(run_dir, method, model, optimizer, scheduler, callbacks, state, cfg, is_main, world, parallelism)
        loggers.close()
        log.warning(f"preempted at step {state.step}: checkpoint {ckpt}; resume with `tunelab train --resume {run_dir}`")
        raise Preempted()

    for cb in callbacks:
        cb.on_train_end(state, unwrap(model))
    results: dict[str, Any] = {}
    # Collectives run on every rank (a collective called by rank 0 alone deadlocks the others).
    tokens_total = _all_reduce_sum(tokens_seen, device, world)
    target_tokens_total = _all_reduce_sum(target_tokens_seen, device, world)
    final_model = unwrap(model)
    if parallelism in ("fsdp", "deepspeed"):
        # Gather the trained tensors (every rank takes part), then rank 0 loads them into an
        # unsharded copy of the prepared model, so save_artifact and extra_results see a plain model.
        tensors = gather_trainable(method, model)
        final_model = None
        if is_main:
            final_model = method.prepare(load_model(cfg.model, source, torch.device("cpu")), cfg)
            method.load_trainable_state_dict(final_model, tensors)
        del tensors
    if is_main:
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".artifact-"))
        method.save_artifact(final_model, tmp)
        atomic_replace_dir(tmp, run_dir / method.artifact_dir)
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        results = {
            "schema_version": 1,
            "kind": "train",
            "run_dir": str(run_dir),
            "task": cfg.task.name,
            "method": cfg.method.name,
            "model": cfg.model.name,
            "seed": cfg.seed,
            "steps": state.step,
            "max_steps": max_steps,
            "stopped": stopped_reason or "completed",
            "epochs_completed": state.step / steps_per_epoch,
            "world_size": world,
            "parallelism": parallelism if (world > 1 or use_deepspeed) else None,
            "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world,
            **params,
            **peak_memory(device),
            "train_time_s": train_time,
            "wall_time_s": time.time() - t_start,
            "train_tokens": tokens_total,
            "train_tokens_per_s": tokens_total / max(train_time, 1e-9),
            "target_tokens_per_s": target_tokens_total / max(train_time, 1e-9),
            "final_loss": last_loss,
            "data": asdict(stats),
            "method_results": method.extra_results(final_model, optimizer),
            "device": str(device),
            **git_info(),
            "versions": package_versions(),
        }
        atomic_write_json(run_dir / "results.json", results)
        log.info(
            f"done: {state.step} steps in {train_time:.1f}s, {results['train_tokens_per_s']:.0f} tokens/s, "
            f"final loss {last_loss:.4f} -> {run_dir}"
        )
    # The final artifact supersedes the checkpoints of a completed run; keep the last for resume-extend.
    loggers.close()
    if world > 1:
        dist.barrier()
    return results


def _save(run_dir, method, model, optimizer, scheduler, callbacks, state, cfg, is_main, world, parallelism):
    path = run_dir / "checkpoints" / f"step-{state.step:06d}"
    tmp = None
    if parallelism == "deepspeed":
        # every rank writes its ZeRO partition into one folder: its name must be known to all
        tmp = run_dir / "checkpoints" / f".tmp-step-{state.step:06d}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        dist.barrier()
        tensors, optim_state = gather_trainable(method, model), None
    elif is_main or parallelism == "fsdp":  # under FSDP gathering the shards takes every rank
        tensors = gather_trainable(method, model)
        optim_state = gather_optimizer_state(model, optimizer, parallelism == "fsdp")
    if is_main:
        path = save_checkpoint(run_dir, tensors, optim_state, scheduler, callbacks, state,
                               {"parallelism": parallelism}, cfg.train.keep_checkpoints, tmp=tmp)
    if world > 1:
        dist.barrier()
    return path


def _drop_metrics_after(path: Path, step: int) -> None:
    """A run that died after its last checkpoint logged steps it will now redo: forget those lines."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        log.info(f"metrics.jsonl: dropped {len(lines) - len(kept)} lines logged after step {step} (they are redone)")


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    return _all_reduce_sum(1.0 if flag else 0.0, device, world) > 0


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

"""Launchers: sbatch scripts (validated, quoted, rendered), real SLURM jobs, real multi-process DDP runs.

Three groups:

- unit tests (no SLURM, seconds): time formats, validation, quoting, rendering, the bad-input messages;
- DDP (unmarked, real processes): ``tunelab train --nproc 2`` over gloo is preempted with SIGUSR1,
  resumed, and ends with the same weights on both ranks and the same adapter as one process with the
  whole batch;
- ``@pytest.mark.slurm``: jobs on a real SLURM. They need ``sbatch`` on PATH and ``SLURM_CONF`` set:
  ``.ci/run`` starts the loopback cluster (``../shared/tools/slurm-local/start.sh``, see
  scripts/ci_slurm.sh); by hand: ``eval "$(bash ../shared/tools/slurm-local/start.sh)"``. The tests
  never start or stop the cluster themselves: other sessions may share it, and stop.sh cancels every job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from procs import kill_group, run_group
from tunelab.cli import main
from tunelab.launch import (
    SlurmConfig,
    format_status,
    job_states,
    parse_time,
    run_status,
    validate_slurm,
)
from tunelab.launch.submit import _compress

REPO = Path(__file__).resolve().parents[1]

# A sitecustomize that makes every rank save its trainable weights at the end of training, so a test
# can compare the ranks (only rank 0 writes the run directory). Loaded through PYTHONPATH by the
# processes torchrun/srun start; active only when TUNELAB_TEST_RANK_DUMP is set.
RANK_DUMP_HOOK = '''
import os

_DIR = os.environ.get("TUNELAB_TEST_RANK_DUMP")
if _DIR:
    from tunelab.methods.base import Callback as _Callback
    from tunelab.registry import METHODS as _METHODS

    class _Dump(_Callback):
        def on_train_end(self, state, model):
            from safetensors.torch import save_file

            os.makedirs(_DIR, exist_ok=True)
            tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, os.path.join(_DIR, f"rank{state.rank}-of-{state.world_size}.safetensors"))

    _get_method = _METHODS.get

    def get_method(name):
        cls = _get_method(name)

        class Dumping(cls):
            def callbacks(self):
                return [*super().callbacks(), _Dump()]

        return Dumping

    _METHODS.get = get_method  # every lookup of the run's method (the trainer's too) gets the dumping subclass
'''


@pytest.fixture()
def rank_hook(tmp_path, monkeypatch):
    """PYTHONPATH + env so that child processes (torchrun ranks, SLURM jobs) dump per-rank weights."""
    hook = tmp_path / "rank_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_DUMP_HOOK)
    dump = tmp_path / "ranks"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("TUNELAB_TEST_RANK_DUMP", str(dump))
    return dump


@pytest.fixture()
def quiet_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _tiny(tiny_model_dir, out, *extra) -> list[str]:
    return [f"model={tiny_model_dir}", "task=gsm8k", "method=lora", "train.report_to=[]",
            "train.progress_bar=false", f"out={out}", *extra]


def _script_of(output: str, name: str) -> str:
    """The script text printed by --dry-run after '# ---- .../<name> ...'."""
    m = re.search(rf"# ---- \S.*?/{re.escape(name)} \(not written: --dry-run\) ----\n(.*?)\n# would run: ", output, re.S)
    assert m, f"no {name} in the dry-run output:\n{output}"
    return m.group(1) + "\n"


# --------------------------------------------------------------------------------------------
# Unit tests: validation, quoting, rendering (no SLURM needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("5:30", 330), ("03:00:00", 10800), ("1-12", 129600), ("2-01:30", 178200), ("1-00:00:01", 86401),
])
def test_parse_time_accepts_slurm_formats(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text,fragment", [
    ("3h", "not a SLURM time"), ("01:61:00", "above 59"), ("1-25:00", "hours after the day count"),
    ("0", "zero"), ("1:2:3:4", "not a SLURM time"), ("", "not a SLURM time"),
])
def test_parse_time_rejects_with_the_formats(text, fragment):
    with pytest.raises(ValueError, match=fragment) as exc:
        parse_time(text)
    assert "HH:MM:SS" in str(exc.value)


def test_validate_reports_every_problem_at_once():
    s = SlurmConfig(partition="debug --wrap=reboot", account="a;b", time="99:99", mem="lots", nodes=0,
                    gpu_type="A100", extra=["--output=x.out", "--mail-type END"], signal_seconds=-1, master_port=0)
    problems = validate_slurm(s)
    text = "\n".join(problems)
    for fragment in ("slurm.partition 'debug --wrap=reboot'", "slurm.account 'a;b'", "slurm.time '99:99'",
                     "slurm.mem 'lots'", "slurm.nodes must be >= 1", "slurm.gpu_type=A100 needs",
                     "tunelab sets --output itself; use slurm.log_dir", "'--mail-type END' must be one sbatch option",
                     "slurm.signal_seconds must be >= 0", "slurm.master_port"):
        assert fragment in text, f"missing {fragment!r} in:\n{text}"
    assert validate_slurm(SlurmConfig(time="00:01:00", signal_seconds=120))[0].startswith("slurm.signal_seconds=120 is not shorter")
    assert validate_slurm(SlurmConfig(nodes=2), "sweep") and validate_slurm(SlurmConfig(nodes=2), "eval")
    assert validate_slurm(SlurmConfig(partition="gpu,debug", constraint="a100&ib", gpus_per_node=4, gpu_type="A100")) == []


def test_compress_array_indices():
    assert _compress([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _compress([4]) == "4"


def test_dry_run_quotes_metacharacters_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    """A run directory full of shell metacharacters is quoted; the script is valid bash; nothing is written."""
    out = tmp_path / "run $(touch PWNED) `id`; echo 'hi' & x"
    rc = main(["submit", "train", *_tiny(tiny_model_dir, out, "train.max_steps=2"), "--slurm.account=PROJ",
               "--slurm.partition=debug", "--slurm.time=03:00:00", "--slurm.gpus_per_node=1", "--slurm.gpu_type=A100",
               "--slurm.setup=module load Python/3.11", "--slurm.extra=--mail-type=END", "--then-eval", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    assert not out.exists() and not (tmp_path / "PWNED").exists()
    script = _script_of(text, "train.sbatch")
    quoted = "'" + str(out).replace("'", "'\"'\"'") + "'"
    assert f"RUN={quoted}\n" in script  # shlex.quote of the whole path: nothing in it runs
    for directive in ("--account=PROJ", "--partition=debug", "--time=03:00:00", "--gpus-per-node=A100:1",
                      "--signal=B:USR1@120", "--requeue", "--mail-type=END", "--open-mode=append", f'--output="{out}/slurm/train-%j.out"'):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "module load Python/3.11\n" in script
    assert 'ARGS=(train --resume "$RUN")' in script and 'ARGS=(train --config "$RUN/config.yaml")' in script
    assert "scontrol requeue" in script and "srun" not in script  # one process: no srun/torchrun
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash
    eval_script = _script_of(text, "eval.sbatch")
    assert f"ARGS=(eval {quoted})" in eval_script and "--signal" not in eval_script
    assert "--dependency=afterok:<train job id>" in text
    assert "global batch = 8 per device x 1 accumulation x 1 process(es) = 8" in text


def test_multinode_script_runs_srun_torchrun(tiny_model_dir, tmp_path, capsys):
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "r"), "--slurm.nodes=2", "--slurm.gpus_per_node=4",
               "--slurm.cpus_per_task=32", "--slurm.master_port=29555", "--dry-run", "--global-batch-size=128"])
    text = capsys.readouterr().out
    assert rc == 0
    script = _script_of(text, "train.sbatch")
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=4\n" in script
    assert 'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=32' in script
    assert "--nproc_per_node=4" in script and '--rdzv_endpoint="$MASTER_ADDR:29555"' in script
    assert "--rdzv_backend=c10d" in script and "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    # 128 = 8 per device x grad_accum x 8 processes -> grad_accum 2, written into the job's config
    assert "global batch = 8 per device x 2 accumulation x 8 process(es) = 128" in text
    assert "  grad_accum: 2\n" in text
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_global_batch_not_divisible_is_explained(tiny_model_dir, tmp_path, capsys):
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "r", "train.batch_size=4"),
               "--slurm.nodes=1", "--slurm.gpus_per_node=3", "--global-batch-size=16", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--global-batch-size 16 is not divisible by train.batch_size 4 x world size 3 = 12" in err
    assert "choose a multiple of 12 (e.g. 12, 24, 36)" in err


def test_bad_slurm_values_are_refused_with_fixes(tiny_model_dir, tmp_path, capsys):
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "r"), "--slurm.partition=debug;reboot",
               "--slurm.time=3h", "--slurm.tyme=1", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "slurm.partition 'debug;reboot' contains characters" in err
    assert "slurm.time '3h' is not a SLURM time" in err
    assert "unknown key 'slurm.tyme'; did you mean 'slurm.time'?" in err


def test_slurm_config_file_keeps_times_as_text(tiny_model_dir, tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("slurm:\n  account: 12345\n  partition: alvis\n  time: 03:00:00\n  gpus_per_node: 1\n"
                       "  setup: ['source ~/venvs/tl/bin/activate']\n")
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "r"), "--slurm-config", str(cluster),
               "--slurm.time=1-00:00:00", "--dry-run"])
    script = _script_of(capsys.readouterr().out, "train.sbatch")
    assert rc == 0
    assert "#SBATCH --account=12345\n" in script and "#SBATCH --partition=alvis\n" in script
    assert "#SBATCH --time=1-00:00:00\n" in script  # the command line wins over the file
    assert "source ~/venvs/tl/bin/activate\n" in script


def test_missing_model_path_is_caught_before_queueing(tmp_path, capsys):
    rc = main(["submit", "train", "model=/nonexistent/model", f"out={tmp_path / 'r'}", "--dry-run"])
    assert rc == 2 and "model.name '/nonexistent/model' does not exist on this machine" in capsys.readouterr().err


def test_a_gpu_config_is_submitted_from_a_login_node_without_gpu(tiny_model_dir, tmp_path, capsys):
    """A CUDA-only setting (paged 8-bit AdamW) needs CUDA where it runs, not where it is submitted: the job checks again."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the login-node case does not arise")
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "q", "train.optim=paged_adamw_8bit"),
               "--slurm.gpus_per_node=1", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "train.optim=paged_adamw_8bit needs a CUDA GPU" not in captured.err
    assert "#SBATCH --gpus-per-node=1\n" in _script_of(captured.out, "train.sbatch")
    # the same config is still refused by `tunelab train` on this CPU-only machine
    assert main(["train", *_tiny(tiny_model_dir, tmp_path / "q2", "train.optim=paged_adamw_8bit")]) != 0
    assert "train.optim=paged_adamw_8bit needs a CUDA GPU" in capsys.readouterr().err


def test_sbatch_missing_says_how_to_install_or_dry_run(tiny_model_dir, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "sbatch was not found on PATH" in err and "--dry-run" in err and "apt-get install slurm-client" in err
    assert not (tmp_path / "r").exists()


def test_status_of_a_run_without_jobs(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 1.5}\n')
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step 3, loss 1.5000" in out and "no SLURM jobs recorded" in out


def test_sweep_dry_run_is_one_array_over_pending_points(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("tunelab.experiments")
    sweep = _write_sweep(tmp_path, tiny_model_dir)
    rc = main(["submit", "sweep", str(sweep), "--slurm.array_parallelism=2", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    script = _script_of(text, "sweep.sbatch")
    assert "#SBATCH --array=0-2%2\n" in script
    assert f'ARGS=(sweep {sweep} --point "$SLURM_ARRAY_TASK_ID" --out-dir {tmp_path / "sweep-runs"})' in script
    assert "--dependency=afterany:<sweep job id>" in text  # the report waits for the whole array
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def _write_sweep(tmp_path: Path, tiny_model_dir: Path) -> Path:
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny-array
        out_dir: {tmp_path / 'sweep-runs'}
        base:
          task: gsm8k
          model: {tiny_model_dir}
          method: {{name: lora}}
          data: {{limit: 8}}
          train: {{max_steps: 1, batch_size: 4, progress_bar: false, report_to: []}}
        grid:
          method.rank: [2, 4, 8]
        eval: {{limit: 2, max_new_tokens: 4}}
        """))
    return path


# --------------------------------------------------------------------------------------------
# DDP: real processes over gloo (no SLURM)
# --------------------------------------------------------------------------------------------


def _wait_for_steps(metrics: Path, n: int, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before step {n}")
        time.sleep(0.1)
    raise AssertionError(f"no step {n} in {metrics} after {timeout} s")


def test_ddp_two_ranks_preempted_resumed_equal_one_process(tiny_model_dir, tmp_path, rank_hook, quiet_env):
    """2 ranks (batch 1 x accumulation 2 each) = 1 process with batch 4: same losses and adapter.

    The DDP run is stopped with SIGUSR1 after its first step (as SLURM's --signal does): every rank
    stops at the same step, rank 0 writes a checkpoint, the command exits 143; ``--resume`` with 2
    processes finishes it. Both ranks end with bit-identical weights. Dropout is 0 and the data order
    fixed so that the two runs see the same examples per optimizer step.
    """
    from tunelab.config import load_config
    from tunelab.train import train

    common = ["method.dropout=0", "data.limit=16", "data.shuffle=false", "data.group_by_length=false",
              "train.max_steps=8", "model.device=cpu", "train.lr=1e-2"]
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "tunelab", "train", "--nproc", "2",
           *_tiny(tiny_model_dir, ddp, *common, "train.batch_size=1", "train.grad_accum=2")]
    log1 = tmp_path / "ddp-1.log"
    with open(log1, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_steps(ddp / "metrics.jsonl", 1, proc, timeout=240)
            proc.send_signal(signal.SIGUSR1)  # to the launcher only: it must forward it to every rank
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_group(proc, str(ddp))
    text = log1.read_text()
    assert rc == 143, f"expected the preemption exit code 143, got {rc}:\n{text[-3000:]}"
    ckpts = sorted((ddp / "checkpoints").glob("step-*"))
    assert ckpts and not (ddp / "results.json").exists(), text[-3000:]
    stopped_at = int(ckpts[-1].name.split("-")[1])
    assert 1 <= stopped_at < 8
    assert "global batch = 1 per device x 2 accumulation x 2 processes = 4 examples" in text

    log2 = tmp_path / "ddp-2.log"
    rc = run_group([sys.executable, "-m", "tunelab", "train", "--nproc", "2", "--resume", str(ddp)], log2, timeout=300,
                    marker=str(ddp))
    text = log2.read_text()
    assert rc == 0, text[-3000:]
    assert f"resumed from {ckpts[-1]} at step {stopped_at}/8" in text
    results = json.loads((ddp / "results.json").read_text())
    assert results["steps"] == 8 and results["world_size"] == 2 and results["global_batch_size"] == 4

    r0, r1 = (load_file(str(rank_hook / f"rank{r}-of-2.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"

    one = tmp_path / "one"
    train(load_config(overrides=_tiny(tiny_model_dir, one, *common, "train.batch_size=4")))
    a = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Same update up to float reduction order (Adam magnifies it on near-zero gradients: ~1e-5 at most).
    diff = sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5
    size = sum(float(b[k].norm()) ** 2 for k in a) ** 0.5
    assert diff / size < 2e-5, f"DDP adapter differs from the 1-process adapter: relative {diff / size:.2e}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5, msg=f"{k} differs from the 1-process run")
    lora_b = max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k)
    assert lora_b > 1e-2, "the adapter barely trained: the comparison would be vacuous"
    lo = [json.loads(line)["loss"] for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    l1 = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert len(lo) == len(l1) == 8
    assert lo == pytest.approx(l1, rel=1e-5), "the logged loss must be the global mean over both ranks"


def test_fsdp_two_ranks_full_finetune_resumed_equals_one_process(tiny_model_dir, tmp_path, quiet_env):
    """FSDP2 (train.parallelism=fsdp): full fine-tuning sharded over 2 gloo ranks = 1 process.

    The run checkpoints at step 2 (gathered from both shards), is cut back to that checkpoint as if
    it had crashed, and resumes on 2 ranks (each re-shards the whole checkpoint); the saved model
    (gathered to rank 0 and written as a plain HF folder) and the logged losses match an unsharded
    single process with the same global batch.
    """
    import shutil

    from tunelab.config import load_config
    from tunelab.train import train

    common = ["method=full", "data.limit=16", "data.shuffle=false", "data.group_by_length=false",
              "train.max_steps=4", "model.device=cpu", "train.lr=1e-3"]
    sharded = tmp_path / "fsdp"
    log = tmp_path / "fsdp.log"
    cmd = [sys.executable, "-m", "tunelab", "train", "--nproc", "2", *_tiny(tiny_model_dir, sharded, *common,
           "train.parallelism=fsdp", "train.batch_size=1", "train.grad_accum=2", "train.save_steps=2")]
    assert run_group(cmd, log, timeout=300, marker=str(sharded)) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "FSDP2: 2 blocks (LlamaDecoderLayer) + root sharded over 2 processes" in text
    assert "x 2 processes = 4 examples; 4 optimizer steps (4 per epoch); FSDP2 (sharded)" in text
    assert json.loads((sharded / "results.json").read_text())["parallelism"] == "fsdp"
    uninterrupted = load_file(str(sharded / "model" / "model.safetensors"))
    # a crash after the step-2 checkpoint: nothing written after it survives (the end checkpoint neither)
    later = [c.relative_to(sharded) for c in (sharded / "checkpoints").glob("step-*") if c.name != "step-000002"]
    for name in ("model", "results.json", "tokenizer", *later):
        p = sharded / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [c.name for c in (sharded / "checkpoints").iterdir()] == ["step-000002"]
    rc = run_group([sys.executable, "-m", "tunelab", "train", "--nproc", "2", "--resume", str(sharded)], log,
                    timeout=300, marker=str(sharded))
    assert rc == 0, log.read_text()[-3000:]
    resumed = load_file(str(sharded / "model" / "model.safetensors"))

    one = tmp_path / "one"
    train(load_config(overrides=_tiny(tiny_model_dir, one, *common, "train.batch_size=4")))
    single = load_file(str(one / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert single.keys() == resumed.keys() == uninterrupted.keys()
    moved = max(float((single[k] - base[k]).abs().max()) for k in single)
    assert moved > 1e-3, "the weights barely moved: the comparison would be vacuous"
    for k in single:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6, msg=f"{k}: resume is not exact")
        torch.testing.assert_close(resumed[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs from 1 process")
    lf = [json.loads(line)["loss"] for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    l1 = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert lf == pytest.approx(l1, rel=1e-5)


def test_fsdp_two_ranks_lora_equals_one_process(tiny_model_dir, tmp_path, quiet_env):
    """LoRA under FSDP2: the PEFT-wrapped model shards per decoder layer; the adapter matches 1 process."""
    from tunelab.config import load_config
    from tunelab.train import train

    common = ["method.dropout=0", "data.limit=16", "data.shuffle=false", "data.group_by_length=false",
              "train.max_steps=4", "model.device=cpu", "train.lr=1e-2"]
    sharded, one, log = tmp_path / "fsdp", tmp_path / "one", tmp_path / "fsdp.log"
    cmd = [sys.executable, "-m", "tunelab", "train", "--nproc", "2", *_tiny(tiny_model_dir, sharded, *common,
           "train.parallelism=fsdp", "train.batch_size=1", "train.grad_accum=2")]
    assert run_group(cmd, log, timeout=300, marker=str(sharded)) == 0, log.read_text()[-3000:]
    train(load_config(overrides=_tiny(tiny_model_dir, one, *common, "train.batch_size=4")))
    a = load_file(str(sharded / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-2  # it trained
    diff = sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5
    size = sum(float(b[k].norm()) ** 2 for k in a) ** 0.5
    assert diff / size < 2e-5, f"FSDP adapter differs from the 1-process adapter: relative {diff / size:.2e}"


def test_deepspeed_zero3_two_ranks_resumed_equals_one_process(tiny_model_dir, tmp_path, quiet_env):
    """train.parallelism=deepspeed with a user's ZeRO-3 file: 2 gloo ranks, checkpoint, crash, resume = 1 process.

    The engine writes its own partitioned optimizer state inside tunelab's checkpoint folder and
    restores it on --resume; the final model is gathered from the ZeRO-3 partitions.
    """
    pytest.importorskip("deepspeed", reason="pip install 'tunelab[deepspeed]' (the dev setup installs it)")
    from tunelab.config import load_config
    from tunelab.train import train

    ds_file = tmp_path / "zero3.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                                   "bf16": {"enabled": "auto"}}))
    common = ["method=full", "data.limit=16", "data.shuffle=false", "data.group_by_length=false",
              "train.max_steps=4", "model.device=cpu", "train.lr=1e-3"]
    run, log = tmp_path / "ds", tmp_path / "ds.log"
    cmd = [sys.executable, "-m", "tunelab", "train", "--nproc", "2", *_tiny(tiny_model_dir, run, *common,
           "train.parallelism=deepspeed", f"train.deepspeed_config={ds_file}", "train.batch_size=1",
           "train.grad_accum=2", "train.save_steps=2")]
    assert run_group(cmd, log, timeout=300, marker=str(run)) == 0, log.read_text()[-3000:]
    assert "ZeRO stage 3" in log.read_text()
    uninterrupted = load_file(str(run / "model" / "model.safetensors"))
    ckpt = run / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    # a crash after the step-2 checkpoint: nothing written after it survives (the end checkpoint neither)
    later = [c.relative_to(run) for c in (run / "checkpoints").glob("step-*") if c.name != "step-000002"]
    for name in ("model", "results.json", "tokenizer", *later):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    rc = run_group([sys.executable, "-m", "tunelab", "train", "--nproc", "2", "--resume", str(run)], log,
                    timeout=300, marker=str(run))
    assert rc == 0, log.read_text()[-3000:]
    assert json.loads((run / "results.json").read_text())["parallelism"] == "deepspeed"
    resumed = load_file(str(run / "model" / "model.safetensors"))

    one = tmp_path / "one"
    train(load_config(overrides=_tiny(tiny_model_dir, one, *common, "train.batch_size=4")))
    single = load_file(str(one / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((single[k] - base[k]).abs().max()) for k in single) > 1e-3  # it trained
    for k in single:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6, msg=f"{k}: resume is not exact")
        torch.testing.assert_close(resumed[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs from 1 process")


def test_deepspeed_one_process_lora_equals_plain_and_leaves_no_process_group(tiny_model_dir, tmp_path, quiet_env):
    """One process under DeepSpeed (ZeRO-2 by default): same adapter as without it; the group it needed is gone."""
    pytest.importorskip("deepspeed", reason="pip install 'tunelab[deepspeed]' (the dev setup installs it)")
    import torch.distributed as dist

    from tunelab.config import load_config
    from tunelab.train import train

    common = ["method.dropout=0", "data.limit=8", "train.max_steps=3", "model.device=cpu", "train.lr=1e-2",
              "train.batch_size=2", "train.grad_accum=2"]
    res = train(load_config(overrides=_tiny(tiny_model_dir, tmp_path / "ds", *common, "train.parallelism=deepspeed")))
    assert res["parallelism"] == "deepspeed" and res["world_size"] == 1
    assert not dist.is_initialized() and "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    train(load_config(overrides=_tiny(tiny_model_dir, tmp_path / "plain", *common)))
    a = load_file(str(tmp_path / "ds" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_deepspeed_config_conflicts_are_reported_together(tiny_model_dir, tmp_path):
    from tunelab.config import ConfigError, load_config

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto",
                               "train_batch_size": 64, "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"model={tiny_model_dir}", "train.parallelism=deepspeed", "train.batch_size=4",
                               f"train.deepspeed_config={bad}"], check_env=False)
    text = str(err.value)
    assert "train_micro_batch_size_per_gpu=16 but train.batch_size=4" in text
    assert "train_batch_size: leave it out" in text and "remove its 'optimizer' section" in text
    assert "gradient_accumulation_steps" not in text  # "auto" takes train.grad_accum
    with pytest.raises(ConfigError, match="set train.parallelism=deepspeed to use it"):
        load_config(overrides=[f"model={tiny_model_dir}", f"train.deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(overrides=[f"model={tiny_model_dir}", "train.parallelism=deepspeed",
                               f"train.deepspeed_config={tmp_path / 'missing.json'}"], check_env=False)


def test_fsdp_refuses_methods_that_cannot_shard(tiny_model_dir):
    from tunelab.config import ConfigError, load_config

    for method in ("rosa", "galore"):
        for parallelism in ("fsdp", "deepspeed"):
            with pytest.raises(ConfigError) as err:
                load_config(overrides=[f"model={tiny_model_dir}", f"method={method}", f"train.parallelism={parallelism}"],
                            check_env=False)
            assert f"train.parallelism={parallelism} cannot shard method={method}" in str(err.value)
            assert "Use train.parallelism=ddp" in str(err.value)
    for method in ("full", "lora"):  # these shard
        assert load_config(overrides=[f"model={tiny_model_dir}", f"method={method}", "train.parallelism=fsdp"])


# --------------------------------------------------------------------------------------------
# A real SLURM (.ci/run starts the loopback cluster; see the module docstring)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM: sbatch is not on PATH (start one: eval \"$(bash ../shared/tools/slurm-local/start.sh)\")")
    if not os.environ.get("SLURM_CONF"):
        pytest.skip("no SLURM: SLURM_CONF is unset (eval \"$(bash ../shared/tools/slurm-local/start.sh)\" exports it)")
    info = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    if info.returncode != 0:
        pytest.skip(f"no SLURM: sinfo failed: {info.stderr.strip()}")
    return {"nodes": len({line.split()[0] for line in info.stdout.splitlines() if line.strip()})}


@pytest.fixture()
def jobs_cleanup():
    """Directories whose recorded jobs are cancelled after the test if they are still queued or running."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        for job in run_status(d)["jobs"]:
            if not job["finished"]:
                subprocess.run(["scancel", job["job_id"]], capture_output=True)


def _wait(path: Path, timeout: float, *, release_requeued: bool = False) -> dict:
    """Poll until every job recorded in path has finished; fail with the logs after the timeout."""
    end = time.monotonic() + timeout
    while True:
        info = run_status(path)
        if info["jobs"] and all(j["finished"] for j in info["jobs"]):
            return info
        if time.monotonic() > end:
            logs = "\n".join(f"== {t.get('log')}\n" + "\n".join(_tail(t.get("log"))) for j in info["jobs"] for t in j["tasks"])
            raise AssertionError(f"jobs of {path} not finished after {timeout} s:\n{format_status(info)}\n{logs}")
        time.sleep(1)


def _tail(path, n=30):
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except (OSError, TypeError):
        return []


def _job_ids(path: Path) -> dict[str, str]:
    return {j["kind"]: j["job_id"] for j in json.loads((path / "slurm.json").read_text())["jobs"]}


@pytest.mark.slurm
def test_slurm_train_then_eval(slurm, tiny_model_dir, tmp_path, quiet_env, jobs_cleanup, capsys):
    """Train job + dependent eval job; the run directory's name is full of shell metacharacters."""
    run = tmp_path / "run $(touch PWNED) `id`; 'q'"
    jobs_cleanup.append(run)
    rc = main(["submit", "train", *_tiny(tiny_model_dir, run, "train.max_steps=2", "data.limit=8", "train.batch_size=4",
                                          "eval.limit=2", "eval.max_new_tokens=4"),
               "--slurm.time=10", "--slurm.cpus_per_task=1", "--then-eval"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ids = _job_ids(run)
    assert f"submitted train job {ids['train']}" in out and f"submitted eval job {ids['eval']} after afterok:{ids['train']}" in out
    info = _wait(run, 240)
    states = {j["kind"]: j["state"] for j in info["jobs"]}
    assert states == {"train": "COMPLETED", "eval": "COMPLETED"}, format_status(info)
    assert (run / "results.json").is_file() and (run / "adapter").is_dir() and (run / "eval" / "results.json").is_file()
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    record = json.loads((run / "slurm.json").read_text())["jobs"][0]
    assert record["script"] == (run / "slurm" / "train.sbatch").read_text()
    log = Path(record["log"])
    assert log == run / "slurm" / f"train-{ids['train']}.out" and "done: 2 steps" in log.read_text()
    assert f"--config {run}/config.yaml" in log.read_text()  # the job ran the CLI on the resolved config
    assert main(["status", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"job {ids['train']} train: COMPLETED" in shown and "trained; evaluated" in shown


@pytest.mark.slurm
def test_slurm_unknown_partition_shows_sbatch_error(slurm, tiny_model_dir, tmp_path, capsys):
    rc = main(["submit", "train", *_tiny(tiny_model_dir, tmp_path / "r"), "--slurm.partition=no_such_partition"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "sbatch failed (exit 1)" in err and "invalid partition specified: no_such_partition" in err
    assert "sinfo -s" in err
    assert not (tmp_path / "r" / "slurm.json").exists()


@pytest.mark.slurm
def test_slurm_failed_job_reported_with_log(slurm, tiny_model_dir, tmp_path, quiet_env, jobs_cleanup, capsys):
    """A job that fails at run time: status says FAILED with the log path and its error; the eval never runs."""
    run = tmp_path / "bad"
    jobs_cleanup.append(run)
    # Valid config, impossible data: every example is longer than 8 tokens and dropped -> ValueError in the job.
    rc = main(["submit", "train", *_tiny(tiny_model_dir, run, "data.limit=4", "data.max_length=8", "data.overlong=drop"),
               "--slurm.time=5", "--slurm.cpus_per_task=1", "--then-eval"])
    assert rc == 0
    ids = _job_ids(run)
    capsys.readouterr()
    info = _wait(run, 180)
    train_job = next(j for j in info["jobs"] if j["kind"] == "train")
    eval_job = next(j for j in info["jobs"] if j["kind"] == "eval")
    assert train_job["state"] == "FAILED" and eval_job["state"] == "CANCELLED", format_status(info)
    failed = train_job["failed_tasks"][0]
    assert failed["log"] == str(run / "slurm" / f"train-{ids['train']}.out")
    assert any("no training examples left" in line for line in failed["log_tail"])
    assert main(["status", str(run), "--wait", "--timeout", "5"]) == 1
    shown = capsys.readouterr().out
    assert f"{ids['train']}: FAILED exit 1:0" in shown and f"log {run}/slurm/train-{ids['train']}.out" in shown
    assert "no training examples left" in shown


@pytest.mark.slurm
def test_slurm_requeue_after_signal_resumes(slurm, tiny_model_dir, tmp_path, quiet_env, jobs_cleanup):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): checkpoint, requeue, resume, finish."""
    run = tmp_path / "rq"
    jobs_cleanup.append(run)
    assert main(["submit", "train", *_tiny(tiny_model_dir, run, "train.max_steps=12", "train.batch_size=2", "data.limit=16"),
                 "--slurm.time=10", "--slurm.cpus_per_task=1"]) == 0
    job = _job_ids(run)["train"]
    end = time.monotonic() + 180
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert time.monotonic() < end, "\n".join(_tail(run / "slurm" / f"train-{job}.out"))
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # SLURM holds a requeued job ~2 minutes (BeginTime); release it sooner. Not in the same second as
    # the requeue: slurmd would refuse the new start ("Job credential revoked", 1 s resolution).
    while True:
        st = job_states(job)[0]
        if st.state == "PENDING" and (st.restarts or 0) >= 1:
            time.sleep(3)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            break
        assert not st.finished, f"job ended ({st.state}) instead of requeueing:\n" + "\n".join(_tail(run / "slurm" / f"train-{job}.out"))
        assert time.monotonic() < end, f"not requeued: {st}"
        time.sleep(0.3)
    info = _wait(run, 240)
    log = (run / "slurm" / f"train-{job}.out").read_text()
    assert info["jobs"][0]["state"] == "COMPLETED", format_status(info) + log[-3000:]
    assert "forwarding it to tunelab" in log and "tunelab exited with code 143" in log
    assert f"requeueing job {job}" in log and "restart 1" in log
    m = re.search(r"resumed from \S+/step-(\d+) at step (\d+)/12", log)
    assert m and 1 <= int(m.group(2)) < 12, log[-3000:]
    assert f"train --resume {run}" in log
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), "every step exactly once across the two starts"
    assert json.loads((run / "results.json").read_text())["steps"] == 12


@pytest.mark.slurm
def test_slurm_ddp_two_tasks_identical_weights(slurm, tiny_model_dir, tmp_path, quiet_env, rank_hook, jobs_cleanup):
    """2 DDP ranks in one job through srun + torchrun (c10d rendezvous on 127.0.0.1, gloo)."""
    run = tmp_path / "ddp"
    jobs_cleanup.append(run)
    # Two nodes of the test cluster (SLURM_LOCAL_NODES=2): 2 nodes x 1 process; else 1 node x 2.
    layout = ["--slurm.nodes=2", "--slurm.nproc_per_node=1", "--slurm.cpus_per_task=1"] if slurm["nodes"] >= 2 \
        else ["--slurm.nodes=1", "--slurm.nproc_per_node=2", "--slurm.cpus_per_task=2"]
    assert main(["submit", "train", *_tiny(tiny_model_dir, run, "train.max_steps=2", "train.batch_size=2", "data.limit=8",
                                          "model.device=cpu"),
                 *layout, "--slurm.master_addr=127.0.0.1", f"--slurm.master_port={29400 + os.getpid() % 500}",
                 "--slurm.time=10"]) == 0
    info = _wait(run, 300)
    job = _job_ids(run)["train"]
    log = (run / "slurm" / f"train-{job}.out").read_text()
    assert info["jobs"][0]["state"] == "COMPLETED", format_status(info) + log[-3000:]
    assert "srun --nodes=" in log and "torch.distributed.run" in log
    assert "global batch = 2 per device x 1 accumulation x 2 processes = 4 examples" in log
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 4
    r0, r1 = (load_file(str(rank_hook / f"rank{r}-of-2.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], r0[k.replace(".weight", ".default.weight")]) for k in adapter)


@pytest.mark.slurm
def test_slurm_sweep_array_of_three_points(slurm, tiny_model_dir, tmp_path, quiet_env, jobs_cleanup, capsys):
    pytest.importorskip("tunelab.experiments")
    sweep = _write_sweep(tmp_path, tiny_model_dir)
    out = tmp_path / "sweep-runs"
    jobs_cleanup.append(out)
    assert main(["submit", "sweep", str(sweep), "--slurm.array_parallelism=2", "--slurm.cpus_per_task=1",
                 "--slurm.time=10"]) == 0
    text = capsys.readouterr().out
    ids = _job_ids(out)
    assert f"submitted sweep job {ids['sweep']} (array 0-2%2)" in text
    info = _wait(out, 420)
    array = next(j for j in info["jobs"] if j["kind"] == "sweep")
    assert sorted(t["array_task"] for t in array["tasks"]) == ["0", "1", "2"]
    assert array["state"] == "COMPLETED", format_status(info)
    for t in array["tasks"]:
        assert t["log"] == str(out / "slurm" / f"point-{ids['sweep']}_{t['array_task']}.out")
    for name in array["points"].values():
        assert (out / name / "results.json").is_file() and (out / name / "eval" / "results.json").is_file()
    if "report" in ids:
        assert next(j for j in info["jobs"] if j["kind"] == "report")["state"] == "COMPLETED"
        assert (out / "report" / "report.md").is_file()
    # Nothing left to do: a second submission submits nothing.
    assert main(["submit", "sweep", str(sweep)]) == 0
    assert "every point is done" in capsys.readouterr().out

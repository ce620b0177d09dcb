"""Nothing injects into a job script (issue 14, Why 1): hostile text in every field a user can reach.

Each hostile value is put into one field (the config file's ``out:``, the eval target, overrides,
SLURM options, the sweep's paths), the script is rendered (``--dry-run`` or a fake ``sbatch``),
and then run by bash with fake ``python``/``srun``/``scontrol`` on PATH that only record their
argv (and a ``command_not_found_handle`` that records any stray command). Proven for each value:
nothing runs (no ``PWNED`` file, no stray command), and tunelab receives the value verbatim as one
argument -- or the value is refused at submit time with a message naming the field and its fix.
No SLURM is needed; the last test asks the ``sbatch`` client (when installed) how it parses the
``#SBATCH`` lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.launch.records import log_path

#: Fragments the script must carry as plain text (quoted), never run.
RUNNABLE = [
    "$(touch PWNED)", "`touch PWNED`", "; touch PWNED;", "&& touch PWNED", "| touch PWNED", "> PWNED",
    "' ; touch PWNED ; '", '" ; touch PWNED ; "', "${IFS}touch${IFS}PWNED", "'$SLURM_ARRAY_TASK_ID'",
    "100%j %% %A %", "# touch PWNED", "*", "~",
]
#: Fragments no script can hold: refused before anything is rendered or written.
UNWRITABLE = ["x\ntouch PWNED", "x\rtouch PWNED", "x\x1b[2Jy", "x\ttouch PWNED", "x\x07y", "x\x85y",
              "x\u2028touch PWNED", "x\x00y"]

SHIM = """#!/bin/bash
# records its name and argv (NUL-separated) in $FAKE_CALLS, one file per call
f=$(mktemp "$FAKE_CALLS/call.XXXXXX")
printf '%s\\0' "$(basename "$0")" "$@" > "$f"
{extra}
exit 0
"""


def _ids(values):
    return [repr(v)[1:-1][:24] for v in values]


# --------------------------------------------------------------------------------------------
# The fake interpreter
# --------------------------------------------------------------------------------------------


class FakeJob:
    """Runs a rendered script with bash as SLURM would start it, but with recording shims."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.calls = root / "calls"
        self.cwd = root / "job-cwd"  # where a stray `touch PWNED` would land
        for d in (self.bin, self.calls, self.cwd):
            d.mkdir(parents=True)
        for name in ("python", "srun", "torchrun"):
            self._shim(name)
        self._shim("scontrol", 'if [[ $1 == show && $2 == hostnames ]]; then echo node1; fi')
        self.bash_env = root / "bash_env.sh"
        # Any command that is neither a builtin nor on PATH (e.g. a line split off by a newline) is recorded.
        self.bash_env.write_text(
            'command_not_found_handle() { printf "%s\\n" "$*" >> "$FAKE_STRAY"; return 127; }\n')
        self.stray = root / "stray-commands.txt"

    def _shim(self, name: str, extra: str = "") -> None:
        path = self.bin / name
        path.write_text(SHIM.format(extra=extra))
        path.chmod(0o755)

    def run(self, script: str, **env) -> subprocess.CompletedProcess:
        """bash SCRIPT in a fresh job (:meth:`argvs` then tells this run's calls)."""
        for f in self.calls.iterdir():
            f.unlink()
        self.stray.unlink(missing_ok=True)
        path = self.root / "job.sbatch"
        path.write_text(script)
        full_env = {
            "PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.root), "FAKE_CALLS": str(self.calls),
            "FAKE_STRAY": str(self.stray), "BASH_ENV": str(self.bash_env), "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_RESTART_COUNT": "0", **env,
        }
        return subprocess.run(["bash", str(path)], cwd=self.cwd, env=full_env, capture_output=True, text=True)

    def argvs(self, name: str = "python") -> list[list[str]]:
        """The argv of every call of the shim ``name`` in the last run."""
        out = []
        for f in sorted(self.calls.iterdir()):
            argv = f.read_bytes().decode().split("\0")[:-1]
            if argv[0] == name:
                out.append(argv[1:])
        return out

    def strays(self) -> list[str]:
        """Commands bash did not find (each with its arguments) in the last run."""
        return self.stray.read_text().splitlines() if self.stray.exists() else []

    def assert_nothing_ran(self, proc: subprocess.CompletedProcess, *elsewhere: Path, strays: int = 0) -> None:
        pwned = [p for d in (self.cwd, self.root, *elsewhere) for p in d.rglob("PWNED")]
        assert not pwned, f"injected command ran: {pwned}\n{proc.stderr}"
        assert len(self.strays()) == strays, f"stray commands ran: {self.strays()}\n{proc.stderr}"


@pytest.fixture()
def job(tmp_path) -> FakeJob:
    return FakeJob(tmp_path / "fake")


def _scripts(output: str) -> dict[str, str]:
    """The scripts printed by --dry-run, by file name."""
    found = re.findall(r"# ---- (.+?) \(not written: --dry-run\) ----\n(.*?)\n# would run: ", output, re.S)
    assert found, f"no script in the dry-run output:\n{output}"
    return {Path(path).name: text + "\n" for path, text in found}


def _make_run(path: Path) -> Path:
    """A run directory as `tunelab train` leaves it (its config.yaml), without training."""
    from tunelab.config import load_config, save_config

    path.mkdir(parents=True)
    save_config(load_config(overrides=[f"out={path}"], check_env=False), path / "config.yaml")
    return path


# --------------------------------------------------------------------------------------------
# out: in a --config file (train and its evaluation)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fragment", RUNNABLE, ids=_ids(RUNNABLE))
def test_config_out_with_shell_text_is_quoted_and_never_runs(fragment, tmp_path, job, capsys):
    run = tmp_path / f"run {fragment} end"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"out": str(run), "train": {"max_steps": 2}}))
    rc = main(["submit", "train", "--config", str(config), "--slurm.python=python", "--then-eval", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    scripts = _scripts(captured.out)
    proc = job.run(scripts["train.sbatch"])
    job.assert_nothing_ran(proc, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert job.argvs() == [["-m", "tunelab", "train", "--config", f"{run}/config.yaml"]]
    proc = job.run(scripts["eval.sbatch"])
    job.assert_nothing_ran(proc, tmp_path)
    assert job.argvs() == [["-m", "tunelab", "eval", str(run)]]
    assert not run.exists()  # --dry-run writes nothing


@pytest.mark.parametrize("fragment", UNWRITABLE, ids=_ids(UNWRITABLE))
def test_config_out_with_a_line_break_or_control_character_is_refused(fragment, tmp_path, capsys):
    run = tmp_path / f"run {fragment}"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"out": str(run)}))
    rc = main(["submit", "train", "--config", str(config), "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 2 and "#!/bin/bash" not in captured.out
    assert "out (the run directory)" in captured.err and "choose an out= folder without them" in captured.err
    assert not run.exists()


def test_multinode_script_passes_hostile_paths_verbatim_through_srun(tmp_path, job, capsys):
    run = tmp_path / "run $(touch PWNED) `touch PWNED`; 'q' \"d\" 5%j"
    rc = main(["submit", "train", f"out={run}", "--slurm.nodes=2", "--slurm.cpus_per_task=2",
               "--slurm.python=python", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    proc = job.run(_scripts(captured.out)["train.sbatch"], SLURM_NNODES="2")
    job.assert_nothing_ran(proc, tmp_path)
    [srun] = job.argvs("srun")
    py = srun.index("python")
    assert srun[py:py + 3] == ["python", "-m", "torch.distributed.run"] and "--rdzv_endpoint=node1:29500" in srun
    assert srun[-5:] == ["-m", "tunelab", "train", "--config", f"{run}/config.yaml"]


# --------------------------------------------------------------------------------------------
# The eval target path and the eval overrides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fragment", RUNNABLE, ids=_ids(RUNNABLE))
def test_eval_target_and_overrides_with_shell_text_are_quoted(fragment, tmp_path, job, capsys):
    run = _make_run(tmp_path / f"r {fragment} end")
    override = f"model.revision=x {fragment}"
    rc = main(["submit", "eval", str(run), override, "--slurm.python=python", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    proc = job.run(_scripts(captured.out)["eval.sbatch"])
    job.assert_nothing_ran(proc, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert job.argvs() == [["-m", "tunelab", "eval", str(run), override]]


@pytest.mark.parametrize("fragment", [f for f in UNWRITABLE if "\x00" not in f], ids=_ids(UNWRITABLE[:-1]))
def test_eval_target_with_a_line_break_is_refused_before_writing(fragment, tmp_path, capsys, monkeypatch):
    """The issue's case: a run folder whose name holds a newline (train makes one from such an out:)."""
    run = _make_run(tmp_path / f"r {fragment}")
    fake_sbatch = _fake_sbatch(tmp_path / "sbatch-bin", tmp_path / "sbatch-calls")
    monkeypatch.setenv("PATH", f"{fake_sbatch}:{os.environ['PATH']}")
    rc = main(["submit", "eval", str(run)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "RUN (the run directory to evaluate)" in err and "rename the run directory without them" in err
    assert not (run / "slurm").exists() and not list((tmp_path / "sbatch-calls").iterdir())


@pytest.mark.parametrize("fragment", UNWRITABLE, ids=_ids(UNWRITABLE))
def test_eval_override_with_a_line_break_is_refused(fragment, tmp_path, capsys):
    run = _make_run(tmp_path / "r")
    rc = main(["submit", "eval", str(run), f"model.revision={fragment}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "override 'model.revision=" in err and "one key=value per override" in err


def test_eval_target_with_a_backslash_is_refused_naming_the_field(tmp_path, capsys):
    """sbatch reads a backslash as an escape, and SLURM turns %j off in a log path that holds one."""
    run = _make_run(tmp_path / "r\\x")
    assert main(["submit", "eval", str(run), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "RUN (the run directory to evaluate)" in err and "contains a backslash" in err


# --------------------------------------------------------------------------------------------
# SLURM options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["account", "partition", "qos", "constraint", "job_name", "gpu_type", "mem",
                                 "master_addr"])
@pytest.mark.parametrize("fragment", ["a\ntouch PWNED", "a;touch PWNED", "$(touch PWNED)", "a b", 'a"b', "a#b"])
def test_hostile_slurm_names_are_refused_naming_the_key(key, fragment, tmp_path, capsys):
    extra = ["--slurm.gpus_per_node=1"] if key == "gpu_type" else []
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({key: fragment}))  # from a file: the value reaches the check as written
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", "--slurm-config", str(cluster), *extra, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"slurm.{key} {fragment!r}" in err, err


def test_slurm_time_with_a_line_break_is_refused(tmp_path, capsys):
    """parse_time strips blanks, so "\\n10" was a valid time -- and line 2 of the directive ran as a command."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"time": "\n10"}))
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", "--slurm-config", str(cluster), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "slurm.time '\\n10'" in err and "HH:MM:SS" in err


@pytest.mark.parametrize("item", ["--comment=$(touch${IFS}PWNED)", "--comment=`touch${IFS}PWNED`",
                                  "--comment=x;touch,PWNED", "--comment=100%j"])
def test_slurm_extra_with_shell_text_stays_a_comment_line(item, tmp_path, job, capsys):
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", f"--slurm.extra={item}", "--slurm.python=python",
               "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    script = _scripts(captured.out)["train.sbatch"]
    assert f"#SBATCH {item}\n" in script
    proc = job.run(script)
    job.assert_nothing_ran(proc, tmp_path)
    assert proc.returncode == 0 and len(job.argvs()) == 1


@pytest.mark.parametrize("item", ["--comment=a\ntouch PWNED", "--comment=a b", "--comment='x'", "--comment=a#b",
                                  "--comment=a\\b", "--comment=\x1b"])
def test_slurm_extra_that_sbatch_would_split_is_refused(item, tmp_path, capsys):
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", f"--slurm.extra={item}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"slurm.extra item {item!r} must be one sbatch option" in err


@pytest.mark.parametrize("key,value,field", [
    ("setup", "module load x\ntouch PWNED", "slurm.setup[0]"),
    ("setup", "module load x\rtouch PWNED", "slurm.setup[0]"),
    ("python", "python\ntouch PWNED", "slurm.python"),
    ("python", "python\x1b", "slurm.python"),
    ("log_dir", "/tmp/logs\ntouch PWNED", "slurm.log_dir"),
    ("log_dir", "/tmp/lo\\gs", "slurm.log_dir"),
])
def test_slurm_text_with_a_line_break_is_refused_naming_the_key(key, value, field, tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({key: [value] if key == "setup" else value}))
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", "--slurm-config", str(cluster), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{field} {value!r}" in err, err


def test_hostile_python_and_log_dir_are_quoted_and_never_run(tmp_path, job, capsys):
    logs = tmp_path / "logs $(touch PWNED) `touch PWNED` 'q' \"d\" 7%j"
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", "--slurm.python=python; touch PWNED",
               f"--slurm.log_dir={logs}", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    script = _scripts(captured.out)["train.sbatch"]
    assert "#SBATCH --output=\"" + str(logs).replace('"', '\\"').replace("%", "%%") + "/train-%j.out\"\n" in script
    proc = job.run(script)
    job.assert_nothing_ran(proc, tmp_path, strays=1)
    # bash looked for one interpreter named 'python; touch PWNED' (there is none) and ran nothing else
    assert job.strays() == [f"python; touch PWNED -m tunelab train --config {tmp_path / 'r'}/config.yaml"]
    assert proc.returncode == 127 and job.argvs() == []


def test_render_script_itself_refuses_every_unsafe_value_at_once(tmp_path):
    """The gate is in the renderer too: a JobSpec built by library code gets the same checks, all reported."""
    from tunelab.config import ConfigError
    from tunelab.launch import SlurmConfig
    from tunelab.launch.script import JobSpec, render_script

    s = SlurmConfig(setup=["ok", "a\ntouch PWNED"], time="\n10", extra=["--x=a b"], python="py\rthon",
                    nodes="2; touch PWNED")
    spec = JobSpec(kind="eval", title="t\ntouch PWNED", job_name="j", log=tmp_path / "l\\x" / "eval-%j.out",
                   workdir=tmp_path / "w%d", slurm=s, args=["eval", "r\x1b"], script_path=tmp_path / "e.sbatch")
    with pytest.raises(ConfigError) as err:
        render_script(spec)
    text = str(err.value)
    for fragment in ("the job title 't\\ntouch PWNED'", "the log folder", "contains a backslash",
                     "the working directory", "contains '%'", "slurm.time '\\n10'", "slurm.extra[0] '--x=a b'",
                     "slurm.setup[1] 'a\\ntouch PWNED'", "slurm.python 'py\\rthon'", "slurm.nodes must be a whole",
                     "the tunelab argument 'r\\x1b'"):
        assert fragment in text, f"{fragment!r} not in:\n{text}"


# --------------------------------------------------------------------------------------------
# Sweeps: the out_dir and the sweep file's own path
# --------------------------------------------------------------------------------------------


def _sweep_file(folder: Path, out_dir: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "s.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        out_dir: {json.dumps(str(out_dir))}
        base: {{task: gsm8k, method: {{name: lora}}, train: {{max_steps: 1}}}}
        grid: {{method.rank: [2, 4]}}
        """))
    return path


@pytest.mark.parametrize("fragment", ["$(touch PWNED) `touch PWNED`; 'q' \"d\"", "'$SLURM_ARRAY_TASK_ID'", "9%a%A"])
def test_sweep_paths_are_quoted_and_the_array_index_alone_expands(fragment, tmp_path, job, capsys):
    pytest.importorskip("tunelab.experiments")
    out = tmp_path / f"out {fragment}"
    sweep = _sweep_file(tmp_path / f"file {fragment}", out)
    rc = main(["submit", "sweep", str(sweep), "--slurm.python=python", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    scripts = _scripts(captured.out)
    proc = job.run(scripts["sweep.sbatch"], SLURM_ARRAY_TASK_ID="1")
    job.assert_nothing_ran(proc, tmp_path)
    assert job.argvs() == [["-m", "tunelab", "sweep", str(sweep), "--point", "1", "--out-dir", str(out)]]
    if "report.sbatch" in scripts:
        proc = job.run(scripts["report.sbatch"])
        job.assert_nothing_ran(proc, tmp_path)
        assert job.argvs() == [["-m", "tunelab", "report", str(out), "--out", str(out / "report")]]


def test_sweep_out_dir_with_a_line_break_is_refused(tmp_path, capsys):
    pytest.importorskip("tunelab.experiments")
    sweep = _sweep_file(tmp_path / "f", tmp_path / "out\ntouch PWNED")
    assert main(["submit", "sweep", str(sweep), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the sweep's out_dir" in err and "choose an out_dir (or --out-dir) without them" in err


# --------------------------------------------------------------------------------------------
# A real submission (fake sbatch): the written script, the recorded log path
# --------------------------------------------------------------------------------------------


def _fake_sbatch(bin_dir: Path, calls: Path) -> Path:
    bin_dir.mkdir(parents=True)
    calls.mkdir(parents=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(SHIM.replace("$FAKE_CALLS", str(calls)).format(extra="echo 4242"))
    sbatch.chmod(0o755)
    return bin_dir


def test_submitted_script_with_percent_in_the_run_dir_logs_where_status_looks(tmp_path, job, capsys, monkeypatch):
    """A % in a folder is doubled in --output (SLURM reads %% as %); the record names the real file."""
    monkeypatch.setenv("PATH", f"{_fake_sbatch(tmp_path / 'sb', tmp_path / 'sb-calls')}:{os.environ['PATH']}")
    run = tmp_path / "100%j $(touch PWNED)"
    assert main(["submit", "train", f"out={run}", "--slurm.python=python"]) == 0, capsys.readouterr().err
    script = (run / "slurm" / "train.sbatch").read_text()
    assert f'#SBATCH --output="{str(run).replace("%", "%%")}/slurm/train-%j.out"\n' in script
    record = json.loads((run / "slurm.json").read_text())["jobs"][0]
    assert record["log"] == f"{run}/slurm/train-4242.out"
    assert log_path(Path(f"{run}/slurm/point-%A_%a.out"), "7", "3") == f"{run}/slurm/point-7_3.out"
    proc = job.run(script)
    job.assert_nothing_ran(proc, tmp_path)
    assert job.argvs() == [["-m", "tunelab", "train", "--config", f"{run}/config.yaml"]]


def test_sbatch_reads_the_directives_as_tunelab_meant_them(tmp_path, capsys, monkeypatch):
    """The sbatch client parses the #SBATCH lines (no controller needed: -vv lists the options first)."""
    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch client on PATH")
    logs = tmp_path / "logs 'q' \"d\" #h $(x) 5%j"
    work = tmp_path / "work 'q' \"d\" #h $(x)"
    work.mkdir()
    monkeypatch.chdir(work)  # the job's --chdir
    rc = main(["submit", "train", f"out={tmp_path / 'r'}", f"--slurm.log_dir={logs}", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    script = tmp_path / "job.sbatch"
    script.write_text(_scripts(captured.out)["train.sbatch"])
    conf = tmp_path / "slurm.conf"  # a controller nobody listens for: sbatch parses, then fails to connect
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=1\nAuthType=auth/none\n")
    proc = subprocess.Popen(["sbatch", "-vv", "--test-only", str(script)], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, env={**os.environ, "SLURM_CONF": str(conf)})
    seen: dict[str, str] = {}
    try:
        for line in proc.stderr:
            m = re.match(r"sbatch: (chdir|output)\s+: (.*)$", line.rstrip("\n"))
            if m:
                seen[m.group(1)] = m.group(2)
            if len(seen) == 2:
                break
    finally:
        proc.kill()
        proc.wait()
    # SLURM turns %% into % when it opens the log (src/slurmd/common/fname.c), and %j into the job id.
    assert seen == {"chdir": str(work), "output": str(logs).replace("%", "%%") + "/train-%j.out"}, seen

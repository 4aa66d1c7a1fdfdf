#!/usr/bin/env python
"""Run a grid of training runs (games x seeds x methods) of one of our scripts.

    python reincarnate_utils/launch.py --script qdagger_dqn_atari_jax.py \\
        --env-ids Breakout-v5 Atlantis-v5 --seeds 1 2 --methods qdagger tabula-rasa --workers 2 \\
        -- --total-timesteps 500000 --track
    python -m reincarnate_utils.launch ...          # the same, from the repository root

Run it from the folder where ``runs/`` should go (the scripts write there); ``--script``
may be a path or a bare script name, looked up in the repository root.

Everything after ``--`` is passed unchanged to every run. Each run gets the flags
``--env-id GAME --seed S --method M --run-name GAME__EXP__M__sS`` (EXP: the script's
``--exp-name``, by default its file name without ``.py``), so it writes to its own
folder ``runs/GAME__EXP__M__sS/`` under the current directory, whatever the start time,
and a resumed or repeated run finds the same folder.

What it does:

* prints each command just before it starts it, and runs at most ``--workers`` at once
  (one child process each);
* writes each run's stdout and stderr to ``--log-dir``/RUN_NAME.log
  (default ``runs/launch-logs/``; appended to, one header line per start);
* prints each run's exit code and wall time when it ends, and at the end a summary;
  exits 1 if any run failed, naming those runs and their log files;
* on Ctrl-C (or SIGTERM to the launcher) it sends each running run one SIGTERM (the runs
  have their own sessions, so the terminal's SIGINT does not reach them too), waits up
  to ``--stop-timeout`` seconds (default 600) while they checkpoint and exit, then kills
  what is left; a second Ctrl-C kills them at once. Relaunch with ``--resume`` to continue;
* ``--dry-run`` only prints the commands;
* ``--resume`` adds ``--resume`` to the runs whose ``runs/RUN_NAME/checkpoints``
  folder exists (so relaunching the same grid continues interrupted runs);
* ``--emit-grid FILE`` writes the grid as argument lines, one run per line (line i is
  SLURM array task i), and starts nothing: ``reincarnate_utils/slurm/reincarnate.sbatch``
  runs line ``$SLURM_ARRAY_TASK_ID`` of it;
* ``--slurm`` submits the grid as a SLURM job array with submitit (``pip install
  submitit``; only imported then): one GPU per task, at most ``--workers`` tasks at
  once (default: no limit), each adding ``--resume`` when its run has a checkpoint; ``--slurm-cluster local``
  runs the same tasks on this machine (to try it) and waits for them.

GPU sharing: ``--gpus 0 1 --processes-per-gpu 2`` runs up to 4 runs at once, at most
2 on each GPU. Each run is started with ``CUDA_VISIBLE_DEVICES`` set to a GPU that
has a free slot (the first runs go round-robin over the list),
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (JAX then allocates as it needs instead of
taking most of the GPU at start) and ``XLA_PYTHON_CLIENT_MEM_FRACTION`` =
``--mem-fraction`` (default 0.9 / processes-per-gpu: XLA's limit per process, leaving
room for the CUDA context of each). The scripts' replay-size check reads that limit,
so a grid that does not fit says so at start. Each script uses one device, so there
is no gpus-per-run setting. Without ``--gpus`` the environment is passed unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

# Flags the launcher sets itself for every run: passing them after `--` is an error.
GRID_FLAGS = ("env_id", "seed", "method", "run_name")


@dataclass
class Run:
    """One grid point: the script's flags for it and where its output goes."""

    env_id: str
    seed: int
    method: str
    run_name: str
    args: list[str]  # everything after the script path
    env: dict[str, str] = field(default_factory=dict)  # variables added to the launcher's environment

    def argv(self, python: str, script: str) -> list[str]:
        return [python, script, *self.args]


def flag_name(token: str) -> str | None:
    """``--env-id=X`` / ``--env_id`` -> ``env_id``; None for a non-flag token."""
    if not token.startswith("--") or token == "--":
        return None
    return token[2:].split("=", 1)[0].replace("-", "_")


def flag_value(tokens: Sequence[str], name: str) -> str | None:
    """The value of the last ``--name V`` / ``--name=V`` in ``tokens`` (either spelling of name)."""
    value = None
    for i, tok in enumerate(tokens):
        if flag_name(tok) == name:
            if "=" in tok:
                value = tok.split("=", 1)[1]
            elif i + 1 < len(tokens):
                value = tokens[i + 1]
    return value


def run_name_for(env_id: str, exp_name: str, method: str, seed: int) -> str:
    return f"{env_id}__{exp_name}__{method}__s{seed}".replace("/", "-")


def build_grid(env_ids: Sequence[str], seeds: Sequence[int], methods: Sequence[str], exp_name: str,
               extra: Sequence[str]) -> list[Run]:
    """games x seeds x methods, in that nesting order (all methods of a game and seed together)."""
    runs = []
    for env_id, seed, method in itertools.product(env_ids, seeds, methods):
        name = run_name_for(env_id, exp_name, method, seed)
        args = ["--env-id", env_id, "--seed", str(seed), "--method", method, "--run-name", name, *extra]
        runs.append(Run(env_id, seed, method, name, args))
    return runs


def checkpoint_dir(run_name: str, cwd: Path) -> Path:
    return cwd / "runs" / run_name / "checkpoints"


def add_resume(run: Run, cwd: Path) -> bool:
    """Append ``--resume`` if the run already has a checkpoint folder (and the flag is not given)."""
    if checkpoint_dir(run.run_name, cwd).is_dir() and "resume" not in {flag_name(t) for t in run.args}:
        run.args.append("--resume")
        return True
    return False


def gpu_env(gpu: str, processes_per_gpu: int, mem_fraction: float | None) -> dict[str, str]:
    fraction = mem_fraction if mem_fraction is not None else 0.9 / processes_per_gpu
    return {
        "CUDA_VISIBLE_DEVICES": str(gpu),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}",
    }


def format_command(argv: Sequence[str], env: dict[str, str]) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (prefix + " " if prefix else "") + shlex.join(argv)


def grid_lines(runs: Sequence[Run]) -> list[str]:
    """One shell-quoted argument line per run (what follows the script path)."""
    return [shlex.join(run.args) for run in runs]


# ----------------------------------------------------------------------------
# Local execution
# ----------------------------------------------------------------------------
@dataclass
class Result:
    run: Run
    returncode: int | None  # None: not started (interrupted before)
    seconds: float
    log: Path


class LocalLauncher:
    """Runs commands with at most len(slots) at once; each slot is the environment a child gets
    (one slot per worker, or processes_per_gpu slots per GPU)."""

    def __init__(self, python: str, script: str, log_dir: Path, cwd: Path, slots: list[dict[str, str]],
                 stop_timeout: float = 600.0):
        self.python, self.script, self.log_dir, self.cwd = python, script, log_dir, cwd
        self.stop_timeout = stop_timeout
        self.slots: queue.Queue[dict[str, str]] = queue.Queue()
        for slot in slots:
            self.slots.put(slot)
        self.print_lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        # Held while a child starts and while stop() reads the children: a run starting during a Ctrl-C is either
        # stopped with the others or never started.
        self.procs_lock = threading.Lock()
        self.stopping = threading.Event()

    def say(self, msg: str) -> None:
        with self.print_lock:
            print(msg, flush=True)

    def run_one(self, index: int, total: int, run: Run) -> Result:
        log = self.log_dir / f"{run.run_name}.log"
        slot = self.slots.get()
        try:
            run.env = dict(slot)
            argv = run.argv(self.python, self.script)
            command = format_command(argv, run.env)
            with self.procs_lock:
                if self.stopping.is_set():
                    return Result(run, None, 0.0, log)
                self.say(f"[{index}/{total}] start {run.run_name}: {command}")
                start = time.monotonic()
                f = open(log, "a")
                f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {command}\n")
                f.flush()
                # Own session: a terminal's Ctrl-C reaches only the launcher, which then sends each run one SIGTERM.
                # The scripts take a second signal as "exit now, no checkpoint", so they must not get both.
                try:
                    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=self.cwd, env={**os.environ, **run.env}, start_new_session=True)
                except BaseException:
                    f.close()
                    raise
                self.procs[proc.pid] = proc
            with f:
                try:
                    code = proc.wait()
                finally:
                    self.procs.pop(proc.pid, None)
            seconds = time.monotonic() - start
            status = "ok" if code == 0 else "FAILED"
            self.say(f"[{index}/{total}] {status} {run.run_name}: exit code {code} after {seconds:.1f} s (log: {log})")
            return Result(run, code, seconds, log)
        finally:
            self.slots.put(slot)

    def run_all(self, runs: Sequence[Run]) -> list[Result]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        threads_results: list[Result | None] = [None] * len(runs)
        work: queue.Queue[int] = queue.Queue()
        for i in range(len(runs)):
            work.put(i)

        def worker():
            while not self.stopping.is_set():
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                threads_results[i] = self.run_one(i + 1, len(runs), runs[i])

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.slots.qsize(), len(runs)))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            self.stop()
            for t in threads:
                t.join(timeout=5)
        return [r if r is not None else Result(run, None, 0.0, self.log_dir / f"{run.run_name}.log")
                for r, run in zip(threads_results, runs)]

    def stop(self) -> None:
        """After a Ctrl-C: one SIGTERM to each run (it checkpoints and exits), then wait up to stop_timeout; a
        second Ctrl-C, or the timeout, kills them."""
        with self.procs_lock:
            self.stopping.set()
            procs = list(self.procs.values())
        if not procs:
            return
        self.say(f"interrupted: sent SIGTERM to {len(procs)} running run(s); waiting up to {self.stop_timeout:g} s while "
                 f"they write a checkpoint (Ctrl-C again kills them; relaunch with --resume to continue)")
        deadline = time.monotonic() + self.stop_timeout
        try:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)  # (Popen skips a run already reaped: its pid may be reused)
            for proc in procs:
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    self.say(f"run pid {proc.pid} did not exit within --stop-timeout {self.stop_timeout:g} s: killing it")
                    proc.kill()
        except KeyboardInterrupt:
            self.say("interrupted again: killing the runs (they write no checkpoint now)")
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def summarize(results: Sequence[Result]) -> int:
    failed = [r for r in results if r.returncode != 0]
    done = len(results) - len(failed)
    print(f"\n{done}/{len(results)} runs succeeded, total run time {sum(r.seconds for r in results):.1f} s")
    for r in results:
        code = "not started" if r.returncode is None else f"exit {r.returncode}"
        print(f"  {code:>11}  {r.seconds:8.1f} s  {r.run.run_name}")
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for r in failed:
            why = "not started" if r.returncode is None else f"exit code {r.returncode}"
            print(f"  {r.run.run_name} ({why}); log: {r.log}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------
# SLURM through submitit (optional)
# ----------------------------------------------------------------------------
def _slurm_task(argv: list[str], run_name: str, cwd: str, env: dict[str, str], resume: bool) -> int:
    """What each array task runs (on the compute node): the script, resumed if it has a checkpoint."""
    argv = list(argv)
    if resume and checkpoint_dir(run_name, Path(cwd)).is_dir() and "--resume" not in argv:
        argv.append("--resume")
    print("command:", shlex.join(argv), flush=True)
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **env}).returncode


def submit_slurm(opts: argparse.Namespace, runs: Sequence[Run], script: str, cwd: Path) -> int:
    try:
        import submitit
    except ImportError:
        print("error: --slurm needs the submitit package: pip install submitit "
              "(or use --emit-grid with reincarnate_utils/slurm/reincarnate.sbatch)", file=sys.stderr)
        return 2
    folder = Path(opts.log_dir) / "submitit"
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=opts.slurm_cluster)
    except RuntimeError as e:  # submitit's "Could not detect srun" off a cluster
        print(f"error: --slurm: {e} (--slurm-cluster local runs the tasks here)", file=sys.stderr)
        return 1
    params = dict(slurm_array_parallelism=opts.workers or len(runs), gpus_per_node=1, cpus_per_task=opts.slurm_cpus,
                  timeout_min=opts.slurm_time_min, mem_gb=opts.slurm_mem_gb, name=Path(script).stem)
    if opts.slurm_partition:
        params["slurm_partition"] = opts.slurm_partition
    if opts.slurm_cluster != "slurm":  # local / debug: no GPU request (the machine's own devices are used)
        params.pop("gpus_per_node")
    executor.update_parameters(**params)
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    argvs = [run.argv(opts.python, script) for run in runs]
    submitted = time.monotonic()
    try:
        jobs = executor.map_array(_slurm_task, argvs, [r.run_name for r in runs], [str(cwd)] * len(runs),
                                  [env] * len(runs), [True] * len(runs))
    except (OSError, subprocess.CalledProcessError) as e:  # e.g. no sbatch on this machine
        print(f"error: submitting to {opts.slurm_cluster} failed: {e}", file=sys.stderr)
        return 1
    for run, job in zip(runs, jobs):
        print(f"submitted {job.job_id}: {run.run_name}")
    print(f"submitit logs: {folder}; rerunning the same launch command resumes runs that have a checkpoint")
    if opts.slurm_cluster == "slurm":
        return 0
    results = []  # local / debug: wait, and report as a local launch does
    for run, job in zip(runs, jobs):
        try:
            code = job.result()
        except Exception as e:  # the task itself raised (submitit re-raises it here)
            print(f"{run.run_name}: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        results.append(Result(run, code, time.monotonic() - submitted, folder))  # time until seen finished
    return summarize(results)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reincarnate_utils.launch",
        description="Run a grid of games x seeds x methods of a training script, a few at a time, "
                    "each in its own run folder runs/GAME__EXP__METHOD__sSEED. Flags after `--` go to every run.",
        epilog="example: python -m reincarnate_utils.launch --script qdagger_dqn_atari_jax.py --env-ids Breakout-v5 "
               "Pong-v5 --seeds 1 2 3 --methods qdagger tabula-rasa --workers 2 -- --total-timesteps 1000000",
    )
    p.add_argument("--script", required=True,
                   help="the training script (a path; a bare name is also looked up in the repository root)")
    p.add_argument("--env-ids", nargs="+", default=["Breakout-v5"], metavar="ENV_ID", help="envpool ids (default: Breakout-v5)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1], metavar="SEED", help="seeds (default: 1)")
    p.add_argument("--methods", nargs="+", default=["qdagger"], metavar="METHOD",
                   help="values of the script's --method (default: qdagger)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at once (default: 1, or len(--gpus) x --processes-per-gpu; with --slurm: all)")
    p.add_argument("--log-dir", default="runs/launch-logs", help="where each run's output goes (default: runs/launch-logs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    p.add_argument("--resume", action="store_true",
                   help="add --resume to runs whose runs/RUN_NAME/checkpoints exists (continue an interrupted grid)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs (default: this one)")
    p.add_argument("--stop-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="on Ctrl-C (or SIGTERM to the launcher) each running run gets one SIGTERM, checkpoints and exits; "
                        "wait this long for them before killing them (a second Ctrl-C kills them at once; default: 600)")
    p.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                   help="GPU ids to share out: each run gets CUDA_VISIBLE_DEVICES=<one of them>")
    p.add_argument("--processes-per-gpu", type=int, default=1, help="runs sharing one GPU at once (default: 1)")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION per run with --gpus (default: 0.9 / processes-per-gpu)")
    p.add_argument("--emit-grid", metavar="FILE", default=None,
                   help="write one argument line per run to FILE (line i = SLURM array task i) and run nothing")
    g = p.add_argument_group("SLURM via submitit (--slurm)")
    g.add_argument("--slurm", action="store_true", help="submit the grid as a SLURM job array with submitit, 1 GPU per task")
    g.add_argument("--slurm-partition", default=None, help="SLURM partition")
    g.add_argument("--slurm-cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit executor: slurm (default); local or debug run the tasks on this machine, "
                        "to try the path without a cluster (the launcher then waits and reports exit codes)")
    g.add_argument("--slurm-time-min", type=int, default=24 * 60, help="time limit per task in minutes (default: 1440)")
    g.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per task (default: 8)")
    g.add_argument("--slurm-mem-gb", type=int, default=64, help="host memory per task in GB (default: 64)")
    return p


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def resolve_script(script: str) -> str:
    path = Path(script)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise SystemExit(f"error: --script {script} not found (here or in {REPO_ROOT})")
    return str(path.resolve())


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    opts = parser.parse_args(own)
    clash = sorted({flag_name(t) for t in extra} & set(GRID_FLAGS))
    if clash:
        parser.error(f"the launcher sets {', '.join('--' + c.replace('_', '-') for c in clash)} itself: "
                     "use --env-ids/--seeds/--methods instead of passing them after --")
    if opts.processes_per_gpu < 1:
        parser.error("--processes-per-gpu must be >= 1")
    if opts.workers is not None and opts.workers < 1:
        parser.error("--workers must be >= 1")
    script = resolve_script(opts.script)
    exp_name = flag_value(extra, "exp_name") or Path(script).stem
    runs = build_grid(opts.env_ids, opts.seeds, opts.methods, exp_name, extra)
    names = [r.run_name for r in runs]
    if len(set(names)) != len(names):
        parser.error("the grid repeats a run (duplicate --env-ids, --seeds or --methods)")
    cwd = Path.cwd()

    if opts.gpus:
        slots = [gpu_env(g, opts.processes_per_gpu, opts.mem_fraction)
                 for _ in range(opts.processes_per_gpu) for g in opts.gpus]  # round-robin order
        workers = opts.workers or len(slots)
        if workers > len(slots):
            print(f"note: --workers {workers} > {len(opts.gpus)} GPU(s) x {opts.processes_per_gpu}; running {len(slots)} at once")
        slots = slots[:workers]
    else:
        workers = opts.workers or 1
        slots = [{} for _ in range(workers)]

    if opts.emit_grid:
        lines = grid_lines(runs)
        Path(opts.emit_grid).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.emit_grid).write_text("".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} argument lines to {opts.emit_grid}; submit with:\n"
              f"  sbatch --array=1-{len(lines)} {REPO_ROOT / 'reincarnate_utils/slurm/reincarnate.sbatch'} "
              f"{opts.emit_grid} {script}")
        return 0
    if opts.resume and not opts.slurm:  # (--slurm tasks check for checkpoints when they start)
        for run in runs:
            if add_resume(run, cwd):
                print(f"resuming {run.run_name} from {checkpoint_dir(run.run_name, cwd)}")
    if opts.dry_run:
        for i, run in enumerate(runs):
            print(format_command(run.argv(opts.python, script), {} if opts.slurm else slots[i % len(slots)]))
        where = "as a SLURM array" if opts.slurm else f"{len(slots)} at once"
        print(f"{len(runs)} runs, {where} (dry run: nothing started)")
        return 0
    if opts.slurm:
        return submit_slurm(opts, runs, script, cwd)

    print(f"{len(runs)} runs, {len(slots)} at once; logs in {opts.log_dir}", flush=True)
    launcher = LocalLauncher(opts.python, script, Path(opts.log_dir), cwd, slots, stop_timeout=opts.stop_timeout)
    # `kill <launcher>` stops the grid as Ctrl-C does: the runs have their own sessions and would go on unwatched.
    previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        results = launcher.run_all(runs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return summarize(results)


def _sigterm_as_ctrl_c(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

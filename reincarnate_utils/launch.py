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
  runs the same tasks on this machine (to try it) and waits for them. At the time limit (or a preemption)
  submitit's signal (SIGUSR2, ``--slurm-signal-delay-s`` before the limit) reaches the task, which sends its
  run one SIGTERM (the run finishes its step, writes a checkpoint and exits 130), waits for it and requeues
  itself (at most ``--slurm-max-requeues`` times after a time limit); the requeued task continues the run with
  ``--resume``. A run stopped that way is reported as interrupted, not failed; one that could not be requeued
  says how to resume it.

Before anything starts (and before ``--emit-grid`` writes its file) the grid is checked: each ``--methods`` value
against the script's ``Args.method`` choices and the flags after ``--`` against its ``Args`` fields (both read
from the script's source, without running it), each ``--env-ids`` value against envpool's Atari ids (listed by
``--python``, as the runs will see them), and that ``--script`` and ``--python`` exist. A bad value ends the
launcher with one ``error:`` line (with the valid choices or a close match) and exit code 2.

Exit code: 0 when every run succeeded, 1 when a run failed, 130 when none failed but some were interrupted with a
checkpoint or not started (Ctrl-C, or a SLURM task that could not be requeued): relaunch to resume them.

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
import ast
import contextlib
import difflib
import itertools
import math
import os
import queue
import shlex
import shutil
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
    interrupted: bool = False  # stopped by a signal as asked (it wrote a checkpoint and exited 130): not a failure
    note: str = ""  # e.g. how often submitit requeued it

    @property
    def failed(self) -> bool:
        return self.returncode not in (0, None) and not self.interrupted


# The scripts' exit code after a SIGTERM/SIGINT once they have written their checkpoint (teacher_utils.Interrupt).
INTERRUPTED_EXIT = 130


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
            # 130 after the launcher's own SIGTERM (Ctrl-C): the run checkpointed and stopped as asked.
            interrupted = code == INTERRUPTED_EXIT and self.stopping.is_set()
            status = "ok" if code == 0 else "interrupted" if interrupted else "FAILED"
            self.say(f"[{index}/{total}] {status} {run.run_name}: exit code {code} after {seconds:.1f} s (log: {log})")
            return Result(run, code, seconds, log, interrupted=interrupted)
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
        try:  # the starts inside: a Ctrl-C while the main thread still waits in Thread.start() (its runs may have begun) must stop them too
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            self.stop()
            for t in threads:
                if t.is_alive():
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


def summarize(results: Sequence[Result], resume_hint: str = "relaunch with --resume to continue them") -> int:
    """Print the table; 0 if every run succeeded, 1 if one failed, else 130 (interrupted or not started runs)."""
    failed = [r for r in results if r.failed]
    stopped = [r for r in results if r.interrupted or r.returncode is None]
    done = sum(r.returncode == 0 for r in results)
    parts = [f"{done}/{len(results)} runs succeeded"]
    if any(r.interrupted for r in results):
        parts.append(f"{sum(r.interrupted for r in results)} interrupted (resumable)")
    if any(r.returncode is None for r in results):
        parts.append(f"{sum(r.returncode is None for r in results)} not started")
    print(f"\n{', '.join(parts)}, total run time {sum(r.seconds for r in results):.1f} s")
    for r in results:
        code = "not started" if r.returncode is None else "interrupted" if r.interrupted else f"exit {r.returncode}"
        print(f"  {code:>11}  {r.seconds:8.1f} s  {r.run.run_name}" + (f"  ({r.note})" if r.note else ""))
    if stopped:
        print(f"{len(stopped)} run(s) interrupted or not started (not failures): {resume_hint}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.run.run_name} (exit code {r.returncode}); log: {r.log}", file=sys.stderr)
        return 1
    return INTERRUPTED_EXIT if stopped else 0


# ----------------------------------------------------------------------------
# SLURM through submitit (optional)
# ----------------------------------------------------------------------------
def _preempt_signal() -> signal.Signals:
    """submitit's time-limit / preemption signal: SIGUSR2, or what SUBMITIT_PREEMPT_SIGNAL names (read as submitit's
    JobEnvironment reads it)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


_REAPED: dict[int, int] = {}  # without os.waitid (macOS): the exit codes of the children _child_exit reaped


def _child_exit(pid: int, timeout: float | None) -> int | None:
    """The exit code of child ``pid`` (-N if signal N killed it) once it has exited, or None if it is still running
    after ``timeout`` seconds (None: wait). It takes no lock (Popen.wait and Popen.poll hold one that the code a signal
    handler interrupted may hold already) and leaves the child unreaped (WNOWAIT) where os.waitid exists."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if hasattr(os, "waitid"):
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | (0 if deadline is None else os.WNOHANG))
            code = None if info is None else info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        elif pid in _REAPED:
            code = _REAPED[pid]
        else:  # reaped here, and remembered (Popen.wait then finds no child and leaves it be)
            done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
            code = None
            if done:
                code = _REAPED[pid] = os.waitstatus_to_exitcode(status)
        if code is not None:
            return code
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _say(msg: str) -> None:
    print(f"launch: {msg}", file=sys.stderr, flush=True)


class SlurmTask:
    """What each submitit task runs on its node: the training script as a child process, with ``--resume`` when its
    run has a checkpoint. Returns ``{"returncode", "interrupted", "requeues"}``.

    At the time limit, or at a preemption, submitit's signal handler (SIGUSR2 by default, ``--signal=USR2@DELAY``)
    calls ``checkpoint()`` in the task while ``__call__`` waits for the child, then requeues the task with the
    DelayedSubmission it returns (``scontrol requeue``; the local executor restarts it) and exits; after too many
    time limits it raises ``UncompletedJobError`` instead. ``checkpoint()`` sends the run one SIGTERM (it finishes its
    step, writes a checkpoint and exits 130, as under reincarnate.sbatch), waits up to ``stop_timeout`` seconds for
    it, and asks for the requeue; the requeued task resumes the run. Without that (a plain function, as before),
    submitit found nothing to checkpoint, raised, and the child was killed without a checkpoint.

    submitit only looks for a ``checkpoint`` method (``helpers.Checkpointable`` adds nothing else), so the class does
    not derive from it and this module imports submitit only with --slurm.

    Signals: the child stays in the task's process group, as the python that reincarnate.sbatch execs, so what SLURM
    sends the whole job step (SIGTERM at the end of the time limit or at a preemption, scancel's signals) and a
    terminal's Ctrl-C reach it directly, once; the task forwards none of those (the scripts take a second signal as
    "exit now, without a checkpoint"). The child ignores submitit's signal (its default action would kill it
    without a checkpoint; SLURM sends --signal to every process of the step): the task turns it into one SIGTERM.
    """

    def __init__(self, stop_timeout: float):
        self.stop_timeout = stop_timeout
        self.requeues = 0  # how often this task was requeued at a time limit or preemption (kept across requeues)
        self._fresh()

    def _fresh(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._run_name = ""
        self._code: int | None = None  # the child's exit code once known
        self._signalled = False  # submitit's signal handler called checkpoint()
        self._stopped = False  # we sent the child its SIGTERM
        self._killed = False  # ... and it did not exit within stop_timeout
        self._asked_requeue = False  # checkpoint() returned a DelayedSubmission (submitit may still not requeue)
        self._got_sigterm = False  # the task got a SIGTERM (SLURM sends the whole step one: the run got it too)

    def __getstate__(self) -> dict:  # pickled for submission and for the requeue: without this run's process
        state = dict(self.__dict__)
        state.update(_proc=None, _run_name="", _code=None, _signalled=False, _stopped=False, _killed=False,
                     _asked_requeue=False, _got_sigterm=False)
        return state

    def __call__(self, argv: list[str], run_name: str, cwd: str, env: dict[str, str | None]) -> dict:
        argv = list(argv)
        if checkpoint_dir(run_name, Path(cwd)).is_dir() and "--resume" not in argv:
            argv.append("--resume")
        child_env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
        for k in [k for k, v in env.items() if v is None]:  # None: not set for the run
            child_env.pop(k, None)
        again = f" (requeued {self.requeues} time(s) so far)" if self.requeues else ""
        print("command:", shlex.join(argv) + again, flush=True)
        self._run_name = run_name
        watch = threading.current_thread() is threading.main_thread()  # (submitit's debug executor: maybe not)
        if watch:
            previous = signal.getsignal(signal.SIGTERM)  # submitit's: it logs and ignores SIGTERM

            def note_sigterm(signum, frame):
                self._got_sigterm = True
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGTERM, note_sigterm)
        try:
            return self._run(argv, run_name, cwd, child_env)
        finally:
            if watch:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _run(self, argv: list[str], run_name: str, cwd: str, child_env: dict[str, str]) -> dict:
        sig = _preempt_signal()

        def ignore_preempt_signal() -> None:  # in the child, before exec (SIG_IGN survives exec)
            signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})

        # Blocked until checkpoint() can see the child: a signal in between waits, neither lost nor half-handled.
        signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        try:
            self._proc = proc = subprocess.Popen(argv, cwd=cwd, env=child_env, preexec_fn=ignore_preempt_signal)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        try:
            self._code = _child_exit(proc.pid, None)
            proc.wait()
            if self._code == INTERRUPTED_EXIT and self._got_sigterm:  # SLURM's SIGTERM reached the run directly
                _say(f"interrupted: {run_name} and its task got a SIGTERM (from SLURM: a preemption, scancel or the "
                     "end of the time limit) and the run stopped with a checkpoint; SLURM requeues a preempted job if "
                     "so configured, or rerun the same launch command to resume it (its task adds --resume)")
                return {"returncode": self._code, "interrupted": True, "requeues": self.requeues}
            return {"returncode": self._code, "interrupted": False, "requeues": self.requeues}
        except BaseException as e:
            if not self._signalled:
                raise
            # submitit's handler ran checkpoint(), then requeued the task and exits (SystemExit), or could not requeue.
            if self._code is not None:
                with contextlib.suppress(ChildProcessError):
                    proc.wait()
            if not isinstance(e, Exception):  # SystemExit (requeued), KeyboardInterrupt
                raise
            if self._asked_requeue:  # but submitit did not requeue (too many time limits, or scontrol failed)
                self.requeues -= 1
            code = self._code
            if code == 0:
                return {"returncode": 0, "interrupted": False, "requeues": self.requeues}
            if self._stopped and (code == INTERRUPTED_EXIT or self._killed):
                what = "killed without a new checkpoint" if self._killed else "with a checkpoint"
                resume = argv if "--resume" in argv else [*argv, "--resume"]
                _say(f"interrupted: {run_name} stopped at the time limit or a preemption {what}, but was not requeued "
                     f"({type(e).__name__}: {e}); to resume it, rerun the same launch command (its task adds --resume), "
                     f"or: cd {shlex.quote(cwd)} && {shlex.join(resume)}")
                return {"returncode": code, "interrupted": True, "requeues": self.requeues}
            return {"returncode": code, "interrupted": False, "requeues": self.requeues}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit's signal handler (in this process, while __call__ waits): stop the run with one
        SIGTERM and wait for its checkpoint; a DelayedSubmission of the same call to requeue, or None (the run
        had ended by itself: nothing to requeue)."""
        self._signalled = True
        proc = self._proc
        if proc is None:  # the signal came before the run started
            return self._requeue(*args, **kwargs)
        if self._code is None:
            self._code = _child_exit(proc.pid, 0)
        if self._code is None and not self._stopped:
            sig = _preempt_signal().name
            _say(f"{sig} from submitit (time limit or preemption): sent SIGTERM to {self._run_name} (pid {proc.pid}); "
                 f"waiting up to {self.stop_timeout:g} s while it writes its checkpoint")
            self._stopped = True
            os.kill(proc.pid, signal.SIGTERM)
            self._code = _child_exit(proc.pid, self.stop_timeout)
            if self._code is None:
                _say(f"{self._run_name} did not exit within {self.stop_timeout:g} s: killing it "
                     "(it resumes from its last checkpoint)")
                self._killed = True
                os.kill(proc.pid, signal.SIGKILL)
                self._code = _child_exit(proc.pid, None)
        if self._stopped and (self._code == INTERRUPTED_EXIT or self._killed):
            _say(f"{self._run_name} stopped (exit code {self._code}): asking submitit to requeue its task, which "
                 "continues the run with --resume")
            return self._requeue(*args, **kwargs)
        _say(f"{self._run_name} had ended by itself (exit code {self._code}): nothing to requeue")
        return None

    def _requeue(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        if not self._asked_requeue:
            self._asked_requeue = True
            self.requeues += 1  # pickled with the DelayedSubmission: the requeued task counts it
        return DelayedSubmission(self, *args, **kwargs)


def import_submitit():
    try:
        import submitit
    except ImportError:
        print("error: --slurm needs the submitit package: pip install submitit "
              "(or use --emit-grid with reincarnate_utils/slurm/reincarnate.sbatch)", file=sys.stderr)
        return None
    return submitit


def submit_slurm(opts: argparse.Namespace, runs: Sequence[Run], script: str, cwd: Path, submitit) -> int:
    folder = Path(opts.log_dir) / "submitit"
    delay = signal_delay_s(opts)
    try:
        if opts.slurm_cluster == "local":
            # LocalExecutor directly: AutoExecutor takes neither a fractional timeout_min nor signal_delay_s for it.
            executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=opts.slurm_max_requeues)
            executor.update_parameters(timeout_min=opts.slurm_time_min, signal_delay_s=delay)
        else:
            executor = submitit.AutoExecutor(folder=str(folder), cluster=opts.slurm_cluster,
                                             slurm_max_num_timeout=opts.slurm_max_requeues)
    except RuntimeError as e:  # submitit's "Could not detect srun" off a cluster
        print(f"error: --slurm: {e} (--slurm-cluster local runs the tasks here)", file=sys.stderr)
        return 1
    if opts.slurm_cluster != "local":
        params = dict(slurm_array_parallelism=opts.workers or len(runs), gpus_per_node=1, cpus_per_task=opts.slurm_cpus,
                      timeout_min=math.ceil(opts.slurm_time_min), mem_gb=opts.slurm_mem_gb, name=Path(script).stem,
                      slurm_signal_delay_s=delay)
        if opts.slurm_partition:
            params["slurm_partition"] = opts.slurm_partition
        if opts.slurm_cluster == "debug":  # runs in this process: no GPU request (the machine's own devices are used)
            params.pop("gpus_per_node")
        executor.update_parameters(**params)
    env: dict[str, str | None] = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    if opts.slurm_cluster == "local":  # its controller sets CUDA_VISIBLE_DEVICES to the GPUs requested ("": none)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # the runs see this machine's devices
    argvs = [run.argv(opts.python, script) for run in runs]
    task = SlurmTask(stop_timeout=max(delay - 30, 0.8 * delay))
    submitted = time.monotonic()
    try:
        jobs = executor.map_array(task, argvs, [r.run_name for r in runs], [str(cwd)] * len(runs), [env] * len(runs))
    except (OSError, subprocess.CalledProcessError) as e:  # e.g. no sbatch on this machine
        print(f"error: submitting to {opts.slurm_cluster} failed: {e}", file=sys.stderr)
        return 1
    for run, job in zip(runs, jobs):
        print(f"submitted {job.job_id}: {run.run_name}")
    print(f"submitit logs: {folder}; {_preempt_signal().name} {delay} s before a task's time limit (or at a preemption) "
          f"stops its run with a checkpoint and requeues the task (at most {opts.slurm_max_requeues} time(s) after a "
          "time limit), which resumes it; rerunning the same launch command also resumes runs that have a checkpoint",
          flush=True)
    if opts.slurm_cluster == "slurm":
        return 0
    results = []  # local / debug: wait, and report as a local launch does
    for i, (run, job) in enumerate(zip(runs, jobs), 1):
        log = Path(job.paths.stderr)
        try:
            out = job.result()
        except Exception as e:  # the task itself raised (submitit re-raises it here)
            print(f"{run.run_name}: {type(e).__name__}: {e}", file=sys.stderr)
            out = {"returncode": 1}
        if not isinstance(out, dict):  # a task pickled by an older launcher returned the exit code
            out = {"returncode": out}
        code, interrupted, requeues = out["returncode"], out.get("interrupted", False), out.get("requeues", 0)
        note = f"requeued {requeues} time(s) at a time limit or preemption, resumed with --resume" if requeues else ""
        if interrupted:
            how = "with a checkpoint" if code == INTERRUPTED_EXIT else "killed without a new checkpoint"
            note = f"stopped {how} and not requeued: see its log" + (f"; {note}" if note else "")
        seconds = time.monotonic() - submitted  # time until seen finished
        status = "ok" if code == 0 else "interrupted" if interrupted else "FAILED"
        print(f"[{i}/{len(runs)}] {status} {run.run_name}: exit code {code} after {seconds:.1f} s"
              + (f"; {note}" if note else "") + f" (log: {log})", flush=True)
        results.append(Result(run, code, seconds, log, interrupted=interrupted, note=note))
    return summarize(results, resume_hint="rerun the same launch command to resume them")


def signal_delay_s(opts: argparse.Namespace) -> int:
    """Seconds before the time limit at which a task gets submitit's signal (default: 300, as reincarnate.sbatch's
    --signal=B:TERM@300, at most half the time limit)."""
    if opts.slurm_signal_delay_s is not None:
        return opts.slurm_signal_delay_s
    return max(1, min(300, int(opts.slurm_time_min * 30)))


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
    g.add_argument("--slurm-time-min", type=float, default=24 * 60,
                   help="time limit per task in minutes (default: 1440; fractions only with --slurm-cluster local)")
    g.add_argument("--slurm-signal-delay-s", type=int, default=None, metavar="SECONDS",
                   help="submitit's signal (SIGUSR2) comes this long before the time limit; the task then sends its run "
                        "one SIGTERM (it writes a checkpoint) and requeues itself "
                        "(default: 300, as reincarnate.sbatch, at most half the time limit)")
    g.add_argument("--slurm-max-requeues", type=int, default=3, metavar="N",
                   help="requeue a task at most N times after its time limit (submitit's max_num_timeout; default: 3); "
                        "then it stops with a checkpoint and says how to resume")
    g.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per task (default: 8)")
    g.add_argument("--slurm-mem-gb", type=int, default=64, help="host memory per task in GB (default: 64)")
    return p


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def resolve_script(script: str) -> str | None:
    path = Path(script)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    return str(path.resolve()) if path.is_file() else None


# ----------------------------------------------------------------------------
# Checking the grid before anything starts
# ----------------------------------------------------------------------------
@dataclass
class ScriptArgs:
    """What the script's ``Args`` accepts, read from its source (None: not found there, so not checked)."""

    methods: list[str] | None = None  # Args.method's Literal values (or the keys of a METHODS table)
    fields: set[str] | None = None  # Args's field names


def read_script_args(script: str) -> ScriptArgs:
    """Parse the script's source with ``ast`` instead of importing it: an import runs the script's module code
    (jax, flax, envpool: seconds, and it can fail on a login node without the GPU libraries), while the values
    needed are literals in the source: ``method: Literal["qdagger", ...]`` in ``class Args`` and its fields."""
    try:
        tree = ast.parse(Path(script).read_text(), filename=script)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ScriptArgs()
    info = ScriptArgs()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    # The scripts' Args extend the flags every student shares (reincarnate/config.py, beside the script): read them too.
    try:
        shared = ast.parse((Path(script).resolve().parent / "reincarnate" / "config.py").read_text())
        classes = {**{node.name: node for node in shared.body if isinstance(node, ast.ClassDef)}, **classes}
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        pass
    if "Args" in classes:
        info.fields = _class_fields(classes, "Args")
        for n in classes["Args"].body:
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "method":
                info.methods = _literal_strings(n.annotation)
    if info.methods is None:  # no Literal: the keys of a module-level METHODS = {...} table
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
            value = getattr(node, "value", None)
            if isinstance(target, ast.Name) and target.id == "METHODS" and isinstance(value, ast.Dict):
                keys = [k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
                if keys and len(keys) == len(value.keys):
                    info.methods = keys
    return info


def _class_fields(classes: dict[str, ast.ClassDef], name: str) -> set[str] | None:
    """The field names of dataclass `name` and of its bases (None if a base is not among `classes`: not checked)."""
    node = classes[name]
    fields = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for base in node.bases:
        base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        inherited = _class_fields(classes, base_name) if base_name in classes else None
        if inherited is None:
            return None
        fields |= inherited
    return fields


def _literal_strings(annotation: ast.expr) -> list[str] | None:
    """``Literal["a", "b"]`` (or ``typing.Literal[...]``) -> ["a", "b"]; None for anything else."""
    if not isinstance(annotation, ast.Subscript):
        return None
    name = annotation.value
    if not ((isinstance(name, ast.Name) and name.id == "Literal") or (isinstance(name, ast.Attribute) and name.attr == "Literal")):
        return None
    elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
    values = [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return values if values and len(values) == len(elts) else None


# envpool's Atari ids, as teacher_utils.atari_env_ids lists them (without importing teacher_utils, i.e. jax).
_LIST_ATARI_IDS = ("from envpool.registration import registry\n"
                   "print('ATARI_IDS', *sorted(i for i, s in registry.specs.items() if s[0] == 'envpool.atari'))")


def atari_env_ids(python: str) -> tuple[list[str] | None, str]:
    """envpool's Atari ids as ``python`` (the runs' interpreter) sees them, or (None, why not)."""
    try:
        r = subprocess.run([python, "-c", _LIST_ATARI_IDS], capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    lines = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("ATARI_IDS")]
    if r.returncode != 0 or not lines or not lines[-1]:
        return None, (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return lines[-1], ""


def env_id_problem(env_id: str, candidates: Sequence[str]) -> str | None:
    """None if envpool has ``env_id``, else its close matches, by teacher_utils.check_env_id's rule."""
    if env_id in candidates:
        return None
    key = env_id.split("/")[-1].replace("NoFrameskip", "").replace("-v4", "-v5")
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.5)
    return f"{env_id!r} (did you mean {', '.join(close)}?)" if close else repr(env_id)


def check_grid(opts: argparse.Namespace, script: str, extra: Sequence[str]) -> str | None:
    """The first problem with the grid's values (one line), or None: what would otherwise surface only when a run
    starts, after others were launched."""
    if shutil.which(opts.python) is None:
        return f"--python {opts.python}: no such interpreter"
    name = Path(script).name
    info = read_script_args(script)
    if info.methods is not None:
        bad = [m for m in dict.fromkeys(opts.methods) if m not in info.methods]
        if bad:
            close = difflib.get_close_matches(bad[0], info.methods, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return (f"unknown method {', '.join(map(repr, bad))} in --methods{hint}: {name} takes "
                    f"{', '.join(info.methods)}")
    if info.fields is not None:
        known = info.fields | {f"no_{f}" for f in info.fields} | {"help"}
        for tok in extra:
            flag = flag_name(tok)
            if flag is not None and flag not in known:
                close = difflib.get_close_matches(flag, sorted(info.fields), n=1)
                hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
                return f"unknown flag {tok.split('=', 1)[0]} after --: {name}'s Args has no such field{hint}"
    ids, why = atari_env_ids(opts.python)
    if ids is None:
        print(f"note: --env-ids not checked: {opts.python} could not list envpool's Atari ids ({why})", file=sys.stderr)
        return None
    bad = [p for p in (env_id_problem(e, ids) for e in dict.fromkeys(opts.env_ids)) if p]
    if bad:
        return (f"unknown Atari env id {', '.join(bad)} in --env-ids: envpool ids look like Breakout-v5 "
                "(teacher_utils.atari_env_ids() lists them)")
    return None


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
    if opts.slurm:
        if opts.slurm_time_min <= 0:
            parser.error("--slurm-time-min must be > 0")
        if opts.slurm_cluster != "local" and opts.slurm_time_min != int(opts.slurm_time_min):
            parser.error(f"--slurm-time-min must be whole minutes with --slurm-cluster {opts.slurm_cluster} "
                         "(fractions only with --slurm-cluster local)")
        delay = signal_delay_s(opts)
        if not 1 <= delay < opts.slurm_time_min * 60:
            parser.error(f"--slurm-signal-delay-s {delay} must be >= 1 and shorter than the time limit "
                         f"({opts.slurm_time_min * 60:g} s)")
        if opts.slurm_max_requeues < 0:
            parser.error("--slurm-max-requeues must be >= 0")
    submitit = None
    if opts.slurm and not (opts.dry_run or opts.emit_grid):  # (before the slower checks below)
        submitit = import_submitit()
        if submitit is None:
            return 2
    script = resolve_script(opts.script)
    if script is None:
        print(f"error: --script {opts.script} not found (here or in {REPO_ROOT})", file=sys.stderr)
        return 2
    exp_name = flag_value(extra, "exp_name") or Path(script).stem
    runs = build_grid(opts.env_ids, opts.seeds, opts.methods, exp_name, extra)
    names = [r.run_name for r in runs]
    if len(set(names)) != len(names):
        parser.error("the grid repeats a run (duplicate --env-ids, --seeds or --methods)")
    problem = check_grid(opts, script, extra)  # before anything starts or --emit-grid writes its file
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
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
        return submit_slurm(opts, runs, script, cwd, submitit)

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

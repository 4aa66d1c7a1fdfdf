"""A run from start to finish: its folder, flags, logs (TensorBoard, W&B), checkpoints, lock and signals.

README "Resuming" describes what a checkpoint holds and how a resumed run continues bit for bit; this module keeps
the folder and the files, the scripts say what goes in them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from reincarnate.checkpoints import (CHECKPOINT_SENTINEL, latest_checkpoint, lock_run_folder, read_checkpoint_array, tree_arrays, tree_from, unlock_run_folder,
                                    write_checkpoint)
from reincarnate.errors import ConfigError, RunError


FINISHED = "finished.json"  # the mark of a complete run: its last counters


class EventLog:
    """The run's TensorBoard events (W&B's sync_tensorboard reads the same file). tensorboard's own event writer, not
    tensorboardX's: its flush() returns only when every record logged before it is on disk, which a checkpoint needs
    (it stores the file's size, and a resume cuts the file there); tensorboardX's flush() leaves queued records behind,
    so a run killed after a checkpoint lost the last logged step."""

    def __init__(self, folder: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # (0.3 s: not for --help)
        from tensorboard.summary.writer import event_file_writer  # its class looked up now: wandb.init patches it

        self.Event, self.Summary = event_pb2.Event, summary_pb2.Summary
        self.file = event_file_writer.EventFileWriter(str(folder), flush_secs=30)

    def _add(self, step: int, value) -> None:
        self.file.add_event(self.Event(wall_time=time.time(), step=step, summary=self.Summary(value=[value])))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._add(step, self.Summary.Value(tag=tag, simple_value=float(value)))

    def text(self, tag: str, markdown: str) -> None:
        """Shown in TensorBoard's Text tab: the text plugin's summary, a scalar string tensor."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[markdown.encode()])
        self._add(0, self.Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Interrupted(Exception):
    """SIGINT/SIGTERM was handled: a checkpoint is written; the message says how to resume."""


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (MemAvailable; the cgroup limit if lower)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                avail = min(avail, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            pass
    return avail


def default_run_name(env_id: str, exp_name: str, method: str, seed: int) -> str:
    """``{env_id}__{exp_name}__{method}__{seed}__{start time}-{random}``: game, method and seed visible, and two
    runs started in the same second (a sweep, a launcher) still get different folders."""
    import secrets

    return f"{env_id}__{exp_name}__{method}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_output_folder(folder: Path, need_bytes: int, what: str) -> None:
    """The run folder exists, is writable, and its disk has room for ``need_bytes`` (a checkpoint): one error line
    before any work is spent, never a traceback hours later."""
    import shutil

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {folder} ({e.strerror or e}); run from a writable folder or fix its permissions") from None
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise RunError(f"{what} need {binary_size(need_bytes)} on disk but {folder} has {binary_size(free)} free; "
                       f"free some space, pass --checkpoint-frequency 0 (no checkpoints) or a smaller --buffer-size")


def _wandb_key_configured() -> bool:
    """Whether wandb.init will find an API key, looked up where wandb looks (the environment, then the netrc entry
    of the W&B host) without wandb itself: its Api() can prompt on a terminal or wait on the network."""
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    host = urllib.parse.urlsplit(base_url).netloc or base_url.strip("/")  # wandb's netrc machine is the URL's netloc
    path = Path(os.environ["NETRC"]).expanduser() if os.environ.get("NETRC") else Path.home() / ".netrc"
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # missing or malformed: wandb reads no key from it either
        return False
    return bool(creds and creds[2])


def check_wandb(track: bool) -> None:
    """With --track, a missing W&B login is one error line before any work (offline/disabled modes need none).
    Only the key's presence is checked, locally; a wrong key or an unreachable server is left to wandb.init."""
    if not track or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or _wandb_key_configured():
        return
    raise RunError("--track needs a Weights & Biases login: run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to log locally")


def _say_now(text: str) -> None:
    """Write to stderr from a signal handler: os.write, not print, since a signal that lands while the main thread
    writes to sys.stderr would make print re-enter that buffered stream ("RuntimeError: reentrant call")."""
    try:
        os.write(2, text.encode())
    except OSError:  # stderr closed or a broken pipe: the signal must still take effect
        pass


class Interrupt:
    """SIGINT/SIGTERM set ``requested``: the training loop finishes its step, checkpoints and exits. A second
    signal exits at once."""

    def __init__(self):
        import signal

        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        import signal

        if self.requested:
            _say_now(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n")
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        _say_now(f"\n{self.requested}: finishing this step and writing a checkpoint (send it again to exit at once)\n")

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def binary_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point: 512 B, 30.0 MiB, 6.6 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def memory_check(need: int, device, what: str) -> None:
    """One clear error before any phase if the buffers cannot fit where they would live."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        where, fix = f"{device.device_kind} free memory", "pass a smaller --buffer-size/--teacher-steps or --replay-on-host"
    else:
        free = available_host_memory()
        where, fix = "available host memory", "pass a smaller --buffer-size/--teacher-steps (each 1M transitions is 6.6 GiB)"
    if need > free:
        raise ConfigError(f"{what} need {binary_size(need)} but the {where} is {binary_size(free)}; {fix}")


def save_atomic(path: str | Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary file, fsynced, renamed over the target."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Run:
    """The run folder runs/{run_name}: a new one, or (--resume) an earlier run with the same algorithm flags, read
    from its latest complete checkpoint. The script reads `phase` and `progress` to know where to continue, `array()`
    for the checkpoint's arrays, and calls `open()` once every check that can fail before the first checkpoint has
    passed, then `log`, `due`, `save`, `exit_if_interrupted` and finally `close`."""

    def __init__(self, args, script: str, runtime_flags: set[str]):
        """The folder (a new one, or --resume's), then the checks that need no teacher (every flag, the env id, the W&B
        and Hub logins: a missing login is told now, not after the run). With --resume the flags the command line does
        not give are the run's own (args.json), so the printed resume command works as it is; `args` is the result."""
        from reincarnate.config import check_args, explicit_flags
        from reincarnate.envs import check_env_id
        from reincarnate.hub import check_hub_login, hub_repo_name

        self.script = os.path.basename(script)
        if args.resume:
            if not args.run_name:
                raise ConfigError("--resume needs the run to continue: --run-name NAME (its folder under runs/) or its path")
            self.dir = Path(args.run_name) if Path(args.run_name).is_dir() else Path("runs") / args.run_name
            if not (self.dir / "args.json").is_file():
                raise ConfigError(f"no run to resume at {self.dir} (no args.json); pass the name of a folder under runs/")
            found = latest_checkpoint(self.dir / "checkpoints")
            if found is None and (self.dir / FINISHED).is_file():  # finished with checkpoints off: nothing to resume
                found = (None, {"phase": "done"})
            if found is None:
                raise ConfigError(f"{self.dir} has no complete checkpoint; start the run again without --resume")
            saved = json.loads((self.dir / "args.json").read_text())
            given = explicit_flags(args)  # None: Args built in code, every value counts as given
            differ = [f"--{k.replace('_', '-')} (was {saved[k]!r}, now {getattr(args, k)!r})" for k in saved
                      if k not in runtime_flags and hasattr(args, k) and (given is None or k in given) and saved[k] != getattr(args, k)]
            if differ:
                raise ConfigError(f"cannot resume {self.dir} with different algorithm flags: {', '.join(differ)}; drop them to keep the run's own")
            if given is not None:
                keep = given | {"resume", "run_name"}
                args = dataclasses.replace(args, **{k: v for k, v in saved.items() if k in args.__dataclass_fields__ and k not in keep})
            self.resumed, self.meta = found
        else:
            name = args.run_name or default_run_name(args.env_id, args.exp_name, args.method, args.seed)
            if Path(name).name != name or name in (".", ".."):
                raise ConfigError(f"--run-name {name!r} is a path; pass a plain name (the run goes to runs/<name>), or --resume with a run's folder")
            self.dir = Path("runs") / name
            if self.holds_a_run(self.dir):
                raise ConfigError(f"{self.dir} already holds a run; pass --resume to continue it, or another --run-name")
            self.resumed, self.meta = None, {}  # (a start that failed before its first checkpoint is started again)
        check_args(args)
        check_env_id(args.env_id)
        check_wandb(args.track)
        self.hub_repo = f"{check_hub_login(args.hf_entity)}/{hub_repo_name(dataclasses.asdict(args))}" if args.upload_model else None
        self.args = args
        self.name = self.dir.name
        self.resume_name = self.name if self.dir == Path("runs") / self.name else str(self.dir)  # what --resume --run-name needs
        self.ckpt_dir = self.dir / "checkpoints"
        self.phase = self.meta.get("phase", "teacher_eval")
        self.progress = dict(self.meta.get("progress", {}))
        # Kept in every checkpoint's meta: what the script records once (the teacher's identity and score, ...).
        self.info = dict(self.meta.get("info", {}))
        self.seq = self.meta.get("seq", 0)
        self.checkpoints_on = args.checkpoint_frequency != 0
        self.teacher_data: Callable[[], dict] | None = None  # the teacher data's arrays, saved once
        self.teacher_data_saved = False
        self.writer, self.interrupt, self.wandb = None, None, None

    @staticmethod
    def holds_a_run(folder: Path) -> bool:
        """A run to keep: a complete checkpoint, a saved model or the mark of a finished run. A folder with none is a
        start that failed before its first checkpoint (a full disk, say): it can be started again."""
        return folder.is_dir() and (latest_checkpoint(folder / "checkpoints") is not None or (folder / FINISHED).is_file()
                                    or any(folder.glob("*.cleanrl_model")))

    def array(self, name: str) -> np.ndarray:
        """An array of the checkpoint this run resumed from."""
        return read_checkpoint_array(self.resumed, name)

    def pending_step(self, device):
        """The online phase's last vector step, saved unapplied (transition, updates, target sync, log step), or None:
        placed on the device as the live loop holds it, so the learning call does not compile again."""
        p = self.progress
        if p.get("pending_updates") is None:
            return None
        return tuple(jax.device_put([self.array(f"pending.{i}") for i in range(6)], device)), p["pending_updates"], p["pending_sync"], p["pending_log"]

    def open(self, checkpoint_bytes: int) -> None:
        """The disk (room for the checkpoints), the lock (one process per run folder), the logs (on resume the event
        records written after the checkpoint are cut off, so no step is logged twice; W&B continues the same run id),
        args.json, and the signal handlers."""
        args = self.args
        check_output_folder(self.dir, (checkpoint_bytes if self.checkpoints_on else 0) + (1 << 27), "the checkpoints and the logs")
        lock_run_folder(self.dir)
        for f in self.dir.glob("events.out.tfevents.*"):  # (a new run: a failed start's logs)
            if self.resumed and f.name in self.meta["events"]:
                os.truncate(f, self.meta["events"][f.name])
            else:
                f.unlink()
        if args.track:
            import wandb

            try:
                wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=dataclasses.asdict(args), name=self.name,
                           id=self.meta.get("wandb_id") or secrets.token_hex(4), resume="allow", save_code=True)
            except Exception as e:  # noqa: BLE001 - W&B raises many kinds; the user needs one line
                raise RunError(f"Weights & Biases could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"check `wandb login` and the network, or set WANDB_MODE=offline") from None
            self.wandb = wandb
        self.writer = EventLog(self.dir)
        if not self.resumed:
            self.writer.text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
            save_atomic(self.dir / "args.json", json.dumps(dataclasses.asdict(args), indent=2).encode())
        self.interrupt = Interrupt()
        self.last_checkpoint = time.time()
        print(f"run folder: {self.dir}" + (f" (resumed from {self.resumed.name}, phase {self.phase})" if self.resumed else ""))

    def log(self, tag: str, value: float, step: int) -> None:
        self.writer.scalar(tag, value, step)

    def log_video(self, path: Path) -> None:
        """The video in the W&B run's media too (as CleanRL's monitor_gym), with --track."""
        if self.wandb is not None:
            self.wandb.log({"videos/final_eval": self.wandb.Video(str(path), format="mp4")})

    @property
    def interrupted(self) -> bool:
        return bool(self.interrupt and self.interrupt.requested)

    def due(self, count: int, last: int, every: int) -> bool:
        """A checkpoint is due: `count` passed a multiple of `every` since `last`, or --checkpoint-minutes passed."""
        minutes = self.args.checkpoint_minutes > 0 and time.time() - self.last_checkpoint > 60 * self.args.checkpoint_minutes
        return self.checkpoints_on and (count // every > last // every or minutes)

    def save(self, phase: str, progress: dict, arrays: dict, params=None, force: bool = False) -> None:
        """Write a checkpoint of the run's complete state: the script's `arrays`, `progress` and `info` (unless
        checkpoints are off and it is neither forced nor interrupted: a signal always keeps the work)."""
        self.phase, self.progress = phase, progress
        if not (self.checkpoints_on or force or self.interrupted):
            return
        if self.teacher_data is not None and not self.teacher_data_saved:
            self.save_teacher_data()  # checkpoints off, then an interrupt: the resume needs it
        if params is not None:
            self.check_finite(params, f"at the checkpoint of phase {phase}")
        self.writer.flush()
        self.seq += 1
        meta = dict(seq=self.seq, phase=phase, progress=progress, info=self.info,
                    events={f.name: f.stat().st_size for f in self.dir.glob("events.out.tfevents.*")},
                    wandb_id=self.wandb.run.id if self.wandb else None)
        write_checkpoint(self.ckpt_dir, self.seq, arrays, meta, self.args.keep_checkpoints)
        self.last_checkpoint = time.time()

    def finish(self, progress: dict, arrays: dict, params) -> None:
        """The run is complete: its mark (so the folder is never started over) and, if it has checkpoints (or was
        interrupted with checkpoints off), a "done" one, which makes --resume of it a no-op (and the upload)."""
        self.save("done", progress, arrays, params=params, force=self.ckpt_dir.is_dir())
        save_atomic(self.dir / FINISHED, json.dumps(progress).encode())

    def checkpoint(self, phase: str, progress: dict, arrays: dict | None, state, keys) -> None:
        """The run's complete state (README "Resuming"): the student's train state, the PRNG keys and the phase's
        arrays; then leave if a signal asked to."""
        self.save(phase, progress, {**tree_arrays("state", state), "keys": np.stack(keys), **(arrays or {})}, params=state.params)
        self.exit_if_interrupted()

    def diverged(self, what: str) -> ConfigError:
        """The one error line of a run whose student diverged: what became non-finite where, what is kept, and the
        learning-rate flag in use to lower."""
        args = self.args
        if self.phase in ("online", "final") and args.online_learning_rate:
            flag, value = "--online-learning-rate", args.online_learning_rate
        else:
            flag, value = "--learning-rate", args.learning_rate
        complete = sorted(p.name for p in self.ckpt_dir.glob("ckpt-*") if (p / CHECKPOINT_SENTINEL).is_file())
        if complete:  # the folder holds a run whose flags cannot change on --resume: the new start needs a new name
            kept, again = f"its last checkpoint ({self.ckpt_dir / complete[-1]}) is from before", "under a new --run-name "
        else:
            kept, again = "no checkpoint was written before it", ""
        return ConfigError(f"the student diverged: {what}; {kept}; start the run again {again}with a lower {flag} (now {value:g})")

    def check_finite(self, params, what: str) -> None:
        """Nothing is evaluated, logged or saved from non-finite parameters: the run stops with `diverged`."""
        if not all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(params)):
            raise self.diverged(f"its parameters are not finite {what}")

    def exit_if_interrupted(self) -> None:
        """After a SIGINT/SIGTERM (and its checkpoint): leave, saying how to resume."""
        if self.interrupted:
            raise Interrupted(f"{self.interrupt.requested} in phase {self.phase}: checkpoint written; resume with "
                              f"`python {self.script} --resume --run-name {self.resume_name}`")

    def save_teacher_data(self) -> None:
        """The teacher data is immutable once built: written once, beside the checkpoints, read by every later resume."""
        write_checkpoint(self.ckpt_dir / "teacher_data", 0, self.teacher_data(), {}, 1)
        self.teacher_data_saved = True

    def teacher_data_checkpoint(self) -> Path:
        found = latest_checkpoint(self.ckpt_dir / "teacher_data")
        if found is None:
            raise ConfigError(f"{self.ckpt_dir / 'teacher_data'} is missing or corrupt; start the run again without --resume")
        self.teacher_data_saved = True
        return found[0]

    def save_params(self, params) -> None:
        """--save-model: the student's params so far (flax msgpack), as an interrupted run leaves them."""
        if self.args.save_model:
            import flax.serialization

            save_atomic(self.dir / f"{self.args.exp_name}.cleanrl_model", flax.serialization.to_bytes(params))

    def upload(self, upload_hf: Callable) -> None:
        """--upload-model: the finished run to the Hub (teacher_utils.upload_hf reloads it as a teacher first)."""
        if self.hub_repo:
            print(f"model uploaded to {upload_hf(self.dir, self.hub_repo)}")

    def command(self) -> str:
        return shlex.join(["python", self.script, *sys.argv[1:]])

    def close(self) -> None:
        if self.interrupt:
            self.interrupt.restore()
        if self.writer:
            self.writer.close()
        unlock_run_folder(self.dir)
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------
# What a run logs and saves, the same in both scripts
# ----------------------------------------------------------------------------
LOSSES = ("td_loss", "distill_loss", "cql_loss", "margin_loss", "loss", "q_values")


def log_offline_losses(run: Run, unchecked: list, log_frequency: int, last: int) -> None:
    """Fetch the losses of the offline calls done so far (kept on the device until now: a fetch waits for the updates)
    and log them at every log_frequency-th update number and the last; a failed sample or a non-finite loss stops
    the run naming the update."""
    for step0, n, m in jax.device_get(unchecked):
        if not m["sample_ok"][:n].all():
            raise ConfigError("the teacher data has too few valid transitions to sample a batch; collect more (--teacher-steps)")
        if not np.isfinite(m["loss"][:n]).all():
            raise run.diverged(f"the offline loss is not finite at update {step0 + int(np.argmin(np.isfinite(m['loss'][:n]))) + 1} (phase c)")
        for i in range(n):
            if (step0 + i + 1) % log_frequency == 0 or step0 + i + 1 == last:
                for name in LOSSES:
                    run.log(f"offline/{name}", float(m[name][i]), step0 + i + 1)
    unchecked.clear()


def log_online_losses(run: Run, unlogged: list) -> None:
    """Fetch and log the losses of the online steps learned so far (each at its agent step): called after the envs'
    step, so the fetch does not hold up the next actions."""
    if not unlogged:  # called after every env step; most steps have nothing to log
        return
    for log_step, m in jax.device_get(unlogged):
        if not m.pop("sample_ok"):
            raise ConfigError("the online replay has too few valid transitions to sample a batch; raise --learning-starts")
        if not np.isfinite(m["loss"]):
            raise run.diverged(f"the online loss is not finite at agent step {log_step} (phase d)")
        for name, value in m.items():
            run.log(f"losses/{name}", float(value), log_step)
    unlogged.clear()


def log_student_eval(run: Run, game: str, returns: list[float], steps: int, global_step: int, normalized: Callable) -> tuple[float | None, str]:
    """Log an online evaluation of the student (its mean return, human- and teacher-normalized scores) at global_step;
    returns (the mean return or None, its summary line)."""
    from reincarnate.envs import human_normalized_score
    from reincarnate.evaluation import summary

    student_return = float(np.mean(returns)) if returns else None
    line = summary(f"online step {global_step}: student", returns, steps)
    if student_return is not None:
        run.log("eval/episodic_return", student_return, global_step)
        run.log("charts/human_normalized_score", human_normalized_score(game, student_return), global_step)
        if (tns := normalized(student_return)) is not None:
            run.log("charts/teacher_normalized_score", tns, global_step)
            line += f", teacher-normalized {tns:.3f}"
    return student_return, line


class OfflineEvaluations:
    """The offline phase's student evaluations, as the reference's runner evaluates each offline iteration. They feed
    nothing back (lambda is 1 offline), so with --overlap-offline-eval each plays in its own thread on a copy of the
    params while the updates go on, and is logged at its own update step when it lands: the same envs, seeds and key as
    played in between, so the same result. One at a time; the last one (after the last update) is played in between.

    A checkpoint waits for the pending one. After a signal it stops early and stays pending: the checkpoint keeps its
    params and update step (`progress()`, `arrays()`), and the resume plays it again. Use as a context manager: an error
    in the loop stops and joins the thread."""

    def __init__(self, run: Run, evaluate_student: Callable, normalized: Callable, rate, unchecked: list, template, device,
                 checkpoint: Callable[[], None]):
        self.run, self.evaluate_student, self.normalized, self.rate = run, evaluate_student, normalized, rate
        self.unchecked = unchecked  # the phase's offline calls whose losses are not logged yet (log_offline_losses)
        self.checkpoint = checkpoint  # the phase's checkpoint (a pending evaluation's progress() and arrays() in it); leaves after a signal
        self.overlap = run.args.overlap_offline_eval
        self.pool, self.cancel = ThreadPoolExecutor(1, thread_name_prefix="offline-eval"), threading.Event()
        self.pending = None  # (update step, params copy, future)
        if run.resumed and run.progress.get("pending_eval") is not None:  # stopped by a signal: played again
            self._submit(run.progress["pending_eval"], tree_from(run.resumed, "eval_params", template, device))

    @property
    def note(self) -> str:
        return "evaluations overlapped with them" if self.overlap else "evaluations excluded"

    def start(self, params, step: int, last: bool) -> None:
        """Evaluate `params` at offline update `step`, the losses so far logged first; in between (its time not the
        phase's `rate`) without --overlap-offline-eval or when it is the `last`. Call it before the loop counts the
        evaluation as done: after a signal the checkpoint is the one from before it, so the resume plays it again."""
        self.log(wait=True)
        if self.run.interrupted:
            self.checkpoint()
        self.run.check_finite(params, "before the offline eval")  # here, not in the thread: the error names this step
        if self.overlap and not last:
            return self._submit(step, jax.tree.map(jax.numpy.copy, params))  # the offline calls donate the state
        t0 = time.time()
        returns, steps = self.evaluate_student(params, desc="offline eval", seed_offset=20_000 + step)
        self.rate.pause(time.time() - t0)
        if self.run.interrupted:
            self.checkpoint()
        self._log(step, returns, steps)

    def _submit(self, step: int, params) -> None:
        future = self.pool.submit(self.evaluate_student, params, desc="offline eval", seed_offset=20_000 + step, stop=self.cancel.is_set)
        self.pending = (step, params, future)

    def log(self, wait: bool = False) -> None:
        """Log the offline losses so far and the pending evaluation if it has landed; with `wait` (before a checkpoint or
        the next evaluation) once it lands."""
        log_offline_losses(self.run, self.unchecked, self.run.args.log_frequency, self.run.args.offline_steps)
        if wait or (self.pending is not None and self.pending[2].done()):
            self.wait()

    def wait(self) -> None:
        """Wait for the pending evaluation and log it; one a signal stopped stays pending (for the checkpoint)."""
        if self.pending is None:
            return
        step, _, future = self.pending
        returns, steps = future.result()
        if not self.run.interrupted:
            self.pending = None
            self._log(step, returns, steps)

    def progress(self) -> dict:
        return {} if self.pending is None else dict(pending_eval=self.pending[0])

    def arrays(self) -> dict:
        return {} if self.pending is None else tree_arrays("eval_params", self.pending[1])

    def _log(self, step: int, returns: list, steps: int) -> None:
        from tqdm import tqdm

        from reincarnate.evaluation import summary

        if returns:
            self.run.log("offline/eval_return", float(np.mean(returns)), step)
            if (tns := self.normalized(float(np.mean(returns)))) is not None:
                self.run.log("offline/teacher_normalized_score", tns, step)
        tqdm.write(f"(c) {summary(f'offline update {step}: student', returns, steps)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.pending is not None:  # the last overlapped one lands in the phase
                self.wait()
                if self.pending is not None:  # a signal stopped it
                    self.checkpoint()
        finally:
            if exc[0] is not None:
                self.cancel.set()  # an error in the loop: the evaluation stops at its next step
            self.pool.shutdown(wait=True)


def log_charts(run: Run, step: int, **values) -> None:
    """charts/{name} at `step` for each value given (None: not logged)."""
    for name, value in values.items():
        if value is not None:
            run.log(f"charts/{name}", value, step)


def log_episodes(run: Run, finished: list, first_step: int) -> None:
    """charts/episodic_return and charts/episodic_length of the episodes a vector step ended, each at its env's agent
    step (the vector step holds agent steps first_step + 1 ... first_step + num_envs: env i's is the i-th)."""
    for i, ret, length in finished:
        run.log("charts/episodic_return", ret, first_step + i + 1)
        run.log("charts/episodic_length", length, first_step + i + 1)


def save_video(run: Run, frames: list) -> None:
    """The final evaluation's first episode as runs/{run}/videos/final-eval.mp4 (and in the W&B run's media with
    --track); a codec or W&B problem is a warning: it must not cost the trained model."""
    from reincarnate.evaluation import write_video

    path = run.dir / "videos" / "final-eval.mp4"
    try:
        write_video(frames, str(path))
        run.log_video(path)
    except Exception as e:  # noqa: BLE001
        print(f"warning: the final evaluation's video could not be written or logged ({type(e).__name__}: {e}); the run goes on", file=sys.stderr)


def save_model(run: Run, params, probe_obs: np.ndarray, probe_q: np.ndarray, returns: list[float], global_step: int,
               normalized: Callable, game: str) -> None:
    """--save-model: the student's params (flax msgpack, runs/{run}/{exp_name}.cleanrl_model), the Q-values of the saved
    params on a few states (q_probe.npz, to check a reload against) and the final evaluation (final_eval.json)."""
    import io

    import flax.serialization

    from reincarnate.envs import human_normalized_score

    model_path = run.dir / f"{run.args.exp_name}.cleanrl_model"
    save_atomic(model_path, flax.serialization.to_bytes(params))
    probe = io.BytesIO()
    np.savez(probe, obs=probe_obs, q=probe_q)
    save_atomic(run.dir / "q_probe.npz", probe.getvalue())
    if returns:
        mean, teacher_return = float(np.mean(returns)), run.info.get("teacher_return")
        final = dict(returns=[float(r) for r in returns], mean=mean, std=float(np.std(returns)), agent_steps=global_step,
                     teacher_return=None if teacher_return is None else float(teacher_return), teacher_normalized_score=normalized(mean),
                     human_normalized_score=human_normalized_score(game, mean), command=run.command())
        save_atomic(run.dir / "final_eval.json", json.dumps(final, indent=2).encode())
    print(f"model saved to {model_path}")


def final_evaluation(run: Run, evaluate_student: Callable, params, global_step: int, game: str, normalized: Callable,
                     on_interrupt: Callable[[], None]) -> list[float]:
    """(e) The student's final evaluation (an interrupted one runs again after a resume): logged at global_step, with
    a video of its first episode (--capture-video). Returns its episodes' returns."""
    from tqdm import tqdm

    frames = [] if run.args.capture_video else None
    returns, steps = evaluate_student(params, desc="student eval", seed_offset=30_000 + global_step // run.args.eval_frequency, frames=frames)
    if run.interrupted:
        on_interrupt()
    tqdm.write(f"(e) final {log_student_eval(run, game, returns, steps, global_step, normalized)[1]}")
    if frames:
        save_video(run, frames)
    return returns


def devices_and_keys(args) -> tuple:
    """(the accelerator, where the replay lives: the CPU with --replay-on-host, and the run's PRNG keys: acting, the
    student's initialisation, offline, online). The keys are committed to the accelerator from the start: a jitted
    call fed a fresh key, then the device key it returned, compiles twice (inside the timed part of a phase)."""
    compute_device = jax.devices()[0]
    replay_device = jax.devices("cpu")[0] if args.replay_on_host else compute_device
    return (compute_device, replay_device, *jax.device_put(list(jax.random.split(jax.random.PRNGKey(args.seed), 4)), compute_device))


def run_script(main: Callable, parse_args: Callable) -> None:
    """A script's entry point: a problem the user can fix (a TeacherError or ConfigError) is one `error:` line and exit
    1; an interrupted run, its checkpoint written, one `interrupted:` line (how to resume) and exit 130."""
    from reincarnate.errors import TeacherError

    try:
        main(parse_args())
    except (TeacherError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)

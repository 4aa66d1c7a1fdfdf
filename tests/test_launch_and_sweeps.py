"""The W&B sweep files, the local launcher and the SLURM array script.

Sweeps: every sweep YAML is turned into the agent's command line by wandb's own
agent code (no server, no network), and the arguments must parse into the script's
Args with the swept values and types. Launcher: a tiny real grid (2 games x 2 seeds)
of qdagger_dqn_atari_jax.py, the dry run, a failing run, the GPU-sharing environment
(with a fake script) and --emit-grid. SLURM: the sbatch body run with bash and a fake
`python` that records its arguments.
"""

import dataclasses
import itertools
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

import qdagger_dqn_atari_jax as dqn
import qdagger_rainbow_atari_jax as rainbow
import teacher_utils as tu
from reincarnate import config
from reincarnate_utils import launch

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "reincarnate_utils" / "sweeps"
SBATCH = ROOT / "reincarnate_utils" / "slurm" / "reincarnate.sbatch"
LAUNCH = ROOT / "reincarnate_utils" / "launch.py"
DQN_SCRIPT = ROOT / "qdagger_dqn_atari_jax.py"
MODULES = {"qdagger_dqn_atari_jax.py": dqn, "qdagger_rainbow_atari_jax.py": rainbow}
LOGGED_TAGS = {"eval/episodic_return", "charts/teacher_normalized_score"}
SWEEP_FILES = ["paper_grid_dqn.yaml", "paper_grid_rainbow.yaml", "hparam_search_dqn.yaml", "hparam_search_rainbow.yaml"]

TINY = ["--num-envs", "2", "--eval-steps", "200", "--max-episode-steps", "100", "--teacher-steps", "128",
        "--offline-steps", "16", "--updates-per-call", "1", "--offline-eval-frequency", "0", "--total-timesteps", "256",
        "--learning-starts", "64", "--buffer-size", "512", "--batch-size", "8", "--eval-frequency", "256",
        "--log-frequency", "8", "--eval-num-envs", "2"]


# ----------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------
def load_sweep(name: str) -> dict:
    return yaml.safe_load((SWEEPS / name).read_text())


def method_choices(module) -> tuple[str, ...]:
    return typing.get_args(typing.get_type_hints(module.Args)["method"])


def grid_points(params: dict) -> list[dict]:
    """A few grid points that together use every value of every parameter at least once."""
    names = list(params)
    choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
    width = max(len(c) for c in choices)
    points = [{n: c[(i + k) % len(c)] for k, (n, c) in enumerate(zip(names, choices))} for i in range(width)]
    points.append({n: c[-1] for n, c in zip(names, choices)})
    return points


def sample_value(spec: dict, rng: random.Random):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    dist, lo, hi = spec["distribution"], spec["min"], spec["max"]
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    raise AssertionError(f"the test does not know the distribution {dist!r}: teach sample_value it")


def random_points(params: dict, n: int, seed: int = 0) -> list[dict]:
    """n draws from the parameter spec; boolean `values` alternate so both True and False are tried."""
    rng = random.Random(seed)
    points = []
    for i in range(n):
        point = {name: sample_value(spec, rng) for name, spec in params.items()}
        for name, spec in params.items():
            if set(map(type, spec.get("values", [None]))) == {bool}:
                point[name] = spec["values"][i % len(spec["values"])]
        points.append(point)
    return points


def agent_argv(sweep: dict, config: dict, tmp_path: Path, monkeypatch) -> list[str]:
    """The command wandb's sweep agent would start for a run with `config` (its own code, no server)."""
    from wandb import wandb_agent

    started = []

    class RecordingProcess:  # stands in for the agent's subprocess wrapper
        def __init__(self, command=None, env=None, **kwargs):
            started.append(list(command))

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordingProcess)
    for var, value in [("WANDB_DIR", str(tmp_path)), ("WANDB_SWEEP_ID", "testsweep"), ("WANDB_RUN_ID", "x"),
                       ("WANDB_SWEEP_PARAM_PATH", "x")]:
        monkeypatch.setenv(var, value)  # restored afterwards (the agent sets some of them itself)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="testsweep")
    agent._sweep_command = list(sweep["command"])  # what Agent.run reads from the sweep's config
    agent._command_run({"run_id": "run1", "program": sweep["program"],
                        "args": {name: {"value": value} for name, value in config.items()}})
    (command,) = started
    assert command[:3] == ["/usr/bin/env", "python", sweep["program"]], command
    return command[3:]


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_file_is_well_formed(name):
    sweep = load_sweep(name)
    module = MODULES[sweep["program"]]
    assert (ROOT / sweep["program"]).is_file()
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"]["goal"] == "maximize" and sweep["metric"]["name"] in LOGGED_TAGS
    # The metric is a tag the script really logs (mirrored by W&B's sync_tensorboard), by its own code or the run's
    # logging helpers in reincarnate/run.py.
    sources = (ROOT / sweep["program"]).read_text() + (ROOT / "reincarnate" / "run.py").read_text()
    assert f'"{sweep["metric"]["name"]}"' in sources
    fields = {f.name for f in dataclasses.fields(module.Args)}
    params = sweep["parameters"]
    assert set(params) <= fields, set(params) - fields
    assert params["track"] == {"value": True}
    for pname, spec in params.items():
        if sweep["method"] == "grid":
            assert set(spec) <= {"value", "values"}, (pname, spec)
        if "distribution" in spec:
            assert all(isinstance(spec[k], (int, float)) for k in ("min", "max")), (pname, spec)  # 3e-5 would be text
            assert spec["min"] < spec["max"]
    if name.startswith("paper_grid"):
        assert params["seed"]["values"] == [1, 2, 3] and len(params["env_id"]["values"]) == 10
        for env_id in params["env_id"]["values"]:
            tu.check_env_id(env_id)
        expected = set(method_choices(module)) - ({"finetune"} if module is rainbow else set())
        assert set(params["method"]["values"]) == expected
    else:
        assert sweep["metric"]["name"] == "charts/teacher_normalized_score"
        assert any(spec.get("values") == [True, False] for spec in params.values())


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_commands_parse_into_args(name, tmp_path, monkeypatch):
    sweep = load_sweep(name)
    module = MODULES[sweep["program"]]
    params = sweep["parameters"]
    points = grid_points(params) if sweep["method"] == "grid" else random_points(params, 4)
    seen_bools = {}
    for i, point in enumerate(points):
        argv = agent_argv(sweep, point, tmp_path / str(i), monkeypatch)
        assert all(tok.startswith("--") and "=" in tok for tok in argv), argv  # the agent's --name=value form
        args = config.parse_args(module.Args, argv)
        for pname, value in point.items():
            got = getattr(args, pname)
            if isinstance(value, bool):
                assert got is value, (pname, value, got, argv)
                seen_bools.setdefault(pname, set()).add(got)
            else:
                assert got == value and type(got) is type(value), (pname, value, got, argv)
    for pname, spec in params.items():
        if spec.get("values") == [True, False]:
            assert seen_bools[pname] == {True, False}, pname
    if sweep["method"] == "grid":  # every grid value went through at least once
        for pname, spec in params.items():
            assert {p[pname] for p in points} == set(spec.get("values", [spec.get("value")]))


def test_sweep_parameter_names_take_underscores_and_hyphens():
    a = config.parse_args(dqn.Args, ["--env_id=Pong-v5", "--distill_decay_period=10", "--clip_lambda=False", "--track=True"])
    b = config.parse_args(dqn.Args, ["--env-id=Pong-v5", "--distill-decay-period=10", "--no-clip-lambda", "--track"])
    assert a == b and a.env_id == "Pong-v5" and a.track is True and a.clip_lambda is False


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------
def run_launcher(cwd, *argv, module=False, timeout=600):
    entry = ["-m", "reincarnate_utils.launch"] if module else [str(LAUNCH)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *entry, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def expected_name(env_id, seed, method="qdagger", exp="qdagger_dqn_atari_jax"):
    return f"{env_id}__{exp}__{method}__s{seed}"


def test_launcher_tiny_grid(tmp_path, fixture_copy):
    teacher = fixture_copy("teacher_tf")
    r = run_launcher(tmp_path, "--script", DQN_SCRIPT, "--env-ids", "Breakout-v5", "Atlantis-v5", "--seeds", "2",
                     "--methods", "qdagger", "--workers", "2", "--", "--teacher-checkpoint", teacher, *TINY)
    # two runs at once (the whole envs x seeds x methods grid is checked by the dry run below); seed 2 is not the default
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    starts = [line for line in out.splitlines() if "] start " in line]
    assert len(starts) == 2, out
    assert all(str(DQN_SCRIPT) in line and "--teacher-checkpoint" in line for line in starts)
    assert out.count("exit code 0 after") == 2 and "2/2 runs succeeded" in out

    grid = {(e, 2) for e in ("Breakout-v5", "Atlantis-v5")}
    folders = [d for d in (tmp_path / "runs").iterdir() if d.name != "launch-logs"]
    assert len(folders) == 2, folders
    found = set()
    for d in folders:
        args = json.loads((d / "args.json").read_text())
        env_id, seed = args["env_id"], args["seed"]
        name = expected_name(env_id, seed)
        assert args["method"] == "qdagger" and args["run_name"] == name  # the launcher's deterministic name
        assert d.name == name, d.name  # the launcher names every run: game, script, method and seed visible
        assert any(p.name.startswith("events.out.tfevents") for p in d.iterdir()), list(d.iterdir())
        log = tmp_path / "runs" / "launch-logs" / f"{name}.log"
        assert log.is_file() and "launch:" in log.read_text()
        found.add((env_id, seed))
    assert found == grid


def test_launcher_dry_run_starts_nothing(tmp_path):
    for module in (False, True):  # `python reincarnate_utils/launch.py` and `python -m reincarnate_utils.launch`
        r = run_launcher(tmp_path, "--script", "qdagger_dqn_atari_jax.py", "--env-ids", "Breakout-v5", "Atlantis-v5",
                         "--seeds", "1", "2", "--methods", "qdagger", "tabula-rasa", "--dry-run", "--",
                         "--total-timesteps", "1000", module=module)
        assert r.returncode == 0, r.stderr
        commands = [line for line in r.stdout.splitlines() if str(DQN_SCRIPT) in line]
        assert len(commands) == 8, r.stdout
        for env_id, seed, method in itertools.product(("Breakout-v5", "Atlantis-v5"), (1, 2), ("qdagger", "tabula-rasa")):
            want = (f"--env-id {env_id} --seed {seed} --method {method} "
                    f"--run-name {expected_name(env_id, seed, method)} --total-timesteps 1000")
            assert sum(line.endswith(want) for line in commands) == 1, want
        assert not (tmp_path / "runs").exists()


def test_launcher_reports_a_failing_run(tmp_path):
    r = run_launcher(tmp_path, "--script", DQN_SCRIPT, "--env-ids", "Pong-v5", "--seeds", "1", "--",
                     "--teacher-checkpoint", tmp_path / "no-such-teacher", *TINY)
    name = expected_name("Pong-v5", 1)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "run(s) failed" in r.stderr and name in r.stderr
    assert "no-such-teacher does not exist" in (tmp_path / "runs" / "launch-logs" / f"{name}.log").read_text()


def test_launcher_refuses_an_unknown_method_before_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for script, module in MODULES.items():
        choices = method_choices(module)
        argv = ["--script", script, "--env-ids", "Pong-v5", "--methods", "qdagger", "qdager"]
        for mode in (["--emit-grid", "grid.txt"], ["--dry-run"], [], ["--slurm", "--slurm-cluster", "local"]):
            if "--slurm" in mode:  # (in a process of its own: submitit binds its log handlers to the streams it finds)
                r = run_launcher(tmp_path, *argv, *mode)
                code, out, err = r.returncode, r.stdout, r.stderr
            else:
                code = launch.main([*argv, *mode])
                out, err = capsys.readouterr()
            assert code == 2 and out == "", (mode, out, err)
            assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
            assert "'qdager'" in err and "did you mean qdagger?" in err and ", ".join(choices) in err, err
            assert not (tmp_path / "grid.txt").exists() and not (tmp_path / "runs").exists()


def test_launcher_reads_the_scripts_methods_and_flags_without_importing_them():
    for script, module in MODULES.items():
        info = launch.read_script_args(str(ROOT / script))
        assert info.methods == list(method_choices(module))
        assert info.fields == {f.name for f in dataclasses.fields(module.Args)}
    assert launch.read_script_args(__file__) == launch.ScriptArgs()  # no Args: nothing to check against


def test_launcher_refuses_an_unknown_env_id_before_starting_anything(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_SCRIPT)
    monkeypatch.chdir(tmp_path)
    for argv in (["--script", script, "--workers", "2"], ["--script", DQN_SCRIPT, "--emit-grid", "grid.txt"]):
        code = launch.main([*map(str, argv), "--env-ids", "Pong-v5", "Breakuot-v5", "--seeds", "1", "2"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (argv, out, err)
        assert err.startswith("error: unknown Atari env id 'Breakuot-v5' (did you mean Breakout-v5") and err.count("\n") == 1, err
        assert "Pong-v5" not in err
        assert not (tmp_path / "calls.jsonl").exists() and not (tmp_path / "grid.txt").exists()
        assert not (tmp_path / "runs").exists()


def test_launcher_refuses_unknown_flags_and_a_missing_script_or_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--script", DQN_SCRIPT, "--", "--total-timestep", "5"], "unknown flag --total-timestep after --",
         "did you mean --total-timesteps?"),
        (["--script", DQN_SCRIPT, "--", "--no-clip-lambda", "--total_timesteps=5", "--colour", "x"], "unknown flag --colour",
         "qdagger_dqn_atari_jax.py's Args has no such field"),
        (["--script", tmp_path / "nope.py"], "error: --script", "nope.py not found"),
        (["--script", DQN_SCRIPT, "--python", tmp_path / "no-python"], "error: --python", "no such interpreter"),
    ]
    for argv, *wanted in cases:
        assert launch.main([*map(str, argv), "--emit-grid", "grid.txt"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (argv, out, err)
        assert all(w in err for w in wanted), (argv, err)
        assert not (tmp_path / "grid.txt").exists()


FAKE_SCRIPT = """
import json, os, sys, time
args = sys.argv[1:]
seed = int(args[args.index("--seed") + 1])
start = time.time()
time.sleep(0.4)
keys = ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")
with open("calls.jsonl", "a") as f:
    f.write(json.dumps({"argv": args, "env": {k: os.environ.get(k) for k in keys}, "start": start, "end": time.time()}) + "\\n")
sys.exit(3 if seed == 2 and "Atlantis-v5" in args else 0)
"""


def test_launcher_shares_gpus_and_names_failures(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_SCRIPT)
    r = run_launcher(tmp_path, "--script", script, "--env-ids", "Breakout-v5", "Atlantis-v5", "--seeds", "1", "2", "3",
                     "--gpus", "0", "1", "--processes-per-gpu", "2")
    failed = expected_name("Atlantis-v5", 2, exp="fake_train")
    assert r.returncode == 1 and f"{failed} (exit code 3)" in r.stderr, r.stdout + r.stderr
    assert "5/6 runs succeeded" in r.stdout
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 6
    for c in calls:
        assert c["env"]["CUDA_VISIBLE_DEVICES"] in {"0", "1"}
        assert c["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert c["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"
    # Never more than 2 runs on one GPU at once.
    for c in calls:
        same_gpu = [d for d in calls if d["env"]["CUDA_VISIBLE_DEVICES"] == c["env"]["CUDA_VISIBLE_DEVICES"]]
        assert sum(d["start"] <= c["start"] < d["end"] for d in same_gpu) <= 2


def test_launcher_resume_adds_the_flag_to_runs_with_a_checkpoint(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_SCRIPT)
    (tmp_path / "runs" / expected_name("Pong-v5", 1, exp="fake_train") / "checkpoints").mkdir(parents=True)
    r = run_launcher(tmp_path, "--script", script, "--env-ids", "Pong-v5", "--seeds", "1", "2", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    calls = {c["argv"][3]: c["argv"] for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())}
    assert calls["1"][-1] == "--resume" and "--resume" not in calls["2"]
    assert all(c["env"]["CUDA_VISIBLE_DEVICES"] is None for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines()))


SIGNAL_SCRIPT = """
import os, signal, sys, time
args = sys.argv[1:]
seed = args[args.index("--seed") + 1]

def handle(signum, frame):
    with open(f"signals-{seed}.txt", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if os.environ["FAKE_ON_SIGTERM"] == "checkpoint":  # as the scripts: finish the step, checkpoint, exit
        time.sleep(0.5)
        open(f"checkpoint-{seed}", "w").close()
        sys.exit(130)

signal.signal(signal.SIGINT, handle)
signal.signal(signal.SIGTERM, handle)
with open(f"started-{seed}", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def start_interruptible_grid(tmp_path, on_sigterm, *argv):
    """The launcher on 3 runs of SIGNAL_SCRIPT, 2 at once, in its own process group as a terminal's foreground job,
    once both first runs have started."""
    script = tmp_path / "fake_train.py"
    script.write_text(SIGNAL_SCRIPT)
    env = {**os.environ, "FAKE_ON_SIGTERM": on_sigterm, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(LAUNCH), "--script", str(script), "--env-ids", "Pong-v5", "--seeds", "1", "2", "3",
                             "--workers", "2", *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"started-{s}").is_file() and (tmp_path / f"started-{s}").read_text() for s in (1, 2)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def ctrl_c(proc):
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: SIGINT to the foreground process group


def test_ctrl_c_sends_each_run_one_sigterm_and_waits_for_its_checkpoint(tmp_path):
    proc = start_interruptible_grid(tmp_path, "checkpoint")
    ctrl_c(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err  # interrupted, none failed
    for seed in (1, 2):  # not SIGINT as well: a second signal makes the scripts exit without a checkpoint
        assert (tmp_path / f"signals-{seed}.txt").read_text() == "SIGTERM\n"
        assert (tmp_path / f"checkpoint-{seed}").is_file()
        assert f"] interrupted {expected_name('Pong-v5', seed, exp='fake_train')}: exit code 130" in out
    assert not (tmp_path / "started-3").exists() and "not started" in out
    assert "0/3 runs succeeded, 2 interrupted (resumable), 1 not started" in out
    assert "3 run(s) interrupted or not started (not failures): relaunch with --resume" in err
    assert "failed" not in err and "FAILED" not in out
    assert "interrupted: sent SIGTERM to 2 running run(s)" in out and "Traceback" not in err


def test_a_ctrl_c_while_the_workers_start_still_stops_the_started_runs(tmp_path, monkeypatch, capsys):
    """The Ctrl-C lands in the main thread's Thread.start() of the second worker, after that worker's run began (a
    starved main thread on a loaded machine): the launcher must still send its SIGTERM and wait for the checkpoints."""
    script = tmp_path / "fake_train.py"
    script.write_text(SIGNAL_SCRIPT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_ON_SIGTERM", "checkpoint")
    runs = [launch.Run("Pong-v5", s, "qdagger", f"run-{s}", ["--seed", str(s)]) for s in (1, 2, 3)]
    real_start, starts = launch.threading.Thread.start, []

    def start_then_ctrl_c(thread):
        real_start(thread)
        starts.append(thread)
        if len(starts) == 2:
            deadline = time.monotonic() + 60
            while not all((tmp_path / f"started-{s}").is_file() and (tmp_path / f"started-{s}").read_text() for s in (1, 2)):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            raise KeyboardInterrupt

    monkeypatch.setattr(launch.threading.Thread, "start", start_then_ctrl_c)
    launcher = launch.LocalLauncher(sys.executable, str(script), tmp_path / "logs", tmp_path, [{}, {}], stop_timeout=30)
    try:
        results = launcher.run_all(runs)
    except KeyboardInterrupt:  # the bug: the runs go on, orphaned (killed here), and pytest must not take it as a Ctrl-C
        with launcher.procs_lock:
            launcher.stopping.set()  # (no worker starts the third run)
            for proc in list(launcher.procs.values()):
                proc.kill()
        pytest.fail("the Ctrl-C escaped run_all: no SIGTERM was sent to the started runs")
    out = capsys.readouterr().out
    assert "interrupted: sent SIGTERM to 2 running run(s)" in out, out
    assert [r.returncode for r in results] == [130, 130, None] and all(r.interrupted for r in results[:2])
    for seed in (1, 2):
        assert (tmp_path / f"signals-{seed}.txt").read_text() == "SIGTERM\n" and (tmp_path / f"checkpoint-{seed}").is_file()
    assert not (tmp_path / "started-3").exists()


def test_a_second_ctrl_c_or_the_stop_timeout_kills_the_runs(tmp_path):
    (tmp_path / "again").mkdir()
    proc = start_interruptible_grid(tmp_path / "again", "ignore")
    pids = [int((tmp_path / "again" / f"started-{s}").read_text()) for s in (1, 2)]
    ctrl_c(proc)
    deadline = time.monotonic() + 30
    while not all((tmp_path / "again" / f"signals-{s}.txt").is_file() for s in (1, 2)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    ctrl_c(proc)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 15 and "interrupted again: killing the runs" in out, out + err
    for seed, pid in zip((1, 2), pids):
        assert (tmp_path / "again" / f"signals-{seed}.txt").read_text() == "SIGTERM\n"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    (tmp_path / "timeout").mkdir()
    proc = start_interruptible_grid(tmp_path / "timeout", "ignore", "--stop-timeout", "1")
    ctrl_c(proc)
    out, err = proc.communicate(timeout=30)
    assert out.count("did not exit within --stop-timeout 1 s: killing it") == 2, out + err
    assert proc.returncode == 1 and "Traceback" not in err


def test_launcher_submitit_debug_cluster(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_SCRIPT)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / expected_name("Atlantis-v5", 1, exp="fake_train") / "checkpoints").mkdir(parents=True)
    code = launch.main(["--script", str(script), "--env-ids", "Atlantis-v5", "--seeds", "1", "2", "--slurm",
                        "--slurm-cluster", "debug"])
    assert code == 1  # Atlantis-v5 seed 2 exits 3
    calls = {c["argv"][3]: c for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())}
    assert calls["1"]["argv"][-1] == "--resume" and "--resume" not in calls["2"]["argv"]
    assert calls["1"]["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


# A stand-in for the scripts under submitit: on SIGTERM/SIGINT it writes a checkpoint, says so on stderr and exits 130;
# with --resume it reads the checkpoint and finishes. Every event goes to events.jsonl (a SIGKILL leaves no "signal").
STOPPABLE_SCRIPT = """
import json, os, signal, sys, time
args = sys.argv[1:]
run = args[args.index("--run-name") + 1]
ckpt = os.path.join("runs", run, "checkpoints")

def event(**kw):
    with open("events.jsonl", "a") as f:
        f.write(json.dumps(kw) + "\\n")

resume = "--resume" in args
event(kind="start", resume=resume, pid=os.getpid(), task_pid=os.getppid(), usr2_ignored=signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN,
      cuda=os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
if resume:
    with open(os.path.join(ckpt, "step")) as f:
        event(kind="resumed", step=f.read())
    sys.exit(0)

def handle(signum, frame):
    event(kind="signal", name=signal.Signals(signum).name)
    time.sleep(0.3)  # finishing the step
    os.makedirs(ckpt, exist_ok=True)
    with open(os.path.join(ckpt, "step"), "w") as f:
        f.write("42")
    print("interrupted: checkpoint written; resume with --resume", file=sys.stderr, flush=True)
    sys.exit(130)

signal.signal(signal.SIGTERM, handle)
signal.signal(signal.SIGINT, handle)
while True:
    time.sleep(0.05)
"""

# submitit's local executor: a 9 s time limit (its timeouts are whole seconds), its signal 4 s before: the stand-in
# has 5 s to start, and once requeued it finishes at once.
LOCAL_TIME_LIMIT = ["--slurm", "--slurm-cluster", "local", "--slurm-time-min", "0.15", "--slurm-signal-delay-s", "4"]


def read_events(tmp_path) -> list[dict]:
    events = tmp_path / "events.jsonl"
    return [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []


def run_stoppable_on_local_submitit(tmp_path, *argv, time_limit=LOCAL_TIME_LIMIT, while_running=None):
    """The launcher on one run of STOPPABLE_SCRIPT with submitit's local executor; while_running(events) once the
    run has started."""
    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    proc = subprocess.Popen([sys.executable, str(LAUNCH), "--script", str(script), "--env-ids", "Pong-v5", "--seeds", "1",
                             *time_limit, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if while_running:
            deadline = time.monotonic() + 120
            while not read_events(tmp_path):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            while_running(read_events(tmp_path))
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    task_logs = "".join(p.read_text() for p in sorted((tmp_path / "runs" / "launch-logs" / "submitit").glob("*_log.err")))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), read_events(tmp_path), task_logs


def test_submitit_time_limit_stops_the_run_with_a_checkpoint_and_requeues_it(tmp_path):
    pytest.importorskip("submitit")  # (a dev dependency)
    r, events, task_logs = run_stoppable_on_local_submitit(tmp_path)
    name = expected_name("Pong-v5", 1, exp="stoppable")
    out = r.stdout
    assert r.returncode == 0, out + r.stderr + task_logs
    # One SIGTERM (not submitit's SIGUSR2, which the run ignores, nor a SIGKILL), a checkpoint, then the requeued
    # task resumed the run with --resume and it finished.
    assert [e["kind"] for e in events] == ["start", "signal", "start", "resumed"], events
    assert events[1]["name"] == "SIGTERM" and not events[0]["resume"] and events[2]["resume"]
    assert events[3]["step"] == "42" and (tmp_path / "runs" / name / "checkpoints" / "step").is_file()
    assert all(e["usr2_ignored"] for e in events if e["kind"] == "start")
    assert {e["cuda"] for e in events if e["kind"] == "start"} == {"3"}  # the launcher's GPUs, not the controller's ""
    assert f"[1/1] ok {name}: exit code 0 after" in out and "requeued 1 time(s)" in out
    assert "1/1 runs succeeded" in out and "failed" not in r.stderr.lower() and "Traceback" not in r.stderr
    assert f"SIGUSR2 from submitit (time limit or preemption): sent SIGTERM to {name}" in task_logs
    assert "interrupted: checkpoint written" in task_logs and "asking submitit to requeue its task" in task_logs
    assert "UncompletedJobError" not in task_logs


def test_submitit_task_that_cannot_be_requeued_says_how_to_resume(tmp_path):
    pytest.importorskip("submitit")
    r, events, task_logs = run_stoppable_on_local_submitit(tmp_path, "--slurm-max-requeues", "0")
    name = expected_name("Pong-v5", 1, exp="stoppable")
    out = r.stdout
    assert r.returncode == 130, out + r.stderr + task_logs  # interrupted, not failed
    assert [(e["kind"], e.get("name")) for e in events] == [("start", None), ("signal", "SIGTERM")], events
    assert (tmp_path / "runs" / name / "checkpoints" / "step").is_file()
    assert f"[1/1] interrupted {name}: exit code 130 after" in out and "stopped with a checkpoint and not requeued" in out
    assert "0/1 runs succeeded, 1 interrupted (resumable), total" in out and "requeued 1" not in out
    assert "1 run(s) interrupted or not started (not failures): rerun the same launch command" in r.stderr
    assert "failed" not in r.stderr and "Traceback" not in r.stderr
    assert (f"interrupted: {name} stopped at the time limit or a preemption with a checkpoint, but was not requeued "
            "(UncompletedJobError: Job not requeued because: timed-out too many times.)") in task_logs
    assert f"--run-name {name} --resume" in task_logs
    # What it says: the same command resumes the run (its task adds --resume).
    r, events, _ = run_stoppable_on_local_submitit(tmp_path, "--slurm-max-requeues", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [e["kind"] for e in events[2:]] == ["start", "resumed"] and events[2]["resume"]


def test_submitit_task_reports_a_sigterm_to_its_job_step_as_interrupted(tmp_path):
    pytest.importorskip("submitit")

    def sigterm_the_job_step(events):  # as SLURM at a preemption or scancel: every process of the step, once
        time.sleep(0.3)  # (the stand-in's handlers are set just after its first event)
        os.kill(events[0]["task_pid"], signal.SIGTERM)
        os.kill(events[0]["pid"], signal.SIGTERM)

    r, events, task_logs = run_stoppable_on_local_submitit(tmp_path, time_limit=["--slurm", "--slurm-cluster", "local"],
                                                           while_running=sigterm_the_job_step)
    name = expected_name("Pong-v5", 1, exp="stoppable")
    assert r.returncode == 130, r.stdout + r.stderr + task_logs
    assert [(e["kind"], e.get("name")) for e in events] == [("start", None), ("signal", "SIGTERM")], events  # no 2nd
    assert f"[1/1] interrupted {name}: exit code 130" in r.stdout and "failed" not in r.stderr
    assert f"interrupted: {name} and its task got a SIGTERM" in task_logs and "Traceback" not in task_logs


def test_launcher_refuses_grid_flags_after_dashes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--script", str(DQN_SCRIPT), "--", "--seed=3"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_slurm_without_submitit_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError, installed or not
    assert launch.main(["--script", str(DQN_SCRIPT), "--slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --slurm needs the submitit package: pip install submitit"), err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------
# SLURM array script
# ----------------------------------------------------------------------------
def emit_grid(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    assert launch.main(["--script", str(DQN_SCRIPT), "--env-ids", "Breakout-v5", "Pong-v5", "--seeds", "1", "2",
                        "--methods", "qdagger", "jsrl", "--emit-grid", "grid.txt", "--",
                        "--wandb-project-name", "my project", "--clip-lambda"]) == 0
    assert not (tmp_path / "runs").exists()
    return (tmp_path / "grid.txt").read_text().splitlines()


def test_emit_grid_writes_one_parsable_line_per_run(tmp_path, monkeypatch):
    lines = emit_grid(tmp_path, monkeypatch)
    assert len(lines) == 8
    points = list(itertools.product(("Breakout-v5", "Pong-v5"), (1, 2), ("qdagger", "jsrl")))
    for line, (env_id, seed, method) in zip(lines, points):
        tokens = shlex.split(line)
        assert tokens == ["--env-id", env_id, "--seed", str(seed), "--method", method, "--run-name",
                          expected_name(env_id, seed, method), "--wandb-project-name", "my project", "--clip-lambda"]
        args = config.parse_args(dqn.Args, tokens)
        assert (args.env_id, args.seed, args.method, args.run_name) == (env_id, seed, method, expected_name(env_id, seed, method))
        assert args.wandb_project_name == "my project" and args.clip_lambda is True


def run_sbatch(tmp_path, task, *args):
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    fake = shim / "python"
    fake.write_text('#!/bin/bash\nprintf "%s\\0" "$XLA_PYTHON_CLIENT_PREALLOCATE" "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$@" > argv.bin\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task)}
    for var in ("REINCARNATE_PYTHON", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        env.pop(var, None)
    (tmp_path / "argv.bin").unlink(missing_ok=True)
    r = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    recorded = (tmp_path / "argv.bin").read_bytes().decode().split("\0")[:-1] if (tmp_path / "argv.bin").exists() else None
    return r, recorded


def test_sbatch_runs_its_array_line_and_resumes(tmp_path, monkeypatch):
    lines = emit_grid(tmp_path, monkeypatch)
    for task in (1, 2, 8):
        r, recorded = run_sbatch(tmp_path, task, "grid.txt", DQN_SCRIPT)
        assert r.returncode == 0, r.stderr
        assert recorded == ["false", "0.9", str(DQN_SCRIPT), *shlex.split(lines[task - 1])]
    # A run with a checkpoint folder is resumed.
    name = expected_name("Breakout-v5", 1, "jsrl")
    (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
    r, recorded = run_sbatch(tmp_path, 2, "grid.txt", DQN_SCRIPT)
    assert r.returncode == 0 and recorded[2:] == [str(DQN_SCRIPT), *shlex.split(lines[1]), "--resume"]
    assert f"resuming {name}" in r.stdout
    assert config.parse_args(dqn.Args, recorded[3:]).resume is True
    # Other tasks are not.
    r, recorded = run_sbatch(tmp_path, 1, "grid.txt", DQN_SCRIPT)
    assert "--resume" not in recorded


@pytest.mark.parametrize("task", ["9", "0", ""])
def test_sbatch_refuses_a_task_without_a_line(tmp_path, monkeypatch, task):
    emit_grid(tmp_path, monkeypatch)
    r, recorded = run_sbatch(tmp_path, task, "grid.txt", DQN_SCRIPT)
    assert r.returncode == 2 and recorded is None and "error:" in r.stderr

"""reincarnate_utils/report.py on synthetic run folders with known scores (CPU, offline)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rliable  # noqa: F401,E402 - the dev extra installs it: a missing rliable is a failure, not a skip
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402

import teacher_utils as tu  # noqa: E402
from reincarnate import run as rr  # noqa: E402
from reincarnate_utils import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = [250_000, 500_000, 750_000, 1_000_000]
REPS = 200
SEED = 3
# Teacher return G_T per game (G_T - G_R = 300, 40, 1000 with the table's G_R).
TEACHER = {"Breakout": 301.7, "Pong": 19.3, "SpaceInvaders": 1148.0}
# Teacher-normalized final scores, seeds 0..3.
FINAL = {
    "qdagger": {"Breakout": [0.9, 1.0, 1.1, 1.2], "Pong": [0.8, 0.85, 0.95, 1.05], "SpaceInvaders": [0.5, 0.6, 0.7, 1.0]},
    "tabula-rasa": {"Breakout": [0.1, 0.2, 0.15, 0.05], "Pong": [0.0, 0.1, 0.2, 0.3], "SpaceInvaders": [0.25, 0.3, 0.35, 0.4]},
}
# By hand. qdagger, all 12 sorted: .5 .6 .7 | .8 .85 .9 .95 1 1 | 1.05 1.1 1.2 -> IQM = 5.5/6;
# per-game means 1.05, .9125, .7 -> median .9125; mean 10.65/12; optimality gap (.1+.4+1.2)/12.
# tabula-rasa sorted: 0 .05 .1 | .1 .15 .2 .2 .25 .3 | .3 .35 .4 -> IQM 1.2/6; game means .125 .15 .325.
HAND = {
    "qdagger": {"iqm": 5.5 / 6, "median": 0.9125, "mean": 10.65 / 12, "optimality_gap": 1.7 / 12},
    "tabula-rasa": {"iqm": 0.2, "median": 0.15, "mean": 0.2, "optimality_gap": 0.8},
}


def raw_return(game: str, normalized: float, teacher: float | None = None) -> float:
    g_r = tu.ATARI_SCORES[game][0]
    return g_r + normalized * ((teacher if teacher is not None else TEACHER[game]) - g_r)


def make_run(root: Path, name: str, config: dict | None, evals: list[tuple[int, float]], teacher: float | None = None,
             hparams: dict | None = None) -> Path:
    """A run folder as the training scripts write it: their event writer's events (+ args.json)."""
    from reincarnate.run import EventLog

    run_dir = root / name
    writer = EventLog(run_dir)
    if hparams is not None:
        writer.text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))
    if teacher is not None:
        writer.scalar("teacher/mean_return", teacher, 0)
    for step, value in evals:
        writer.scalar("eval/episodic_return", value, step)
        writer.scalar("charts/SPS", 1000, step)
    writer.close()
    if config is not None:
        (run_dir / "args.json").write_text(json.dumps(config, indent=2))
    return run_dir


def write_experiment(root: Path) -> Path:
    """2 methods x 3 games x 4 seeds, evaluations at STEPS rising linearly to FINAL, + one run with no evaluation."""
    for method, games in FINAL.items():
        for game, finals in games.items():
            for seed, final in enumerate(finals):
                env_id = f"{game}-v5"
                evals = [(s, raw_return(game, final * (k + 1) / len(STEPS))) for k, s in enumerate(STEPS)]
                make_run(root / method, f"{env_id}__qdagger_dqn_atari_jax__{seed}__1700000000",
                         {"env_id": env_id, "seed": seed, "method": method, "exp_name": "qdagger_dqn_atari_jax"},
                         evals, teacher=TEACHER[game] if method == "qdagger" else None)
    make_run(root / "qdagger", "Pong-v5__crashed__9__1", {"env_id": "Pong-v5", "seed": 9, "method": "qdagger"}, [],
             teacher=TEACHER["Pong"])
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = report.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = write_experiment(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report")
    args = report.parse_args([str(root), "--out", str(out), "--reps", str(REPS), "--seed", str(SEED)])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rep = report.run_report(args)
    return {"root": root, "out": out, "report": rep, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def score_matrix(rows: list[dict[str, str]], method: str) -> np.ndarray:
    """(seeds, games) normalized final scores of a method from scores.csv, games sorted."""
    games = sorted(FINAL[method])
    return np.array([[float(next(r["normalized_score"] for r in rows if r["method"] == method and r["game"] == g
                                 and int(r["seed"]) == s)) for g in games] for s in range(4)])


def test_scores_csv_holds_hand_normalized_scores(experiment):
    rows = read_csv(experiment["out"] / "scores.csv")
    assert len(rows) == 24  # the run with no evaluation is skipped
    assert "no evaluation" in experiment["stderr"] and "crashed" in experiment["stderr"]
    for row in rows:
        game, seed = row["game"], int(row["seed"])
        g_r = tu.ATARI_SCORES[game][0]
        g_s = float(np.float32(raw_return(game, FINAL[row["method"]][game][seed])))  # TensorBoard keeps float32
        g_t = float(np.float32(TEACHER[game]))
        assert float(row["final_raw_score"]) == g_s
        assert int(row["final_step"]) == STEPS[-1]
        assert float(row["teacher_score"]) == g_t
        assert row["teacher_source"] == ("run" if row["method"] == "qdagger" else "pooled")
        assert float(row["random_score"]) == g_r
        assert float(row["normalized_score"]) == pytest.approx((g_s - g_r) / (g_t - g_r), rel=1e-12)
        assert float(row["normalized_score"]) == pytest.approx(FINAL[row["method"]][game][seed], abs=1e-5)
        assert row["in_aggregate"] == "1"
        assert Path(row["run"]).is_dir() and (Path(row["run"]) / "args.json").is_file()
    # tabula rasa logs no teacher: it borrows the pooled G_T of its game, with a warning
    borrowed = [l for l in experiment["stderr"].splitlines() if "logged no teacher/mean_return" in l]
    assert len(borrowed) == 1 and borrowed[0].startswith("warning: tabula-rasa: 12 run(s) logged no teacher/mean_return (3 games")


def test_point_estimates_match_hand_and_rliable(experiment):
    rep = experiment["report"]
    rows = read_csv(experiment["out"] / "scores.csv")
    agg = {r["method"]: r for r in read_csv(experiment["out"] / "aggregate.csv")}
    for method, hand in HAND.items():
        x = score_matrix(rows, method)
        # hand IQM: 12 pooled scores, drop the 3 lowest and 3 highest, mean of the middle 6
        pooled = np.sort(x.ravel())
        assert pooled[3:9].mean() == pytest.approx(hand["iqm"], abs=1e-5)
        expected = {
            "iqm": metrics.aggregate_iqm(x),
            "median": metrics.aggregate_median(x),
            "mean": metrics.aggregate_mean(x),
            "optimality_gap": metrics.aggregate_optimality_gap(x),
        }
        for k, key in enumerate(report.METRIC_KEYS):
            assert expected[key] == pytest.approx(hand[key], abs=1e-5)
            assert rep.point[method][k] == pytest.approx(expected[key], rel=1e-12)
            assert float(agg[method][key]) == pytest.approx(expected[key], rel=1e-12)
        assert agg[method]["runs"] == "12" and agg[method]["games"] == "3" and agg[method]["runs_per_game"] == "4"


def test_confidence_intervals_match_rliable(experiment):
    rep = experiment["report"]
    rows = read_csv(experiment["out"] / "scores.csv")
    agg = {r["method"]: r for r in read_csv(experiment["out"] / "aggregate.csv")}
    scores = {m: score_matrix(rows, m) for m in sorted(FINAL)}  # the tool bootstraps methods in sorted order

    def func(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_median(x), metrics.aggregate_mean(x),
                         metrics.aggregate_optimality_gap(x)])

    np.random.seed(SEED)
    point, interval = rly.get_interval_estimates(scores, func, reps=REPS)
    for method in scores:
        np.testing.assert_allclose(rep.interval[method], interval[method], rtol=1e-12)
        for k, key in enumerate(report.METRIC_KEYS):
            low, high = float(agg[method][f"{key}_ci_low"]), float(agg[method][f"{key}_ci_high"])
            assert low == pytest.approx(interval[method][0, k], rel=1e-12)
            assert high == pytest.approx(interval[method][1, k], rel=1e-12)
            assert low <= float(agg[method][key]) <= high
            assert low < high or key == "optimality_gap" and method == "tabula-rasa"  # all tabula-rasa scores < 1
    # the bootstrap is seeded: a second analysis gives the same intervals and leaves numpy's global state alone
    state = np.random.get_state()[1].copy()
    again = report.analyze(rep.runs, "teacher", reps=REPS, seed=SEED)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    for method in scores:
        np.testing.assert_array_equal(again.interval[method], rep.interval[method])


def test_fast_estimators_equal_rliable():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(5, 6)).astype(float)  # many ties
    y = rng.integers(0, 4, size=(3, 6)).astype(float)
    y[:, 0] = x[:3, 0] + 10
    for a, b in ((x, y), (y, x), (x, x), (x[:, :1], y[:, :1])):
        assert report.probability_of_improvement(a, b) == pytest.approx(metrics.probability_of_improvement(a, b), abs=1e-15)
    curve = rng.normal(size=(4, 3, 7))
    np.testing.assert_allclose(report.iqm_per_step(curve), [metrics.aggregate_iqm(curve[..., t]) for t in range(7)], rtol=1e-13)
    tau = np.linspace(-2, 2, 41)
    np.testing.assert_array_equal(report.score_distribution(curve[..., 0], tau), rly.score_distributions(curve[..., 0], tau))


def test_probability_of_improvement(experiment):
    rep = experiment["report"]
    assert len(rep.poi) == 1
    x, y, games, p, low, high = rep.poi[0]
    assert (x, y) == ("qdagger", "tabula-rasa") and games == sorted(TEACHER)
    assert p > 0.95 and low <= p <= high
    rows = read_csv(experiment["out"] / "probability_of_improvement.csv")
    assert rows[0]["x"] == "qdagger" and float(rows[0]["probability"]) == pytest.approx(p)
    # the same interval as rliable's own estimator under the same seed
    scores = read_csv(experiment["out"] / "scores.csv")
    np.random.seed(SEED)
    point, interval = rly.get_interval_estimates(
        {"pair": [score_matrix(scores, "qdagger"), score_matrix(scores, "tabula-rasa")]}, metrics.probability_of_improvement, reps=REPS)
    assert p == pytest.approx(point["pair"]) and [low, high] == pytest.approx(np.ravel(interval["pair"]).tolist())


def test_poi_and_profile_intervals_match_rliable_on_overlapping_methods(experiment):
    """Overlapping scores (non-trivial intervals): the tool's fast estimators give rliable's intervals."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.6, 0.3, size=(4, 3)).round(1), rng.normal(0.5, 0.3, size=(5, 3)).round(1)
    np.random.seed(7)
    _, mine = rly.get_interval_estimates({"p": [a, b]}, report.probability_of_improvement, reps=300)
    np.random.seed(7)
    _, theirs = rly.get_interval_estimates({"p": [a, b]}, metrics.probability_of_improvement, reps=300)
    np.testing.assert_allclose(mine["p"], theirs["p"], atol=1e-12)
    assert np.ravel(mine["p"])[0] < np.ravel(mine["p"])[1]
    rep = experiment["report"]
    finals = {m: rep.methods[m].final for m in rep.methods}
    np.random.seed(SEED)
    profiles, cis = rly.create_performance_profile(finals, rep.tau, reps=REPS)  # rliable's own profile function
    for m in finals:
        np.testing.assert_array_equal(rep.profiles[m], profiles[m])
        np.testing.assert_array_equal(rep.profile_cis[m], cis[m])


def test_sample_efficiency_curve_uses_eval_steps(experiment):
    rep = experiment["report"]
    rows = read_csv(experiment["out"] / "curves.csv")
    for method, hand in HAND.items():
        mine = [r for r in rows if r["method"] == method]
        assert [int(r["step"]) for r in mine] == STEPS
        assert rep.methods[method].steps == STEPS
        # evaluation k is (k+1)/4 of the final score, so the IQM scales the same way
        for k, r in enumerate(mine):
            assert float(r["iqm"]) == pytest.approx(hand["iqm"] * (k + 1) / 4, abs=1e-5)
            assert float(r["ci_low"]) <= float(r["iqm"]) <= float(r["ci_high"])
        assert rep.curve_point[method][-1] == pytest.approx(rep.point[method][0], rel=1e-9)


def test_figures_are_valid_pngs(experiment):
    import matplotlib.image as mpimg

    for name in report.FIGURES.values():
        path = experiment["out"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)
        assert image[..., :3].std() > 0.01, name  # not a blank canvas


def test_markdown_table_printed_and_written(experiment):
    text = (experiment["out"] / "aggregate.md").read_text()
    assert experiment["stdout"] == text
    assert "| method | #runs | #games | IQM [95% CI] |" in text
    assert "| qdagger | 12 | 3 | 0.917 [" in text and "| tabula-rasa | 12 | 3 | 0.200 [" in text
    assert "teacher_utils.ATARI_SCORES" in text
    assert "| qdagger | tabula-rasa | 3 |" in text


def test_cli_script_and_module(tmp_path):
    root = tmp_path / "runs"
    for game in ("Breakout", "Pong"):
        for seed in range(2):
            make_run(root, f"{game}-v5__qdagger_dqn_atari_jax__{seed}__1",
                     {"env_id": f"{game}-v5", "seed": seed, "exp_name": "qdagger_dqn_atari_jax"},
                     [(250_000, raw_return(game, 0.5 + 0.1 * seed)), (500_000, raw_return(game, 0.8 + 0.1 * seed))],
                     teacher=TEACHER[game])
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"}
    script = subprocess.run([sys.executable, "reincarnate_utils/report.py", str(root), "--out", str(tmp_path / "a"),
                             "--reps", "50"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert script.returncode == 0, script.stderr
    assert "| method | #runs | #games |" in script.stdout and "| qdagger | 4 | 2 |" in script.stdout  # no method: qdagger
    assert "Traceback" not in script.stderr
    module = subprocess.run([sys.executable, "-m", "reincarnate_utils.report", str(root), "--out", str(tmp_path / "b"),
                             "--reps", "50"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert module.returncode == 0, module.stderr
    assert module.stdout == script.stdout  # same seed, same table
    help_ = subprocess.run([sys.executable, "reincarnate_utils/report.py", "--help"], cwd=ROOT, capture_output=True,
                           text=True, env=env, timeout=60)
    assert help_.returncode == 0
    for word in ("--normalize", "--teacher-scores", "--wandb-export", "--group-by", "ATARI_SCORES", "scores.csv",
                 "global_step", "stratified"):
        assert word in help_.stdout, word


def test_cli_empty_folder_is_one_error_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for target in (tmp_path / "empty", tmp_path / "missing"):
        proc = subprocess.run([sys.executable, "reincarnate_utils/report.py", str(target), "--out", str(tmp_path / "o")],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 1
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert not (tmp_path / "o").exists()


def test_runs_without_evaluation_only_is_an_error(tmp_path, capsys):
    make_run(tmp_path, "Pong-v5__x__0__1", {"env_id": "Pong-v5", "seed": 0}, [], teacher=10.0)
    code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and out == ""
    assert [l.split(":")[0] for l in err.strip().splitlines()] == ["warning", "error"]


def test_unequal_runs_per_game_truncate_to_lowest_seeds(tmp_path, capsys):
    for game, seeds in (("Breakout", [0, 1, 2]), ("Pong", [0, 1])):
        for seed in seeds:
            make_run(tmp_path, f"{game}-v5__qdagger_dqn_atari_jax__{seed}__1",
                     {"env_id": f"{game}-v5", "seed": seed, "method": "qdagger"},
                     [(100, raw_return(game, 0.3 + seed / 10))], teacher=TEACHER[game])
    code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o"), "--reps", "20"], capsys)
    assert code == 0, err
    assert "different numbers of runs (Breakout 3, others 2)" in err
    rows = read_csv(tmp_path / "o" / "scores.csv")
    left_out = [(r["game"], r["seed"]) for r in rows if r["in_aggregate"] == "0"]
    assert left_out == [("Breakout", "2")]
    assert "| qdagger | 4 | 2 |" in out


def test_teacher_score_sources(tmp_path, capsys):
    make_run(tmp_path, "a", {"env_id": "Breakout-v5", "seed": 0, "method": "qdagger"}, [(1, 101.7)], teacher=201.7)
    make_run(tmp_path, "b", {"env_id": "Breakout-v5", "seed": 1, "method": "qdagger"}, [(1, 101.7)], teacher=401.7)
    make_run(tmp_path, "c", {"env_id": "Breakout-v5", "seed": 0, "method": "tabula-rasa"}, [(1, 51.7)])

    def scores(*extra):
        code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o"), "--reps", "10", *extra], capsys)
        assert code == 0, err
        return {Path(r["run"]).name: (float(r["normalized_score"]), r["teacher_source"]) for r in read_csv(tmp_path / "o" / "scores.csv")}

    # each run's own G_T; the run without one borrows the mean (301.7)
    assert scores() == {"a": (pytest.approx(0.5), "run"), "b": (pytest.approx(0.25), "run"), "c": (pytest.approx(1 / 6), "pooled")}
    assert scores("--pool-teacher") == {k: (pytest.approx(v), "pooled") for k, v in {"a": 1 / 3, "b": 1 / 3, "c": 1 / 6}.items()}
    # --teacher-scores overrides every run of the game (keys: game or env id)
    assert scores("--teacher-scores", '{"Breakout-v5": 101.7}') == {
        "a": (pytest.approx(1.0), "json"), "b": (pytest.approx(1.0), "json"), "c": (pytest.approx(0.5), "json")}


def test_teacher_scores_json_file_and_bad_teacher(tmp_path, capsys):
    make_run(tmp_path / "runs", "a", {"env_id": "Breakout-v5", "seed": 0, "method": "tabula-rasa"}, [(1, 101.7)])
    code, out, err = run_cli([str(tmp_path / "runs"), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "--teacher-scores" in err and err.strip().splitlines()[-1].startswith("error:")
    (tmp_path / "t.json").write_text(json.dumps({"Breakout": 201.7}))
    code, out, err = run_cli([str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--reps", "10",
                              "--teacher-scores", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    row = read_csv(tmp_path / "o" / "scores.csv")[0]
    assert float(row["normalized_score"]) == pytest.approx(0.5) and row["teacher_source"] == "json"
    code, out, err = run_cli([str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--teacher-scores", '{"Breakout": 1.0}'], capsys)
    assert code == 1 and "not above the random score" in err


def test_human_and_raw_normalization(experiment, tmp_path, capsys):
    code, out, err = run_cli([str(experiment["root"] / "qdagger"), "--out", str(tmp_path / "h"), "--reps", "10",
                              "--normalize", "human"], capsys)
    assert code == 0, err
    assert "human-normalized" in out and "teacher_utils.ATARI_SCORES" in out and "DQN Nature" in out
    for row in read_csv(tmp_path / "h" / "scores.csv"):
        g_r, g_h = tu.ATARI_SCORES[row["game"]]
        assert float(row["human_score"]) == g_h
        assert float(row["normalized_score"]) == pytest.approx((float(row["final_raw_score"]) - g_r) / (g_h - g_r), rel=1e-12)
    code, out, err = run_cli([str(experiment["root"] / "qdagger"), "--out", str(tmp_path / "r"), "--reps", "10",
                              "--normalize", "raw"], capsys)
    assert code == 0, err
    for row in read_csv(tmp_path / "r" / "scores.csv"):
        assert row["normalized_score"] == row["final_raw_score"]


def test_wandb_export_csv(tmp_path, capsys):
    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Name", "config.env_id", "seed", "method", "global_step", "eval/episodic_return", "teacher/mean_return"])
        for method, level in (("qdagger", 0.8), ("kickstarting", 0.4)):
            for seed in range(2):
                name = f"Pong-v5__{method}__{seed}"
                w.writerow([name, "Pong-v5", seed, method, 0, "", TEACHER["Pong"]])
                for step in (500, 1000):  # written out of order: sorted by step
                    w.writerow([name, "Pong-v5", seed, method, 1500 - step, raw_return("Pong", level * (1500 - step) / 1000 + seed / 100), ""])
        w.writerow(["no-evals", "Pong-v5", 0, "qdagger", 0, "", TEACHER["Pong"]])
    code, out, err = run_cli(["--wandb-export", str(path), "--out", str(tmp_path / "o"), "--reps", "20"], capsys)
    assert code == 0, err
    assert "skipping" in err and "no-evals" in err
    rows = read_csv(tmp_path / "o" / "scores.csv")
    assert len(rows) == 4
    for row in rows:
        level = 0.8 if row["method"] == "qdagger" else 0.4
        assert row["final_step"] == "1000"
        assert float(row["normalized_score"]) == pytest.approx(level + int(row["seed"]) / 100, abs=1e-9)
    assert [int(r["step"]) for r in read_csv(tmp_path / "o" / "curves.csv") if r["method"] == "qdagger"] == [500, 1000]
    assert "| kickstarting | 2 | 1 |" in out and "| qdagger | kickstarting | 1 |" in out


def test_run_folder_without_args_json_and_group_by(tmp_path, capsys):
    # no args.json: the hyperparameters text and the folder name <env_id>__<exp_name>__<seed>__<time>
    make_run(tmp_path, "Breakout-v5__qdagger_rainbow_atari_jax__7__1700000000", None, [(1, raw_return("Breakout", 0.5))],
             teacher=TEACHER["Breakout"], hparams={"env_id": "Breakout-v5", "seed": 7, "exp_name": "qdagger_rainbow_atari_jax"})
    make_run(tmp_path, "Breakout-v5__qdagger_dqn_atari_jax__7__1700000000", None, [(1, raw_return("Breakout", 0.25))],
             teacher=TEACHER["Breakout"])
    code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o"), "--reps", "10"], capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in read_csv(tmp_path / "o" / "scores.csv")}
    assert set(rows) == {"qdagger_rainbow_atari_jax:qdagger", "qdagger_dqn_atari_jax:qdagger"}  # several scripts
    assert rows["qdagger_rainbow_atari_jax:qdagger"]["seed"] == "7"
    code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o"), "--reps", "10", "--group-by", "method"], capsys)
    assert code == 0, err
    assert "| qdagger | 2 | 1 |" in out
    (tmp_path / "Breakout-v5__qdagger_dqn_atari_jax__7__1700000000" / "args.json").write_text(
        json.dumps({"env_id": "Breakout-v5", "seed": 7, "distill_coef": 0.0}))
    code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o"), "--reps", "10", "--group-by", "distill_coef"], capsys)
    assert code == 0, err
    assert "| 0.0 | 1 | 1 |" in out and "| ? | 1 | 1 |" in out  # a key a run lacks reads "?"


def test_run_folder_names_of_the_scripts_and_the_launcher(tmp_path, capsys):
    from reincarnate_utils import launch

    names = {
        "default": rr.default_run_name("Breakout-v5", "qdagger_dqn_atari_jax", "tabula-rasa", 3),
        "launcher": launch.run_name_for("Pong-v5", "qdagger_dqn_atari_jax", "jsrl", 12),
        "cleanrl": "Breakout-v5__qdagger_dqn_atari_jax__7__1700000000",
    }
    assert report.parse_run_name(names["default"]) == {"env_id": "Breakout-v5", "exp_name": "qdagger_dqn_atari_jax",
                                                       "method": "tabula-rasa", "seed": 3}
    assert report.parse_run_name(names["launcher"]) == {"env_id": "Pong-v5", "exp_name": "qdagger_dqn_atari_jax",
                                                        "method": "jsrl", "seed": 12}
    assert report.parse_run_name(names["cleanrl"]) == {"env_id": "Breakout-v5", "exp_name": "qdagger_dqn_atari_jax", "seed": 7}
    assert report.parse_run_name("my-run") == {}
    # No args.json and no hyperparameters text: the folder name alone gives game, method and seed.
    for key in ("default", "launcher"):
        game = "Breakout" if key == "default" else "Pong"
        make_run(tmp_path, names[key], None, [(1, raw_return(game, 0.5))])
    code, out, err = run_cli([str(tmp_path), "--out", str(tmp_path / "o"), "--reps", "10", "--normalize", "raw"], capsys)
    assert code == 0, err
    rows = {(r["method"], r["game"], r["seed"]) for r in read_csv(tmp_path / "o" / "scores.csv")}
    assert rows == {("tabula-rasa", "Breakout", "3"), ("jsrl", "Pong", "12")}


# ----------------------------------------------------------------------------
# Issues 23 and 26: figures' layout and colours, teachers no better than random, runs of other budgets or teachers
# ----------------------------------------------------------------------------
def memory_runs(finals: dict[str, list[float]], games=("Breakout", "Pong")) -> list[report.Run]:
    """Runs in memory: method -> teacher-normalized final score per seed (the same in every game), two evaluations."""
    return [report.Run(f"{method}/{game}/{seed}", {"env_id": f"{game}-v5", "seed": seed, "method": method},
                       [500, 1000], [raw_return(game, final / 2), raw_return(game, final)], TEACHER[game])
            for method, levels in finals.items() for game in games for seed, final in enumerate(levels)]


def written_figures(rep, out: Path, monkeypatch) -> dict:
    """write_figures(rep, out)'s figures, by file name, as they were saved (drawn again on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures, savefig = {}, Figure.savefig

    def record(fig, fname, *args, **kwargs):
        figures[Path(fname).name] = fig
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    try:
        written = report.write_figures(rep, out)
    finally:
        monkeypatch.setattr(Figure, "savefig", savefig)
    assert sorted(p.name for p in written) == sorted(figures)
    for fig in figures.values():
        FigureCanvasAgg(fig).draw()
    return figures


def drawn_tick_labels(axis) -> list:
    """The tick labels (and offset text) an axis draws: visible, with text, of ticks within the view limits."""
    if not (axis.get_visible() and axis.axes.get_visible()):
        return []
    locs = axis.get_majorticklocs()
    low, high = sorted(axis.get_view_interval())
    out = [t for loc, tick in zip(locs, axis.get_major_ticks(len(locs))) if low - 1e-12 <= loc <= high + 1e-12
           for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text()]
    offset = axis.get_offset_text()
    return out + ([offset] if out and offset.get_visible() and offset.get_text() else [])


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for t in drawn_tick_labels(axis)]
    return [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]


@pytest.mark.parametrize("methods", [1, 2])
def test_aggregate_figure_xlabel_below_tick_labels(methods, tmp_path, monkeypatch):
    """Issue 23: with one or two methods rliable's label (at a fixed height) was drawn over the tick labels."""
    runs = memory_runs({name: [0.4, 0.5, 0.6] for name in ["qdagger", "tabula-rasa"][:methods]})
    rep = report.analyze(report.score_runs(runs), reps=20)
    fig = written_figures(rep, tmp_path, monkeypatch)[report.FIGURES["aggregate"]]
    renderer = fig.canvas.get_renderer()
    [xlabel] = [t for t in fig.texts if t.get_text() == "Teacher Normalized Score"]
    label_box = xlabel.get_window_extent(renderer)
    ticks = [t for ax in fig.axes for t in drawn_tick_labels(ax.xaxis)]
    assert len(ticks) >= 2 * len(report.METRIC_NAMES)  # every panel has numbers under it
    for tick in ticks:
        box = tick.get_window_extent(renderer)
        assert not label_box.overlaps(box), (tick.get_text(), box, label_box)
        assert label_box.y1 < box.y0  # below them, not beside them
    assert overlapping_tick_labels(fig) == []
    # the label is centred under the panels and in the written figure (bbox_inches="tight" keeps it)
    assert fig.axes[0].get_position().x0 < xlabel.get_position()[0] < fig.axes[-1].get_position().x1


def test_tick_labels_never_overlap_on_small_ranges(tmp_path, monkeypatch):
    """Issue 26: scores in 0.001..0.003 gave long tick labels (0.0012, 0.9976) that overlapped in rliable's panels."""
    runs = memory_runs({"qdagger": [0.0010, 0.0015, 0.0020], "kickstarting": [0.0020, 0.0025, 0.0030]})
    rep = report.analyze(report.score_runs(runs), reps=20)
    assert 0.001 <= rep.point["qdagger"][0] <= rep.point["kickstarting"][0] <= 0.003
    figures = written_figures(rep, tmp_path, monkeypatch)
    assert set(figures) == set(report.FIGURES.values())
    for name, fig in figures.items():
        assert overlapping_tick_labels(fig) == [], name
        for ax in fig.axes:  # still numbers on every numeric axis: at least two ticks
            if ax.xaxis.get_visible() and name != report.FIGURES["poi"]:
                assert len(drawn_tick_labels(ax.xaxis)) >= 2, name
    # and raw scores (hundreds, in the same narrow panels)
    raw = report.analyze(report.score_runs(memory_runs({"a": [0.5, 0.6, 0.7], "b": [0.7, 0.8, 0.9]}), "raw"), "raw", reps=20)
    (tmp_path / "raw").mkdir()
    for name, fig in written_figures(raw, tmp_path / "raw", monkeypatch).items():
        assert overlapping_tick_labels(fig) == [], name


def test_distinct_colour_per_method_beyond_ten(tmp_path, monkeypatch):
    """Issue 26: seaborn's colorblind palette has 10 colours and cycles: method 11 had method 1's colour."""
    import seaborn as sns
    from matplotlib.colors import to_rgb

    labels = [f"method-{k:02d}" for k in range(12)]
    runs = memory_runs({label: [0.1 * k, 0.1 * k + 0.05] for k, label in enumerate(labels)}, games=("Pong",))
    rep = report.analyze(report.score_runs(runs), reps=10)
    figures = written_figures(rep, tmp_path, monkeypatch)

    def assert_distinct(colors: dict) -> None:
        assert sorted(colors) == labels
        rgb = np.array([to_rgb(c) for c in colors.values()])
        distance = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb))
        assert distance.min() > 0.1, distance.min()

    profile = figures[report.FIGURES["profile"]].axes[0]
    assert_distinct({line.get_label(): line.get_color() for line in profile.get_lines() if line.get_label() in labels})
    curve = figures[report.FIGURES["curve"]].axes[0]
    assert_distinct({line.get_label(): line.get_color() for line in curve.get_lines() if line.get_label() in labels})
    # aggregate panels: the k-th bar of a panel is the k-th method's interval
    for ax in figures[report.FIGURES["aggregate"]].axes:
        assert_distinct(dict(zip(labels, (patch.get_facecolor() for patch in ax.patches))))
    for n in (10, 15, 20, 30):
        names = [str(k) for k in range(n)]
        colors = report.method_colors(names)
        rgb = np.array([colors[k] for k in names])
        assert (np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(n)).min() > 0.05, n
    assert list(report.method_colors(["a", "b"]).values()) == [tuple(c) for c in sns.color_palette("colorblind", 2)]


def test_teacher_no_better_than_random_is_one_error_line(tmp_path, capsys):
    """Issue 26: (G_S - G_R) / (G_T - G_R) is undefined for G_T <= G_R: the Pong runs were dropped with a warning and
    the report went on without them; now the report refuses, naming the runs and the fixes."""
    g_r = tu.ATARI_SCORES["Pong"][0]
    for seed in range(2):
        make_run(tmp_path / "runs", f"Breakout-v5__q__{seed}__1", {"env_id": "Breakout-v5", "seed": seed},
                 [(1, raw_return("Breakout", 0.5))], teacher=TEACHER["Breakout"])
        make_run(tmp_path / "runs", f"Pong-v5__q__{seed}__1", {"env_id": "Pong-v5", "seed": seed}, [(1, g_r + 2.0)],
                 teacher=-21.0)  # below Pong's G_R of -20.7
    out = tmp_path / "o"
    code, stdout, stderr = run_cli([str(tmp_path / "runs"), "--out", str(out), "--reps", "10"], capsys)
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert [l for l in lines if not l.startswith("warning:")] == [lines[-1]] and lines[-1].startswith("error: ")
    error = lines[-1]
    assert "Pong: G_T -21" in error and f"G_R {g_r:g}" in error and "not above the random score" in error
    assert "Pong-v5__q__0__1" in error and "Pong-v5__q__1__1" in error and "Breakout-v5__q__" not in error
    assert "--normalize human" in error and "--teacher-scores" in error
    assert not out.exists()  # nothing half-written
    # the fixes it names work
    code, stdout, stderr = run_cli([str(tmp_path / "runs"), "--out", str(out), "--reps", "10", "--normalize", "human"], capsys)
    assert code == 0, stderr
    code, stdout, stderr = run_cli([str(tmp_path / "runs"), "--out", str(out), "--reps", "10", "--teacher-scores",
                                    json.dumps({"Pong": g_r + 4.0})], capsys)
    assert code == 0, stderr
    assert {r["game"]: float(r["normalized_score"]) for r in read_csv(out / "scores.csv")}["Pong"] == pytest.approx(0.5)
    # a --teacher-scores value, or a pooled G_T, no better than random: the same refusal
    for extra in (["--teacher-scores", '{"Pong": -30}'], ["--pool-teacher"]):
        code, stdout, stderr = run_cli([str(tmp_path / "runs"), "--out", str(out), "--reps", "10", *extra], capsys)
        assert code == 1 and stderr.strip().splitlines()[-1].startswith("error: ") and "Pong: G_T" in stderr, extra


def test_runs_of_other_budgets_or_teachers_are_reported_apart(tmp_path, capsys):
    """Issue 26: runs of one method with another total_timesteps or another teacher were pooled into one aggregate."""
    folders = iter(range(100))

    def runs_of(root: Path, method: str, game: str, seeds, final: float, g_t: float, **flags) -> None:
        root = root / str(next(folders))  # one folder per call: the run names repeat
        for seed in seeds:
            config = {"env_id": f"{game}-v5", "seed": seed, "method": method, "exp_name": "qdagger_dqn_atari_jax",
                      "total_timesteps": 2_500_000, "offline_steps": 1_000_000, "teacher_checkpoint": None,
                      "teacher_iteration": None, "teacher_data": "rollout", "teacher_steps": 1_000_000,
                      "rehearsal_ratio": 0.0, "track": seed == 1, **flags}
            make_run(root, f"{game}-v5__qdagger_dqn_atari_jax__{method}__s{seed}", config, [(config["total_timesteps"], raw_return(game, final + seed / 100, g_t))],
                     teacher=None if method == "tabula-rasa" else g_t)

    # budgets: Pong also at 10M steps; tabula-rasa's teacher flags differ but it has no teacher
    budget = tmp_path / "budget"
    runs_of(budget, "qdagger", "Pong", [0, 1], 0.5, TEACHER["Pong"])
    runs_of(budget, "qdagger", "Breakout", [0, 1], 0.6, TEACHER["Breakout"])
    runs_of(budget, "qdagger", "Pong", [0, 1], 0.9, TEACHER["Pong"], total_timesteps=10_000_000)
    runs_of(budget, "tabula-rasa", "Pong", [0], 0.2, TEACHER["Pong"], teacher_checkpoint="/t/x", offline_steps=0)
    runs_of(budget, "tabula-rasa", "Pong", [1], 0.2, TEACHER["Pong"], teacher_iteration=3, offline_steps=0)
    code, out, err = run_cli([str(budget), "--out", str(tmp_path / "b"), "--reps", "10"], capsys)
    assert code == 0, err
    short, long_ = "qdagger [total_timesteps=2500000]", "qdagger [total_timesteps=10000000]"
    agg = {r["method"]: r for r in read_csv(tmp_path / "b" / "aggregate.csv")}
    assert set(agg) == {short, long_, "tabula-rasa"}
    assert (agg[short]["runs"], agg[short]["games"], agg[long_]["runs"], agg[long_]["games"]) == ("4", "2", "2", "1")
    assert float(agg[long_]["iqm"]) == pytest.approx(0.905, abs=1e-4)  # 0.9 and 0.91: only the 10M runs
    assert float(agg[short]["mean"]) == pytest.approx((0.5 + 0.51 + 0.6 + 0.61) / 4, abs=1e-4)
    for row in read_csv(tmp_path / "b" / "scores.csv"):
        assert row["method"] == ("tabula-rasa" if "tabula-rasa" in row["run"] else short if row["final_step"] == "2500000" else long_)
    assert f"| {long_} | 2 | 1 |" in out
    assert f"reported apart, not pooled: qdagger as {long_}, {short}." in out
    warning = next(l for l in err.splitlines() if l.startswith("warning: qdagger: its runs differ in"))
    assert "its runs differ in total_timesteps: not pooled" in warning  # the teacherless runs' teacher flags do not count
    assert f"{short} (4 runs)" in warning and f"{long_} (2 runs)" in warning
    assert "track" not in err  # flags that change nothing learned are not compared

    # teachers: Pong's runs with two teacher runs; each game's own path (the default or its own folder) is one teacher
    teacher = tmp_path / "teacher"
    runs_of(teacher, "qdagger", "Pong", [0, 1], 0.5, TEACHER["Pong"], teacher_checkpoint="/t/DQN_400/Pong/1")
    runs_of(teacher, "qdagger", "Pong", [0, 1], 0.8, 15.0, teacher_checkpoint="/t/DQN_400/Pong/2")
    runs_of(teacher, "qdagger", "Breakout", [0, 1], 0.6, TEACHER["Breakout"], teacher_checkpoint="/t/DQN_400/Breakout/1")
    runs_of(teacher, "kickstarting", "Pong", [0, 1], 0.3, TEACHER["Pong"], teacher_checkpoint="/x/pg", offline_steps=0)
    runs_of(teacher, "kickstarting", "Breakout", [0, 1], 0.3, TEACHER["Breakout"], teacher_checkpoint="/x/bo",
            offline_steps=0, teacher_steps=5)  # no offline phase: the teacher data's size does not matter
    code, out, err = run_cli([str(teacher), "--out", str(tmp_path / "t"), "--reps", "10"], capsys)
    assert code == 0, err
    one, two = "qdagger [teacher_checkpoint=/t/DQN_400/{game}/1]", "qdagger [teacher_checkpoint=/t/DQN_400/{game}/2]"
    agg = {r["method"]: r for r in read_csv(tmp_path / "t" / "aggregate.csv")}
    assert set(agg) == {one, two, "kickstarting"}
    assert (agg[one]["runs"], agg[one]["games"], agg[two]["runs"], agg[two]["games"]) == ("4", "2", "2", "1")
    assert float(agg[two]["mean"]) == pytest.approx(0.805, abs=1e-4)  # normalized by its own teacher's G_T of 15
    assert f"reported apart, not pooled: qdagger as {one}, {two}." in out
    # --pool-teacher pools G_T per game and teacher: not Pong's two teachers together
    code, out, err = run_cli([str(teacher), "--out", str(tmp_path / "p"), "--reps", "10", "--pool-teacher"], capsys)
    assert code == 0, err
    pooled = {(r["method"], round(float(r["teacher_score"]), 3)) for r in read_csv(tmp_path / "p" / "scores.csv") if r["game"] == "Pong"}
    assert pooled == {(one, TEACHER["Pong"]), (two, 15.0), ("kickstarting", TEACHER["Pong"])}
    # --group-by naming the flag gives the same groups under its own labels, with nothing to set apart
    code, out, err = run_cli([str(budget), "--out", str(tmp_path / "g"), "--reps", "10", "--group-by", "method,total_timesteps"], capsys)
    assert code == 0, err
    assert {r["method"] for r in read_csv(tmp_path / "g" / "aggregate.csv")} == {
        "qdagger:2500000", "qdagger:10000000", "tabula-rasa:2500000"}
    assert "differ in" not in err and "reported apart" not in out


def test_other_differing_flags_are_pooled_with_a_warning(capsys):
    from reincarnate import config

    runs = memory_runs({"qdagger": [0.5, 0.6]})
    for run in runs:
        run.config.update(distill_coef=float(run.seed + 1), total_timesteps="2500000" if run.seed else 2_500_000.0,
                          wandb_entity=f"me{run.seed}")
    scored = report.score_runs(runs)
    err = capsys.readouterr().err
    assert {r.label for r in scored} == {"qdagger"}  # "2500000" and 2500000.0 are one budget
    assert "warning: qdagger: its runs also differ in distill_coef, pooled as one method" in err
    assert "wandb_entity" not in err and "total_timesteps" not in err
    assert config.RUNTIME_FLAGS <= report.NOT_COMPARED  # the flags that change nothing learned are never compared


def test_wandb_export_budgets_are_reported_apart(tmp_path, capsys):
    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Name", "env_id", "seed", "method", "config.total_timesteps", "teacher_checkpoint", "global_step",
                    "eval/episodic_return", "teacher/mean_return"])
        for budget, level in ((2_500_000, 0.5), (10_000_000, 0.9)):
            for seed in range(2):
                w.writerow([f"r{budget}-{seed}", "Pong-v5", seed, "qdagger", budget, "", budget,
                            raw_return("Pong", level), TEACHER["Pong"]])
    code, out, err = run_cli(["--wandb-export", str(path), "--out", str(tmp_path / "o"), "--reps", "10"], capsys)
    assert code == 0, err
    agg = {r["method"]: float(r["iqm"]) for r in read_csv(tmp_path / "o" / "aggregate.csv")}
    assert agg == {"qdagger [total_timesteps=2500000]": pytest.approx(0.5, abs=1e-5),
                   "qdagger [total_timesteps=10000000]": pytest.approx(0.9, abs=1e-5)}

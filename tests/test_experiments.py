"""The experiment harnesses: the regret check on the synthetic linear task and the comparison
(quick mode)."""
import contextlib
import fcntl
import glob
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import experiments.compare as C
import experiments.regret as R
import experiments.tune as T
from conftest import ROOT


# ---------------------------------------------------------------- the theory check
def test_uncertainty_guided_pairs_have_lower_regret_than_random():
    """On the synthetic linear task (informative comparisons rare), select_pair's Σ⁻¹-uncertainty
    arm must accumulate clearly less regret than uniformly random pairs. Random selection, or a Σ
    that never learns (Euclidean ‖Δφ‖), both give a ratio near 1 here."""
    res = R.regret(K=30, M=4, seeds=10)
    u, r = res["uncertainty"]["cum_mean"][-1], res["random"]["cum_mean"][-1]
    assert u < 0.75 * r, (u, r)
    cumulative = res["uncertainty"]["cum_mean"]
    assert all(b >= a for a, b in zip(cumulative, cumulative[1:]))


def test_results_regret_section_is_recomputed_from_the_committed_data():
    """RESULTS.md section 3's table and verdicts are what experiments/data/regret.json gives:
    recomputed here from the per-seed values (report() does the intervals), cell for cell."""
    res = json.load(open(os.path.join(ROOT, "experiments", "data", "regret.json")))
    table = R.report(res, res["config"]["K"], res["config"]["seeds"])
    assert res["claims"] == R.verdicts(res)  # the verdicts, judged again from the per-seed values
    results = open(os.path.join(ROOT, "experiments", "RESULTS.md"), encoding="utf-8").read()
    assert table in results, table


def test_results_tuning_tables_are_recomputed_from_the_committed_data():
    """Every tune.json committed under experiments/data is quoted in RESULTS.md as its report(),
    recomputed here from the per-seed values, cell for cell."""
    results = open(os.path.join(ROOT, "experiments", "RESULTS.md"), encoding="utf-8").read()
    files = sorted(glob.glob(os.path.join(ROOT, "experiments", "data", "*.json")))
    tuned = [json.load(open(f)) for f in files]
    tuned = [t for t in tuned if "script" in t and "rows" in t]
    assert len(tuned) >= 2
    for t in tuned:
        assert T.report(t) in results, T.report(t)


def test_results_diagnose_tables_are_recomputed_from_the_committed_data():
    """Every diagnose.json committed under experiments/data is quoted in RESULTS.md as its
    report()."""
    import experiments.diagnose as D
    results = open(os.path.join(ROOT, "experiments", "RESULTS.md"), encoding="utf-8").read()
    files = sorted(glob.glob(os.path.join(ROOT, "experiments", "data", "diagnose_*.json")))
    assert len(files) == 2
    for f in files:
        assert D.report(json.load(open(f))) in results, f


def test_pair_subsets_are_the_comparisons_draw(toy, tmp_path, monkeypatch):
    """tune --subset and compare's offline arms draw a seed's pairs the same way: a random subset
    of the toy's pair file, the same for the same seed, another for another seed; what the
    budget pays for, its offline calls charged; tune refuses a subset for PbPO or a larger one
    than the file."""
    paths = toy[1]
    lines = open(paths.prefs).read().splitlines()
    first = open(T.pair_subset(paths.prefs, 10, 0, str(tmp_path / "a"))).read().splitlines()
    again = open(T.pair_subset(paths.prefs, 10, 0, str(tmp_path / "b"))).read().splitlines()
    other = open(T.pair_subset(paths.prefs, 10, 1, str(tmp_path / "c"))).read().splitlines()
    assert first == again != other and len(first) == 10 and set(first) <= set(lines)
    path, offline = C.offline_pairs(paths, 64, 0, str(tmp_path / "d"))
    cost = 2 * sum(1 for _ in open(paths.train)) / len(lines)  # calls a kept pair cost the file
    keep = int(64 // (cost + C.RANKING_CALLS))
    drawn = open(T.pair_subset(paths.prefs, keep, 0, str(tmp_path / "e"))).read()
    assert open(path).read() == drawn and offline == pytest.approx(keep * cost)
    with pytest.raises(ValueError, match="only train_selm.py"):
        T.tune("train_pbpo.py", [], "", [0], str(tmp_path / "t"), subset=5)
    monkeypatch.setattr(T.toy, "build", lambda *args, **kwargs: paths)
    with pytest.raises(ValueError, match="has fewer pairs"):
        T.tune("train_selm.py", [], "", [0], str(tmp_path / "t"), subset=len(lines) + 1)
    assert not (tmp_path / "t").exists()  # refused before any run


def test_loglog_slope_recovers_a_power_law():
    K = torch.arange(1, 401, dtype=torch.float64)
    assert R.loglog_slope((3 * K.sqrt()).tolist()) == pytest.approx(0.5, abs=1e-9)
    assert R.loglog_slope((2 * K).tolist()) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- the comparison
@pytest.mark.parametrize("n, t", [(3, 4.303), (10, 2.262), (11, 2.228), (16, 2.131), (31, 2.042),
                                  (121, 1.980)])  # Student's t, 97.5% quantile, n - 1 d.o.f.
def test_mean_ci_is_the_95_percent_t_interval(n, t):
    values = [float(i % 2) for i in range(n)]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    got_mean, half = T.mean_ci(values)
    assert got_mean == pytest.approx(mean)
    assert half == pytest.approx(t * sd / math.sqrt(n), rel=0.01)


def test_compare_refuses_an_untuned_first_setting(tmp_path):
    with pytest.raises(ValueError, match="the first setting must be tuned"):
        C.compare(C.Config(out=str(tmp_path), settings="rare,standard", quick=True))
    assert not os.listdir(tmp_path)  # before anything was built


def peaked_at(targets):
    """A stand-in for tuning's score: highest where each flag is at its target (log scale for
    floats), so where the best point of a grid lies is known in advance."""
    def score(flag_lists):
        scores = []
        for flags in flag_lists:
            values = dict(f[2:].split("=", 1) for f in flags)
            scores.append(-sum(abs(math.log(float(values[k]) / t)) for k, t in targets.items()
                               if k in values))
        return scores
    return score


def test_a_choice_inside_the_grid_is_not_extended():
    flags, record = C.tune_stages("train_selm.py", ("lr=5e-5,1e-4,3e-4 epochs=4,8,16",), [],
                                  peaked_at({"lr": 1e-4, "epochs": 8}))
    assert flags == ["--epochs=8", "--lr=1e-4"]
    assert len(record["points"]) == 9 and record["extensions"] == record["edges"] == []


def test_a_choice_on_an_edge_extends_its_axis_up_to_the_cap():
    """lr's best is the lowest tried: two geometric steps by the grid's own ratio (the cap), after
    which the choice is still on the edge and the record says so. epochs' best, 16, is the highest
    tried: one arithmetic step (16 + 8), with the best's lr; then 16 is inside the values tried
    on its axis and is not extended again."""
    flags, record = C.tune_stages("train_selm.py", ("lr=5e-5,1e-4 epochs=4,8,16",), [],
                                  peaked_at({"lr": 1e-6, "epochs": 24}))
    extensions = [(e["axis"], e["value"], e["side"]) for e in record["extensions"]]
    assert extensions == [("lr", "2.5e-05", "low"), ("epochs", "24", "high"),
                          ("lr", "1.25e-05", "low")]
    assert flags == ["--epochs=16", "--lr=1.25e-05"]
    assert record["edges"] == [{"stage": 0, "axis": "lr", "value": "1.25e-05", "side": "low",
                                "why": "cap"}]
    assert len(record["points"]) == 6 + 3
    assert ["--lr=2.5e-05", "--epochs=16"] in [p["flags"] for p in record["points"]]


def test_an_edge_at_a_flags_bound_or_a_category_is_not_extended():
    """β = 0 cannot be stepped past geometrically, T_out stops at its least value 1 (the step of
    4 from 4 would give 0), the anchor is categorical; each stage starts from the last's best."""
    prefers_small = lambda flag_lists: [-sum(float(f.split("=")[1]) for f in flags
                                             if C.is_number(f.split("=")[1]))
                                        for flags in flag_lists]
    flags, record = C.tune_stages("train_pbpo.py", ("beta=0,0.01 anchor=ref,sft", "t_out=4,8"),
                                  ["--beta=0.5"], prefers_small)
    assert flags == ["--anchor=ref", "--beta=0", "--t_out=1"]
    assert [(e["axis"], e["value"]) for e in record["extensions"]] == [("t_out", "1")]
    assert [(e["axis"], e["why"]) for e in record["edges"]] == [("beta", "bound"),
                                                               ("t_out", "bound")]


def test_a_continued_run_is_paid_for_once():
    """Tuning runs are counted once each, a PbPO run at a larger budget paying only what it
    added to the run it continues; an offline run is charged its pairs."""
    pbpo_384 = C.Run("p/final", 370, 1, 1.0, (("p384", 370),))
    pbpo_768 = C.Run("q/final", 740, 1, 1.0, (("p384", 370), ("p768", 740)))
    dpo = C.Run("d/final", 380.5, 1, 1.0, (("d384", 380.5),))
    assert C.spent([pbpo_384, pbpo_768, dpo, pbpo_768]) == (3, 740 + 380.5)


def test_run_cost_counts_the_enhancer_steps_of_pbpo():
    lines = [{"kind": "explore"}, *[{"kind": "step"}] * 8, {"kind": "episode", "wall_s": 2.5},
             *[{"kind": "step"}] * 8, {"kind": "episode", "wall_s": 3.0},
             {"kind": "final_eval"}]
    assert C.run_cost("train_pbpo.py", [], lines) == (16 + 2 * 2, 5.5)  # --enh_steps=2
    assert C.run_cost("train_pbpo.py", ["--enh_steps=5"], lines) == (16 + 2 * 5, 5.5)
    assert C.run_cost("train_pbpo.py", ["--enhancer=best_of_n"], lines) == (16, 5.5)
    selm = [*[{"kind": "step"}] * 6, {"kind": "iteration", "wall_s": 1.5}]
    assert C.run_cost("train_selm.py", [], selm) == (6, 1.5)


def test_plot_data_has_a_95_percent_interval_at_every_point():
    """Each arm's points: SFT first, then every budget's mean ± the 95% t-interval of the seeds;
    an arm sharing another's runs is left out (it would hide under it)."""
    row = lambda r, kl: {"reward": r, "expected_reward": r, "kl_sft": kl, "calls": 100}
    sft = {b: {s: row(0.5, 0.0) for s in range(3)} for b in (1, 2)}
    arm = {1: {s: row(0.6 + 0.01 * s, 0.1) for s in range(3)},
           2: {s: row(0.7 + 0.02 * s, 0.2 + 0.1 * s) for s in range(3)}}
    data = C.plot_data({"sft": sft, "a": arm, "b": arm}, {"b": "a"})
    assert set(data["frontier"]) == {"sft", "a"}
    points = data["frontier"]["a"]
    assert [p["budget"] for p in points] == [0, 1, 2]
    assert points[2]["y"] == pytest.approx(0.72)
    assert points[2]["y_ci"] == pytest.approx(T.mean_ci([0.7, 0.72, 0.74])[1])
    assert points[2]["x_ci"] == pytest.approx(T.mean_ci([0.2, 0.3, 0.4])[1])
    assert points[0] == {"budget": 0, "x": 0.0, "x_ci": 0.0, "y": 0.5, "y_ci": 0.0}


def test_compare_quick_tunes_runs_evaluates_and_judges(tmp_path):
    """experiments.compare --quick end to end on the quick toy: every arm is tuned on the
    validation split at each budget, runs at both budgets within them with that budget's flags,
    is evaluated on the held-out split (calls, optimizer steps and wall seconds recorded), every
    claim between arms gets a paired difference, the tuning runs are all counted; a second call
    reuses every run, and with the runs gone, the jobs file gives every result again."""
    arms = "sft,dpo,dpo_online,selm,pbpo"
    jobs_file = tmp_path / "jobs.jsonl"
    cfg = C.Config(out=str(tmp_path), settings="standard", arms=arms, quick=True,
                   jobs_file=str(jobs_file))
    res = C.compare(cfg)["settings"]["standard"]
    whole = jobs_file.read_text()
    budgets = (32, 64)
    assert set(res["table"]) == set(arms.split(","))
    for arm, by_budget in res["table"].items():
        for budget in budgets:
            row = by_budget[budget][0]
            keys = ("accuracy", "reward", "expected_reward", "kl_sft")
            assert all(math.isfinite(row[k]) for k in keys)
            assert 0 < row["calls"] <= budget or arm == "sft"
            assert row["steps"] > 0 and row["wall_s"] > 0 or arm == "sft"
    pbpo = res["table"]["pbpo"]
    assert pbpo[32][0]["calls"] <= 32 < pbpo[64][0]["calls"]  # one run, continued
    assert pbpo[32][0]["steps"] < pbpo[64][0]["steps"]
    tuning = res["tuning"]
    for arm in ("dpo", "dpo_online", "selm", "pbpo"):  # tuned at each budget, on its own runs
        for budget in budgets:
            assert res["tuned"][arm][budget]
            assert tuning["arms"][arm]["by_budget"][budget]["points"]
        assert tuning["arms"][arm]["calls"] > 0
    selm_points = sum(len(tuning["arms"]["selm"]["by_budget"][b]["points"]) for b in budgets)
    assert tuning["arms"]["selm"]["runs"] == selm_points == 2 * len(C.SELM_GRID)
    runs_dir = tmp_path / "standard" / "runs"
    assert {b for b in budgets if glob.glob(f"{runs_dir}/selm_{b}_s100_*")} == set(budgets)
    assert tuning["runs"] == sum(a["runs"] for a in tuning["arms"].values())
    assert tuning["calls"] == pytest.approx(sum(a["calls"] for a in tuning["arms"].values()))
    claims = {(c["claim"], c["budget"], c["metric"]) for c in res["claims"]}
    assert ("PbPO ≥ SELM", 32, "reward") in claims
    assert ("iterative DPO ≥ SFT", 32, "expected_reward") in claims
    for points in res["plots"]["frontier"].values():  # along training: SFT, then each budget
        assert all({"x", "x_ci", "y", "y_ci"} <= set(p) for p in points)
    assert [p["budget"] for p in res["plots"]["frontier"]["pbpo"]] == [0, *budgets]
    md = (tmp_path / "compare.md").read_text()
    assert "| pbpo | 64 |" in md and "| all |" in md
    stamps = {r: os.path.getmtime(runs_dir / r / "command.json") for r in os.listdir(runs_dir)}
    C.compare(cfg)  # everything finished is reused, and every job: the toy is the same toy
    assert {r: os.path.getmtime(runs_dir / r / "command.json") for r in stamps} == stamps
    assert jobs_file.read_text() == whole
    for gone in ("runs", "toy", "data"):  # another machine: only the jobs file came along
        shutil.rmtree(tmp_path / "standard" / gone)
    with open(jobs_file, "a") as f:
        f.write('{"key": "cut short by a ki')  # a write a kill cut short
    again = C.compare(cfg)["settings"]["standard"]
    assert not runs_dir.exists()  # no run was made again: the rebuilt toy is the same toy
    for key in ("table", "tuned", "tuning", "claims"):
        assert json.dumps(again[key], default=str) == json.dumps(res[key], default=str), key
    assert jobs_file.read_text() == whole  # the cut line dropped, the whole ones kept


def test_a_job_is_keyed_by_all_that_decides_it():
    arm = C.Arm("dpo", "train_selm.py", ("--alpha=0",))
    args = dict(kind="heldout", arm=arm, flags={"384": ["--lr=1e-4"]}, seed=0, budgets=[384],
                code="c", toy_files="t", samples=8, max_new=48)
    key = C.job_key(C.job_of(**args))
    for name, other in [("kind", "tune"), ("arm", C.Arm("dpo", "train_selm.py")),
                        ("flags", {"384": ["--lr=3e-4"]}), ("seed", 1), ("budgets", [768]),
                        ("code", "d"), ("toy_files", "u"), ("samples", 0), ("max_new", 16)]:
        assert C.job_key(C.job_of(**dict(args, **{name: other}))) != key, name


def job_line(kind="tune", value=None, budgets=(384,), **changes):
    job = dict(kind=kind, seed=0, budgets=list(budgets) if isinstance(budgets, tuple) else budgets)
    run = dict(policy="standard/runs/r/final", calls=380, steps=48, wall_s=30.5,
               path=[["standard/runs/r", 380]])
    row = dict.fromkeys(C.ROW_FIELDS, 0.5)
    value = value or ({"score": 0.9, "runs": [run]} if kind == "tune" else {"384": row})
    return json.dumps({"key": C.job_key(job), "job": job, "value": value, **changes}) + "\n"


@pytest.mark.parametrize("line, expected", [
    ('["not", "a", "job"]\n', "a JSON object with 'key', 'job' and 'value'"),
    (job_line(key="0" * 64), "'key' to be the SHA-256 of its 'job'"),
    (job_line(value=[1]), "a tuning job's value {'score': number, 'runs': [...]}"),
    (job_line(value={"score": 0.9, "runs": [{"policy": 1}]}), "each run to have policy, calls"),
    (job_line(value={"score": 0.9, "runs": [dict(policy="../x", calls=1, steps=1, wall_s=1.0,
                                                  path=[])]}), "a run's directories relative to --out, inside it"),
    (job_line("heldout", value={"768": {}}), "a held-out job's value {budget: {accuracy"),
    (job_line("heldout", value={"384": dict.fromkeys(C.ROW_FIELDS)}), "a held-out job's value"),
    (job_line(value={"score": float("nan"), "runs": []}), "a tuning job's value"),
    (job_line(budgets=384), "a 'job' object whose kind is 'tune' or 'heldout', with a list"),
], ids=["not-an-object", "key", "tune-value", "run-fields", "run-outside", "heldout-value",
        "none", "nan", "budgets"])
def test_a_jobs_file_line_that_is_not_a_job_is_refused_by_number(tmp_path, line, expected):
    path = tmp_path / "jobs.jsonl"
    text = job_line() + line + job_line("heldout") + '{"key": "c'
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected {expected}")):
        C.JobFile(str(path))
    assert path.read_text() == text  # refused: the file is as it was


def test_a_jobs_file_keeps_a_whole_last_line_and_refuses_a_bad_one(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(job_line() + job_line("heldout").rstrip("\n"))  # killed before its newline
    assert len(C.JobFile(str(path)).done) == 2
    assert path.read_text() == job_line() + job_line("heldout")
    bad = job_line() + job_line(key="0" * 64).rstrip("\n")  # whole, but not a job: not dropped
    path.write_text(bad)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected 'key' to be the SHA")):
        C.JobFile(str(path))
    assert path.read_text() == bad
    for where in ("/nonexistent/j.jsonl", str(tmp_path)):
        with pytest.raises(ValueError, match=f"--jobs_file={where}: cannot write a file there"):
            C.JobFile(where)


def test_the_toy_digest_reads_what_the_build_wrote_not_what_came_later(tmp_path):
    paths = C.toy.ToyPaths(*(str(tmp_path / f) for f in C.toy.FILES))
    for p in paths:
        if p.endswith(".jsonl"):
            pathlib.Path(p).write_text("{}\n")
        else:
            os.makedirs(p)
            for f in C.CHECKPOINT_FILES:
                (pathlib.Path(p) / f).write_text(f)
    digest = C.toy_digest(paths)
    (pathlib.Path(paths.model) / "eval_heldout_8_48_abc.json").write_text("{}")  # the SFT's
    assert C.toy_digest(paths) == digest
    (pathlib.Path(paths.rm) / "model.safetensors").write_text("other weights")
    assert C.toy_digest(paths) != digest


def test_compare_extends_a_grid_whose_choice_is_on_an_edge(tmp_path, monkeypatch):
    """A real stage of two β values (so the choice is on an edge, whichever wins): the driver
    runs the point past it at each budget, with the tuning seed, and counts it."""
    monkeypatch.setattr(C, "QUICK_POINTS", 2)
    monkeypatch.setattr(C, "ARMS", [C.Arm("sft"), C.Arm("dpo", "train_selm.py", ("--alpha=0",),
                                                        ("beta=0.01,0.1",))])
    cfg = C.Config(out=str(tmp_path), settings="standard", quick=True)
    tuning = C.compare(cfg)["settings"]["standard"]["tuning"]["arms"]["dpo"]
    for budget in (32, 64):
        record = tuning["by_budget"][budget]
        assert record["extensions"][0]["value"] in ("0.001", "1")
        assert len(record["points"]) == 2 + len(record["extensions"])
        assert len(record["extensions"]) < C.EXTENSIONS or record["edges"][0]["why"] == "cap"
    assert tuning["runs"] == sum(len(tuning["by_budget"][b]["points"]) for b in (32, 64))


def test_plan_counts_the_runs_without_running_any(tmp_path, capsys):
    rows = C.plan(C.Config(out=str(tmp_path), arms="sft,dpo,pbpo,pbpo_mle", ablation_seeds=3))
    by = {(r["setting"], r["arm"]): r for r in rows}
    points = 8 + 6  # DPO's two stages, at each of 2 budgets with 2 tuning seeds
    assert by["standard", "dpo"]["tuning_runs"] == 2 * 2 * points
    assert by["rare", "dpo"]["tuning_runs"] == 0  # takes standard's flags
    assert by["standard", "pbpo_mle"]["runs"] == 3 * 2 and by["rare", "pbpo_mle"]["seeds"] == 3
    assert all(r["seconds"] <= r["seconds_most"] for r in rows)
    assert "wall time" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- drivers: bad flags, stops, kills
BAD_FLAGS = [  # (driver, flag, what it says after "error: ")
    ("tune", "--grid=kl_coef",
     "--grid: 'kl_coef': expected space-separated name=value1,value2,... items"),
    ("tune", "--grid=kl_coeff=0.1,0.2",
     "--grid: train_pbpo.py has no flag --kl_coeff (python train_pbpo.py --help)"),
    ("tune", "--grid=kl_coef=0.1,abc", "--grid: --kl_coef=abc: expected a number"),
    ("tune", "--seeds=1,x", "--seeds=1,x: expected comma-separated integers >= 0, distinct"),
    ("compare", "--budgets=abc",
     "--budgets=abc: expected comma-separated integers >= 1, increasing"),
    ("compare", "--arms=sft,bogus", "--arms=sft,bogus: expected comma-separated names, each "
     "once, of sft, dpo, dpo_online, selm, pbpo, pbpo_best_of_n, pbpo_no_enhancer, "
     "pbpo_mle, pbpo_small_rm, pbpo_beta0, pbpo_beta0.01, pbpo_beta0.02, pbpo_beta0.04, pbpo_beta0.1"),
    ("compare", "--settings=standard,bogus",
     "--settings=standard,bogus: expected comma-separated names, each once, of standard, rare"),
    ("compare", "--ablation_seeds=101", "--ablation_seeds=101: at most 100, so that the "
     "comparison's seeds stay apart from the tuning seeds"),
]


@pytest.mark.parametrize("driver, flag, message", BAD_FLAGS,
                         ids=[f"{driver} {flag}" for driver, flag, _ in BAD_FLAGS])
def test_a_driver_refuses_a_bad_flag_before_any_work(tmp_path, driver, flag, message):
    """One line naming the flag and what was expected, before the toy is built or anything is
    written (the toy's default place is relative to the working directory: tmp_path here)."""
    command = [sys.executable, "-m", f"experiments.{driver}", flag, f"--out={tmp_path / 'out'}"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"experiments/{driver}.py: error: {message}"]
    assert not os.listdir(tmp_path)


FAKE_RUN = '''"""A stand-in for a training script: it locks its --out_dir as run.start does,
writes its metrics and `started` (its pid), then ends (--hold=0) or waits for SIGTERM, on which
it writes `stopped` and exits 1, as a run does."""
import fcntl
import os
import signal
import sys

flags = dict(f[2:].split("=", 1) for f in sys.argv[1:] if "=" in f)
out = flags["out_dir"]


def stop(*_):
    open(os.path.join(out, "stopped"), "w").close()
    sys.exit(1)


signal.signal(signal.SIGTERM, stop)
signal.alarm(900)  # whatever the code under test does, this process never outlives the test
lock = os.open(os.path.join(out, "lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(lock, f"pid {os.getpid()} on {os.uname().nodename}: stand-in".encode())
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    f.write('{"kind": "final_eval", "oracle_calls": 1}\\n')
with open(os.path.join(out, "argv"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
with open(os.path.join(out, "started.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(out, "started.tmp"), os.path.join(out, "started"))
while flags.get("hold") == "1":
    signal.pause()
'''

DRIVER = '''"""tune() or compare() as python -m experiments.DRIVER runs them, on the stand-in
script (its runs wait for SIGTERM) and a stand-in toy: the drivers' own code, in seconds."""
import dataclasses
import sys
import types

import experiments.compare as C
import experiments.tune as T
import run
import toy

driver, fake, out = sys.argv[1:]
toy.build = lambda *args, **kwargs: types.SimpleNamespace(model="m", train="t", valid="v",
                                                          heldout="h", prefs="p", rm="r")
C.toy_digest = lambda paths: "a stand-in toy"
with run.friendly_errors(f"experiments/{driver}.py"):
    if driver == "tune":  # 3 runs, 2 at a time
        fields = [("lr", float, run.knob(0.0, "")), ("hold", int, run.knob(0, ""))]
        T.SCRIPTS[fake] = dataclasses.make_dataclass("Config", fields)
        T.tune(fake, ["--hold=1"], "lr=1,2,3", [0], out, jobs=2)
    else:  # 6 tuning runs (3 points, 2 seeds), 2 at a time
        C.ARMS[:] = [C.Arm("sft"), C.Arm("fake", fake, ("--online", "--hold=1"), ("lr=1,2,3",))]
        C.compare(C.Config(out=out, settings="standard", jobs=2))
'''


def fake_run(tmp_path):
    path = tmp_path / "fake_run"
    path.write_text(FAKE_RUN)
    return str(path)


def started(out, n):
    """The pids of the first n runs under out to write `started` (bounded wait)."""
    deadline = time.time() + 240
    while len(glob.glob(f"{out}/**/started", recursive=True)) < n and time.time() < deadline:
        time.sleep(0.05)
    files = glob.glob(f"{out}/**/started", recursive=True)
    assert len(files) == n, files
    return {f: int(pathlib.Path(f).read_text()) for f in files}


def running_driver(tmp_path, driver):
    """The driver in flight, its first two runs started: (driver process, {started file: pid})."""
    script = tmp_path / "driver"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), driver, fake_run(tmp_path),
                             str(tmp_path / "out")], cwd=ROOT, env={**os.environ,
                             "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        return proc, started(tmp_path / "out", 2)
    except AssertionError:
        proc.kill()
        proc.communicate()
        raise


def gone(pid):
    """The process exited (a zombie no reaper collected counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids, deadline_s=120):
    deadline = time.time() + deadline_s
    while not all(map(gone, pids)) and time.time() < deadline:
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


def kill_all(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, PDEATHSIG")


@linux
@pytest.mark.parametrize("driver", ["tune", "compare"])
def test_sigterm_stops_a_driver_and_its_runs_at_once(tmp_path, driver):
    """SIGTERM to a driver while its runs (which never end by themselves) are in flight: each run
    gets SIGTERM, no other run starts, and the driver exits non-zero with one line."""
    proc, runs = running_driver(tmp_path, driver)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert err.splitlines() == [f"experiments/{driver}.py: stopped"]
        assert started(tmp_path / "out", 2) == runs  # nothing else started
        assert all(os.path.exists(os.path.join(os.path.dirname(f), "stopped")) for f in runs)
    finally:
        proc.kill()
        kill_all(runs.values())


@linux
@pytest.mark.parametrize("driver", ["tune", "compare"])
def test_a_killed_driver_takes_its_runs_with_it(tmp_path, driver):
    """kill -9 of the driver: its runs end too and free their run directories' locks, so a
    restart finds no orphaned run still writing into them."""
    proc, runs = running_driver(tmp_path, driver)
    try:
        proc.kill()
        proc.communicate()
        assert not wait_gone(runs.values()), "runs outlived their driver"
        for f in runs:
            with open(os.path.join(os.path.dirname(f), "lock")) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    finally:
        kill_all(runs.values())


EVALUATORS = '''import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import experiments.compare as C

if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=C.evaluator_starts) as evaluators:
        pid = evaluators.submit(os.getpid).result()
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(pid))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(900)
'''


@linux
def test_an_evaluator_ends_with_a_killed_driver(tmp_path):
    """compare's evaluation processes (a spawn pool's workers, which would wait for work forever)
    end when the driver is killed."""
    script, pid_file = tmp_path / "evaluators", tmp_path / "pid"
    script.write_text(EVALUATORS)
    proc = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 240
    while not pid_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    worker = int(pid_file.read_text())
    try:
        assert not wait_gone([worker]), "the evaluator outlived its driver"
    finally:
        kill_all([worker])


def test_a_run_directory_in_use_is_never_deleted(tmp_path):
    """run_arm starts an unfinished run over by deleting its directory, unless a run holds it (its
    lock): then it refuses, naming the holder, and the files stay. Once the holder ends, it runs."""
    fake = fake_run(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, fake, f"--out_dir={out}", "--hold=1"])
    try:
        started(out, 1)
        holder_line = f"pid {holder.pid} on {os.uname().nodename}: stand-in"
        in_use = f"{out} is in use by {holder_line}: not deleting it to start over"
        with pytest.raises(FileExistsError, match="^" + re.escape(in_use)):
            T.run_arm(fake, ["--hold=0"], str(out))
        assert holder.poll() is None and (out / "started").exists()
    finally:
        holder.terminate()
        holder.wait()
    assert T.run_arm(fake, ["--hold=0"], str(out)) == [{"kind": "final_eval", "oracle_calls": 1}]
    assert json.loads((out / "command.json").read_text())["command"][-1] == f"--out_dir={out}"
    assert not (out / "stopped").exists() and not (out / "command.json.tmp").exists()


def test_an_interrupted_run_is_continued_with_resume_and_keeps_its_pairs(tmp_path):
    """A run of the same command that began and did not finish (a killed driver) is continued with
    --resume, never deleted: the pairs it labelled stay. A run of another command starts over; a
    finished run is reused, unless the code changed since."""
    fake = fake_run(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    begun = {"command": [fake, "--hold=0", f"--out_dir={out}"], "code": T.code_digest()}
    (out / "command.begun.json").write_text(json.dumps(begun))
    (out / "preferences.jsonl").write_text('{"episode": 1, "label": 1}\n')  # labelled, paid for
    assert T.run_arm(fake, ["--hold=0"], str(out)) == [{"kind": "final_eval", "oracle_calls": 1}]
    assert (out / "argv").read_text().split()[-1] == "--resume"
    assert (out / "preferences.jsonl").read_text() == '{"episode": 1, "label": 1}\n'
    assert T.run_arm(fake, ["--hold=0", "--lr=2"], str(out))  # another command: a fresh directory
    assert "--resume" not in (out / "argv").read_text() and not (out / "preferences.jsonl").exists()
    (out / "argv").unlink()  # written by every run of the stand-in
    T.run_arm(fake, ["--hold=0", "--lr=2"], str(out))  # finished, same code: reused
    assert not (out / "argv").exists()
    done = json.loads((out / "command.json").read_text())
    (out / "command.json").write_text(json.dumps({**done, "code": "0" * 64}))  # older code's run
    T.run_arm(fake, ["--hold=0", "--lr=2"], str(out))
    assert (out / "argv").exists()


# ---------------------------------------------------------------- the larger RM backbone
def test_rm_backbone_pieces_are_disjoint_identity_grown_and_loadable(toy, tmp_path):
    """experiments/rm_backbone.py: its text is on problems none of the toy's splits holds; an
    answer's number is replaced wherever the answer states it; the grown model starts as the SFT
    policy; the build's top-block-only features are φ at the last token as the full forward
    computes it; a built backbone loads with model.from_pretrained and shares the policy's
    tokenizer."""
    import random
    import data
    import model as M
    import experiments.rm_backbone as B
    paths = toy[1]
    tok, sft = data.load_tokenizer(paths.model), M.from_pretrained(paths.model).eval()
    splits = (paths.train, paths.valid, paths.heldout)
    excluded = {p["prompt"] for f in splits for p in data.load_prompts(f, tok, 256)}
    problems = B.fresh_problems(random.Random(0), excluded, 300)
    assert len(problems) == 300 and not {q for q, _, _ in problems} & excluded
    assert B.replace_number("3 + 4 = 7. 7 - 2 = 5.\n#### 5", 9) == "3 + 4 = 7. 7 - 2 = 9.\n#### 9"
    assert B.replace_number("I think it is about 6.\n#### 6", 9) == "I think it is about 9.\n#### 9"
    grown = B.grow(sft, 2).eval()
    ids = torch.tensor([data.encode_prompt(tok, problems[0][0])])
    with torch.no_grad():
        torch.testing.assert_close(grown(ids), sft(ids))
    torch.manual_seed(0)
    with torch.no_grad():  # the grown blocks away from the identity, so the check sees them
        for block in grown.model.layers[sft.config.num_hidden_layers:]:
            block.self_attn.o_proj.weight.normal_(0.0, 0.1)
            block.mlp.down_proj.weight.normal_(0.0, 0.1)
    rows = [data.encode_prompt(tok, q) + tok(B.crowd_answer(start, ops, random.Random(i), 3.0))
            .input_ids for i, (q, start, ops) in enumerate(problems[:6])]
    ids, attn, _ = B.pad_batch([(x, [0] * len(x)) for x in rows], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(B.top_token_features(grown, *B.pad_left(rows, tok.pad_token_id)),
                                   B.last_token_features(grown, ids, attn))
    cfg = B.Config(steps=2, batch_size=4, problems=50, warm=2)  # the warm-up path too
    backbone = B.build_detector(sft, tok, problems[:50], cfg)
    M.save_pretrained(backbone, str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    data.check_same_tokenizer(str(tmp_path / "rm"), tok)
    loaded = M.from_pretrained(str(tmp_path / "rm"))
    assert loaded.config.num_hidden_layers == sft.config.num_hidden_layers + 2


def test_rm_backbone_ordinal_targets_and_build(toy):
    """experiments/rm_backbone.py --objective=ordinal: logit k's target is 1 exactly where the
    stated number is within d_k of the answer, on either side; a build of that objective runs."""
    import random
    import data
    import model as M
    import experiments.rm_backbone as B
    targets = B.within_thresholds([7, 8, 5, 20, 0], [7, 7, 7, 7, 7], [0, 1, 2, 4, 8])
    assert targets.tolist() == [[1, 1, 1, 1, 1],   # the answer itself
                                [0, 1, 1, 1, 1],   # 1 above
                                [0, 0, 1, 1, 1],   # 2 below
                                [0, 0, 0, 0, 0],   # 13 above
                                [0, 0, 0, 0, 1]]   # 7 below
    paths = toy[1]
    tok, sft = data.load_tokenizer(paths.model), M.from_pretrained(paths.model).eval()
    problems = B.fresh_problems(random.Random(0), set(), 50)
    cfg = B.Config(objective="ordinal", steps=2, batch_size=4, problems=50, near=1.0)
    backbone = B.build_detector(sft, tok, problems, cfg)
    assert backbone.config.num_hidden_layers == sft.config.num_hidden_layers + 2


def test_toy_rm_backbone_is_the_build_the_harness_measured(toy):
    """toy.train_rm_backbone, the toy's default RM backbone, is experiments/rm_backbone.py's
    build with the flags its docstring says the toy uses, weight for weight, so what the harness
    measures of those flags is what a toy run gets."""
    import random
    import data
    import model as M
    import experiments.rm_backbone as B
    import toy as T
    paths = toy[1]
    tok, sft = data.load_tokenizer(paths.model), M.from_pretrained(paths.model).eval()
    problems = B.fresh_problems(random.Random(3), set(), 60)
    assert (T.RM_STEPS[False], T.RM_BATCH, T.RM_ESTIMATES) == (1400, 16, 0.8)  # the docstring's
    built = T.train_rm_backbone(sft, tok, problems, steps=4, seed=1)
    cfg = B.Config(objective="ordinal", anchor="self", estimates=0.8, batch_size=16, steps=4,
                   problems=60, seed=1)
    assert (T.RM_DISTANCES, T.RM_NEAR, T.RM_NEAR_MAX) == (
        tuple(map(int, cfg.thresholds.split(","))), cfg.near, cfg.near_max)  # its defaults
    torch.manual_seed(cfg.seed)  # as the harness's main does
    measured = B.build_detector(sft, tok, problems, cfg)
    for (name, a), (_, b) in zip(built.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(built.state_dict()["model.norm.weight"], sft.model.norm.weight)

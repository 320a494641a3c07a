"""The experiment harnesses: the regret check on the synthetic linear task and the comparison (quick mode)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import experiments.compare as C
import experiments.regret as R
import experiments.tune as T
from conftest import ROOT


# ---------------------------------------------------------------- the theory check
def test_uncertainty_guided_pairs_have_lower_regret_than_random():
    """On the synthetic linear task (informative comparisons rare), select_pair's Σ⁻¹-uncertainty arm must
    accumulate clearly less regret than uniformly random pairs. Random selection, or a Σ that never learns
    (Euclidean ‖Δφ‖), both give a ratio near 1 here."""
    res = R.regret(K=30, M=4, seeds=10)
    u, r = res["uncertainty"]["cum_mean"][-1], res["random"]["cum_mean"][-1]
    assert u < 0.75 * r, (u, r)
    assert all(b >= a for a, b in zip(res["uncertainty"]["cum_mean"], res["uncertainty"]["cum_mean"][1:]))


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


def test_compare_quick_tunes_runs_evaluates_and_judges(tmp_path):
    """experiments.compare --quick end to end on the quick toy: every arm is tuned on the validation split, runs at
    both budgets within them, is evaluated on the held-out split, and every claim between arms gets a paired
    difference; a second call reuses every run."""
    arms = "sft,dpo,dpo_online,selm,pbpo"
    cfg = C.Config(out=str(tmp_path), settings="standard", arms=arms, quick=True)
    res = C.compare(cfg)["settings"]["standard"]
    budgets = (32, 64)
    assert set(res["table"]) == set(arms.split(","))
    for arm, by_budget in res["table"].items():
        for budget in budgets:
            row = by_budget[budget][0]
            sampled = ("expected_reward", "kl_sft") if budget == budgets[-1] or arm == "sft" else ()
            assert all(math.isfinite(row[k]) for k in ("accuracy", "reward", *sampled))
            assert 0 < row["calls"] <= budget or arm == "sft"
    assert res["table"]["pbpo"][32][0]["calls"] <= 32 < res["table"]["pbpo"][64][0]["calls"]  # one run, continued
    assert set(res["tuned"]) >= {"dpo", "selm", "pbpo"} and all(res["tuning_calls"][a] > 0 for a in ("dpo", "pbpo"))
    claims = {(c["claim"], c["budget"], c["metric"]) for c in res["claims"]}
    assert ("PbPO ≥ SELM", 32, "reward") in claims and ("iterative DPO ≥ SFT", 64, "expected_reward") in claims
    assert ("iterative DPO ≥ SFT", 32, "expected_reward") not in claims  # sampled: top budget only
    assert "| pbpo | 64 |" in (tmp_path / "compare.md").read_text()
    runs = sorted(os.listdir(tmp_path / "standard" / "runs"))
    stamps = {r: os.path.getmtime(tmp_path / "standard" / "runs" / r / "command.json") for r in runs}
    C.compare(cfg)  # everything finished is reused
    assert {r: os.path.getmtime(tmp_path / "standard" / "runs" / r / "command.json") for r in runs} == stamps


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
     "once, of sft, dpo, dpo_online, selm, pbpo, pbpo_token, pbpo_n1, pbpo_rho0, pbpo_rho0.1, "
     "pbpo_rho1, pbpo_rho10, pbpo_rho25"),
    ("compare", "--settings=standard,bogus",
     "--settings=standard,bogus: expected comma-separated names, each once, of standard, rare"),
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

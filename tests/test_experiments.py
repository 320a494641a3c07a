"""The experiment harnesses: the regret check on the synthetic linear task and the comparison (quick mode)."""
import json
import math

import pytest
import torch

import experiments.compare as C
import experiments.regret as R


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
@pytest.mark.slow
def test_compare_quick_writes_every_arm_at_the_budget(tmp_path):
    """experiments.compare --quick end to end: every arm trains in its subprocess, and the table, JSON and learning
    curves hold every arm with finite numbers, each within the oracle budget (PbPO spends all of it)."""
    C.compare(str(tmp_path), 0, 1, "", True)
    arms = C.QUICK_ARMS.split(",")
    res = json.load(open(tmp_path / "compare.json"))
    budget = res["config"]["budget"]
    for arm in arms:
        for key in ("accuracy", "win_rate", "reward", "oracle_calls"):
            mean, std = res[arm][f"{key}_mean_std"]
            assert math.isfinite(mean) and math.isfinite(std), (arm, key)
        assert 0 < max(res[arm]["oracle_calls"]) <= budget or arm == "sft"
    assert res["pbpo"]["oracle_calls"] == [budget] and res["sft"]["win_rate"] == [0.5]
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "compare.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| arm")}
    assert set(rows) == set(arms) and all(" ± " in row and "nan" not in row for row in rows.values())
    curves = [line.split(",") for line in (tmp_path / "curves.csv").read_text().splitlines()[1:]]
    assert {c[0] for c in curves} == set(arms) and all(math.isfinite(float(c[4])) for c in curves)
    assert any(c[0] == "pbpo" and c[2] == "step" for c in curves)  # PbPO's learning curve, one point per step

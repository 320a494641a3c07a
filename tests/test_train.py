"""PbPO end to end on a quick toy task: short runs, resume, torchrun with 2 CPU ranks (SELM's:
tests/test_selm.py)."""
import os

import torch
from conftest import PBPO, metrics, run, without_timings
from safetensors.torch import load_file

import data


def test_pbpo_runs_and_resumes_to_the_same_result(toy, tmp_path):
    """β by dual ascent (the fixed form's resume: test_reliability's kill test): a run stopped after
    episode 1 and resumed is the run never stopped, β and the slack included."""
    flags, _ = toy
    flags = [*flags, "--beta_form=dual"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    out = run("train_pbpo.py", *flags, *PBPO, f"--out_dir={full}").stdout
    assert "held-out gold accuracy: SFT" in out
    rows = metrics(full)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("explore") == 2 and kinds.count("step") == 4 and kinds[-1] == "final_eval"
    explore = [r for r in rows if r["kind"] == "explore"]
    assert [r["pairs"] for r in explore] == [8, 16]
    assert explore[-1]["oracle_calls"] == 32  # 2 responses scored a pair
    assert all(r["beta"] >= 0 and r["slack"] is not None for r in rows if r["kind"] == "step")
    store = data.PreferenceStore(os.path.join(full, "preferences.jsonl")).records
    assert len(store) == 16 and {r["episode"] for r in store} == {1, 2}
    assert {r["label"] for r in store} <= {0, 1}
    # stop after episode 1, then --resume: episode 2 and everything after it is the same as the run
    # never stopped
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={part}")
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={part}", "--resume")
    # resume cut the log back to the checkpoint
    assert without_timings(metrics(part)) == without_timings(rows)
    assert data.PreferenceStore(os.path.join(part, "preferences.jsonl")).records == store
    a = load_file(os.path.join(full, "final", "model.safetensors"))
    b = load_file(os.path.join(part, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pbpo_token_level_and_no_exploration_ablation(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--level=token",
        "--enhancer=best_of_n", "--n_candidates=1", "--enh_temp=1",
        "--beta_form=mle", f"--out_dir={tmp_path}")
    rows = metrics(tmp_path)
    assert rows[-1]["kind"] == "final_eval"
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps and all(r["rm_reward"] is not None for r in steps)  # NaN is written as null


def test_help_lists_the_papers_knobs():
    """--help names β, the enhancer and its stand-in, each with what it means."""
    out = run("train_pbpo.py", "--help").stdout
    for flag in ("--beta ", "--beta_form", "--zeta_coef", "--dual_lr", "--enhancer", "--enh_steps",
                 "--enh_samples", "--enh_kl", "--n_candidates"):
        assert flag in out, flag
    assert "best_of_n" in out and "weight of the summed preference likelihood" in out

"""The training scripts end to end on a quick toy task: short runs, resume, torchrun with 2 CPU ranks."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PBPO = ["--episodes=2", "--explore_prompts=8", "--n_candidates=3", "--t_out=2", "--t_in=2", "--group=2",
        "--leader_prompts=4", "--max_new_tokens=16", "--eval_max=16"]
SELM = ["--iterations=1", "--batch_size=4", "--micro_batch=4", "--max_new_tokens=16", "--eval_max=16", "--lr=1e-4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    t = data.build_toy(str(tmp_path_factory.mktemp("toy")), seed=0, quick=True)
    return [f"--model={t.model}", f"--prompts={t.train}", f"--heldout={t.heldout}"], t


def run(script, *flags, ranks=0, timeout=300):
    """Run a training script as a user would; ranks > 0 launches it under torchrun on CPU (gloo)."""
    launch = [sys.executable, os.path.join(ROOT, script)]
    if ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                  f"--master_port={port}", os.path.join(ROOT, script)]
    proc = subprocess.run(launch + list(flags), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def test_pbpo_runs_and_resumes_to_the_same_result(toy, tmp_path):
    flags, _ = toy
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    out = run("train_pbpo.py", *flags, *PBPO, f"--out_dir={full}")
    assert "held-out gold accuracy: SFT" in out
    rows = metrics(full)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("explore") == 2 and kinds.count("step") == 4 and kinds[-1] == "final_eval"
    explore = [r for r in rows if r["kind"] == "explore"]
    assert [r["pairs"] for r in explore] == [8, 16] and explore[-1]["total_calls"] == 32  # 2 responses scored a pair
    store = data.PreferenceStore(os.path.join(full, "preferences.jsonl")).records
    assert len(store) == 16 and {r["episode"] for r in store} == {1, 2} and {r["label"] for r in store} <= {0, 1}
    # stop after episode 1, then --resume: episode 2 and everything after it is the same as the run never stopped
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={part}")
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={part}", "--resume")
    after = lambda rs: without_timings([r for r in rs if r.get("episode") == 2] + rs[-1:])  # + the final eval
    assert after(metrics(part)) == after(rows)
    assert data.PreferenceStore(os.path.join(part, "preferences.jsonl")).records == store
    a, b = load_file(os.path.join(full, "final", "model.safetensors")), load_file(os.path.join(part, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pbpo_token_level_and_no_exploration_ablation(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--level=token", "--n_candidates=1", "--adv_coef=0",
        f"--out_dir={tmp_path}")
    rows = metrics(tmp_path)
    assert rows[-1]["kind"] == "final_eval" and all(r["rm_reward"] == r["rm_reward"] for r in rows if r["kind"] == "step")


def test_pbpo_torchrun_two_ranks_keep_the_same_sigma_and_store(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={tmp_path}", ranks=2)
    explore = [r for r in metrics(tmp_path) if r["kind"] == "explore"][0]
    assert len(explore["sigma_hash"]) == 2 and len(set(explore["sigma_hash"])) == 1
    assert len(explore["store_hash"]) == 2 and len(set(explore["store_hash"])) == 1
    records = data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records
    assert len(records) == 8 and explore["total_calls"] == 16
    assert os.path.exists(os.path.join(tmp_path, "final", "model.safetensors"))

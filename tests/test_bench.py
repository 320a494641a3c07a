"""experiments/bench.py end to end on the tiny shape, CPU: every section runs and reports finite numbers. No timing is asserted
(speed and memory are what the benchmark reports, not what a test checks).

    python -m pytest -q tests/test_bench.py
"""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPISODE = "--explore_prompts=8 --n_candidates=2 --t_out=1 --t_in=2 --group=2 --leader_prompts=4 --max_new_tokens=16"
KEYS = {  # what each section must report as a finite number on CPU (GPU-only fields are null there)
    "sample": ["ours_tok_s", "ours_ms_step", "hf_dynamic_ms_step", "hf_static_ms_step", "floor_ms_step",
               "ours_over_floor", "hf_static_over_ours"],
    "logprobs": ["fused_s", "naive_s", "fused_over_naive_time"],
    "train": ["step_s", "tok_s", "matmul_tflop_s", "mfu"],
    "episode": ["gen_s", "train_s", "gen_share", "process_wall_s"],
}


def test_bench_tiny_cpu_every_section(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--shape=tiny", "--batch=4", "--prompt_len=8", "--new_tokens=8", "--lp_batch=2", "--lp_len=64",
             "--repeats=2", f"--episode_flags={EPISODE}", f"--out={out}"]  # every section: the default
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", *flags], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "section" in proc.stdout and "ours_ms_step" in proc.stdout  # the table
    results = json.loads(out.read_text())
    assert results["config"]["shape"] == "tiny" and results["env"]["device"] == "cpu"
    for section, keys in KEYS.items():
        values = results[section]
        assert all(isinstance(values[k], (int, float)) and math.isfinite(values[k]) for k in keys), (section, values)
        assert all(v is None or math.isfinite(v) for v in values.values()), (section, values)
    assert 0 <= results["episode"]["gen_share"] <= 1

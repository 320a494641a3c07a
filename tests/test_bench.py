"""experiments/bench.py end to end on CPU at tiny sizes, through the GPU suite's own command path
(`--suite=gpu --smoke`): every section runs and reports finite numbers, the table goes into its
block of a copy of BENCHMARKS.md, and our greedy tokens equal transformers'. No time or memory
figure is asserted: those are what the benchmark reports, not what a test checks.

    python -m pytest -q tests/test_bench.py
"""
import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {  # what each section must report as finite numbers on CPU (GPU-only fields are null)
    "sample": ["greedy_rows_equal", "ours_ms_step", "hf_static_ms_step", "hf_static_over_ours",
               "floor_ms_step", "ours_over_floor"],
    "logprobs": ["naive_s", "fused_s", "fused_over_naive_time", "fused_plus_one_over_n",
                 "naive_peak_mib", "fused_peak_mib", "fused_over_naive_peak"],
    "train": ["step_s", "tok_s", "matmul_tflop_s", "mfu"],
    "episode": ["episode_s", "process_wall_s"],
}


def finite(value):
    """A number, or [min, median, max] of numbers, all finite."""
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_gpu_suite_command_path_on_cpu(tmp_path):
    doc, out = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    shutil.copy(os.path.join(ROOT, "experiments", "BENCHMARKS.md"), doc)
    before = doc.read_text(encoding="utf-8")
    cmd = [sys.executable, "-m", "experiments.bench", "--suite=gpu", "--smoke", f"--doc={doc}",
           f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    results = json.loads(out.read_text())["results"]
    assert {s: set(sections) for s, sections in results.items()} == {
        "tiny": {"sample", "logprobs", "train", "episode"}, "tiny-llama": {"sample", "logprobs"}}
    for shape, sections in results.items():
        for section, figures in sections.items():
            assert all(finite(figures[k]) for k in KEYS[section]), (shape, section, figures)
            assert all(v is None or finite(v) for v in figures.values()), (shape, figures)
        assert sections["sample"]["greedy_rows_equal"] == 1  # ours = transformers, token by token
    episode = results["tiny"]["episode"]
    assert 0 < episode["episode_s"] <= episode["process_wall_s"]

    after = doc.read_text(encoding="utf-8")
    begin, end = "<!-- suite:gpu -->", "<!-- /suite:gpu -->"
    assert after.split(begin)[0] == before.split(begin)[0]  # the rest of the document is kept
    assert after.split(end)[1] == before.split(end)[1]
    block = after.split(begin)[1].split(end)[0]
    assert "python -m experiments.bench --suite=gpu --smoke" in block  # the command that made it
    for row in ("| tiny | hf_static_over_ours >= 4 |", "| tiny | mfu >= 0.4 |",
                "| tiny-llama | fused_over_naive_peak <= 0.25 |", "| tiny | episode | episode_s |"):
        assert row in block

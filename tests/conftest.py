"""Shared by the end-to-end tests: the quick toy task (built once a session) and running a script
as a user would."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

# One environment for every process of a test, this one included: the same thread count gives the
# same numbers, so a run killed and resumed can equal one that never stopped on any machine.
os.environ["OMP_NUM_THREADS"] = "1"
import toy as T  # noqa: E402  (torch reads OMP_NUM_THREADS when it starts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PBPO = ["--episodes=2", "--explore_prompts=8", "--n_candidates=3", "--t_out=2", "--t_in=2",
        "--group=2", "--ref_samples=2", "--leader_prompts=4", "--max_new_tokens=16",
        "--eval_max=16"]
SELM = ["--iterations=1", "--batch_size=4", "--micro_batch=4", "--max_new_tokens=16",
        "--eval_max=16", "--lr=1e-4"]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    t = T.build(str(tmp_path_factory.mktemp("toy")), seed=0, quick=True)
    return [f"--model={t.model}", f"--prompts={t.train}", f"--heldout={t.heldout}"], t


def command(script, *flags, ranks=0):
    """The command line of a training script; ranks > 0 launches it under torchrun on CPU (gloo)."""
    if not ranks:
        return [sys.executable, os.path.join(ROOT, script), *flags]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(ROOT, script), *flags]


def run(script, *flags, ranks=0, timeout=300, ok=True):
    proc = subprocess.run(command(script, *flags, ranks=ranks), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def wait_for_lines(path, lines, proc, timeout=300):
    """Until the file at path has `lines` lines (an event of the run, whatever the machine's
    speed)."""
    deadline = time.time() + timeout
    while not (os.path.exists(path) and open(path, "rb").read().count(b"\n") >= lines):
        assert proc.poll() is None, f"the run ended before {path} had {lines} lines"
        assert time.time() < deadline, f"{path} did not reach {lines} lines in {timeout} s"
        time.sleep(0.01)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

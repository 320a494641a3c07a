"""FSDP2 on CPU: `torchrun --nproc_per_node=2` with gloo runs tests/fsdp_worker.py against the
unsharded model.

    python -m pytest -q tests/test_fsdp.py
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import model as M
import run
from test_model import hf_checkpoint, left_padded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args, timeout=240):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}",
                           os.path.join(ROOT, "tests", "fsdp_worker.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # tied embeddings: the tricky case
    return hf_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))[1]


def test_fsdp_matches_unsharded_and_saves(ckpt, tmp_path):
    out = torchrun(ckpt, tmp_path / "export")
    assert "rank 0: FSDP OK" in out and "rank 1: FSDP OK" in out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    hf = hf.float()
    ours = M.from_pretrained(tmp_path / "export")
    ids, attn = left_padded()
    with torch.no_grad():
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=attn.long(), position_ids=positions).logits
        assert (ours.lm_head(ours(ids, attn)) - ref)[attn].abs().max() <= 1e-4


def test_leader_step_on_two_ranks_with_different_token_counts_is_the_one_rank_step(ckpt, tmp_path):
    out = torchrun(ckpt, tmp_path / "unused", "--leader")
    assert "rank 0: leader step OK with 30 response tokens" in out
    assert "rank 1: leader step OK with 8 response tokens" in out


@pytest.mark.slow
def test_fsdp_compiled_generate(ckpt, tmp_path):
    out = torchrun(ckpt, tmp_path / "unused", "--compile")
    assert "rank 0: FSDP compiled generate OK" in out and "rank 1: FSDP compiled generate OK" in out

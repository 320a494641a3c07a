"""Reliability: runs killed at random points resume to the same result, bad input gets one clear message, NaN/inf
never trains silently, a full disk or a dead rank leaves the last good checkpoint intact; a run directory is one run's
(a lock, its flags), its checkpoint runs no code and is refused when corrupt, what was labelled is never wiped."""
import collections
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import torch
from conftest import PBPO, ROOT, SELM, command, metrics, run, without_timings
from safetensors.torch import load_file, save_file

import data
import model as M
import run as R

TRACES = (R.CHECKPOINT, "preferences.jsonl", "metrics.jsonl")


def killed_then_resumed(script, flags, out, delays, leftovers=lambda: None):
    """SIGKILL the run after each delay (wherever it is: generating, labelling, checkpointing), restart it with
    --resume as a user would after a preemption, and let the last restart finish. leftovers() runs before it."""
    for delay in [*delays, None]:
        if delay is None:
            leftovers()
        resume = ["--resume"] if any(os.path.exists(os.path.join(out, f)) for f in TRACES) else []
        if delay is None:
            return run(script, *flags, f"--out_dir={out}", *resume)
        proc = subprocess.Popen(command(script, *flags, f"--out_dir={out}", *resume), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def same_weights(a, b):
    a, b = load_file(os.path.join(a, "final", "model.safetensors")), load_file(os.path.join(b, "final", "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pbpo_killed_at_random_points_resumes_to_the_same_result(toy, tmp_path):
    flags, _ = toy
    full, part = tmp_path / "full", tmp_path / "part"
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={full}")
    rng = random.Random(0)

    def leftovers():  # what a kill leaves that timing may not hit: half a checkpoint write, a torn store line
        (part / f"{R.CHECKPOINT}.tmp").write_bytes(b"\x10\x00\x00\x00 half a checkpoint")
        with open(part / "preferences.jsonl", "ab") as f:
            f.write(b'{"episode": 2, "prompt": "Tom has')

    killed_then_resumed("train_pbpo.py", [*flags, *PBPO], part, [rng.uniform(3.0, 12.0) for _ in range(2)], leftovers)
    assert without_timings(metrics(part)) == without_timings(metrics(full))
    store, ref = (data.PreferenceStore(os.path.join(d, "preferences.jsonl")).records for d in (part, full))
    assert store == ref and len(store) == 16  # nothing lost, nothing twice
    assert same_weights(part, full)


def test_selm_killed_at_random_points_resumes_to_the_same_result(toy, tmp_path):
    flags, t = toy
    flags = [f.replace("--prompts=", "--prefs=").replace(t.train, t.prefs) for f in flags]
    flags += [*SELM, "--iterations=2", "--max_pairs=16"]
    run("train_selm.py", *flags, f"--out_dir={tmp_path / 'full'}")
    rng = random.Random(1)
    killed_then_resumed("train_selm.py", flags, tmp_path / "part", [rng.uniform(3.0, 9.0) for _ in range(2)])
    assert without_timings(metrics(tmp_path / "part")) == without_timings(metrics(tmp_path / "full"))
    assert same_weights(tmp_path / "part", tmp_path / "full")


def test_resume_on_fewer_ranks_keeps_every_pair_once(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={tmp_path}", ranks=2)
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={tmp_path}", "--resume")  # 2 ranks -> 1
    records = data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records
    assert [r["episode"] for r in records] == [1] * 8 + [2] * 8
    assert [r["pairs"] for r in metrics(tmp_path) if r["kind"] == "explore"] == [8, 16]


def test_runs_with_the_same_seed_are_identical_and_ranks_sample_differently(toy, tmp_path):
    flags, _ = toy
    for out in ("a", "b"):
        run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={tmp_path / out}")
    assert without_timings(metrics(tmp_path / "a")) == without_timings(metrics(tmp_path / "b"))
    # 2 ranks, every prompt the same: each rank samples its own rows, so their responses differ
    same = tmp_path / "same.jsonl"
    same.write_text(2 * (json.dumps({"question": "Tom has 5 pens and buys 3. How many pens does Tom have now?",
                                     "answer": "8"}) + "\n"))
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--prompts={same}", f"--out_dir={tmp_path / 'ranks'}", ranks=2)
    records = data.PreferenceStore(os.path.join(tmp_path / "ranks", "preferences.jsonl")).records
    by_rank = [[r["response1_ids"] for r in records[i * 4:(i + 1) * 4]] for i in range(2)]
    assert by_rank[0] != by_rank[1]


# ---------------------------------------------------------------------------- numerical guards
def test_nonfinite_update_is_skipped_and_logged(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--t_out=3", "--lr=1e30", f"--out_dir={tmp_path}")
    bad = [r for r in metrics(tmp_path) if r["kind"] == "nonfinite"]
    assert bad and all(r["what"] == "policy gradient" and r["episode"] == 1 for r in bad)
    assert {r["step"] for r in bad} <= {1, 2}  # step 0 is finite: it is the step that blows the weights up


def test_nonfinite_with_stop_ends_the_run_and_keeps_what_was_labelled(toy, tmp_path):
    """lr 1e30: the first leader step is finite and blows the weights up, a later one is NaN or inf. With
    --on_nonfinite=stop that step ends the run, naming it, and episode 1's labelled pairs stay in the store."""
    flags, _ = toy
    proc = run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--t_out=3", "--lr=1e30", "--on_nonfinite=stop",
               f"--out_dir={tmp_path / 'out'}", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"policy gradient is (nan|inf) at episode 1, leader step [12]; stopped \(--on_nonfinite=stop\), "
                     r"no checkpoint yet", proc.stderr), proc.stderr[-2000:]
    bad = [(r["episode"], r["step"]) for r in metrics(tmp_path / "out") if r["kind"] == "nonfinite"]
    assert len(bad) == 1 and bad[0][0] == 1 and bad[0][1] in (1, 2)
    assert len(data.PreferenceStore(os.path.join(tmp_path / "out", "preferences.jsonl")).records) == 8


# ---------------------------------------------------------------------------- bad input
def corrupt(path, how):
    """A checkpoint as disks and people leave them."""
    raw = open(path, "rb").read()
    if how == "flipped":  # 4 bytes inside the tensor data
        raw = raw[:-100] + bytes(b ^ 0xFF for b in raw[-100:-96]) + raw[-96:]
    open(path, "wb").write({"flipped": raw, "truncated": raw[:len(raw) // 2], "empty": b"",
                            "random": random.Random(0).randbytes(len(raw))}[how])


class Payload:
    """Unpickling this runs code: it creates the file named."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_inputs(toy, tmp):
    """(name, script, flags, what the message must say): each must exit non-zero with that one
    message, before any oracle call, leaving a run directory it was pointed at as it was."""
    flags, t = toy
    model, prompts = f"--model={t.model}", f"--prompts={t.train}"
    selm_flags = [model, f"--prefs={t.prefs}", f"--heldout={t.heldout}", *SELM, "--max_pairs=8"]

    def model_copy(name, edit):
        path = tmp / name
        shutil.copytree(t.model, path)
        edit(path)
        return f"--model={path}"

    def set_json(file, key, value):
        config = json.loads(file.read_text()) if file.exists() else {}
        config[key] = value
        file.write_text(json.dumps(config))

    def prompt_file(name, text):
        (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return f"--prompts={tmp / name}"

    def smaller_vocab(path):  # config.json and the weights agree on 300 tokens; the tokenizer has more
        set_json(path / "config.json", "vocab_size", 300)
        weights = load_file(path / "model.safetensors")
        weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:300].clone()
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    def other_tokenizer(path):  # two tokens swap ids: the same text, other ids
        tokenizer = json.loads((path / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        (a, i), (b, j) = sorted(vocab.items(), key=lambda kv: kv[1])[-2:]
        vocab[a], vocab[b] = j, i
        (path / "tokenizer.json").write_text(json.dumps(tokenizer))

    def index_only(path):
        os.remove(path / "model.safetensors")
        (path / "model.safetensors.index.json").write_text('{"metadata": {}}')

    def run_dir(name, base, edit=lambda d: None):
        shutil.copytree(base, tmp / name)
        edit(tmp / name)
        return f"--out_dir={tmp / name}"

    pbpo_run, selm_run = tmp / "base_pbpo", tmp / "base_selm"  # finished runs, to resume
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={pbpo_run}")
    run("train_selm.py", *selm_flags, f"--out_dir={selm_run}")
    pbpo_resume = [*flags, *PBPO, "--resume"]
    ckpt = lambda how: lambda d: corrupt(d / R.CHECKPOINT, how)
    (tmp / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoint.pt").write_bytes(b"")
    (tmp / "empty_model").mkdir()
    os.mkfifo(tmp / "fifo.jsonl")
    fifo_in_model = model_copy("fifo_model", lambda p: os.mkfifo(p / "generation_config.json"))
    return [
        ("missing model dir", "train_pbpo.py", ["--model=/no/such/model", prompts], "/no/such/model: no such directory"),
        ("model dir without files", "train_pbpo.py", [f"--model={tmp / 'empty_model'}", prompts], "no loadable tokenizer"),
        ("unsupported architecture", "train_pbpo.py", [model_copy("gpt2", lambda p: set_json(p / "config.json", "model_type", "gpt2")), prompts],
         "model_type 'gpt2' is not supported"),
        ("config.json not JSON", "train_pbpo.py", [model_copy("badcfg", lambda p: (p / "config.json").write_text("{")), prompts], "config.json"),
        ("weights missing", "train_pbpo.py", [model_copy("noweights", lambda p: os.remove(p / "model.safetensors")), prompts],
         "neither model.safetensors nor model.safetensors.index.json"),
        ("tokenizer without EOS", "train_pbpo.py", [model_copy("noeos", lambda p: set_json(p / "tokenizer_config.json", "eos_token", None)), prompts],
         "the tokenizer has no EOS token"),
        ("missing prompt file", "train_pbpo.py", [model, "--prompts=/no/such.jsonl"], "/no/such.jsonl"),
        ("empty prompt file", "train_pbpo.py", [model, prompt_file("empty.jsonl", "")], "empty.jsonl"),
        ("malformed JSONL", "train_pbpo.py", [model, prompt_file("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n')], "bad.jsonl:2"),
        ("wrong field type", "train_pbpo.py", [model, prompt_file("type.jsonl", '{"prompt": 5}\n')], "type.jsonl:1: field 'prompt'"),
        ("missing field", "train_pbpo.py", [model, prompt_file("field.jsonl", '{"text": "hi"}\n')], "field.jsonl:1: missing field 'prompt'"),
        ("prompts longer than the context", "train_pbpo.py", [model, prompts, "--max_prompt_len=3"], "longer than max_prompt_len=3"),
        ("no answer for the gold oracle", "train_pbpo.py", [model, prompt_file("noanswer.jsonl", '{"prompt": "hi"}\n')],
         "--oracle=gold needs an 'answer' field"),
        ("max_new_tokens 0", "train_pbpo.py", [model, prompts, "--max_new_tokens=0"], "--max_new_tokens=0: expected at least 1"),
        ("NaN learning rate", "train_pbpo.py", [model, prompts, "--lr=nan"], "--lr=nan: expected a finite number >= 0"),
        ("negative KL weight", "train_pbpo.py", [model, prompts, "--kl_coef=-1"], "--kl_coef=-1.0: expected a finite number >= 0"),
        ("infinite bound", "train_pbpo.py", [model, prompts, "--bound=inf"], "--bound=inf: expected a finite number >= 0"),
        ("group of one", "train_pbpo.py", [model, prompts, "--group=1"], "--group=1: expected at least 2"),
        ("greedy leader", "train_pbpo.py", [model, prompts, "--temperature=0"],
         "--temperature=0.0: expected at least 1e-06 (T: the leader scores its samples' log-probs at T)"),
        ("not an integer", "train_pbpo.py", [model, prompts, "--episodes=two"], "--episodes: invalid int value"),
        ("unknown level", "train_pbpo.py", [model, prompts, "--level=word"], "--level='word': expected one of seq, token"),
        ("unknown oracle", "train_pbpo.py", [model, prompts, "--oracle=magic"], "--oracle='magic': expected gold, gsm8k or rm:PATH"),
        ("missing reward model", "train_pbpo.py", [model, prompts, "--oracle=rm:/no/rm"], "expected a local HF reward model directory"),
        ("--resume without a checkpoint", "train_pbpo.py", [model, prompts, f"--out_dir={tmp / 'nothing'}", "--resume"],
         "--resume: no checkpoint at"),
        ("fresh run over a previous one", "train_pbpo.py", [model, prompts, f"--out_dir={tmp / 'run'}"], "holds a previous run"),
        ("pair without 'rejected'", "train_selm.py", [model, f"--prefs={tmp / 'pairs.jsonl'}"], "pairs.jsonl:1: missing field 'rejected'"),
        ("SELM with max_new_tokens 0", "train_selm.py", [model, f"--prefs={t.prefs}", "--max_new_tokens=0"], "expected at least 1"),
        # flags whose range was never checked
        ("no follower steps", "train_pbpo.py", [model, prompts, "--t_in=0"], "--t_in=0: expected at least 1"),
        ("max_new_tokens past the context", "train_pbpo.py", [model, prompts, "--max_new_tokens=1000000"],
         "--max_new_tokens=1000000 is more than the model's context, max_position_embeddings=256"),
        ("nothing to evaluate", "train_pbpo.py", [model, prompts, "--eval_max=0"], "--eval_max=0: expected at least 1"),
        ("SELM, nothing to evaluate", "train_selm.py", [model, f"--prefs={t.prefs}", "--eval_max=0"], "--eval_max=0: expected at least 1"),
        ("a bool flag neither on nor off", "train_pbpo.py", [model, prompts, "--normalize=maybe"],
         "argument --normalize: invalid boolean value: 'maybe'"),
        # files
        ("JSON nested too deep", "train_pbpo.py", [model, prompt_file("deep.jsonl", "[" * 100000 + "\n")],
         "deep.jsonl:1: bad JSON (maximum recursion depth exceeded"),
        ("a 5000-digit number", "train_pbpo.py", [model, prompt_file("digits.jsonl", '{"prompt": "a", "answer": ' + "9" * 5000 + "}\n")],
         "digits.jsonl:1: bad JSON (Exceeds the limit (4300 digits)"),
        ("text that is not Unicode", "train_pbpo.py", [model, prompt_file("surrogate.jsonl", '{"prompt": "\\ud800"}\n')],
         "surrogate.jsonl:1: bad JSON ('utf-8' codec can't encode character"),
        ("text that is not UTF-8", "train_pbpo.py", [model, prompt_file("latin1.jsonl", b'{"prompt": "caf\xe9"}\n')],
         "latin1.jsonl: not UTF-8 text (byte 15: invalid continuation byte)"),
        ("prompt file that never ends (FIFO)", "train_pbpo.py", [model, f"--prompts={tmp / 'fifo.jsonl'}"],
         "fifo.jsonl: not a regular file"),
        ("prompt file that never ends (/dev/zero)", "train_pbpo.py", [model, "--prompts=/dev/zero"], "/dev/zero: not a regular file"),
        ("model file that never ends (FIFO)", "train_pbpo.py", [fifo_in_model, prompts], "generation_config.json: not a regular file"),
        ("truncated safetensors", "train_pbpo.py",
         [model_copy("truncated", lambda p: os.truncate(p / "model.safetensors", os.path.getsize(p / "model.safetensors") // 2)), prompts],
         "model.safetensors: not a readable safetensors file (Error while deserializing header: incomplete metadata"),
        ("index without a weight map", "train_pbpo.py", [model_copy("index", index_only), prompts],
         "model.safetensors.index.json: expected a 'weight_map' of tensor names to files"),
        ("config.json: a size that is no number", "train_pbpo.py",
         [model_copy("strsize", lambda p: set_json(p / "config.json", "hidden_size", "32")), prompts],
         "Validation error for field 'hidden_size': TypeError: Field 'hidden_size' expected int, got str (value: '32')"),
        ("config.json: a negative size", "train_pbpo.py",
         [model_copy("negsize", lambda p: set_json(p / "config.json", "hidden_size", -32)), prompts],
         "config.json: hidden_size must be a positive integer to build a llama model, got -32"),
        ("config.json disagrees with the weights", "train_pbpo.py",
         [model_copy("heads", lambda p: set_json(p / "config.json", "intermediate_size", 48)), prompts], "config.json implies (32, 48)"),
        ("config.json disagrees with the tokenizer", "train_pbpo.py", [model_copy("vocab", smaller_vocab), prompts],
         "must be ids below the vocab_size=300"),
        ("EOS id outside the vocabulary", "train_pbpo.py",
         [model_copy("geneos", lambda p: set_json(p / "generation_config.json", "eos_token_id", [2, 100000])), prompts],
         "generation_config.json: eos_token_id [2, 100000] and the tokenizer"),
        ("broken tokenizer.json", "train_pbpo.py",
         [model_copy("badtok", lambda p: (p / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')), prompts], "no loadable tokenizer"),
        ("reward backbone with another tokenizer", "train_pbpo.py",
         [model, prompts, model_copy("othertok", other_tokenizer).replace("--model", "--rm_backbone")], "its tokenizer is not"),
        # run directories: checkpoints, flags, scripts
        ("checkpoint with 4 bytes flipped", "train_pbpo.py", [*pbpo_resume, run_dir("flipped", pbpo_run, ckpt("flipped"))],
         "checksum mismatch: the file is corrupt"),
        ("checkpoint truncated", "train_pbpo.py", [*pbpo_resume, run_dir("truncated_ckpt", pbpo_run, ckpt("truncated"))],
         "not a readable checkpoint (Error while deserializing header"),
        ("checkpoint empty", "train_pbpo.py", [*pbpo_resume, run_dir("empty_ckpt", pbpo_run, ckpt("empty"))],
         "not a readable checkpoint (Error while deserializing header: header too small)"),
        ("checkpoint of random bytes", "train_pbpo.py", [*pbpo_resume, run_dir("random_ckpt", pbpo_run, ckpt("random"))],
         "not a readable checkpoint (Error while deserializing header"),
        ("checkpoint crafted to run code", "train_pbpo.py",
         [*pbpo_resume, run_dir("pickle", pbpo_run, lambda d: torch.save(Payload(tmp / "MARKER"), d / R.CHECKPOINT))],
         "not a readable checkpoint"),
        ("checkpoint lost", "train_pbpo.py", [*pbpo_resume, run_dir("lost", pbpo_run, lambda d: os.remove(d / R.CHECKPOINT))],
         "checkpoints.log shows the run had one: refusing to start it over"),
        ("only a checkpoint of an older version", "train_pbpo.py",
         [*pbpo_resume, run_dir("legacy", pbpo_run, lambda d: [os.rename(d / R.CHECKPOINT, d / "checkpoint.pt"), os.remove(d / R.HISTORY)])],
         "checkpoint.pt shows the run had one: refusing to start it over"),
        ("resume with another learning rate", "train_pbpo.py", [*pbpo_resume, run_dir("lr", pbpo_run), "--lr=0.5"],
         "is a run with other flags (--lr 0.0001 -> 0.5); only episodes, micro_batch, on_nonfinite, dist_timeout may change"),
        ("resume with another G, level and seed", "train_pbpo.py",
         [*pbpo_resume, run_dir("glevel", pbpo_run), "--group=4", "--level=token", "--seed=1"],
         "(--group 2 -> 4; --level 'seq' -> 'token'; --seed 0 -> 1)"),
        ("resume with another model", "train_pbpo.py", [*pbpo_resume, run_dir("model", pbpo_run), model_copy("same_arch", lambda p: None)],
         f"(--model '{t.model}' -> '{tmp / 'same_arch'}')"),
        ("resume with fewer episodes than done", "train_pbpo.py", [*pbpo_resume, run_dir("fewer", pbpo_run), "--episodes=1"],
         "--episodes=1: the run is past episode 2 already"),
        ("SELM resume with more iterations", "train_selm.py", [*selm_flags, "--resume", run_dir("iterations", selm_run), "--iterations=2"],
         "(--iterations 1 -> 2); only micro_batch, on_nonfinite, dist_timeout may change"),
        ("PbPO resume in a SELM run", "train_pbpo.py", [*pbpo_resume, run_dir("selm", selm_run)],
         "checkpoint.safetensors was written by train_selm.py, not train_pbpo.py"),
        # eval.py
        ("eval: negative limit", "eval.py", ["generation", model, f"--prompts={t.heldout}", "--limit=-3"], "--limit=-3: expected a finite number >= 0"),
        ("eval: unknown device", "eval.py", ["generation", model, f"--prompts={t.heldout}", "--device=gpu"], "--device=gpu: expected cpu"),
        ("eval: truncated safetensors", "eval.py", ["generation", f"--model={tmp / 'truncated'}", f"--prompts={t.heldout}"],
         "model.safetensors: not a readable safetensors file"),
        ("eval: max_new_tokens past the context", "eval.py", ["generation", model, f"--prompts={t.heldout}", "--max_new_tokens=1000000"],
         "is more than the model's context"),
        ("eval: reference with another tokenizer", "eval.py", ["winrate", model, f"--ref={tmp / 'othertok'}", f"--prompts={t.heldout}"],
         "its tokenizer is not"),
        ("eval: pass@k at temperature 0", "eval.py", ["generation", model, f"--prompts={t.heldout}", "--k=2"],
         "pass@2 needs k samples at a temperature > 0"),
        ("eval: data file that never ends", "eval.py", ["choice", model, f"--data={tmp / 'fifo.jsonl'}"], "fifo.jsonl: not a regular file"),
    ]


def snapshot(out_dir):
    """{file: bytes} of a run directory (its lock's holder line apart), None if there is none."""
    if not os.path.isdir(out_dir):
        return None
    return {f: b"" if f == "lock" else open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir))
            if os.path.isfile(os.path.join(out_dir, f))}


def test_bad_inputs_give_one_clear_message(toy, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    cases = bad_inputs(toy, tmp_path)
    assert len(cases) >= 60

    def attempt(case):
        name, script, flags, expected = case
        given = [f.split("=", 1)[1] for f in flags if f.startswith("--out_dir=")]
        out_dir = given[-1] if given else str(tmp_path / "out" / name)
        flags = flags if given or script == "eval.py" else [*flags, f"--out_dir={out_dir}"]
        before = snapshot(out_dir)
        proc = run(script, *flags, ok=False, timeout=120)
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        print(f"{name:40} {message}")  # the table for the notes: pytest -s
        if proc.returncode == 0 or expected not in message or "Traceback" in proc.stderr:
            return f"{name}: rc={proc.returncode}, last stderr line {message!r}, expected {expected!r}"
        after = snapshot(out_dir)
        if before is not None and after != before:  # nothing lost, nothing left behind
            return f"{name}: {out_dir} changed: {sorted(before)} -> {sorted(after)}"
        if before is None and after and (after.get("preferences.jsonl") or after.get("metrics.jsonl")):
            return f"{name}: the oracle was called before the refusal: {sorted(after)}"

    with ThreadPoolExecutor(2) as pool:  # two at a time: most of each is Python importing torch
        failures = [f for f in pool.map(attempt, cases) if f]
    assert not failures, "\n".join(failures)
    assert not os.path.exists(tmp_path / "MARKER")  # the crafted checkpoint ran nothing


# ---------------------------------------------------------------------------- checkpoints and run directories
def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"policy": Payload(marker)}, tmp_path / "payload")
    torch.load(tmp_path / "payload", weights_only=False)  # the payload is live: unpickling it runs it
    assert marker.exists()
    marker.unlink()
    for load in (lambda p: R.read_checkpoint(p), lambda p: R.read_checkpoint(p, tensors=False),
                 lambda p: R.load_checkpoint(p, {})):
        try:
            load(str(tmp_path / "payload"))
        except ValueError as e:
            assert "not a readable checkpoint" in str(e)
        else:
            raise AssertionError("a pickle was read as a checkpoint")
    assert not marker.exists()


def test_checkpoint_round_trip_is_exact_and_a_changed_byte_is_refused(tmp_path):
    def tied():  # two names, one storage, as a tied lm_head
        linear, embedding = torch.nn.Linear(3, 4), torch.nn.Embedding(4, 3)
        linear.weight = embedding.weight
        return torch.nn.Sequential(embedding, linear)

    torch.manual_seed(0)
    model = tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    rows = torch.randn(3, 5)
    extra = {"rows": [rows[0], rows[1]], "nested": {"a": [1, 2.5, None, "x", True], "b": {"c": torch.tensor(7)}},
             "bf16": torch.randn(4).bfloat16(), "empty": [], "pair": (1, 2), "inf": float("inf")}
    path = str(tmp_path / R.CHECKPOINT)
    R.save_checkpoint(path, {"model": (model, opt)}, **extra)
    copy = tied()
    copy_opt = torch.optim.AdamW(copy.parameters(), lr=1e-3)
    out = R.load_checkpoint(path, {"model": (copy, copy_opt)})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))
    state, copy_state = opt.state_dict()["state"], copy_opt.state_dict()["state"]
    assert all(torch.equal(state[i][k], copy_state[i][k]) for i in state for k in state[i])
    assert copy_opt.param_groups[0]["betas"] == [0.8, 0.9]  # tuples come back as lists
    assert [torch.equal(a, b) for a, b in zip(out["rows"], extra["rows"])] == [True, True]
    assert out["nested"]["a"] == [1, 2.5, None, "x", True] and out["nested"]["b"]["c"].item() == 7
    assert out["bf16"].dtype == torch.bfloat16 and torch.equal(out["bf16"], extra["bf16"])
    assert out["empty"] == [] and out["pair"] == [1, 2] and out["inf"] == float("inf") and out["script"]
    assert sorted(os.listdir(tmp_path)) == sorted([R.CHECKPOINT, R.HISTORY])  # no temp file left
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b'\\"x\\"')  # the string "x" in the JSON document: the header still parses, the sum differs
    raw[at + 2] = ord("y")
    open(path, "wb").write(raw)
    try:
        R.load_checkpoint(path, {})
    except ValueError as e:
        assert "checksum mismatch" in str(e)
    else:
        raise AssertionError("a changed checkpoint was loaded")


@dataclass
class Flags:
    on: bool = False  # a bool flag


def test_bool_flags_take_the_usual_spellings():
    for text, value in [("on", True), ("yes", True), ("TRUE", True), ("1", True), ("off", False), ("no", False),
                        ("False", False), ("0", False)]:
        assert R.parse_flags(Flags, "", [f"--on={text}"]).on is value, text
    assert R.parse_flags(Flags, "", ["--on"]).on is True and R.parse_flags(Flags, "", []).on is False


def test_metrics_log_is_strict_json(tmp_path):
    """A NaN metric (a correlation of constants, a spread of one value) is written as null, which every
    JSON reader takes; `json.dumps` alone would write NaN."""
    log = R.MetricsLog(str(tmp_path / "metrics.jsonl"), True)
    log.write(kind="step", rm_gold_corr=float("nan"), kl=float("inf"), gold=0.5, n=3)
    line = open(tmp_path / "metrics.jsonl").read()
    assert json.loads(line, parse_constant=lambda c: 1 / 0) == {"kind": "step", "rm_gold_corr": None, "kl": None,
                                                               "gold": 0.5, "n": 3}


def test_selm_batch_not_a_multiple_of_the_ranks_is_refused(toy, tmp_path):
    flags, _ = toy
    proc = run("train_selm.py", *flags, "--batch_size=3", f"--out_dir={tmp_path}", ranks=2, ok=False)
    assert proc.returncode != 0 and "--batch_size=3 must be a multiple of the world size 2" in proc.stderr


def test_one_run_in_a_directory_at_a_time(toy, tmp_path):
    """A second run in a directory in use (here --resume while the run is still going: both would label and
    checkpoint into it) is refused, naming the holder, and the running one keeps its labelled pairs."""
    flags, _ = toy
    longer = [*flags, *PBPO[1:], "--episodes=500", f"--out_dir={tmp_path}"]
    first = subprocess.Popen(command("train_pbpo.py", *longer), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not os.path.exists(tmp_path / "preferences.jsonl") and time.time() < deadline:
            time.sleep(0.1)
        second = run("train_pbpo.py", *longer, "--resume", ok=False)
        assert first.poll() is None, "the first run ended before the second was tried"
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"{tmp_path} is in use by pid {first.pid} on " in second.stderr.strip().splitlines()[-1]
        time.sleep(3)  # the first run goes on labelling
        assert len(data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records) >= 8
    finally:
        first.kill()
        first.wait()


def test_stopped_runs_say_where_they_resume_leave_no_tmp_and_resume_without_their_log(toy, tmp_path):
    """Ctrl-C before the first checkpoint and SIGTERM after one: one line each, no .tmp file. The second run resumes
    with its metrics.jsonl deleted: the log restarts from there, never padded with NUL bytes."""
    flags, _ = toy
    for sig, out, wait_for in ((signal.SIGINT, tmp_path / "a", "metrics.jsonl"), (signal.SIGTERM, tmp_path / "b", R.CHECKPOINT)):
        proc = subprocess.Popen(command("train_pbpo.py", *flags, *PBPO[1:], "--episodes=3", f"--out_dir={out}"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,  # SIGINT as in a terminal,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even under nohup ... &
        while not os.path.exists(out / wait_for) and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        where = (f"stopped; --resume continues from {out / R.CHECKPOINT}" if sig == signal.SIGTERM else
                 "stopped; no checkpoint yet, --resume starts over")
        assert proc.returncode != 0 and "Traceback" not in err and err.strip().splitlines()[-1] == f"train_pbpo.py: {where}"
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    os.remove(tmp_path / "b" / "metrics.jsonl")
    proc = run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=3", f"--out_dir={tmp_path / 'b'}", "--resume")
    assert "metrics.jsonl is shorter than its checkpoint saw (0 <" in proc.stdout
    log = open(tmp_path / "b" / "metrics.jsonl", "rb").read()
    assert b"\0" not in log and metrics(tmp_path / "b")[-1]["kind"] == "final_eval"
    records = data.PreferenceStore(os.path.join(tmp_path / "b", "preferences.jsonl")).records
    assert [r["episode"] for r in records] == [1] * 8 + [2] * 8 + [3] * 8


# ---------------------------------------------------------------------------- inputs as users have them
def test_responses_end_on_every_eos_id_of_generation_config(toy, tmp_path):
    """An instruct checkpoint ends a turn on more than one token: generation_config.json lists them. The sampler
    stops on any of them in training (here the 3 tokens the toy policy writes most, besides its EOS)."""
    flags, t = toy
    tok, policy = data.load_tokenizer(t.model), M.from_pretrained(t.model)
    prompts = [p["prompt_ids"] for p in data.load_prompts(t.train, tok, 256)]
    written = collections.Counter(x for y in M.sample(policy, prompts, 16, 1.0, n=4, eos_ids=[tok.eos_token_id]) for x in y)
    extra = [x for x, _ in written.most_common(4) if x != tok.eos_token_id][:3]
    shutil.copytree(t.model, tmp_path / "model")
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, *extra]}))
    assert M.stop_ids(str(tmp_path / "model"), tok) == sorted({tok.eos_token_id, *extra})
    assert M.stop_ids(t.model, tok) == [tok.eos_token_id]  # no generation_config.json: config.json's, the same
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--model={tmp_path / 'model'}", f"--out_dir={tmp_path / 'out'}")
    responses = [r[k] for r in data.PreferenceStore(os.path.join(tmp_path / "out", "preferences.jsonl")).records
                 for k in ("response0_ids", "response1_ids")]
    assert not [y for y in responses if set(y[:-1]) & set(extra)]  # nothing after the first stop id
    assert sum(y[-1] in extra for y in responses) >= 2  # and responses did stop there


def reward_model(path, tok_dir, nan=False):
    """A real HF sequence-classification checkpoint; nan=True: one whose scores are NaN, an oracle gone wrong."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config)
    if nan:
        with torch.no_grad():
            rm.score.weight.fill_(float("nan"))
    rm.save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)


def test_oracle_returning_nan_names_the_pair_and_keeps_the_store(toy, tmp_path):
    flags, t = toy
    oracle, out = f"--oracle=rm:{tmp_path / 'rm'}", f"--out_dir={tmp_path / 'out'}"
    reward_model(tmp_path / "rm", t.model)
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", oracle, out)
    reward_model(tmp_path / "rm", t.model, nan=True)  # the same oracle goes wrong between two episodes
    proc = run("train_pbpo.py", *flags, *PBPO, oracle, out, "--resume", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "oracle returned nan for pair item 0" in proc.stderr
    assert len(data.PreferenceStore(os.path.join(tmp_path / "out", "preferences.jsonl")).records) == 8


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={tmp_path}")
    size = os.path.getsize(tmp_path / R.CHECKPOINT)

    def small_disk():  # files may grow to half a checkpoint: the write of the next one fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = subprocess.run(command("train_pbpo.py", *flags, *PBPO, f"--out_dir={tmp_path}", "--resume"), cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the previous checkpoint is intact" in proc.stderr
    assert R.read_checkpoint(str(tmp_path / R.CHECKPOINT), tensors=False)["episode"] == 1
    assert not os.path.exists(tmp_path / f"{R.CHECKPOINT}.tmp")
    assert len(data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records) == 16  # episode 2's pairs kept
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={tmp_path}", "--resume")  # space again: it continues
    assert [r["episode"] for r in data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records] == [1] * 8 + [2] * 8


# ---------------------------------------------------------------------------- distributed faults
def test_a_dead_rank_takes_the_job_down_and_the_checkpoint_survives(toy, tmp_path):
    flags, _ = toy
    proc = subprocess.Popen(command("train_pbpo.py", *flags, *PBPO[1:], "--episodes=50", "--dist_timeout=60",
                                    f"--out_dir={tmp_path}", ranks=2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not os.path.exists(tmp_path / R.CHECKPOINT) and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and b"train_pbpo.py" in open(f"/proc/{p}/cmdline", "rb").read()
               and b"LOCAL_RANK=1" in open(f"/proc/{p}/environ", "rb").read().split(b"\0")]
    assert workers, "rank 1 not found"
    os.kill(workers[0], signal.SIGKILL)
    started = time.time()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.time() - started < 120, out[-3000:]
    assert "train_pbpo.py FAILED" in out or "ChildFailedError" in out, out[-3000:]
    assert R.read_checkpoint(str(tmp_path / R.CHECKPOINT))["episode"] >= 1

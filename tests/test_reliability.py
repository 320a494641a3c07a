"""Reliability: runs killed at random points resume to the same result, bad input gets one clear
message (the table in tests/bad_input_cases.py), NaN/inf never trains silently, a full disk or a
dead rank leaves the last good checkpoint intact; a run directory is one run's (a lock, its flags),
its checkpoint runs no code and is refused when corrupt, what was labelled is never wiped."""
import collections
import json
import os
import random
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from bad_input_cases import BASE_RUNS, CASES
from conftest import PBPO, ROOT, SELM, command, metrics, run, wait_for_lines, without_timings
from safetensors.torch import load_file, save_file

import data
import model as M
import checkpoint as C
import run as R
from reward import Oracle

TRACES = (C.CHECKPOINT, "preferences.jsonl", "metrics.jsonl")


def killed_then_resumed(script, flags, out, events, leftovers=lambda: None):
    """SIGKILL the run at each event, (file, n): the moment out/file has n lines (a metrics line, a
    checkpoint write), plus a random few ms; restart it with --resume as a user would after a
    preemption, and let the last restart finish. leftovers() runs before it."""
    rng = random.Random(0)
    for name, lines in events:
        resume = ["--resume"] if any(os.path.exists(os.path.join(out, f)) for f in TRACES) else []
        proc = subprocess.Popen(command(script, *flags, f"--out_dir={out}", *resume), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_lines(os.path.join(out, name), lines, proc)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers()
    return run(script, *flags, f"--out_dir={out}", "--resume")


def same_weights(a, b):
    a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pbpo_killed_at_random_points_resumes_to_the_same_result(toy, tmp_path):
    flags, _ = toy
    full, part = tmp_path / "full", tmp_path / "part"
    run("train_pbpo.py", *flags, *PBPO, f"--out_dir={full}")

    # what a kill leaves that timing may not hit: half a checkpoint write, a torn store line
    def leftovers():
        (part / f"{C.CHECKPOINT}.tmp").write_bytes(b"\x10\x00\x00\x00 half a checkpoint")
        with open(part / "preferences.jsonl", "ab") as f:
            f.write(b'{"episode": 2, "prompt": "Tom has')

    # mid-episode 1 (labelled, no checkpoint yet), right after checkpoint 1, mid-episode 2 (metrics
    # lines: sft_eval, explore, 2 steps, episode per episode)
    events = [("metrics.jsonl", 2), (C.HISTORY, 1), ("metrics.jsonl", 7)]
    killed_then_resumed("train_pbpo.py", [*flags, *PBPO], part, events, leftovers)
    assert without_timings(metrics(part)) == without_timings(metrics(full))
    store, ref = (data.PreferenceStore(os.path.join(d, "preferences.jsonl")).records
                  for d in (part, full))
    assert store == ref and len(store) == 16  # nothing lost, nothing twice
    dropped = data.PreferenceStore(os.path.join(part, "preferences.dropped.jsonl")).records
    # set aside, never deleted, and labelled again alike
    assert dropped and all(r in ref for r in dropped)
    assert same_weights(part, full)


def test_selm_killed_at_random_points_resumes_to_the_same_result(toy, tmp_path):
    flags, t = toy
    flags = [f.replace("--prompts=", "--prefs=").replace(t.train, t.prefs) for f in flags]
    flags += [*SELM, "--iterations=2", "--max_pairs=16"]
    run("train_selm.py", *flags, f"--out_dir={tmp_path / 'full'}")
    # metrics lines: sft_eval, 2 steps, iteration per iteration
    events = [("metrics.jsonl", 2), (C.HISTORY, 1), ("metrics.jsonl", 6)]
    killed_then_resumed("train_selm.py", flags, tmp_path / "part", events)
    part, full = (without_timings(metrics(tmp_path / d)) for d in ("part", "full"))
    assert part == full
    assert same_weights(tmp_path / "part", tmp_path / "full")


def test_resume_on_fewer_ranks_keeps_every_pair_once(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={tmp_path}", ranks=2)
    # a resume refused on rank 0 (a store line that is no record) stops every rank with its one line
    store = tmp_path / "preferences.jsonl"
    lines = store.read_bytes()
    store.write_bytes(lines + b"[1, 2]\n")
    proc = run("train_pbpo.py", *flags, *PBPO, f"--out_dir={tmp_path}", "--resume", ranks=2,
               ok=False)
    # the ranks' lines, then torchrun's own report: one line each, no traceback of ours
    ranks = [line for line in proc.stderr.splitlines() if "train_pbpo.py: error: " in line]
    assert proc.returncode != 0 and proc.stderr.count("train_pbpo.py: error: ") == 2, proc.stderr
    assert len(ranks) == 2, proc.stderr[-3000:]  # each its own line
    assert 'train_pbpo.py", line' not in proc.stderr, proc.stderr[-3000:]  # torchrun's, not ours
    for line in ranks:
        assert "preferences.jsonl:9: expected a preference record" in line, line
    store.write_bytes(lines)
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
    question = "Tom has 5 pens and buys 3. How many pens does Tom have now?"
    same.write_text(2 * (json.dumps({"question": question, "answer": "8"}) + "\n"))
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--prompts={same}",
        f"--out_dir={tmp_path / 'ranks'}", ranks=2)
    records = data.PreferenceStore(os.path.join(tmp_path / "ranks", "preferences.jsonl")).records
    by_rank = [[r["response1_ids"] for r in records[i * 4:(i + 1) * 4]] for i in range(2)]
    assert by_rank[0] != by_rank[1]


# ---------------------------------------------------------------------------- numerical guards
def test_nonfinite_update_is_skipped_and_logged_and_divergence_ends_in_an_error(toy, tmp_path):
    """lr 1e30: leader step 0 is finite and blows the weights up (logged as diverged: it cannot be
    undone), later steps' gradients are NaN or inf (skipped). The run goes on
    (--on_nonfinite=skip), then exits with an error."""
    flags, _ = toy
    proc = run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--t_out=3", "--lr=1e30",
               f"--out_dir={tmp_path}", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"the policy diverged \(‖θ‖ = \S+, ‖θ⁰‖ = [\d.]+\) at episode 1, leader step "
                     r"0; it was trained and exported all the same \(--on_nonfinite=skip\)",
                     proc.stderr.strip().splitlines()[-1])
    bad = [r for r in metrics(tmp_path) if r["kind"] == "nonfinite"]
    assert (bad[0]["what"], bad[0]["step"]) == ("policy weights", 0)
    assert bad[1:] and all(r["what"] == "policy gradient" and r["episode"] == 1 for r in bad[1:])
    assert {r["step"] for r in bad[1:]} <= {1, 2}
    assert os.path.exists(tmp_path / "final" / "model.safetensors")
    # the checkpoint holds the diverged policy: resumed, it is still an error
    proc = run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=2", "--t_out=3", "--lr=1e30",
               f"--out_dir={tmp_path}", "--resume", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_divergence_with_stop_ends_the_run_and_keeps_what_was_labelled(toy, tmp_path):
    """lr 1e6 (finite gradients, weights driven far from the start): with --on_nonfinite=stop the
    step that diverges ends the run, naming it; episode 1's labelled pairs stay in the store. SELM
    does the same."""
    flags, t = toy
    proc = run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--t_out=3", "--lr=1e6",
               "--on_nonfinite=stop", f"--out_dir={tmp_path / 'out'}", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"the policy diverged \(‖θ‖ = [\d.e+]+, ‖θ⁰‖ = [\d.]+\) at episode 1, "
                     r"leader step 0; stopped \(--on_nonfinite=stop\), no checkpoint yet",
                     proc.stderr), proc.stderr[-2000:]
    bad = [(r["episode"], r["step"], r["what"]) for r in metrics(tmp_path / "out")
           if r["kind"] == "nonfinite"]
    assert bad == [(1, 0, "policy weights")]
    store = data.PreferenceStore(os.path.join(tmp_path / "out", "preferences.jsonl"))
    assert len(store.records) == 8
    selm = [f.replace("--prompts=", "--prefs=").replace(t.train, t.prefs) for f in flags]
    proc = run("train_selm.py", *selm, *SELM, "--max_pairs=8", "--lr=1e6",
               f"--out_dir={tmp_path / 'selm'}", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the policy diverged (‖θ‖ = " in proc.stderr, proc.stderr[-2000:]
    assert "at iteration 1, step 0" in proc.stderr, proc.stderr[-2000:]
    bad = [r["what"] for r in metrics(tmp_path / "selm") if r["kind"] == "nonfinite"]
    assert bad == ["policy weights"]


# ---------------------------------------------------------------------------- bad input
class Payload:
    """Unpickling this runs code: it creates the file named."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def fill(text, places):
    """text with each {name} of places (a path) written out."""
    for name, path in places.items():
        text = text.replace("{" + name + "}", path)
    return text


def edit_json(path, key, value):
    config = json.loads(open(path).read()) if os.path.exists(path) else {}
    config[key] = value
    open(path, "w").write(json.dumps(config))


def edit_weights(folder, name, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = edit(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def edit_lines(path, what, args):
    """A JSONL file edited line by line; line numbers count from 1, as error messages do."""
    lines = open(path).read().splitlines(keepends=True)
    if what == "keep_lines":
        lines = lines[:args[0]]
    elif what == "drop_last_line":
        lines = lines[:-1]
    elif what == "append_line":
        lines.append(args[0] + "\n")
    elif what == "insert_line":
        lines.insert(args[0] - 1, args[1] + "\n")
    elif what == "flip_label":
        record = json.loads(lines[args[0] - 1])
        if "label" in record:
            record["label"] = 1 - record["label"]
        else:
            record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
        lines[args[0] - 1] = json.dumps(record) + "\n"
    elif what == "no_answer":
        question = json.loads(lines[args[0] - 1])["question"]
        lines[args[0] - 1] = json.dumps({"prompt": question}) + "\n"
    else:
        raise ValueError(f"no step {what!r}")
    open(path, "w").write("".join(lines))


def make(step, places):
    """Carry out one setup step of a bad-input case (tests/bad_input_cases.py lists them)."""
    what, path, *args = [fill(a, places) if isinstance(a, str) else a for a in step]
    if what == "copy" and os.path.isdir(path):
        shutil.copytree(path, args[0])
    elif what == "copy":
        shutil.copyfile(path, args[0])
    elif what == "mkdir":
        os.makedirs(path)
    elif what == "write":
        open(path, "wb").write(args[0].encode() if isinstance(args[0], str) else args[0])
    elif what == "set_json":
        edit_json(path, *args)
    elif what == "remove":
        os.remove(path)
    elif what == "rename":
        os.rename(path, args[0])
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "link":
        if os.path.exists(path):
            os.remove(path)
        os.symlink(args[0], path)
    elif what == "halve":
        os.truncate(path, os.path.getsize(path) // 2)
    elif what == "flip_bytes":  # 4 bytes inside the tensor data
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:-100] + bytes(b ^ 0xFF for b in raw[-100:-96]) + raw[-96:])
    elif what == "random_bytes":
        open(path, "wb").write(random.Random(0).randbytes(os.path.getsize(path)))
    elif what == "weights":
        changes = {"nan": lambda w: w * float("nan"), "bool": lambda w: w > 0,
                   "int8": lambda w: w.to(torch.int8), "grown": lambda w: w * 1.01}
        edit_weights(path, args[0], changes[args[1]])
    elif what == "vocab":  # config.json and the weights agree on fewer tokens than the tokenizer
        edit_json(os.path.join(path, "config.json"), "vocab_size", args[0])
        edit_weights(path, "model.embed_tokens.weight", lambda w: w[:args[0]].clone())
    elif what == "swap_ids":
        tokenizer = json.loads(open(os.path.join(path, "tokenizer.json")).read())
        vocab = tokenizer["model"]["vocab"]
        (a, i), (b, j) = sorted(vocab.items(), key=lambda kv: kv[1])[-2:]
        vocab[a], vocab[b] = j, i
        open(os.path.join(path, "tokenizer.json"), "w").write(json.dumps(tokenizer))
    elif what == "pickle":
        torch.save(Payload(args[0]), path)
    elif what == "document":
        save_file({}, path, metadata={"state": args[0], "sha256": C._checksum(args[0], {})})
    else:
        edit_lines(path, what, args)


def snapshot(path):
    """What is at path: {file: bytes} of a directory tree (a lock's holder line apart, FIFOs
    skipped: reading one never ends), a file's bytes, or None where there is nothing."""
    if os.path.isfile(path):
        return open(path, "rb").read()
    if not os.path.isdir(path):
        return None
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            file = os.path.join(folder, name)
            if os.path.isfile(file) and name == "lock":
                found[os.path.relpath(file, path)] = b""
            elif os.path.isfile(file):
                found[os.path.relpath(file, path)] = open(file, "rb").read()
    return found


def run_in_this_fork(script, flags, stderr_path):
    """The child's side of run_forked: `python script flags` as a user types it, its `__main__`
    block unchanged, in a process that imported torch and transformers before the fork. Never
    returns."""
    code = 1
    try:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(stderr_path, "w")
        os.dup2(sys.stderr.fileno(), 2)  # what C code writes too
        sys.argv = [script, *flags]
        os.chdir(ROOT)
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        code = 0
    except SystemExit as e:  # argparse's refusals: exit 2
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the script's own hook: its one line
    finally:
        sys.stderr.flush()
        os._exit(code)


def run_forked(jobs, folder, at_once=2, timeout=120):
    """[(exit code, stderr)] of each (script, flags), two at a time, each in a fork of this
    process: a new interpreter would spend seconds importing torch and transformers before it
    reached the input it refuses."""
    results = [None] * len(jobs)
    running = {}  # pid: (job, its stderr file, when it started)
    todo = list(enumerate(jobs))
    while todo or running:
        if todo and len(running) < at_once:
            i, (script, flags) = todo.pop(0)
            stderr_path = os.path.join(folder, f"stderr{i}.txt")
            pid = os.fork()
            if pid == 0:
                run_in_this_fork(script, flags, stderr_path)
            running[pid] = (i, stderr_path, time.time())
            continue
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, (i, _, started) in running.items():
                if time.time() - started > timeout:
                    os.kill(child, signal.SIGKILL)  # reaped on the next round, with its status
            time.sleep(0.01)
            continue
        i, stderr_path, _ = running.pop(pid)
        results[i] = (os.waitstatus_to_exitcode(status), open(stderr_path).read())
    return results


def test_bad_inputs_give_one_clear_message(toy, tmp_path):
    """Each case of tests/bad_input_cases.py exits non-zero with its one message, before any
    oracle call, leaving what it names unchanged on disk: a run directory it was pointed at as it
    was, a fresh one with at most its lock."""
    flags, t = toy
    places = {"tmp": str(tmp_path), "model": t.model, "train": t.train, "heldout": t.heldout,
              "prefs": t.prefs}
    flag_sets = {"{toy}": flags, "{PBPO}": PBPO, "{SELM}": SELM}

    def command_line(text):  # -> (script, flags)
        words = [w for word in text.split() for w in flag_sets.get(word, [fill(word, places)])]
        return words[0], words[1:]

    for base in BASE_RUNS:
        for step in base.setup:
            make(step, places)
        script, base_flags = command_line(base.command)
        run(script, *base_flags, f"--out_dir={fill(base.out_dir, places)}")
    for case in CASES:
        for step in case.setup:
            make(step, places)
    assert len(CASES) >= 99 and len({case.name for case in CASES}) == len(CASES)
    jobs, kept = [], []
    for case in CASES:
        script, case_flags = command_line(case.command)
        given = [f.split("=", 1)[1] for f in case_flags if f.startswith("--out_dir=")]
        out_dir = given[-1] if given else str(tmp_path / "out" / re.sub(r"\W+", "_", case.name))
        if not given and script != "eval.py":
            case_flags.append(f"--out_dir={out_dir}")
        jobs.append((script, case_flags))
        kept.append([fill(path, {**places, "out_dir": out_dir}) for path in case.unchanged])
    before = [[snapshot(path) for path in paths] for paths in kept]
    (tmp_path / "stderr").mkdir()
    failures = []
    for case, paths, was, (code, stderr) in zip(CASES, kept, before,
                                                run_forked(jobs, tmp_path / "stderr")):
        message = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        print(f"{case.name:40} {message}")  # the table for the notes: pytest -s
        expected = fill(case.expect, places)
        if code == 0 or expected not in message or "Traceback" in stderr:
            failures.append(f"{case.name}: rc={code}, last stderr line {message!r}, "
                            f"expected {expected!r}")
        for path, then in zip(paths, was):
            now = snapshot(path)
            fresh_lock = then is None and isinstance(now, dict) and set(now) <= {"lock"}
            if now != then and not fresh_lock:  # nothing lost, nothing left behind
                failures.append(f"{case.name}: {path} changed: {describe(then)} -> {describe(now)}")
    assert not failures, "\n".join(failures)


def describe(found):
    """What snapshot found, for a failure message."""
    if isinstance(found, dict):
        return sorted(found)
    return "nothing" if found is None else f"a file of {len(found)} bytes"


# ------------------------------------------------------------------ checkpoints and run directories
def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"policy": Payload(marker)}, tmp_path / "payload")
    # the payload is live: unpickling it runs it
    torch.load(tmp_path / "payload", weights_only=False)
    assert marker.exists()
    marker.unlink()
    for load in (lambda p: C.read_checkpoint(p), lambda p: C.read_checkpoint(p, tensors=False),
                 lambda p: C.load(p, {})):
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
    extra = {"rows": [rows[0], rows[1]],
             "nested": {"a": [1, 2.5, None, "x", True], "b": {"c": torch.tensor(7)}},
             "bf16": torch.randn(4).bfloat16(), "empty": [], "pair": (1, 2), "inf": float("inf")}
    path = str(tmp_path / C.CHECKPOINT)
    C.save(path, {"model": (model, opt)}, **extra)
    copy = tied()
    copy_opt = torch.optim.AdamW(copy.parameters(), lr=1e-3)
    out = C.load(path, {"model": (copy, copy_opt)})
    pairs = zip(model.state_dict().values(), copy.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    state, copy_state = opt.state_dict()["state"], copy_opt.state_dict()["state"]
    assert all(torch.equal(state[i][k], copy_state[i][k]) for i in state for k in state[i])
    assert copy_opt.param_groups[0]["betas"] == [0.8, 0.9]  # tuples come back as lists
    assert [torch.equal(a, b) for a, b in zip(out["rows"], extra["rows"])] == [True, True]
    assert out["nested"]["a"] == [1, 2.5, None, "x", True]
    assert out["nested"]["b"]["c"].item() == 7
    assert out["bf16"].dtype == torch.bfloat16 and torch.equal(out["bf16"], extra["bf16"])
    assert out["empty"] == [] and out["pair"] == [1, 2] and out["inf"] == float("inf")
    assert out["script"]
    assert sorted(os.listdir(tmp_path)) == sorted([C.CHECKPOINT, C.HISTORY])  # no temp file left
    raw = bytearray(open(path, "rb").read())
    # the string "x" in the JSON document: the header still parses, the sum differs
    at = raw.index(b'\\"x\\"')
    raw[at + 2] = ord("y")
    open(path, "wb").write(raw)
    try:
        C.load(path, {})
    except ValueError as e:
        assert "checksum mismatch" in str(e)
    else:
        raise AssertionError("a changed checkpoint was loaded")


@dataclass
class Flags:
    on: bool = False  # a bool flag


def test_bool_flags_take_the_usual_spellings():
    for text, value in [("on", True), ("yes", True), ("TRUE", True), ("1", True), ("off", False),
                        ("no", False), ("False", False), ("0", False)]:
        assert R.parse_flags(Flags, "", [f"--on={text}"]).on is value, text
    assert R.parse_flags(Flags, "", ["--on"]).on is True
    assert R.parse_flags(Flags, "", []).on is False


def test_a_percent_sign_in_a_flag_comment_is_help_text_not_a_format(capsys):
    @dataclass
    class Knobs:
        rate: float = R.knob(0.5, "guess on 97% / 90% of problems")

    with pytest.raises(SystemExit) as stop:
        R.parse_flags(Knobs, "doc", ["--help"])
    assert stop.value.code == 0 and "guess on 97% / 90% of problems" in capsys.readouterr().out


def test_metrics_log_is_strict_json(tmp_path):
    """A NaN metric (a correlation of constants, a spread of one value) is written as null, which
    every JSON reader takes; `json.dumps` alone would write NaN."""
    log = R.MetricsLog(str(tmp_path / "metrics.jsonl"), True, Oracle(None))
    log.write(kind="step", rm_gold_corr=float("nan"), kl=float("inf"), gold=0.5, n=3)
    line = open(tmp_path / "metrics.jsonl").read()
    strict = json.loads(line, parse_constant=lambda c: 1 / 0)
    assert strict == {"kind": "step", "oracle_calls": 0, "rm_gold_corr": None, "kl": None,
                      "gold": 0.5, "n": 3}


def test_selm_batch_not_a_multiple_of_the_ranks_is_refused(toy, tmp_path):
    flags, _ = toy
    proc = run("train_selm.py", *flags, "--batch_size=3", f"--out_dir={tmp_path}", ranks=2,
               ok=False)
    assert proc.returncode != 0
    assert "--batch_size=3 must be a multiple of the world size 2" in proc.stderr


def test_one_run_in_a_directory_at_a_time(toy, tmp_path):
    """A second run in a directory in use (here --resume while the run is still going: both would
    label and checkpoint into it) is refused, naming the holder, and the running one keeps its
    labelled pairs."""
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
        refusal = second.stderr.strip().splitlines()[-1]
        assert f"{tmp_path} is in use by pid {first.pid} on " in refusal
        time.sleep(3)  # the first run goes on labelling
        store = data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl"))
        assert len(store.records) >= 8
    finally:
        first.kill()
        first.wait()


# a terminal's: pytest itself may run with SIGINT and SIGHUP ignored (nohup ... &)
def default_signals():
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def test_stopped_runs_say_where_they_resume_leave_no_tmp_and_resume_without_their_log(toy,
                                                                                      tmp_path):
    """Ctrl-C (three times, as an impatient user does) before the first checkpoint, SIGTERM and
    SIGHUP (a closed terminal) after one: one line each, no traceback, no .tmp file. The second run
    resumes with its metrics.jsonl deleted: the log restarts from there, never padded with NUL
    bytes."""
    flags, _ = toy
    cases = ((signal.SIGINT, tmp_path / "a", "metrics.jsonl"),
             (signal.SIGTERM, tmp_path / "b", C.CHECKPOINT),
             (signal.SIGHUP, tmp_path / "c", C.CHECKPOINT))
    for sig, out, wait_for in cases:
        argv = command("train_pbpo.py", *flags, *PBPO[1:], "--episodes=3", f"--out_dir={out}")
        # SIGINT as in a terminal, even under nohup ... &
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, preexec_fn=default_signals)
        while not os.path.exists(out / wait_for) and proc.poll() is None:
            time.sleep(0.02)
        for _ in range(3 if sig == signal.SIGINT else 1):
            proc.send_signal(sig)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=120)
        where = (f"stopped; --resume continues from {out / C.CHECKPOINT}" if sig != signal.SIGINT
                 else "stopped; no checkpoint yet, --resume starts over")
        assert proc.returncode != 0, err[-3000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
        assert err.strip().splitlines()[-1] == f"train_pbpo.py: {where}"
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    os.remove(tmp_path / "b" / "metrics.jsonl")
    proc = run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=3", f"--out_dir={tmp_path / 'b'}",
               "--resume")
    assert "metrics.jsonl is shorter than its checkpoint saw (0 <" in proc.stdout
    log = open(tmp_path / "b" / "metrics.jsonl", "rb").read()
    assert b"\0" not in log and metrics(tmp_path / "b")[-1]["kind"] == "final_eval"
    records = data.PreferenceStore(os.path.join(tmp_path / "b", "preferences.jsonl")).records
    assert [r["episode"] for r in records] == [1] * 8 + [2] * 8 + [3] * 8


# ----------------------------------------------------------------------- inputs as users have them
def test_responses_end_on_every_eos_id_of_generation_config(toy, tmp_path):
    """An instruct checkpoint ends a turn on more than one token: generation_config.json lists them.
    The sampler stops on any of them in training (here the 3 tokens the toy policy writes most,
    besides its EOS)."""
    flags, t = toy
    tok, policy = data.load_tokenizer(t.model), M.from_pretrained(t.model)
    prompts = [p["prompt_ids"] for p in data.load_prompts(t.train, tok, 256)]
    samples = M.sample(policy, prompts, 16, 1.0, n=4, eos_ids=[tok.eos_token_id])
    written = collections.Counter(x for y in samples for x in y)
    extra = [x for x, _ in written.most_common(4) if x != tok.eos_token_id][:3]
    shutil.copytree(t.model, tmp_path / "model")
    generation_config = {"eos_token_id": [tok.eos_token_id, *extra]}
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(generation_config))
    assert M.stop_ids(str(tmp_path / "model"), tok) == sorted({tok.eos_token_id, *extra})
    # no generation_config.json: config.json's, the same
    assert M.stop_ids(t.model, tok) == [tok.eos_token_id]
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--model={tmp_path / 'model'}",
        f"--out_dir={tmp_path / 'out'}")
    records = data.PreferenceStore(os.path.join(tmp_path / "out", "preferences.jsonl")).records
    responses = [r[k] for r in records for k in ("response0_ids", "response1_ids")]
    assert not [y for y in responses if set(y[:-1]) & set(extra)]  # nothing after the first stop id
    assert sum(y[-1] in extra for y in responses) >= 2  # and responses did stop there


def reward_model(path, tok_dir, nan=False):
    """A real HF sequence-classification checkpoint; nan=True: one whose scores are NaN, an oracle
    gone wrong."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config)
    if nan:
        with torch.no_grad():
            rm.score.weight.fill_(float("nan"))
    rm.save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)


def test_oracle_returning_nan_names_the_pair_and_a_changed_oracle_is_refused(toy, tmp_path):
    """An oracle gone wrong (NaN scores) stops the run naming the pair, nothing stored for it; the
    same oracle path with other weights between two episodes is another oracle: --resume refuses
    it, the store kept."""
    flags, t = toy
    oracle, out = f"--oracle=rm:{tmp_path / 'rm'}", f"--out_dir={tmp_path / 'out'}"
    reward_model(tmp_path / "nan_rm", t.model, nan=True)
    proc = run("train_pbpo.py", *flags, *PBPO[1:], f"--oracle=rm:{tmp_path / 'nan_rm'}",
               f"--out_dir={tmp_path / 'nan'}", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "oracle returned nan for pair item 0" in proc.stderr
    assert not data.PreferenceStore(os.path.join(tmp_path / "nan", "preferences.jsonl")).records
    reward_model(tmp_path / "rm", t.model)
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", oracle, out)
    reward_model(tmp_path / "rm", t.model, nan=True)  # the same path, another oracle
    proc = run("train_pbpo.py", *flags, *PBPO, oracle, out, "--resume", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--resume: {oracle}: other contents than the run in" in proc.stderr
    store = data.PreferenceStore(os.path.join(tmp_path / "out", "preferences.jsonl"))
    assert len(store.records) == 8


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", f"--out_dir={tmp_path}")
    size = os.path.getsize(tmp_path / C.CHECKPOINT)

    # files may grow to half a checkpoint: the write of the next one fails as on a full disk
    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    resume = command("train_pbpo.py", *flags, *PBPO, f"--out_dir={tmp_path}", "--resume")
    proc = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the previous checkpoint is intact" in proc.stderr
    assert C.read_checkpoint(str(tmp_path / C.CHECKPOINT), tensors=False)["episode"] == 1
    assert not os.path.exists(tmp_path / f"{C.CHECKPOINT}.tmp")
    store = data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl"))
    assert len(store.records) == 16  # episode 2's pairs kept
    # space again: it continues; here on 2 threads, which it says will change the last bits
    proc = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"warning: \S+checkpoint.safetensors was written by torch \S+ on 1 threads, "
                     r"this is torch \S+ on 2: the resumed run will differ from an unbroken one in "
                     r"the last bits", proc.stderr), proc.stderr[-3000:]
    records = data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records
    assert [r["episode"] for r in records] == [1] * 8 + [2] * 8


def test_a_write_past_the_file_size_limit_names_its_file_and_keeps_the_pairs(toy, tmp_path):
    flags, _ = toy

    def small_files():  # a file may not grow past 3000 bytes: a few labelled pairs
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    proc = subprocess.run(command("train_pbpo.py", *flags, *PBPO, f"--out_dir={tmp_path}"),
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    kept = data.PreferenceStore(os.path.join(tmp_path, "preferences.jsonl")).records
    assert proc.stderr.strip().splitlines()[-1] == (
        f"train_pbpo.py: error: {tmp_path / 'preferences.jsonl'}: writing failed (File too large); "
        "earlier lines kept")
    assert kept


# ---------------------------------------------------------------------------- distributed faults
def is_rank_1_of_pbpo(pid):
    """Whether the process is rank 1 of a torchrun job of train_pbpo.py; the environment is read
    only of processes running train_pbpo.py."""
    if b"train_pbpo.py" not in open(f"/proc/{pid}/cmdline", "rb").read():
        return False
    return b"LOCAL_RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")


def test_a_dead_rank_takes_the_job_down_and_the_checkpoint_survives(toy, tmp_path):
    flags, _ = toy
    argv = command("train_pbpo.py", *flags, *PBPO[1:], "--episodes=50", "--dist_timeout=60",
                   f"--out_dir={tmp_path}", ranks=2)
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while not os.path.exists(tmp_path / C.CHECKPOINT) and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and is_rank_1_of_pbpo(p)]
    assert workers, "rank 1 not found"
    os.kill(workers[0], signal.SIGKILL)
    started = time.time()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.time() - started < 120, out[-3000:]
    assert "train_pbpo.py FAILED" in out or "ChildFailedError" in out, out[-3000:]
    assert C.read_checkpoint(str(tmp_path / C.CHECKPOINT))["episode"] >= 1

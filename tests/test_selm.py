"""SELM and iterative DPO (train_selm.py): the objective by hand, the ranking rule, the schedule
against its formula, runs resumed after a kill, and a 2-rank run against the 1-rank run, offline
and online, on the quick toy task.

    python -m pytest -q tests/test_selm.py
"""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SELM, command, metrics, run, without_timings
from safetensors.torch import load_file

import data
import model as M
import toy as T
from checkpoint import read_checkpoint
from ranks import generator, seed_of
from train_selm import best_and_worst, encode_response, load_preferences, selm_loss


def offline(toy):
    """The toy's flags with its preference file in place of its prompt file."""
    flags, t = toy
    return [f.replace("--prompts=", "--prefs=").replace(t.train, t.prefs) for f in flags]


def same_weights(a, b):
    a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (a, b))
    return all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(one, two, sft_model):
    """Two runs' metrics agree (counts exactly, floats to float tolerance) and so do their final
    weights: the difference of their updates from π⁰ is small against the update itself."""
    a, b = metrics(one), metrics(two)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    compared = 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if key.endswith("_s"):
                continue
            if isinstance(value, float):
                assert math.isclose(value, y[key], rel_tol=1e-3, abs_tol=1e-5), (x, key, y[key])
                compared += 1
            else:
                assert value == y[key], (x["kind"], key, value, y[key])
    assert compared > 20
    sft = load_file(os.path.join(sft_model, "model.safetensors"))
    final = [load_file(os.path.join(d, "final", "model.safetensors")) for d in (one, two)]
    norm = lambda tensors: math.sqrt(sum(float((v ** 2).sum()) for v in tensors))
    update = norm(final[0][k] - sft[k] for k in sft)
    assert update > 1e-3  # the runs trained
    assert norm(final[0][k] - final[1][k] for k in sft) < 1e-3 * update


# ---------------------------------------------------------------------------- the objective
def test_selm_loss_by_hand_and_alpha_zero_is_dpo():
    logp = {"chosen": torch.tensor([-3.0, -10.0]), "rejected": torch.tensor([-5.0, -4.0]),
            "ref": torch.tensor([-2.0, -7.0])}
    logp_ref = {"chosen": torch.tensor([-4.0, -9.0]), "rejected": torch.tensor([-4.0, -6.0]),
                "ref": torch.tensor([-2.5, -6.0])}
    beta, alpha = 0.5, 0.2
    # row 0: margin 0.5·((−3+4) − (−5+4)) = 1, optimism 0.2·0.5·(−2+2.5) = 0.05
    # row 1: margin 0.5·((−10+9) − (−4+6)) = −1.5, optimism 0.2·0.5·(−7+6) = −0.1
    expected = ((math.log(1 + math.exp(-1.0)) + 0.05) + (math.log(1 + math.exp(1.5)) - 0.1)) / 2
    loss, margin, optimism = selm_loss(logp, logp_ref, beta, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert margin.tolist() == pytest.approx([1.0, -1.5])
    assert optimism.tolist() == pytest.approx([0.05, -0.1])
    drift = {k: logp[k] - logp_ref[k] for k in logp}
    dpo = -torch.nn.functional.logsigmoid(beta * (drift["chosen"] - drift["rejected"]))
    assert selm_loss(logp, logp_ref, beta, 0.0)[0].item() == pytest.approx(dpo.mean().item(),
                                                                          rel=1e-6)


def test_selm_optimism_gradient_lowers_logp_of_y_ref(toy):
    """With chosen = rejected the DPO term has no gradient; one SGD step on the rest must lower
    logp_θ(y_ref)."""
    _, t = toy
    policy, tok = M.from_pretrained(t.model), data.load_tokenizer(t.model)
    question = "Tom has 5 pens and buys 3. How many pens does Tom have now?"
    prompts = [data.encode_prompt(tok, question)] * 2
    responses = [encode_response(tok, "5 + 3 = 8.\n#### 8"),
                 encode_response(tok, "5 + 3 = 9.\n#### 9")]

    def seq_logp():
        ids, attn, resp = data.collate(prompts, responses, tok.pad_token_id)
        return (M.token_logprobs(policy, ids, attn) * resp).sum(-1)

    with torch.no_grad():
        before = seq_logp()
    logp = seq_logp()
    loss, _, _ = selm_loss({"chosen": logp, "rejected": logp, "ref": logp},
                           {k: before for k in ("chosen", "rejected", "ref")}, 0.1, 1.0)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
        after = seq_logp()
    assert (after < before).all(), (before, after)


def test_ranking_is_argmax_and_argmin_and_a_three_way_tie_keeps_the_files_pair():
    # columns: y_ref, chosen, rejected
    scores = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.0, 1.0], [1.0, 1.0, 0.0],
                           [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    best, worst = best_and_worst(scores)
    # as the SELM code ranks, numpy's argmax and argmin: a tie goes to the first column, y_ref
    some_differ = scores[:-1].numpy()
    assert best[:-1].tolist() == np.argmax(some_differ, 1).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert worst[:-1].tolist() == np.argmin(some_differ, 1).tolist() == [1, 0, 1, 2, 0, 0, 1]
    # all three tie: argmax = argmin = y_ref would be no pair; the file's chosen and rejected stay
    assert (best[-1].item(), worst[-1].item()) == (1, 2)


# ---------------------------------------------------------------------------- offline
@pytest.mark.parametrize("schedule", ["per_iteration", "global"])
def test_selm_runs_and_resumes_after_a_kill_to_the_same_run(toy, tmp_path, schedule):
    """Killed as soon as iteration 1's checkpoint exists, then --resume: the same metrics and bit
    for bit the same weights as the run that never stopped, under either schedule (global carries
    the optimizer and the schedule across the checkpoint, per_iteration starts them afresh)."""
    flags = [*offline(toy), *SELM, "--iterations=2", "--max_pairs=16", f"--schedule={schedule}"]
    out = run("train_selm.py", *flags, f"--out_dir={tmp_path / 'full'}").stdout
    assert "held-out gold accuracy: SFT" in out
    rows = metrics(tmp_path / "full")
    its = [r for r in rows if r["kind"] == "iteration"]
    assert [r["oracle_calls"] for r in its] == [8, 16]  # 8 pairs a part, y_ref scored (the file
    # keeps chosen's and rejected's gold scores)
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_selm.py"), *flags,
                             f"--out_dir={part}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not os.path.exists(part / "checkpoint.safetensors") and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    checkpoint = read_checkpoint(str(part / "checkpoint.safetensors"), tensors=False)
    assert checkpoint["iteration"] == 1  # killed between the iterations: the resume has work left
    run("train_selm.py", *flags, f"--out_dir={part}", "--resume")
    assert without_timings(metrics(part)) == without_timings(rows)
    assert same_weights(part, tmp_path / "full")


def test_each_iteration_is_a_fresh_run_with_its_own_warmup_and_decay(toy, tmp_path):
    """10 pairs an iteration at batch 2: 5 steps. per_iteration: a warm-up over int(0.4·5) = 2
    steps, then linear decay, again in iteration 2 at γ = 0.5 of the peak, from a new AdamW (its
    step count at the end is iteration 2's 5 steps). global: one warm-up over int(0.4·10) = 4 of
    all 10 steps, one decay, the same AdamW throughout (10 steps)."""
    flags = [*offline(toy), *SELM, "--iterations=2", "--max_pairs=20", "--batch_size=2",
             "--micro_batch=2", "--lr=1e-3", "--lr_decay_per_iter=0.5", "--warmup_ratio=0.4"]
    # the lr each step takes, by hand: min((s + 1) / warm-up, (steps − s) / (steps − warm-up))
    # of the peak, the peak halved in iteration 2; and the AdamW steps it has taken at the end
    one_iteration = [1 / 2, 1, 1, 2 / 3, 1 / 3]
    expected = {"per_iteration": (one_iteration + [x / 2 for x in one_iteration], 5),
                "global": ([1 / 4, 2 / 4, 3 / 4, 1, 1] + [x / 2 for x in (5 / 6, 4 / 6, 3 / 6,
                                                                          2 / 6, 1 / 6)], 10)}
    for schedule, (shares, adamw_steps) in expected.items():
        out = tmp_path / schedule
        run("train_selm.py", *flags, f"--schedule={schedule}", f"--out_dir={out}")
        steps = [r for r in metrics(out) if r["kind"] == "step"]
        assert [(r["iteration"], r["step"]) for r in steps] == [(t, s) for t in (1, 2)
                                                                for s in range(5)]
        assert [r["lr"] for r in steps] == pytest.approx([1e-3 * x for x in shares], rel=1e-9)
        adamw = read_checkpoint(str(out / "checkpoint.safetensors"))["policy_opt"]["state"]
        assert {int(p["step"]) for p in adamw.values()} == {adamw_steps}


def test_selm_two_ranks_run_the_same_run_as_one(toy, tmp_path):
    """Offline SELM is keyed by pair and iteration, never by rank: D_t's order, each step's rows
    (split between the ranks), y_ref's seeds (pair j: seed_of(seed, "y_ref", t) + j, sampled at
    temperature 1 here so the seeds matter) and the step count. And every metric is over all
    ranks' rows. So a 2-rank run is the 1-rank run: the same metrics (3 ranking calls a pair),
    the same weights to float tolerance. Iteration 1's y_ref and ranking are those drawn here."""
    _, t = toy
    flags = [*offline(toy), *SELM, "--iterations=2", "--max_pairs=16", "--sample_ref", "--seed=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run("train_selm.py", *flags, f"--out_dir={one}")
    run("train_selm.py", *flags, f"--out_dir={two}", ranks=2)
    assert_same_run(one, two, t.model)
    for out in (one, two):  # π_θ = π_ref at an iteration's start, in the same shapes: no drift
        starts = [r for r in metrics(out) if r["kind"] == "step" and r["step"] == 0]
        assert len(starts) == 2 and all(r[k] == 0.0 for r in starts for k in (
            "drift_chosen", "drift_rejected", "drift_ref", "dpo_margin", "dpo_acc"))
    its = [r for r in metrics(one) if r["kind"] == "iteration"]
    assert [r["oracle_calls"] for r in its] == [8, 16]
    # iteration 1 by hand: D_1 is the first 8 pairs; y_ref of pair j is row j of one draw
    policy, tok = M.from_pretrained(t.model), data.load_tokenizer(t.model)
    d_1 = load_preferences(t.prefs, tok, 256)[:8]
    y_ref = M.sample(policy, [p["prompt_ids"] for p in d_1], 16, 1.0, seed=seed_of(3, "y_ref", 1),
                     eos_ids=M.stop_ids(t.model, tok), pad_id=tok.pad_token_id)
    texts = [data.decode(tok, y) for y in y_ref]
    scores = torch.tensor([[T.gold_reward(response, p["answer"]) for response in
                            (text, p["chosen"], p["rejected"])] for text, p in zip(texts, d_1)])
    best, worst = best_and_worst(scores)
    candidates = [[y, p["chosen_ids"], p["rejected_ids"]] for y, p in zip(y_ref, d_1)]
    mean_len = lambda columns: sum(len(c[j]) for c, j in zip(candidates, columns)) / 8
    assert its[0]["ref_best"] == pytest.approx((best == 0).float().mean().item())
    assert its[0]["len_ref"] == pytest.approx(sum(map(len, y_ref)) / 8)
    assert its[0]["len_chosen"] == pytest.approx(mean_len(best.tolist()))
    assert its[0]["len_rejected"] == pytest.approx(mean_len(worst.tolist()))


def test_the_files_scores_are_used_not_bought_again(toy, tmp_path):
    """The toy's pair file keeps the gold scores that labelled it: a run on it pays 1 call a pair
    (y_ref). The same file without them pays 3 (y_ref, chosen, rejected) and is otherwise the same
    run: the same metrics and weights. Scores by another oracle are not used."""
    _, t = toy
    stripped, other = tmp_path / "stripped.jsonl", tmp_path / "other.jsonl"
    keys = ("score_oracle", "chosen_score", "rejected_score")
    records = [json.loads(line) for line in open(t.prefs)]
    assert all(r["score_oracle"] == "gold" and r["chosen_score"] > r["rejected_score"]
               for r in records)
    stripped.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in keys}) + "\n"
                                for r in records))
    other.write_text("".join(json.dumps({**r, "score_oracle": "rm:elsewhere"}) + "\n"
                             for r in records))
    flags = [*offline(toy), *SELM, "--iterations=2", "--max_pairs=16"]
    outs = {}
    for name, prefs in (("kept", t.prefs), ("stripped", stripped), ("other", other)):
        outs[name] = tmp_path / name
        run("train_selm.py", *flags, f"--prefs={prefs}", f"--out_dir={outs[name]}")
    calls = {name: [r["oracle_calls"] for r in metrics(out) if r["kind"] == "iteration"]
             for name, out in outs.items()}
    assert calls == {"kept": [8, 16], "stripped": [24, 48], "other": [24, 48]}
    drop = lambda rows: [{k: v for k, v in r.items() if k != "oracle_calls" and not
                          k.endswith("_s")} for r in rows]
    assert drop(metrics(outs["kept"])) == drop(metrics(outs["stripped"]))
    assert same_weights(outs["kept"], outs["stripped"])


# ---------------------------------------------------------------------------- online iterative DPO
ONLINE = ["--online", "--online_prompts=8", "--iterations=2", "--batch_size=4", "--micro_batch=4",
          "--max_new_tokens=16", "--eval_max=16"]


@pytest.fixture(scope="module")
def online(toy, tmp_path_factory):
    """An uninterrupted online run on the quick toy (2 iterations of 8 prompts): its out_dir."""
    flags, _ = toy
    out = tmp_path_factory.mktemp("online")
    run("train_selm.py", *flags, *ONLINE, f"--out_dir={out}")
    return out


def online_pairs(out_dir):
    return data.PreferenceStore(os.path.join(out_dir, "preferences.jsonl"), "iteration").records


def test_selm_online_counts_every_oracle_call_and_drops_ties(online):
    rows = metrics(online)
    its = [r for r in rows if r["kind"] == "iteration"]
    # 2 samples scored per drawn prompt, whether or not the pair then ties
    assert [r["oracle_calls"] for r in its] == [2 * 8, 2 * 8 * 2]
    assert all(r["pairs"] + r["ties"] == 8 and r["pairs"] > 0 for r in its)
    assert sum(r["ties"] for r in its) > 0  # the quick toy's samples often tie: some were dropped
    pairs = online_pairs(online)
    assert [sum(p["iteration"] == i for p in pairs) for i in (1, 2)] == [r["pairs"] for r in its]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    # the steps are those of 8 pairs at batch 4, whatever the ties: 2 an iteration
    steps = [(r["iteration"], r["step"]) for r in rows if r["kind"] == "step"]
    assert steps == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_selm_online_pairs_are_the_policys_samples_ranked_by_gold(toy, online):
    """Iteration 1's pairs are π⁰'s two temperature-1 samples of the drawn prompts (the draw and
    the rows keyed as in train_pbpo.py), the gold-better one chosen, ties left out."""
    _, t = toy
    policy, tok = M.from_pretrained(t.model), data.load_tokenizer(t.model)
    prompts = data.load_prompts(t.train, tok, 256)
    picked = torch.randint(len(prompts), (8,), generator=generator(0, "online", 1))
    items = [prompts[i] for i in picked]
    samples = M.sample(policy, [p["prompt_ids"] for p in items], 16, 1.0, n=2,
                       seed=seed_of(0, "pair", 1), eos_ids=M.stop_ids(t.model, tok),
                       pad_id=tok.pad_token_id)
    texts = [data.decode(tok, y) for y in samples]
    expected = []
    for p, a, b in zip(items, texts[0::2], texts[1::2]):
        # the oracle's scores are float32: a tie is a tie there
        ra, rb = torch.tensor([T.gold_reward(a, p["answer"]), T.gold_reward(b, p["answer"])])
        if ra != rb:
            expected.append((p["prompt"], a, b) if ra > rb else (p["prompt"], b, a))
    got = [(r["prompt"], r["chosen"], r["rejected"]) for r in online_pairs(online)
           if r["iteration"] == 1]
    assert got == expected and 0 < len(got) < 8


def test_selm_online_resumes_after_a_kill_to_the_same_run(toy, online, tmp_path):
    flags, _ = toy
    part = tmp_path / "part"
    proc = subprocess.Popen(command("train_selm.py", *flags, *ONLINE, f"--out_dir={part}"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(part / "checkpoint.safetensors") and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()  # SIGKILL as soon as iteration 1's checkpoint exists
    proc.wait()
    assert read_checkpoint(str(part / "checkpoint.safetensors"), tensors=False)["iteration"] == 1
    # as a kill after iteration 2's labelling leaves it: pairs the checkpoint never saw
    store = data.PreferenceStore(str(part / "preferences.jsonl"), "iteration")
    for record in [r for r in online_pairs(online) if r["iteration"] == 2]:
        store.append(record)
    store.close()
    run("train_selm.py", *flags, *ONLINE, f"--out_dir={part}", "--resume")
    assert without_timings(metrics(part)) == without_timings(metrics(online))
    assert online_pairs(part) == online_pairs(online)  # iteration 2's pairs labelled once
    assert same_weights(part, online)


def test_selm_online_two_ranks_run_the_same_run_as_one(toy, online, tmp_path):
    """The same pairs labelled, the same counts, every metric over all ranks' rows, the same
    weights to float tolerance."""
    flags, t = toy
    run("train_selm.py", *flags, *ONLINE, f"--out_dir={tmp_path}", ranks=2)
    assert online_pairs(tmp_path) == online_pairs(online)
    assert_same_run(online, tmp_path, t.model)


def test_selm_online_refuses_an_iteration_of_ties_only(toy, tmp_path):
    flags, _ = toy
    # one token can never hold a '#### N' line: under the exact-match oracle every pair ties
    proc = run("train_selm.py", *flags, *ONLINE, "--oracle=gsm8k", "--max_new_tokens=1",
               f"--out_dir={tmp_path}", ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "train_selm.py: error: iteration 1: all 8 online pairs are ties")

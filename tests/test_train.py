"""The training scripts end to end on a quick toy task: short runs, resume, torchrun with 2 CPU
ranks."""
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import PBPO, ROOT, SELM, command, metrics, run, without_timings
from safetensors.torch import load_file

import data
from run import read_checkpoint

def test_pbpo_runs_and_resumes_to_the_same_result(toy, tmp_path):
    flags, _ = toy
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    out = run("train_pbpo.py", *flags, *PBPO, f"--out_dir={full}").stdout
    assert "held-out gold accuracy: SFT" in out
    rows = metrics(full)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("explore") == 2 and kinds.count("step") == 4 and kinds[-1] == "final_eval"
    explore = [r for r in rows if r["kind"] == "explore"]
    assert [r["pairs"] for r in explore] == [8, 16]
    assert explore[-1]["oracle_calls"] == 32  # 2 responses scored a pair
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
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--level=token", "--n_candidates=1",
        "--adv_coef=0", f"--out_dir={tmp_path}")
    rows = metrics(tmp_path)
    assert rows[-1]["kind"] == "final_eval"
    assert all(r["rm_reward"] == r["rm_reward"] for r in rows if r["kind"] == "step")


# ---------------------------------------------------------------------------- SELM
def test_selm_loss_by_hand_and_alpha_zero_is_dpo():
    from train_selm import selm_loss
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
    import model as M
    from train_selm import selm_loss
    _, t = toy
    policy, tok = M.from_pretrained(t.model), data.load_tokenizer(t.model)
    question = "Tom has 5 pens and buys 3. How many pens does Tom have now?"
    prompts = [data.encode_prompt(tok, question)] * 2
    responses = [data.encode_response(tok, "5 + 3 = 8.\n#### 8"),
                 data.encode_response(tok, "5 + 3 = 9.\n#### 9")]

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


def test_selm_ranking_keeps_best_and_worst_of_three():
    from train_selm import best_and_worst
    # columns: y_ref, chosen, rejected; ties go to the file's chosen (best) and rejected (worst)
    scores = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.0, 1.0], [1.0, 1.0, 1.0],
                           [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    best, worst = best_and_worst(scores)
    assert best.tolist() == [0, 1, 2, 1, 1, 1] and worst.tolist() == [1, 0, 1, 2, 2, 0]
    assert torch.equal(scores.gather(1, best[:, None]).squeeze(1), scores.max(1).values)
    assert torch.equal(scores.gather(1, worst[:, None]).squeeze(1), scores.min(1).values)


def test_selm_one_iteration_runs_and_resumes(toy, tmp_path):
    flags, t = toy
    flags = [f.replace("--prompts=", "--prefs=").replace(t.train, t.prefs) for f in flags]
    started = time.time()
    out = run("train_selm.py", *flags, *SELM, "--iterations=2", "--max_pairs=16",
              f"--out_dir={tmp_path / 'full'}").stdout
    assert "held-out gold accuracy: SFT" in out and time.time() - started < 60
    rows = metrics(tmp_path / "full")
    its = [r for r in rows if r["kind"] == "iteration"]
    # 8 pairs per part, 3 responses ranked per pair
    assert [r["oracle_calls"] for r in its] == [24, 48]
    # SIGKILL as soon as the first checkpoint exists (wherever iteration 2 then is), then --resume
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_selm.py"), *flags, *SELM,
                             "--iterations=2", "--max_pairs=16", f"--out_dir={part}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(part / "checkpoint.safetensors") and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    run("train_selm.py", *flags, *SELM, "--iterations=2", "--max_pairs=16", f"--out_dir={part}",
        "--resume")
    assert without_timings(metrics(part)) == without_timings(rows)
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_selm_torchrun_two_ranks(toy, tmp_path):
    flags, t = toy
    flags = [f.replace("--prompts=", "--prefs=").replace(t.train, t.prefs) for f in flags]
    run("train_selm.py", *flags, *SELM, "--max_pairs=16", f"--out_dir={tmp_path}", ranks=2)
    its = [r for r in metrics(tmp_path) if r["kind"] == "iteration"]
    assert len(its) == 1 and its[0]["oracle_calls"] == 48
    assert os.path.exists(os.path.join(tmp_path, "final", "model.safetensors"))


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
    import model as M
    import toy as T
    from run import generator, seed_of
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
    a = load_file(str(online / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_selm_online_two_ranks_label_the_same_pairs_as_one(toy, online, tmp_path):
    flags, _ = toy
    run("train_selm.py", *flags, *ONLINE, f"--out_dir={tmp_path}", ranks=2)
    assert online_pairs(tmp_path) == online_pairs(online)
    counts = lambda d: [(r["oracle_calls"], r["pairs"], r["ties"]) for r in metrics(d)
                        if r["kind"] == "iteration"]
    assert counts(tmp_path) == counts(online)


def test_selm_online_refuses_an_iteration_of_ties_only(toy, tmp_path):
    flags, _ = toy
    # one token can never hold a '#### N' line: under the exact-match oracle every pair ties
    proc = run("train_selm.py", *flags, *ONLINE, "--oracle=gsm8k", "--max_new_tokens=1",
               f"--out_dir={tmp_path}", ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "train_selm.py: error: iteration 1: all 8 online pairs are ties")

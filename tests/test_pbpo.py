"""PbPO's leader against exact references: the KL folded into the reward has the gradient of
KL(π_θ ‖ π_anchor) on a policy small enough to enumerate every response; the leader's log-probs are the
sampler's; a run on 2 ranks is the run on 1 rank (tests/test_fsdp.py: a 2-rank leader step with different
token counts per rank is the 1-rank step).

    python -m pytest -q tests/test_pbpo.py
"""
import itertools
import math
import os

import pytest
import torch
from conftest import PBPO, metrics, run
from safetensors.torch import load_file

import data
import model as M
from run import read_checkpoint
from train_pbpo import advantages, leader_loss, on_response

V, H, PROMPT = 4, 2, [1, 2, 3]  # vocab, response length, the prompt: V**H responses in all


def tiny_policy(seed):
    cfg = M.ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=V, hidden_size=16,
                                          intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          initializer_range=0.5))
    torch.manual_seed(seed)
    return M.build(cfg)


def every_response(model, temperature):
    """(ids (V**H, 3 + H), attention mask, response mask, log π(y) per token (V**H, 3 + H)) for every y."""
    ids = torch.tensor([PROMPT + list(y) for y in itertools.product(range(V), repeat=H)])
    attn = torch.ones_like(ids, dtype=torch.bool)
    resp = torch.zeros_like(attn)
    resp[:, len(PROMPT):] = True
    return ids, attn, resp, M.token_logprobs(model, ids, attn, temperature) * resp


@pytest.mark.parametrize("level", ["seq", "token"])
def test_folded_kl_gradient_is_the_gradient_of_kl_to_the_anchor(level):
    """E over groups of G = 2 samples of ∇ leader_loss, with r_w = 0 and the KL folded into the reward, equals
    κ ∇_θ KL(π_θ ‖ π_anchor), both computed exactly by enumerating every response and every pair. The k3 estimate
    used directly as a loss, as before, gives the gradient of the other direction: it fails this check."""
    kappa, temperature = 0.3, 0.8
    policy, anchor = tiny_policy(0), tiny_policy(1)
    ids, attn, resp, logp = every_response(policy, temperature)
    with torch.no_grad():
        logp_anchor = every_response(anchor, temperature)[3]
    seq_logp = logp.sum(-1)  # (V**H,) log π_θ(y)
    kl = (seq_logp.exp() * (seq_logp - logp_anchor.sum(-1))).sum()
    params = [p for p in policy.parameters()]
    exact = torch.autograd.grad(kappa * kl, params, retain_graph=True)

    pairs = torch.tensor(list(itertools.product(range(len(ids)), repeat=2))).flatten()  # (2 V^2H,)
    weight = seq_logp.detach().exp()[pairs].view(-1, 2).prod(1)  # P(y_1, y_2) = π(y_1) π(y_2)
    log_ratio = (logp.detach() - logp_anchor)[pairs]  # (2 V^2H, T), constants
    rewards = torch.zeros(len(pairs)) if level == "seq" else torch.zeros(log_ratio.shape)
    advantage = advantages(rewards, log_ratio, resp[pairs], kappa, group=2)  # (2 V^2H, T)
    # leader_loss is linear in the (constant) advantages: weighting them weights each pair's loss
    weighted = advantage * weight.repeat_interleave(2)[:, None]
    estimate = torch.autograd.grad(leader_loss(logp[pairs], weighted, n_samples=2), params,
                                   retain_graph=True)
    flat = lambda grads: torch.cat([g.flatten() for g in grads])
    err = (flat(estimate) - flat(exact)).norm() / flat(exact).norm()
    assert err < 1e-4, err

    delta = logp_anchor - logp  # the old loss: k3 per token, its expectation over π_θ's samples
    k3 = ((delta.exp() - delta - 1) * resp).sum(-1)
    k3_grad = torch.autograd.grad(kappa * (seq_logp.detach().exp() * k3).sum(), params)
    assert (flat(k3_grad) - flat(exact)).norm() / flat(exact).norm() > 0.1


def test_leader_logprobs_at_the_sampling_temperature_are_the_samplers(toy):
    """The leader scores its samples at --temperature: token_logprobs at T ≠ 1 gives back the log-prob the
    sampler recorded for each token it drew, and at T = 1 it does not."""
    _, t = toy
    policy, tok = M.from_pretrained(t.model), data.load_tokenizer(t.model)
    prompts = [p["prompt_ids"] for p in data.load_prompts(t.train, tok, 256)[:6]]
    responses, sampled = M.sample(policy, prompts, 12, temperature=0.7, n=2, seed=3, logprobs=True,
                                  eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    ids, attn, resp = data.collate([p for p in prompts for _ in range(2)], responses, tok.pad_token_id)
    recorded = on_response(sampled, resp)  # (n, T)
    with torch.no_grad():
        at_t, at_1 = (M.token_logprobs(policy, ids, attn, T) * resp for T in (0.7, 1.0))
    assert (recorded - at_t).abs().max() < 1e-4
    assert (recorded - at_1).abs().max() > 1e-2


def test_two_ranks_run_the_same_run_as_one(toy, tmp_path):
    """Prompts and samples are keyed by prompt and row, not by rank, and every loss is normalised by
    counts over all ranks: a 2-rank run at seed s draws the same prompts and responses as a 1-rank
    run, labels the same pairs into one store (each pair once, 2 oracle calls a pair), ends with
    the same Σ and w, and its metrics and final weights agree to float tolerance, although the
    ranks hold different numbers of tokens."""
    flags, t = toy
    one, two = tmp_path / "one", tmp_path / "two"
    run("train_pbpo.py", *flags, *PBPO, "--seed=3", f"--out_dir={one}")
    run("train_pbpo.py", *flags, *PBPO, "--seed=3", f"--out_dir={two}", ranks=2)
    a, b = metrics(one), metrics(two)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    compared = 0
    for x, y in zip(a, b):
        for key, value in x.items():
            if key.endswith(("_s", "_hash")):
                continue
            if isinstance(value, float):
                close = math.isclose(value, y[key], rel_tol=1e-3, abs_tol=1e-5)
                assert close, (x["kind"], key, value, y[key])
                compared += 1
            else:
                assert value == y[key], (x["kind"], key, value, y[key])
    assert compared > 50
    explore = [r for r in b if r["kind"] == "explore"]
    assert [(r["pairs"], r["oracle_calls"]) for r in explore] == [(8, 16), (16, 32)]

    records = [data.PreferenceStore(str(d / "preferences.jsonl")).records for d in (one, two)]
    strip = lambda rs: [(r["response0_ids"], r["response1_ids"], r["label"]) for r in rs]
    assert strip(records[0]) == strip(records[1]) and len(records[1]) == 16
    # Σ and w as rank 0 saved them (rank 1 chose its pairs above with its own Σ: the same)
    saved = [read_checkpoint(str(d / "checkpoint.safetensors")) for d in (one, two)]
    for name in ("sigma", "sigma_inv"):
        torch.testing.assert_close(saved[1]["cov"][name], saved[0]["cov"][name],
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved[1]["w"], saved[0]["w"], rtol=1e-3, atol=1e-5)
    # the weights: what training changed, θ − θ⁰, the same up to float noise (θ⁰: the SFT policy)
    sft = load_file(os.path.join(t.model, "model.safetensors"))
    updates = []
    for d in (one, two):
        final = load_file(str(d / "final" / "model.safetensors"))
        assert final.keys() == sft.keys()
        updates.append(torch.cat([(final[k] - sft[k]).flatten() for k in sorted(sft)]))
    assert (updates[1] - updates[0]).norm() < 1e-2 * updates[0].norm()


def test_health_signals_are_logged(toy, tmp_path):
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--anchor=ref", f"--out_dir={tmp_path}")
    step = [r for r in metrics(tmp_path) if r["kind"] == "step"][-1]
    for key in ("kl_sft", "kl_anchor", "w_norm", "length", "rm_gap", "rm_gap_se", "rm_gold_corr"):
        assert isinstance(step[key], float) and math.isfinite(step[key]), key
    explore = [r for r in metrics(tmp_path) if r["kind"] == "explore"][0]
    assert 0 <= explore["rm_acc_fresh"] <= 1 and explore["new_pairs"] + explore["identical"] == 8

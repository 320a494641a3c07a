"""PbPO's objectives against exact references. The leader: the KL folded into the reward has the
gradient of KL(π_θ ‖ π_anchor) on a policy small enough to enumerate every response; the leader's
log-probs are the sampler's; a run on 2 ranks is the run on 1 rank (tests/test_fsdp.py: a 2-rank
leader step with different token counts per rank is the 1-rank step). The enhancer: its REINFORCE
reward gives the exact gradient of ‖m_x‖_{Σ⁻¹} − κ KL(π̂ ‖ π_ref). The follower: its minimiser at
β > 0 is a direct KKT solve's, at β = 0 the pure adversary, and its step size keeps descent where
the curvature bound is attained; fit_mle reaches the maximum-likelihood head in the ball; the
dual-ascent form ends on the confidence set's boundary, at its constrained minimiser, closer to the
MLE as D grows (and a run of it logs β and the slack).

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
import toy
from checkpoint import read_checkpoint
from explore import Covariance, enhancer_rewards, trajectory_features
from reward import bt_loss
from train_pbpo import (advantages, dual_ascent, fit_mle, follower_loss, follower_step_size,
                        leader_loss, on_response)

V, H, PROMPT = 4, 2, [1, 2, 3]  # vocab, response length, the prompt: V**H responses in all


def tiny_policy(seed):
    cfg = M.model_config(dict(model_type="llama", vocab_size=V, hidden_size=16,
                              intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2,
                              initializer_range=0.5))
    torch.manual_seed(seed)
    return toy.init_weights(M.build(cfg))


def every_response(model, temperature):
    """(ids (V**H, 3 + H), attention mask, response mask, log π(y) per token (V**H, 3 + H)) for
    every y."""
    ids = torch.tensor([PROMPT + list(y) for y in itertools.product(range(V), repeat=H)])
    attn = torch.ones_like(ids, dtype=torch.bool)
    resp = torch.zeros_like(attn)
    resp[:, len(PROMPT):] = True
    return ids, attn, resp, M.token_logprobs(model, ids, attn, temperature) * resp


@pytest.mark.parametrize("level", ["seq", "token"])
def test_folded_kl_gradient_is_the_gradient_of_kl_to_the_anchor(level):
    """E over groups of G = 2 samples of ∇ leader_loss, with r_w = 0 and the KL folded into the
    reward, equals κ ∇_θ KL(π_θ ‖ π_anchor), both computed exactly by enumerating every response and
    every pair. The k3 estimate used directly as a loss, as before, gives the gradient of the other
    direction: it fails this check."""
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
    """The leader scores its samples at --temperature: token_logprobs at T ≠ 1 gives back the
    log-prob the sampler recorded for each token it drew, and at T = 1 it does not."""
    _, t = toy
    policy, tok = M.from_pretrained(t.model), data.load_tokenizer(t.model)
    prompts = [p["prompt_ids"] for p in data.load_prompts(t.train, tok, 256)[:6]]
    responses, sampled = M.sample(policy, prompts, 12, temperature=0.7, n=2, seed=3, logprobs=True,
                                  eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    rows = [p for p in prompts for _ in range(2)]
    ids, attn, resp = data.collate(rows, responses, tok.pad_token_id)
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
    flags = [*flags, "--beta_form=dual", "--beta=0.5"]  # β by dual ascent: β and ŵ alike too
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
    assert compared > 40  # the float metrics of 2 episodes of 2 steps: none skipped unseen
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
    """A run with π_ref as the anchor and β by dual ascent: every health signal is a number; β
    starts at --beta and moves by --dual_lr times each step's logged slack."""
    flags, _ = toy
    run("train_pbpo.py", *flags, *PBPO[1:], "--episodes=1", "--anchor=ref", "--beta_form=dual",
        "--beta=0.5", "--dual_lr=0.01", f"--out_dir={tmp_path}")
    steps = [r for r in metrics(tmp_path) if r["kind"] == "step"]
    for key in ("kl_sft", "w_norm", "length", "rm_gap", "rm_gold_corr", "beta", "slack"):
        assert isinstance(steps[-1][key], float) and math.isfinite(steps[-1][key]), key
    beta = 0.5  # each step logs the β its follower used, then ascends on its slack
    for step in steps:
        assert math.isclose(step["beta"], beta, rel_tol=1e-12), (step, beta)
        beta = max(0.0, beta - 0.01 * step["slack"])
    explore = [r for r in metrics(tmp_path) if r["kind"] == "explore"][0]
    assert 0 <= explore["rm_acc_fresh"] <= 1 and explore["new_pairs"] + explore["identical"] == 8


@pytest.mark.parametrize("level", ["seq", "token"])
def test_enhancer_reward_gives_the_gradient_of_its_objective(level):
    """Every response enumerated, with a fixed feature table φ(y) (at the token level φ_h a function
    of the prefix y_≤h, as the backbone's are): (1) enhancer_rewards on the enumerated samples of π̂
    and π_ref, each weighted by its probability, is ⟨v_x, φ⟩ with v_x = Σ⁻¹ m_x / ‖m_x‖_{Σ⁻¹} from
    the exact m_x; (2) that reward with the KL to π_ref folded in, through advantages (G = 2, every
    pair enumerated) and leader_loss, has the exact gradient of
    −(‖m_x‖_{Σ⁻¹} − κ KL(π̂ ‖ π_ref))."""
    kappa, temperature, d = 0.3, 0.8, 3
    enhancer, ref = tiny_policy(0), tiny_policy(1)
    ids, attn, resp, logp = every_response(enhancer, temperature)
    with torch.no_grad():
        logp_ref = every_response(ref, temperature)[3]
    g = torch.Generator().manual_seed(0)
    if level == "seq":
        phi = torch.randn(len(ids), d, generator=g)  # (V**H, d) φ(y)
    else:
        table = {}  # φ_h by prefix y_≤h
        phi = torch.zeros(*ids.shape, d)  # (V**H, 3 + H, d), zero on the prompt
        for row, y in enumerate(ids[:, len(PROMPT):].tolist()):
            for h in range(H):
                prefix = tuple(y[:h + 1])
                table.setdefault(prefix, torch.randn(d, generator=g))
                phi[row, len(PROMPT) + h] = table[prefix]
    cov = Covariance(d, 0.5)
    cov.update(torch.randn(6, d, generator=g))
    seq_logp = logp.sum(-1)  # (V**H,) log π̂(y)
    p_enh = seq_logp.exp()
    p_ref = logp_ref.sum(-1).exp()
    m = (p_enh - p_ref) @ trajectory_features(phi)  # (d,) the exact m_x = E_π̂ Φ − E_π_ref Φ
    kl = (p_enh * (seq_logp - logp_ref.sum(-1))).sum()
    params = [p for p in enhancer.parameters()]
    objective = (m @ cov.sigma_inv @ m).sqrt() - kappa * kl
    exact = torch.autograd.grad(-objective, params, retain_graph=True)

    n = len(ids)  # response y as one "sample" of weight n π(y): the sample means are expectations
    weight_enh = (n * p_enh.detach()).view(-1, *[1] * (phi.dim() - 1))
    weight_ref = (n * p_ref).view(-1, *[1] * (phi.dim() - 1))
    rewards = enhancer_rewards(cov, phi * weight_enh, phi * weight_ref, group=n, ref_group=n)
    reward = rewards / weight_enh[..., 0]  # (V**H,) or (V**H, T): ⟨v_x, φ⟩ per response
    sigma_inv = torch.linalg.inv(cov.sigma.double())
    m64 = m.detach().double()
    v = sigma_inv @ m64 / (m64 @ sigma_inv @ m64).sqrt()  # (d,)
    torch.testing.assert_close(reward.double(), phi.double() @ v, rtol=1e-4, atol=1e-5)

    pairs = torch.tensor(list(itertools.product(range(n), repeat=2))).flatten()  # (2 n²,)
    pair_weight = p_enh.detach()[pairs].view(-1, 2).prod(1)  # P(y_1, y_2) = π̂(y_1) π̂(y_2)
    log_ratio = (logp.detach() - logp_ref)[pairs]  # (2 n², T), constants
    advantage = advantages(reward[pairs], log_ratio, resp[pairs], kappa, group=2)
    weighted = advantage * pair_weight.repeat_interleave(2)[:, None]
    estimate = torch.autograd.grad(leader_loss(logp[pairs], weighted, n_samples=2), params)
    flat = lambda grads: torch.cat([g.flatten() for g in grads])
    err = (flat(estimate) - flat(exact)).norm() / flat(exact).norm()
    assert err < 1e-4, err


def unit(rows):  # rows on the unit sphere, as --normalize makes the features
    return torch.nn.functional.normalize(rows, dim=-1)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def bt_preferences(n, w_true, g):
    """D from a well-specified linear BT model in float64: unit-norm Φ⁰, Φ¹ and
    o ~ Bernoulli(σ(⟨w*, Φ¹ − Φ⁰⟩))."""
    phi0 = unit(randn(n, len(w_true), g=g))
    phi1 = unit(randn(n, len(w_true), g=g))
    p_win = torch.sigmoid((phi1 - phi0) @ w_true)  # (n,) P(τ¹ ≻ τ⁰)
    return phi0, phi1, (torch.rand(n, generator=g, dtype=torch.float64) < p_win).long()


def signed_differences(phi0, phi1, labels):  # rows x_i = s_i ΔΦ_i: ℓ_i(w) = softplus(−⟨x_i, w⟩)
    return (2.0 * labels - 1.0)[:, None] * (phi1 - phi0)


def direct_minimiser(x, gap_grad, beta, bound):
    """argmin_{‖w‖≤B} ⟨g, w⟩ + β Σ_i softplus(−⟨x_i, w⟩) from its KKT conditions, in float64: damped
    Newton on the objective + μ‖w‖²/2, with μ = 0 when that minimiser lies in the ball, else μ > 0
    found by bisection on ‖w(μ)‖ = B."""
    def newton(mu):
        def objective(w):
            nll = torch.nn.functional.softplus(-(x @ w)).sum()
            return gap_grad @ w + beta * nll + mu * (w @ w) / 2

        w = torch.zeros_like(gap_grad)
        for _ in range(200):
            p = torch.sigmoid(-(x @ w))  # (n,)
            grad = gap_grad - beta * x.T @ p + mu * w
            if grad.norm() < 1e-13:
                break
            hess = beta * (x.T * (p * (1 - p))) @ x + mu * torch.eye(len(w), dtype=w.dtype)
            step = torch.linalg.solve(hess, grad)
            t = 1.0
            while objective(w - t * step) > objective(w) - 0.25 * t * (grad @ step) and t > 1e-12:
                t /= 2
            w = w - t * step
        return w

    w = newton(0.0)
    if w.norm() <= bound:
        return w
    lo, hi = 0.0, 1.0
    while newton(hi).norm() > bound:
        hi *= 2
    for _ in range(60):  # ‖w(μ)‖ falls as μ grows
        mid = (lo + hi) / 2
        if newton(mid).norm() > bound:
            lo = mid
        else:
            hi = mid
    return newton(hi)


def follower_descent(phi0, phi1, labels, phi_pi, phi_ref, beta, bound, steps, w=None, scaled=True):
    """Projected gradient steps on follower_loss over the whole of D, at follower_step_size with
    η_r = 1 (or at η_r = 1 itself, not scaled), from w (default 0) -> (w, F before each step, the
    batch-mean BT loss before the last step)."""
    w = torch.zeros(phi0.shape[1], dtype=phi0.dtype) if w is None else w.clone()
    w.requires_grad_(True)
    eta = follower_step_size(1.0, beta, len(labels)) if scaled else 1.0
    values = []
    for _ in range(steps):
        loss, nll, _ = follower_loss(lambda phi: phi @ w, phi0, phi1, labels, phi_pi, phi_ref,
                                     beta, len(labels))
        grad, = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= eta * grad
            w *= min(1.0, bound / w.norm().item())  # Proj_B
        values.append(loss.item())
    return w.detach(), values, nll.item()


def falls_at_every_step(values):
    return all(b <= a + 1e-12 * abs(a) for a, b in zip(values, values[1:]))


def test_follower_loss_is_the_gap_plus_beta_times_the_summed_likelihood():
    g = torch.Generator().manual_seed(0)
    phi0, phi1, labels = bt_preferences(30, randn(4, g=g), g)
    phi_pi = randn(6, 4, g=g)
    phi_ref = randn(6, 4, g=g)
    w = randn(4, g=g).requires_grad_(True)
    beta, n_pairs = 0.04, 1000  # the batch of 30 stands for a D of 1000
    loss, nll, gap = follower_loss(lambda phi: phi @ w, phi0, phi1, labels, phi_pi, phi_ref,
                                   beta, n_pairs)
    x = signed_differences(phi0, phi1, labels)
    margins = (x @ w).detach()
    mean_nll = sum(math.log1p(math.exp(-t)) for t in margins.tolist()) / 30
    assert math.isclose(nll.item(), mean_nll, rel_tol=1e-12)
    gap_grad = phi_pi.mean(0) - phi_ref.mean(0)
    assert math.isclose(gap.item(), (gap_grad @ w).item(), rel_tol=1e-12)
    assert math.isclose(loss.item(), gap.item() + beta * n_pairs * mean_nll, rel_tol=1e-12)
    grad, = torch.autograd.grad(loss, w)  # ∇F = g − β |D| mean_i σ(−⟨x_i, w⟩) x_i
    torch.testing.assert_close(grad, gap_grad - beta * n_pairs * torch.sigmoid(-margins) @ x / 30)


@pytest.mark.parametrize("beta, bound", [(0.02, 10.0), (0.02, 1.5), (0.2, 10.0)])
def test_follower_minimiser_is_the_direct_solves(beta, bound):
    """Projected gradient on follower_loss at follower_step_size lowers F at every step and ends at
    the KKT solve's minimiser of gap + β ℓ_D on ‖w‖ ≤ B: inside the ball (B = 10), on its sphere
    (B = 1.5)."""
    g = torch.Generator().manual_seed(1)
    phi0, phi1, labels = bt_preferences(200, unit(randn(5, g=g)) * 2, g)
    phi_pi = unit(randn(8, 5, g=g))
    phi_ref = unit(randn(8, 5, g=g))
    w, values, _ = follower_descent(phi0, phi1, labels, phi_pi, phi_ref, beta, bound, steps=3000)
    x = signed_differences(phi0, phi1, labels)
    direct = direct_minimiser(x, phi_pi.mean(0) - phi_ref.mean(0), beta, bound)
    if bound == 10.0:
        assert direct.norm() < bound - 0.5
    else:
        assert math.isclose(direct.norm(), bound, rel_tol=1e-9)
    torch.testing.assert_close(w, direct, rtol=0, atol=1e-7)
    assert falls_at_every_step(values)


def test_follower_step_size_keeps_descent_where_the_curvature_bound_is_attained():
    """Data attaining L = 1: every ΔΦ = 2e (Φ⁰ = −e, Φ¹ = e, unit norm), half the labels each way,
    gap gradient g = ½e. Along e, F(t e) = g t + β |D| log(2 cosh t) + const: curvature β|D| at
    t = 0, minimiser t* = −artanh(g / (β|D|)). At follower_step_size F falls at every step and
    reaches t* for β|D| from 10 to 10⁵; the unscaled step η_r = 1 overshoots (F rises)."""
    n = 100
    e = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    labels = torch.arange(n) % 2
    phi_pi = e[None]
    phi_ref = 0.5 * e[None]  # g = ½ e
    for beta in (0.1, 10.0, 1000.0):
        w, values, _ = follower_descent(-e.repeat(n, 1), e.repeat(n, 1), labels, phi_pi, phi_ref,
                                        beta, 10.0, steps=200)
        assert falls_at_every_step(values), beta
        torch.testing.assert_close(w, -math.atanh(0.5 / (beta * n)) * e, rtol=1e-9, atol=1e-12)
        _, values, _ = follower_descent(-e.repeat(n, 1), e.repeat(n, 1), labels, phi_pi, phi_ref,
                                        beta, 10.0, steps=50, scaled=False)
        assert sum(b > a for a, b in zip(values, values[1:])) > 10, beta


def test_follower_at_beta_zero_is_the_pure_adversary():
    """β = 0: F = gap(w) is linear, its minimiser on ‖w‖ ≤ B is w* = −B g/‖g‖ with
    g = mean Φ(π) − mean Φ(π_ref), and the step is η_r."""
    g = torch.Generator().manual_seed(3)
    phi0, phi1, labels = bt_preferences(50, randn(5, g=g), g)
    phi_pi = unit(randn(8, 5, g=g))
    phi_ref = unit(randn(8, 5, g=g))
    assert follower_step_size(0.7, 0.0, 50) == 0.7
    w, _, _ = follower_descent(phi0, phi1, labels, phi_pi, phi_ref, 0.0, 3.0, steps=100)
    gap_grad = phi_pi.mean(0) - phi_ref.mean(0)
    torch.testing.assert_close(w, -3.0 * gap_grad / gap_grad.norm(), rtol=0, atol=1e-12)


def test_fit_mle_is_the_maximum_likelihood_head_in_the_ball():
    """fit_mle's ŵ is the KKT solve's argmin ℓ_D on ‖w‖ ≤ B, inside the ball and on its sphere, and
    ℓ_D(ŵ) is |D| times the mean BT loss."""
    g = torch.Generator().manual_seed(4)
    phi0, phi1, labels = bt_preferences(300, unit(randn(6, g=g)) * 3, g)
    x = signed_differences(phi0, phi1, labels)
    for bound in (10.0, 1.0):
        w_mle, nll_mle = fit_mle(phi0, phi1, labels, bound)
        direct = direct_minimiser(x, torch.zeros(6, dtype=torch.float64), 1.0, bound)
        if bound == 10.0:
            assert direct.norm() < bound - 0.5
        else:
            assert math.isclose(direct.norm(), bound, rel_tol=1e-9)
        torch.testing.assert_close(w_mle, direct, rtol=0, atol=1e-6)
        nll_sum = 300 * bt_loss(phi0 @ w_mle, phi1 @ w_mle, labels).item()
        assert math.isclose(nll_mle, nll_sum, rel_tol=1e-12)


def test_dual_ascent_keeps_w_in_the_confidence_set_closer_to_the_mle_as_D_grows():
    """The theory's form on a well-specified BT model at d = 8 and a fixed ζ: T_in = 10 follower
    steps, then dual_ascent on β, over and over, end with the constraint active (ℓ_D(w) =
    ℓ_D(ŵ) + ζ to within 1% of ζ), β > 0 and w the Lagrangian's minimiser at that β: w solves
    min gap s.t. ℓ_D(w) ≤ ℓ_D(ŵ) + ζ. Its distance to ŵ falls about as 1/√|D|, for |D| = 10², 10³
    and 10⁴."""
    assert dual_ascent(0.1, 1.0, lr=0.5) == 0.0  # inside the set, slack 1: 0.1 − 0.5 < 0
    assert math.isclose(dual_ascent(0.1, -3.0, lr=0.5), 1.6)  # outside by 3 nats: β rises
    g = torch.Generator().manual_seed(5)
    bound = 10.0
    width = 0.25 * 8 * math.log(1 + 3)  # ζ_k = c d log(1 + k) at c = 0.25, k = 3
    w_true = unit(randn(8, g=g)) * 3
    phi_pi = unit(randn(16, 8, g=g))
    phi_ref = unit(randn(16, 8, g=g))
    distances = []
    for n in (100, 1000, 10000):
        phi0, phi1, labels = bt_preferences(n, w_true, g)
        w_mle, nll_mle = fit_mle(phi0, phi1, labels, bound)
        # from inside the set and from above β*: a slack is at most ζ, a violation up to ~|D|
        w, beta = w_mle, 0.1
        for _ in range(400):
            w, _, _ = follower_descent(phi0, phi1, labels, phi_pi, phi_ref, beta, bound, steps=10,
                                       w=w)
            slack = nll_mle + width - n * bt_loss(phi0 @ w, phi1 @ w, labels).item()
            beta = dual_ascent(beta, slack, lr=1e-3)
        slack = nll_mle + width - n * bt_loss(phi0 @ w, phi1 @ w, labels).item()
        assert abs(slack) < 0.01 * width and beta > 0, (n, slack, beta)
        x = signed_differences(phi0, phi1, labels)
        direct = direct_minimiser(x, phi_pi.mean(0) - phi_ref.mean(0), beta, bound)
        torch.testing.assert_close(w, direct, rtol=0, atol=1e-4)
        distances.append((w - w_mle).norm().item())
    assert distances[1] < distances[0] / 2 and distances[2] < distances[1] / 2, distances

import torch

from explore import Covariance, enhancer_rewards, select_pair, trajectory_features


def test_sherman_morrison_inverse_matches_direct_inverse():
    g = torch.Generator().manual_seed(0)
    d, lam = 16, 0.5
    cov = Covariance(d, lam)
    dphis = torch.nn.functional.normalize(torch.randn(300, d, generator=g), dim=-1) * 2
    for chunk in dphis.split(7):
        cov.update(chunk)
    direct = lam * torch.eye(d, dtype=torch.float64) + dphis.double().T @ dphis.double()
    torch.testing.assert_close(cov.sigma.double(), direct, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cov.sigma_inv.double(), torch.linalg.inv(direct), rtol=1e-3,
                               atol=1e-5)


def test_uncertainty_is_mahalanobis_norm():
    g = torch.Generator().manual_seed(1)
    cov = Covariance(8, 1.0)
    cov.update(torch.randn(20, 8, generator=g))
    v = torch.randn(5, 8, generator=g)
    expected = torch.stack([(x @ torch.linalg.inv(cov.sigma) @ x).sqrt() for x in v])
    torch.testing.assert_close(cov.uncertainty(v), expected, rtol=1e-4, atol=1e-5)


def test_select_pair_picks_the_most_uncertain_candidate():
    cov = Covariance(3, 1.0)
    # data so far covers direction e0 heavily: a candidate differing along e2 is the most
    # informative
    cov.update(torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [0, 1.0, 0]]))
    ref = torch.zeros(3)
    cands = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0]])
    j, dphi, u = select_pair(cov, ref, cands)
    assert j == 2
    torch.testing.assert_close(dphi, ref - cands[2])
    all_u = cov.uncertainty(ref[None] - cands)
    assert u == max(all_u.tolist()) and all_u.argmax() == 2


def test_trajectory_features_sum_tokens():
    phi_tok = torch.randn(2, 5, 4)
    torch.testing.assert_close(trajectory_features(phi_tok), phi_tok.sum(1))
    phi_seq = torch.randn(2, 4)
    assert trajectory_features(phi_seq) is phi_seq


def test_enhancer_rewards_are_each_prompts_direction_of_its_feature_gap():
    """Prompt by prompt, against a direct computation in float64: m_x = mean Φ(π̂'s G samples) −
    mean Φ(π_ref's R samples), v_x = Σ⁻¹ m_x / ‖m_x‖_{Σ⁻¹}, reward ⟨v_x, Φ⟩ for each π̂ sample, so
    that the rewards' mean less ⟨v_x, mean Φ(π_ref)⟩ is ‖m_x‖_{Σ⁻¹}. A prompt whose samples have
    m_x = 0 gets reward 0. Per-token φ_h give ⟨v_x, φ_h⟩, which sum to the reward of Φ = Σ_h φ_h."""
    g = torch.Generator().manual_seed(2)
    prompts, group, ref_group, d, T = 3, 4, 2, 5, 6
    cov = Covariance(d, 0.5)
    cov.update(torch.randn(40, d, generator=g))
    phi_tok = torch.randn(prompts * group, T, d, generator=g)  # (P·G, T, d) φ_h of π̂'s samples
    phi_ref = torch.randn(prompts * ref_group, d, generator=g)  # (P·R, d)
    # the last prompt: π̂'s samples are π_ref's, twice over, in integers so that the means are exact
    phi_ref[ref_group * 2:] = torch.randint(-3, 4, (ref_group, d), generator=g).float()
    phi_tok[group * 2:, 1:] = 0
    phi_tok[group * 2:, 0] = phi_ref[ref_group * 2:].repeat(2, 1)
    phi_enh = trajectory_features(phi_tok)  # (P·G, d) Φ = Σ_h φ_h
    rewards = enhancer_rewards(cov, phi_enh, phi_ref, group, ref_group)
    token_rewards = enhancer_rewards(cov, phi_tok, phi_ref, group, ref_group)
    assert rewards.shape == (prompts * group,) and token_rewards.shape == (prompts * group, T)
    torch.testing.assert_close(token_rewards.sum(-1), rewards, rtol=1e-5, atol=1e-5)
    sigma_inv = torch.linalg.inv(cov.sigma.double())
    for p in range(prompts):
        enh = phi_enh[p * group:(p + 1) * group].double()  # (G, d)
        ref_mean = phi_ref[p * ref_group:(p + 1) * ref_group].double().mean(0)  # (d,)
        m = enh.mean(0) - ref_mean
        got = rewards[p * group:(p + 1) * group].double()  # (G,)
        if p == prompts - 1:
            assert (m == 0).all() and (got == 0).all()
            continue
        norm = (m @ sigma_inv @ m).sqrt()
        v = sigma_inv @ m / norm  # (d,)
        torch.testing.assert_close(got, enh @ v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.mean() - ref_mean @ v, norm, rtol=1e-4, atol=1e-5)

import torch

from explore import Covariance, select_pair, trajectory_features


def test_sherman_morrison_inverse_matches_direct_inverse():
    g = torch.Generator().manual_seed(0)
    d, lam = 16, 0.5
    cov = Covariance(d, lam)
    dphis = torch.nn.functional.normalize(torch.randn(300, d, generator=g), dim=-1) * 2
    potential = 0.0
    for chunk in dphis.split(7):
        potential += cov.update(chunk)
    direct = lam * torch.eye(d, dtype=torch.float64) + dphis.double().T @ dphis.double()
    torch.testing.assert_close(cov.sigma.double(), direct, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cov.sigma_inv.double(), torch.linalg.inv(direct), rtol=1e-3, atol=1e-5)
    # elliptical potential telescopes: Σ log(1 + ‖Δφ‖²_{Σ⁻¹}) = log det Σ_n − log det λI
    logdet = torch.linalg.slogdet(direct).logabsdet - d * torch.log(torch.tensor(lam, dtype=torch.float64))
    assert abs(potential - logdet.item()) < 1e-2 * logdet.item()


def test_uncertainty_is_mahalanobis_norm():
    g = torch.Generator().manual_seed(1)
    cov = Covariance(8, 1.0)
    cov.update(torch.randn(20, 8, generator=g))
    v = torch.randn(5, 8, generator=g)
    expected = torch.stack([(x @ torch.linalg.inv(cov.sigma) @ x).sqrt() for x in v])
    torch.testing.assert_close(cov.uncertainty(v), expected, rtol=1e-4, atol=1e-5)


def test_select_pair_picks_the_most_uncertain_candidate():
    cov = Covariance(3, 1.0)
    # data so far covers direction e0 heavily: a candidate differing along e2 is the most informative
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

"""Reward-agnostic exploration (PbPO step I): Φ(τ), Σ and Σ⁻¹, the uncertainty ‖Δφ‖_{Σ⁻¹}, the
enhancer's REINFORCE reward, best-of-N's choice. Tests: python -m pytest -q tests/test_explore.py"""
import torch


def trajectory_features(phi):  # Φ(τ) at both levels: r_w(τ) = Σ_h ⟨w, φ_h⟩ = ⟨w, Σ_h φ_h⟩
    return phi if phi.dim() == 2 else phi.sum(1)  # (B, D)


class Covariance:  # Σ (d×d, fp32), Σ⁻¹ by Sherman–Morrison: equal on ranks fed the same Δφ in order
    def __init__(self, dim, lam=1.0, device="cpu"):
        self.sigma = lam * torch.eye(dim, device=device)  # (d, d)
        self.sigma_inv = torch.eye(dim, device=device) / lam  # (d, d)

    def uncertainty(self, dphi):  # ‖Δφ‖_{Σ⁻¹} for each row of dphi (n, d)
        return torch.einsum("nd,de,ne->n", dphi, self.sigma_inv, dphi).clamp_min(0).sqrt()  # (n,)

    def update(self, dphi):  # Σ ← Σ + ΔφΔφᵀ row by row
        for v in dphi.float():  # (d,)
            s_inv_v = self.sigma_inv @ v  # (d,)
            self.sigma += torch.outer(v, v)
            self.sigma_inv -= torch.outer(s_inv_v, s_inv_v) / (1.0 + v @ s_inv_v)

    def state_dict(self):
        return {"sigma": self.sigma.cpu(), "sigma_inv": self.sigma_inv.cpu()}

    def load_state_dict(self, state):
        self.sigma.copy_(state["sigma"])
        self.sigma_inv.copy_(state["sigma_inv"])


def select_pair(cov, phi_ref, phi_candidates):  # best of N: j* = argmax ‖φ(x,y⁰) − φ(x,y^j)‖_{Σ⁻¹}
    dphi = phi_ref[None] - phi_candidates  # (N, d): phi_ref (d,) minus one prompt's N candidates
    u = cov.uncertainty(dphi)  # (N,)
    j = int(u.argmax())
    return j, dphi[j], float(u[j])  # j*, Δφ (d,), the uncertainty of j*


def enhancer_rewards(cov, phi_enh, phi_ref, group, ref_group):
    """π̂'s REINFORCE reward ⟨v_x, Φ(x, y¹)⟩ (per token ⟨v_x, φ_h⟩), v_x = Σ⁻¹ m_x / ‖m_x‖_{Σ⁻¹}
    held constant; phi_enh (P·G, [S,] d) of π̂, phi_ref (P·R, [S,] d) of π_ref, prompt-major."""
    m = (trajectory_features(phi_enh).unflatten(0, (-1, group)).mean(1)
         - trajectory_features(phi_ref).unflatten(0, (-1, ref_group)).mean(1))  # (P, d) m_x
    v = m @ cov.sigma_inv / cov.uncertainty(m).clamp_min(1e-6)[:, None]  # (P, d), Σ⁻¹ symmetric
    return torch.einsum("n...d,nd->n...", phi_enh, v.repeat_interleave(group, 0))  # (n,) | (n, S)

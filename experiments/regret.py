"""
The theory check on a synthetic linear preference task: cumulative regret of a policy that is greedy
under the learned reward, when each round's pairs are picked by the elliptical uncertainty
‖Δφ‖_{Σ⁻¹} (explore.select_pair, PbPO's reward-agnostic exploration) against uniformly random pairs.
The theory says Õ(d√K) for the first: a log-log slope near 0.5 or below.

Seeds are paired: seed s is one task (features, θ*) and the same prompt and label streams for both
arms. The verdicts use the comparison's rule: a paired difference holds when its 95% t-interval
over the seeds excludes 0; the growth exponent is the log-log slope of each seed's curve, reported
as a mean with its 95% interval.

  python -m experiments.regret                          # d = 8, K = 400, 20 seeds: a few minutes
  python -m experiments.regret --out=experiments/data/regret.json   # what RESULTS.md reports

Writes JSON and CSV (and a PNG when matplotlib is installed); experiments/RESULTS.md reports
the run.
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import run
from run import knob
from explore import Covariance, select_pair
from experiments.tune import T_975, mean_ci
from reward import Oracle, bt_loss


def linear_task(d=8, d_hard=4, prompts=64, n=32, n_rare=1, seed=0):
    """Fixed features φ (P, n, d) and θ* (d,), r*(x, y) = ⟨θ*, φ(x, y)⟩. Common responses differ
    along the d − d_hard 'easy' directions (by more, in Euclidean norm); the last n_rare of each
    prompt lie along the d_hard 'hard' ones, shifted towards θ*'s hard part, so they are often the
    best: the informative comparisons are rare."""
    g, de = torch.Generator().manual_seed(seed), d - d_hard
    easy = torch.randn(prompts, n, de, generator=g)
    phi = torch.cat([easy, 0.1 * torch.randn(prompts, n, d_hard, generator=g)], -1)  # (P, n, d)
    u_hard = F.normalize(torch.randn(d_hard, generator=g), dim=0)  # (d_hard,)
    phi[:, n - n_rare:, :de] *= 0.3
    phi[:, n - n_rare:, de:] = torch.randn(prompts, n_rare, d_hard, generator=g) + u_hard
    theta = torch.cat([1.5 * F.normalize(torch.randn(de, generator=g), dim=0), 3.0 * u_hard])
    return phi, theta


def regret_run(phi, theta, arm, K=400, M=4, lam=1.0, bound=10.0, steps=20, lr=4.0, seed=0):
    """Per-round regret J(π*, r*) − J(π^k, r*), k = 1..K, of the policy greedy under ŵ (J: mean r*
    over all prompts). Each round: M prompts, y⁰ = the greedy response, y¹ by `arm` (uncertainty:
    select_pair's argmax ‖Δφ‖_{Σ⁻¹}; random: a uniform other response), o ~ Bernoulli(σ(r*(τ¹) −
    r*(τ⁰))), Σ += ΔφΔφᵀ, then ŵ refit by projected gradient steps on the summed BT loss,
    preconditioned by Σ⁻¹ (a Gauss–Newton step: Σ bounds the BT Hessian)."""
    P, n, d = phi.shape
    g_prompt, g_label, g_arm = (torch.Generator().manual_seed(seed + i) for i in range(3))
    r_star = phi @ theta  # (P, n)
    j_star = r_star.max(1).values.mean()
    cov, w, labeller = Covariance(d, lam), torch.zeros(d), Oracle(None, temp=1.0)
    phi0, phi1, labels, per_round = [], [], [], []
    for _ in range(K):
        greedy = (phi @ w).argmax(1)  # (P,) π^k
        per_round.append((j_star - r_star.gather(1, greedy[:, None]).mean()).item())
        xs, y0s, y1s = torch.randperm(P, generator=g_prompt)[:M].tolist(), [], []
        for x in xs:
            y0 = int(greedy[x])
            if arm == "uncertainty":
                y1, dphi, _ = select_pair(cov, phi[x, y0], phi[x])
            else:
                y1 = (y0 + 1 + int(torch.randint(n - 1, (1,), generator=g_arm))) % n
                dphi = phi[x, y0] - phi[x, y1]
            cov.update(dphi[None])
            y0s.append(y0)
            y1s.append(y1)
        labels.append(labeller.label(r_star[xs, y0s], r_star[xs, y1s], g_label))  # (M,)
        phi0.append(phi[xs, y0s])  # (M, d)
        phi1.append(phi[xs, y1s])
        f0, f1, o = torch.cat(phi0), torch.cat(phi1), torch.cat(labels)
        for _ in range(steps):
            w.requires_grad_(True)
            grad, = torch.autograd.grad(bt_loss(f0 @ w, f1 @ w, o) * len(o), w)
            w = (w.detach() - lr * cov.sigma_inv @ grad)  # (d,)
            w = w * min(1.0, bound / (w.norm().item() + 1e-12))  # ‖w‖ ≤ B
    return per_round


def loglog_slope(cum, lo_frac=0.1):
    """Least-squares slope of log R(k) against log k over k ∈ [lo_frac K, K] (√K growth: 0.5)."""
    k = torch.arange(1, len(cum) + 1, dtype=torch.float64)
    keep = (k >= lo_frac * len(cum)) & (torch.tensor(cum) > 0)
    x, y = k[keep].log(), torch.tensor(cum, dtype=torch.float64)[keep].log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def regret(d=8, d_hard=4, prompts=64, n=32, n_rare=1, K=400, M=4, seeds=20, lam=1.0, bound=10.0):
    """Cumulative regret curves (seeds, K) of both arms, one task per seed, and their slopes."""
    threads, out = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # d-sized ops: thread-pool wake-ups would cost more than the work
    for arm in ("uncertainty", "random"):
        runs = [regret_run(*linear_task(d, d_hard, prompts, n, n_rare, seed), arm, K, M, lam, bound,
                           seed=seed) for seed in range(seeds)]
        curves = torch.tensor(runs, dtype=torch.float64).cumsum(1)  # (seeds, K)
        out[arm] = {"cum_mean": curves.mean(0).tolist(),
                    "cum_std": curves.std(0, correction=0).tolist(),
                    "at_per_seed": {str(k): curves[:, k - 1].tolist() for k in table_ks(K)},
                    "final_per_seed": curves[:, -1].tolist(),
                    "slope": loglog_slope(curves.mean(0).tolist()),
                    "slope_per_seed": [loglog_slope(c) for c in curves.tolist()]}
    torch.set_num_threads(threads)
    out["claims"] = verdicts(out)
    return out


def table_ks(K):  # the rounds the table shows: powers of 2, and K
    return sorted({min(2 ** i, K) for i in range(math.ceil(math.log2(K)) + 1)})


def verdicts(res):
    """The claims, judged by 95% t-intervals over the paired seeds -> a list of dicts."""
    u, r = res["uncertainty"], res["random"]
    saved = [b - a for a, b in zip(u["final_per_seed"], r["final_per_seed"])]  # random − guided
    mean, half = mean_ci(saved)
    claims = [dict(claim="uncertainty-guided has lower cumulative regret at K than random",
                   value=mean, ci=half, seeds=len(saved), holds=mean - half > 0)]
    for arm in ("uncertainty", "random"):  # the theory's bound Õ(d√K): a slope of 0.5 at most
        mean, half = mean_ci(res[arm]["slope_per_seed"])
        claims.append(dict(claim=f"{arm}: regret grows no faster than √K (slope below 0.5)",
                           value=mean, ci=half, seeds=len(saved), holds=mean + half < 0.5))
    return claims


def report(res, K, seeds):
    """The table RESULTS.md shows: cumulative regret (mean ± 95% interval) at powers of 2, the
    slopes and the verdicts."""
    lines = [f"Cumulative regret, mean ± 95% interval over {seeds} paired seeds:", "",
             "| K | uncertainty-guided | random pairs |", "|---|---|---|"]
    for k in table_ks(K):
        cells = []
        for arm in ("uncertainty", "random"):
            mean, half = mean_ci(res[arm]["at_per_seed"][str(k)])
            cells.append(f"{mean:.2f} ± {half:.2f}")
        lines.append(f"| {k} | {' | '.join(cells)} |")
    lines += ["", "| claim | mean | 95% interval | seeds | holds |", "|---|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['claim']} | {c['value']:.3f} | ± {c['ci']:.3f} | {c['seeds']} | "
                     f"{'yes' if c['holds'] else 'no'} |")
    return "\n".join(lines)


@dataclass
class Config:
    d: int = knob(8, "feature dimension", at_least=2)
    d_hard: int = knob(4, "directions only the rare responses vary along")
    prompts: int = knob(64, "")
    n: int = knob(32, "responses per prompt", at_least=2)
    n_rare: int = knob(1, "rare, informative responses per prompt")
    K: int = knob(400, "rounds", at_least=1)
    M: int = knob(4, "pairs labelled a round", at_least=1)
    seeds: int = knob(20, "paired seeds: one task each, both arms on it", at_least=1)
    lam: float = knob(1.0, "λ, Σ = λI + ...")
    bound: float = knob(10.0, "B, ‖w‖ ≤ B")
    out: str = knob("out/regret.json", "JSON; the CSV and PNG go beside it")



if __name__ == "__main__":
    cfg = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/regret.py"):
        res = regret(**{k: v for k, v in asdict(cfg).items() if k != "out"})
        print(report(res, cfg.K, cfg.seeds))
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        with open(cfg.out, "w") as f:
            json.dump({"config": asdict(cfg), **res}, f, indent=1)
        stem = os.path.splitext(cfg.out)[0]
        with open(stem + ".csv", "w") as f:
            f.write("K,uncertainty_mean,uncertainty_std,random_mean,random_std\n")
            for k in range(cfg.K):
                values = [res[a][s][k] for a in ("uncertainty", "random")
                          for s in ("cum_mean", "cum_std")]
                f.write(f"{k + 1},{','.join(map(str, values))}\n")
        try:
            import matplotlib.pyplot as plt
            for arm in ("uncertainty", "random"):
                mean = torch.tensor(res[arm]["cum_mean"])
                n = max(cfg.seeds, 2)
                t = T_975.get(n, 1.96 + 2.6 / (n - 1))  # mean_ci's t quantile
                sd = torch.tensor(res[arm]["cum_std"]) * math.sqrt(n / (n - 1))  # sample sd
                half = t * sd / math.sqrt(n)
                rounds = range(1, cfg.K + 1)
                plt.loglog(rounds, mean, label=f"{arm} (slope {res[arm]['slope']:.2f})")
                plt.fill_between(rounds, mean - half, mean + half, alpha=0.2)
            plt.xlabel("K")
            plt.ylabel("cumulative regret (mean, 95% band)")
            plt.legend()
            plt.savefig(stem + ".png", dpi=120)
        except ImportError:
            print("matplotlib is not installed: no plot")
        print(f"wrote {cfg.out}, {stem}.csv")

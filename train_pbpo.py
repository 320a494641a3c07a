"""PbPO: preference-based policy optimization (ALGORITHMS.md, "PbPO"). A min-max game between the
policy π (the leader) and a reward model r_w(τ) = ⟨w, φ(τ)⟩ (the follower), one round per episode:

  for episode k = 1..K:
    π_ref = π, frozen for the episode
    (I) reward-agnostic exploration, on M prompts x:
        the enhancer π̂ ≈ argmax_π ‖E_π φ(x, y¹) − E_π_ref φ(x, y⁰)‖_{Σ⁻¹}: a few policy-gradient
        steps from π_ref (--enhancer=best_of_n: the cheaper stand-in, N samples of π_ref at T_enh)
        y⁰ ~ π_ref(·|x);  y¹ ~ π̂(·|x);  o = oracle(x, y⁰, y¹)
        D ← D ∪ {(x, y⁰, y¹, o)};  Σ ← Σ + Δφ Δφᵀ
    (II) reward-aware exploitation, T_out times: G samples per prompt from π, R from π_ref
        follower, T_in steps:  w ← Proj_B(w − η ∇_w [gap(w) + β Σ_{i∈D} ℓ_i(w)])
                               gap(w) = E_π r_w − E_π_ref r_w, ℓ_i the BT loss of pair i
                               (--beta_form=dual: β by dual ascent on ℓ_D(w) ≤ ℓ_D(ŵ) + ζ_k)
        leader, one AdamW step up ∇_θ E_π[r_w(τ) − κ log(π_θ(τ) / π_anchor(τ))] (clipped at 1)
    the leader's gradient: REINFORCE with the KL folded into the reward and a leave-one-out
    baseline among a prompt's G samples; π_anchor is π⁰ (the SFT policy) or π_ref.

  python train_pbpo.py                                              # the built-in toy task, CPU
  python train_pbpo.py --model=PATH --prompts=FILE --oracle=gsm8k   # one GPU
  torchrun --nproc_per_node=8 train_pbpo.py --model=PATH --prompts=FILE --oracle=rm:RM_PATH
  python train_pbpo.py --resume                                     # continue out_dir's run
"""
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import checkpoint
import data
import model as M
import ranks
import run
from explore import Covariance, enhancer_rewards, select_pair, trajectory_features
from reward import RewardModel, bt_loss, make_oracle
from run import knob


@dataclass
class Config:
    # PbPO's symbols (ALGORITHMS.md)
    episodes: int = knob(6, "K, episodes", at_least=1)
    explore_prompts: int = knob(64, "M, exploration prompts per episode (all ranks)", at_least=1)
    enhancer: str = knob("policy", "π̂, or its cheaper stand-in", choices=("policy", "best_of_n"))
    enh_steps: int = knob(2, "the enhancer's policy-gradient steps an episode", at_least=1)
    enh_samples: int = knob(4, "π̂'s samples a prompt and step (π_ref's: once)", at_least=2)
    enh_kl: float = knob(0.1, "weight of KL(π̂ ‖ π_ref), per sequence")
    enh_lr: float = knob(1e-4, "the enhancer's AdamW learning rate")
    n_candidates: int = knob(4, "N, best_of_n's samples of π_ref (1: no exploration)", at_least=1)
    enh_temp: float = knob(1.2, "T_enh, best_of_n's sampling temperature", at_least=1e-6)
    lam: float = knob(1.0, "λ, Σ = λI + Σ_i Δφ_i Δφ_iᵀ (must be invertible)", at_least=1e-8)
    t_out: int = knob(8, "T_out, leader steps per episode", at_least=1)
    t_in: int = knob(10, "T_in, follower steps per leader step", at_least=1)
    group: int = knob(8, "G, on-policy samples per prompt (leave-one-out baseline)", at_least=2)
    ref_samples: int = knob(8, "R, π_ref samples per prompt for the follower's gap", at_least=1)
    beta: float = knob(0.04, "β, weight of the summed preference likelihood (0: pure adversary)")
    beta_form: str = knob("fixed", "β as given, by dual ascent, or no gap (mle: an ablation)",
                          choices=("fixed", "dual", "mle"))
    zeta_coef: float = knob(0.1, "c, dual: the confidence set's width ζ_k = c · d · log(1 + k)")
    dual_lr: float = knob(0.01, "η_β, dual: β ← max(0, β + η_β (ℓ_D(w) − ℓ_D(ŵ) − ζ_k))")
    kl_coef: float = knob(0.5, "κ, weight of KL(π_θ ‖ π_anchor), per sequence")
    anchor: str = knob("sft", "π_anchor: π⁰ (the SFT policy) or π_ref", choices=("sft", "ref"))
    bound: float = knob(10.0, "B, ‖w‖ ≤ B", at_least=1e-8)
    lr: float = knob(1e-4, "η_π, policy learning rate (AdamW)")
    rm_lr: float = knob(1.0, "η_r: the follower's step is η_r / (1 + β|D|L)")
    level: str = knob("seq", "r_w and advantages per sequence or token", choices=("seq", "token"))
    normalize: bool = knob(True, "L2-normalise the features φ")
    rm_batch: int = knob(512, "preference pairs per follower step", at_least=1)
    # model, data and oracle
    model: str = knob("", "π⁰, an HF checkpoint dir (default: the toy SFT model, built once)")
    rm_backbone: str = knob("", "the RM backbone's checkpoint dir (default: π⁰; the toy: its RM)")
    prompts: str = knob("", "training prompts (no --model: the toy train split)")
    heldout: str = knob("", "held-out prompts for the gold evaluation (no --model: the toy's)")
    oracle: str = knob("gold", "gold | gsm8k | rm:PATH")
    oracle_temp: float = knob(0.0, "Bradley-Terry label temperature; 0 = deterministic labels")
    # sampling and batching
    temperature: float = knob(1.0, "T: of y⁰, π's samples and their log-probs", at_least=1e-6)
    max_new_tokens: int = knob(48, "H, the longest response", at_least=1)
    max_prompt_len: int = knob(256, "longer prompts are left out, with a count", at_least=1)
    leader_prompts: int = knob(16, "P, prompts per leader step (all ranks)", at_least=1)
    micro_batch: int = knob(64, "sequences per forward / backward", at_least=1)
    # the run
    out_dir: str = knob("out/pbpo", "the run directory")
    seed: int = knob(0, "every draw and sample is keyed by it")
    resume: bool = knob(False, "continue the run in out_dir from its checkpoint")
    eval_max: int = knob(256, "held-out prompts evaluated at the start and the end", at_least=1)
    on_nonfinite: str = knob("skip", "on NaN/inf or diverged weights", choices=("skip", "stop"))
    dist_timeout: int = knob(1800, "seconds a collective waits (e.g. for a dead rank)")

    RESUME_MAY_CHANGE = ("episodes", "micro_batch", "on_nonfinite", "dist_timeout")  # README
    UNIT = "episode"  # what the preference store's records are stamped with
    INPUTS = ("model", "rm_backbone", "prompts", "heldout", "oracle")  # a resume reads the same


# ---------------------------------------------------------------- the objectives
def follower_loss(rm, phi0, phi1, labels, phi_pi, phi_ref, beta, n_pairs):
    """F(w) = gap(w) + β ℓ_D(w), the Lagrangian of min gap(w) s.t. ℓ_D(w) ≤ ℓ_D(ŵ) + ζ_k; the summed
    BT loss ℓ_D = Σ_{i∈D} ℓ_i is |D| · mean_batch ℓ_i (n_pairs = |D|), gap(w) = mean r_w(τ~π) −
    mean r_w(τ~π_ref). β = 0: the pure adversary. -> (F, the batch-mean BT loss, the gap)"""
    nll = bt_loss(rm(phi0), rm(phi1), labels)
    gap = rm(phi_pi).mean() - rm(phi_ref).mean()
    return gap + beta * n_pairs * nll, nll.detach(), gap.detach()


def follower_step_size(rm_lr, beta, n_pairs, curvature=1.0):
    """η = η_r / (1 + β|D|L): F's curvature is at most β|D|L (gap is linear, ∇²ℓ_i ≤ ‖ΔΦ‖²/4 ≤ L,
    the caller's bound), so with η_r ≤ 1 every step lowers F, however large β|D| grows."""
    return rm_lr / (1.0 + beta * n_pairs * curvature)


def fit_mle(phi0, phi1, labels, bound, steps=10_000, tol=1e-6):
    """ŵ = argmin_{‖w‖≤B} ℓ_D(w) on all of D -> (ŵ, ℓ_D(ŵ)): projected FISTA in float64 from 0, step
    1/L with L = ‖X‖²/4 ≥ ∇²ℓ_D, until the gradient mapping is below tol (stopped at `steps`, ℓ_D(ŵ)
    is high, which widens the set: a warning says by how far it was from converging)."""
    x = (2.0 * labels.double() - 1.0)[:, None] * (phi1 - phi0).double()  # (n, d) rows s_i ΔΦ_i
    lipschitz = max(torch.linalg.matrix_norm(x, ord=2).item() ** 2 / 4, 1e-12)
    w = previous = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)  # (d,)
    for k in range(steps):
        y = w + k / (k + 3) * (w - previous)  # Nesterov's extrapolation
        step = y + x.T @ torch.sigmoid(-(x @ y)) / lipschitz  # y − ∇ℓ_D(y) / L
        previous = w
        w = step * (bound / step.norm()).clamp(max=1.0)  # Proj_B
        if (y - w).norm() * lipschitz <= tol:
            break
    else:
        warnings.warn(f"fit_mle: the gradient mapping is {(y - w).norm() * lipschitz:.3g} > {tol} "
                      f"after {steps} steps; ℓ_D(ŵ) is high, the confidence set wider than ζ_k")
    return w.to(phi0.dtype), torch.nn.functional.softplus(-(x @ w)).sum().item()


def dual_ascent(beta, slack, lr):  # β ← max(0, β + η_β (ℓ_D(w) − ℓ_D(ŵ) − ζ_k)), slack = −(…)
    return max(0.0, beta - lr * slack)  # rises while w is outside the set, falls while inside


def leave_one_out(values, group):  # A_i = v_i − mean_{j≠i} v_j among each prompt's G samples
    v = values.view(-1, group, *values.shape[1:])  # (P, G, ...) from values (n, ...), n = P · G
    return (v - (v.sum(1, keepdim=True) - v) / (group - 1)).view_as(values)


def advantages(rewards, log_ratio, response_mask, kl_coef, group):
    """Leave-one-out advantages (n, S) of r̃ = r_w − κ log(π_θ / π_anchor), log-ratio held
    constant; rewards (n,) per sequence, or (n, S) per token: R_h = Σ_{h'≥h} r̃_h'."""
    if rewards.dim() == 1:
        shaped = rewards - kl_coef * log_ratio.sum(-1)  # (n,)
        return leave_one_out(shaped, group)[:, None] * response_mask
    returns = (rewards - kl_coef * log_ratio).flip(-1).cumsum(-1).flip(-1)  # (n, S)
    return leave_one_out(returns, group) * response_mask


def leader_loss(logp, advantage, n_samples):
    """−(1/n) Σ_τ Σ_h A_h log π_θ(y_h|·), whose gradient estimates −∇_θ (E r_w − κ KL)"""
    return -(advantage * logp).sum() / n_samples


def on_response(values, response_mask):  # per-row token values at a batch's response positions
    flat = torch.tensor([v for row in values for v in row], device=response_mask.device)
    return torch.zeros(response_mask.shape, device=flat.device).masked_scatter(response_mask, flat)


@dataclass
class Pair:  # one comparison of D: (x, y⁰, y¹, o), with its features
    item: dict  # the prompt record x
    response0_ids: list  # y⁰, π_ref's sample
    response1_ids: list  # y¹, the enhancer's
    response0: str  # y⁰ decoded
    response1: str
    phi0: torch.Tensor  # Φ(x, y⁰) (d,)
    phi1: torch.Tensor  # Φ(x, y¹) (d,)
    uncertainty: float  # ‖Δφ‖_{Σ⁻¹} before Σ took Δφ
    score0: float = 0.0  # r*(x, y⁰), the oracle's
    score1: float = 0.0
    label: int = 0  # o: 1 where y¹ won

    def record(self, episode):  # the line of preferences.jsonl
        kept = {k: v for k, v in vars(self).items() if k not in ("item", "phi0", "phi1")}
        return dict(episode=episode, prompt=self.item["prompt"], prompt_ids=self.item["prompt_ids"],
                    **kept)


def main(cfg):
    rank, world, device = ranks.init_distributed(cfg.dist_timeout)
    master = rank == 0
    if cfg.explore_prompts % world or cfg.leader_prompts % world:
        raise ValueError(f"--explore_prompts={cfg.explore_prompts} and --leader_prompts="
                         f"{cfg.leader_prompts} must be multiples of the world size {world}")
    if not cfg.model:  # the built-in task: its SFT policy and prompt files, built on first use
        import toy
        toy.fill_defaults(cfg, rank, world)
    mode, inputs = run.start(cfg, rank, world)  # mode: 'fresh', 'resume' or 'restart'

    # ---------------------------------------------------------------- setup
    tok = data.load_tokenizer(cfg.model)
    if cfg.rm_backbone:  # its embedding is given the policy's token ids
        data.check_same_tokenizer(cfg.rm_backbone, tok)
    prompts = data.load_prompts(cfg.prompts, tok, cfg.max_prompt_len)  # all of them, on every rank
    heldout = []
    if cfg.heldout:
        heldout = data.load_prompts(cfg.heldout, tok, cfg.max_prompt_len)[:cfg.eval_max]
    oracle = make_oracle(cfg.oracle, cfg.oracle_temp, device)
    oracle.check(prompts + heldout)  # every record before the first oracle call
    heldout = data.shard(heldout, rank, world)
    policy = M.from_pretrained(cfg.model, device)
    eos_ids = M.stop_ids(cfg.model, tok)  # a response ends on any of them
    longest = max(len(p["prompt_ids"]) for p in prompts)
    explore_n = "enh_samples" if cfg.enhancer == "policy" else "n_candidates"  # the enhancer's
    for prompts_flag, n_flag in (("explore_prompts", explore_n), ("leader_prompts", "group"),
                                 ("leader_prompts", "ref_samples")):
        count, per_prompt = getattr(cfg, prompts_flag), getattr(cfg, n_flag)  # sampled at once
        what = f"--{prompts_flag}={count} × --{n_flag}={per_prompt}"
        M.check_fits(policy, count * per_prompt // world, longest, cfg.max_new_tokens, what)
    ref = M.from_pretrained(cfg.model, device).requires_grad_(False)  # π_ref, reset every episode
    sft = M.from_pretrained(cfg.model, device).requires_grad_(False)  # π⁰, for the KL to it
    enh = None  # π̂, the enhancer, reset to π_ref every episode
    if cfg.enhancer == "policy":
        enh = M.from_pretrained(cfg.model, device)
    backbone = M.from_pretrained(cfg.rm_backbone or cfg.model, device)
    rm = RewardModel(backbone, cfg.level, cfg.bound, cfg.normalize).to(device)  # backbone frozen
    if world > 1 or device.type == "cuda":  # FSDP2; one CPU process runs plain fp32
        mesh = init_device_mesh(device.type, (world,))
        precision = MixedPrecisionPolicy()  # CPU ranks: fp32 throughout
        if device.type == "cuda":  # bf16 compute on fp32 weights; RoPE's cos/sin stay fp32
            precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                             reduce_dtype=torch.float32, cast_forward_inputs=False)
        for m in filter(None, (policy, ref, sft, enh, rm.backbone)):
            for block in m.model.layers:  # a unit each: its weights gathered just for its forward
                fully_shard(block, mesh=mesh, mp_policy=precision)
            fully_shard(m, mesh=mesh, mp_policy=precision)  # the root: embedding, norm, lm_head
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    cov = Covariance(rm.w.numel(), cfg.lam, device)
    pairs = {"phi0": [], "phi1": [], "label": []}  # D, with the features cached
    beta = cfg.beta  # --beta_form=dual moves it
    store = None  # D as labelled, on disk, by rank 0
    if master:
        store = data.PreferenceStore(os.path.join(cfg.out_dir, "preferences.jsonl"), "episode")
    log = run.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master, oracle)
    ckpt_path = os.path.join(cfg.out_dir, checkpoint.CHECKPOINT)
    guard = run.Guard(log, cfg.on_nonfinite, ckpt_path, sft)
    start = 1
    sft_eval = None

    # ---------------------------------------------------------------- plumbing
    def sample(model, items, n, temperature, offset, *purpose):  # n responses to each prompt
        return ranks.sample(model, items, n, temperature, offset, (cfg.seed, *purpose),
                            cfg.max_new_tokens, eos_ids, tok.pad_token_id)

    def batch(samples):  # -> input ids, attention mask, response mask, each (n, S), on device
        padded = data.collate(samples.prompt_ids, samples.responses, tok.pad_token_id)
        return [t.to(device) for t in padded]

    def micro(count):  # the slices of `count` rows, micro_batch at a time
        return [slice(i, i + cfg.micro_batch) for i in range(0, count, cfg.micro_batch)]

    @torch.no_grad()
    def features(ids, attn, resp):  # φ (n, [S,] d) by the RM backbone, micro_batch rows at a time
        return torch.cat([rm.phi(ids[r], attn[r], resp[r]) for r in micro(len(ids))])

    def trajectories(samples):  # Φ(τ) (n, d) of each sample
        return trajectory_features(features(*batch(samples)))

    def policy_gradient_step(model, optimizer, ids, attn, advantage, n_samples, where, **fields):
        """One clipped AdamW step on leader_loss -> the gradient norm (the loss divides by all
        ranks' samples, and FSDP averages over ranks: hence · world)."""
        for rows in micro(len(ids)):
            logp_theta = M.token_logprobs(model, ids[rows], attn[rows], cfg.temperature)  # (b, S)
            (leader_loss(logp_theta, advantage[rows], n_samples) * world).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if guard.finite(grad_norm, "policy gradient", where, **fields):
            optimizer.step()
            if model is policy:
                guard.check_weights(policy, where, **fields)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def kl_folded(rewards, samples, resp, anchor, kl_coef, group, ids, attn):
        """advantages of r̃ = r − κ log(π / π_anchor) -> (A, log-ratio, the sampled log π) (n, S)"""
        logp = on_response(samples.logp, resp)  # (n, S), the sampler's log π, a constant
        logp_anchor = M.token_logprobs(anchor, ids, attn, cfg.temperature,
                                       micro_batch=cfg.micro_batch)  # (n, S)
        log_ratio = (logp - logp_anchor) * resp  # (n, S)
        return advantages(rewards, log_ratio, resp, kl_coef, group), log_ratio, logp

    # ---------------------------------------------------------------- (I) exploration
    def fit_enhancer(episode, items, offset):
        """π̂ ≈ argmax ‖E_π̂ φ(x, y¹) − E_π_ref φ(x, y⁰)‖_{Σ⁻¹} for each prompt x: enh_steps
        policy-gradient steps from π_ref on the reward ⟨v_x, φ(x, y¹)⟩ (explore.enhancer_rewards)
        with κ_enh KL(π̂ ‖ π_ref) folded in. A fresh optimizer each episode -> metrics."""
        enh.load_state_dict(ref.state_dict())
        enh_opt = torch.optim.AdamW(enh.parameters(), lr=cfg.enh_lr, weight_decay=0.0)
        baseline = sample(ref, items, cfg.enh_samples, cfg.temperature, offset, "enh_ref", episode)
        phi_ref = trajectories(baseline)  # (m · G_e, d) samples of π_ref, for E_π_ref φ
        n_samples = cfg.explore_prompts * cfg.enh_samples  # all ranks'
        for step in range(cfg.enh_steps):
            tries = sample(enh, items, cfg.enh_samples, cfg.temperature, offset, "enh", episode,
                           step)
            ids, attn, resp = batch(tries)
            phi = trajectory_features(features(ids, attn, resp))  # (n, d)
            rewards = enhancer_rewards(cov, phi, phi_ref, cfg.enh_samples, cfg.enh_samples)
            advantage, log_ratio, _ = kl_folded(rewards, tries, resp, ref, cfg.enh_kl,
                                                cfg.enh_samples, ids, attn)
            where = f"episode {episode}, enhancer step {step}"
            policy_gradient_step(enh, enh_opt, ids, attn, advantage, n_samples, where,
                                 episode=episode, enhancer_step=step)
        return {"enh_reward": ranks.mean_all(rewards), "enh_kl": ranks.mean_all(log_ratio.sum(-1))}

    def explore(episode):
        """(I): y⁰ ~ π_ref, y¹ ~ the enhancer on M prompts; Σ ← Σ + ΔφΔφᵀ -> (the pairs of two
        different responses, all ranks' in order, on every rank; metrics)."""
        items, offset = ranks.draw(prompts, cfg.explore_prompts, rank, world, cfg.seed, "explore",
                                   episode)
        response0 = sample(ref, items, 1, cfg.temperature, offset, "y0", episode)
        metrics = {}
        if cfg.enhancer == "policy":
            metrics = fit_enhancer(episode, items, offset)
            candidates = sample(enh, items, 1, cfg.temperature, offset, "y1", episode)
        else:  # best_of_n: the most uncertain of N samples of π_ref at T_enh
            candidates = sample(ref, items, cfg.n_candidates, cfg.enh_temp, offset, "enh",
                                episode)
        n = len(candidates.responses) // len(items)  # candidates per prompt
        phi0 = [f.clone() for f in trajectories(response0).cpu()]  # (d,) rows to gather
        phi1 = [f.clone() for f in trajectories(candidates).cpu().view(len(items), n, -1)]  # (n, d)
        answers = [candidates.responses[i * n:(i + 1) * n] for i in range(len(items))]
        mine = list(zip(items, response0.responses, answers, phi0, phi1))
        everyone = ranks.gather(mine)  # Σ takes every rank's Δφ, in the same order on every rank
        new = []
        for item, y0, options, f0, f1 in everyone:
            j, dphi, uncertainty = select_pair(cov, f0.to(device), f1.to(device))
            cov.update(dphi[None])  # a zero Δφ (y¹ = y⁰) leaves Σ unchanged
            if options[j] != y0:  # two different responses: worth an oracle call
                new.append(Pair(item, y0, options[j], data.decode(tok, y0),
                                data.decode(tok, options[j]), f0, f1[j], uncertainty))
        metrics.update(new_pairs=len(new), identical=len(everyone) - len(new))
        return new, metrics

    def label(new, episode):  # o of each new pair: each rank scores its block, all draw the labels
        mine = new[ranks.block(len(new), rank, world)]
        items = [p.item for p in mine]
        score0 = oracle.score(items, [p.response0 for p in mine])
        score1 = oracle.score(items, [p.response1 for p in mine])
        scores = torch.tensor(ranks.gather(list(zip(score0.tolist(), score1.tolist())))).view(-1, 2)
        labels = oracle.label(scores[:, 0], scores[:, 1],
                              ranks.generator(cfg.seed, "oracle", episode))
        for pair, (s0, s1), o in zip(new, scores.tolist(), labels.tolist()):
            pair.score0 = s0
            pair.score1 = s1
            pair.label = o

    @torch.no_grad()
    def fresh_accuracy(new):  # the RM, before it is fit on them, on the new pairs' labels
        if not new:
            return None
        r0 = rm(torch.stack([p.phi0 for p in new]).to(device))  # (n,)
        r1 = rm(torch.stack([p.phi1 for p in new]).to(device))  # (n,)
        labels = torch.tensor([p.label for p in new], device=device)
        return ((r1 > r0).long() == labels).float().mean().item()

    # ---------------------------------------------------------------- (II) exploitation
    def follower(beta, phi_pi, phi_base, D, episode, step):
        """T_in projected gradient steps on F(w) = gap(w) + β ℓ_D(w) -> the last batch's mean ℓ."""
        n_pairs = len(D["label"])
        curvature = (D["phi1"] - D["phi0"]).norm(dim=-1).max().item() ** 2 / 4  # ≥ ∇²ℓ_i, L
        step_size = follower_step_size(cfg.rm_lr, beta, n_pairs, curvature)
        for i in range(cfg.t_in):
            key = ranks.generator(cfg.seed, "follower", episode, step, i)
            idx = torch.randperm(n_pairs, generator=key)[:cfg.rm_batch].to(device)
            gap_pi = phi_base if cfg.beta_form == "mle" else phi_pi  # mle: the gap is 0
            loss, nll, _ = follower_loss(rm, D["phi0"][idx], D["phi1"][idx], D["label"][idx],
                                         gap_pi, phi_base, beta, n_pairs)
            grad, = torch.autograd.grad(loss, rm.w)
            where = f"episode {episode}, leader step {step}"
            if guard.finite(grad.norm().item(), "reward-model gradient", where, episode=episode,
                            step=step):
                with torch.no_grad():
                    rm.w -= step_size * grad
                rm.project()
        return nll.item()

    def leader(on_policy, phi, ids, attn, resp, episode, step):
        """One AdamW step of REINFORCE on r̃ = r_w − κ log(π_θ / π_anchor), at temperature T."""
        with torch.no_grad():
            rewards = phi @ rm.w  # (n,) r_w(τ) seq, (n, S) ⟨w, φ_h⟩ per response token
        anchor = sft if cfg.anchor == "sft" else ref
        advantage, log_ratio, logp = kl_folded(rewards, on_policy, resp, anchor, cfg.kl_coef,
                                               cfg.group, ids, attn)
        n_samples = cfg.leader_prompts * cfg.group  # all ranks'
        where = f"episode {episode}, leader step {step}"
        grad_norm = policy_gradient_step(policy, opt, ids, attn, advantage, n_samples, where,
                                         episode=episode, step=step)
        return grad_norm, log_ratio, logp

    @torch.no_grad()
    def health(items, on_policy, phi, phi_pi, phi_base, logp, log_ratio, ids, attn, resp):
        """What over-optimisation of r_w looks like, over all ranks: r_w against the gold r* on the
        leader's samples (monitoring: r* calls not counted), the KL to π⁰, the length, the gap."""
        responses = [data.decode(tok, y) for y in on_policy.responses]
        gold = oracle.score_fn([p for p in items for _ in range(cfg.group)], responses)
        rm_and_gold = ranks.gather(list(zip(rm(phi).tolist(), map(float, gold))))
        both = torch.tensor(rm_and_gold).T  # (2, n): r_w and r* of every rank's samples
        logp_sft = logp - log_ratio  # on the response: the anchor's log-probs, π⁰'s by default
        if cfg.anchor == "ref":  # π⁰'s own, for the KL to it
            logp_sft = M.token_logprobs(sft, ids, attn, cfg.temperature,
                                        micro_batch=cfg.micro_batch)
        return dict(rm_reward=both[0].mean().item(), gold_reward=both[1].mean().item(),
                    rm_gold_corr=torch.corrcoef(both)[0, 1].item(),
                    kl_sft=ranks.mean_all(((logp - logp_sft) * resp).sum(-1)),
                    length=ranks.mean_all(resp.sum(-1).float()),
                    rm_gap=(rm(phi_pi).mean() - rm(phi_base).mean()).item())

    # ---------------------------------------------------------------- resume
    if mode == "restart":  # killed before its first checkpoint: its pairs are labelled again
        log.cut(0)
        if master and store.records:
            store.keep_before(1)  # episodes count from 1: every pair is set aside
            print(f"{ckpt_path} does not exist yet: starting over; the pairs labelled before are "
                  f"kept in {store.dropped_path} and labelled again")
    if mode == "resume":
        state = checkpoint.load(ckpt_path, {"policy": (policy, opt)})
        if state["episode"] > cfg.episodes:
            raise ValueError(f"--episodes={cfg.episodes}: the run is past episode "
                             f"{state['episode']} already")
        start = state["episode"] + 1
        rm.w.data.copy_(state["w"])
        log.cut(state["log_size"])
        cov.load_state_dict(state["cov"])
        oracle.calls = state["oracle_calls"]
        sft_eval = state["sft_eval"]
        guard.diverged = state.get("diverged")
        beta = state["beta"]
        pairs.update(state["pairs"])
        if master:  # pairs labelled after the checkpoint are set aside and labelled again
            store.keep_before(start)
            print(f"resumed from {ckpt_path} after episode {start - 1} with {len(store)} pairs")
    if sft_eval is None and heldout:
        sft_eval = oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=eos_ids)
        log.write("sft_eval", **sft_eval)

    # ---------------------------------------------------------------- the episodes
    bar = tqdm(range(start, cfg.episodes + 1), desc="episodes", disable=not master)
    for episode in bar:
        ref.load_state_dict(policy.state_dict())  # π_ref = π, frozen for this episode
        started = time.time()

        # (I) reward-agnostic exploration: label the new pairs, add them to D
        new, explore_metrics = explore(episode)
        if not new and not pairs["label"]:
            raise ValueError(f"episode {episode}: every y¹ repeated y⁰, so there is no pair to "
                             "label; raise --temperature, --enh_temp or --n_candidates")
        label(new, episode)
        accuracy = fresh_accuracy(new)
        for pair in new:  # every rank keeps all of D
            if master:
                store.append(pair.record(episode))
            pairs["phi0"].append(pair.phi0)
            pairs["phi1"].append(pair.phi1)
            pairs["label"].append(pair.label)
        log.write("explore", episode=episode, pairs=len(pairs["label"]), **explore_metrics,
                  uncertainty=sum(p.uncertainty for p in new) / max(len(new), 1),
                  rm_acc_fresh=accuracy)

        # (II) reward-aware exploitation: T_out rounds of the follower's steps and the leader's
        D = {"phi0": torch.stack(pairs["phi0"]).to(device),  # (n, d)
             "phi1": torch.stack(pairs["phi1"]).to(device),  # (n, d)
             "label": torch.tensor(pairs["label"], device=device)}  # (n,)
        zeta_k = cfg.zeta_coef * rm.w.numel() * math.log1p(episode)  # log(1 + k): log 1 would be 0
        if cfg.beta_form == "dual":  # w starts inside the confidence set, at ŵ
            w_hat, nll_mle = fit_mle(D["phi0"], D["phi1"], D["label"], cfg.bound)
            rm.w.data.copy_(w_hat)
        for step in range(cfg.t_out):
            items, offset = ranks.draw(prompts, cfg.leader_prompts, rank, world, cfg.seed,
                                       "leader", episode, step)
            on_policy = sample(policy, items, cfg.group, cfg.temperature, offset, "policy",
                               episode, step)
            baseline = sample(ref, items, cfg.ref_samples, cfg.temperature, offset, "ref",
                              episode, step)
            ids, attn, resp = batch(on_policy)  # (n, S)
            phi = features(ids, attn, resp)  # (n, [S,] d), for the leader's rewards
            # Φ (P·G, d) and (P·R, d) of all ranks' samples: the follower's w is the same on each
            phi_pi = torch.cat(ranks.gather([trajectory_features(phi).cpu()])).to(device)
            phi_base = torch.cat(ranks.gather([trajectories(baseline).cpu()])).to(device)
            nll = follower(beta, phi_pi, phi_base, D, episode, step)
            slack = None  # dual: the set's room left, ℓ_D(ŵ) + ζ_k − ℓ_D(w), on all of D
            if cfg.beta_form == "dual":
                with torch.no_grad():
                    nll_sum = len(D["label"]) * bt_loss(rm(D["phi0"]), rm(D["phi1"]), D["label"])
                slack = nll_mle + zeta_k - nll_sum.item()
            grad_norm, log_ratio, logp = leader(on_policy, phi, ids, attn, resp, episode, step)
            metrics = health(items, on_policy, phi, phi_pi, phi_base, logp, log_ratio, ids, attn,
                             resp)
            log.write("step", episode=episode, step=step, rm_bt=nll, beta=beta, slack=slack,
                      grad_norm=grad_norm, w_norm=rm.w.norm().item(), **metrics)
            if slack is not None:  # dual: the β of the next step
                beta = dual_ascent(beta, slack, cfg.dual_lr)
            bar.set_postfix(gold=f"{metrics['gold_reward']:.3f}", kl_sft=f"{metrics['kl_sft']:.2f}")

        log.write("episode", episode=episode, wall_s=time.time() - started)
        checkpoint.save(ckpt_path, {"policy": (policy, opt)}, config=asdict(cfg), episode=episode,
                        w=rm.w.detach().cpu(), cov=cov.state_dict(), beta=beta,
                        oracle_calls=oracle.calls, sft_eval=sft_eval, log_size=log.size(),
                        pairs=pairs, store_pairs=len(pairs["label"]),
                        store_sha256=data.digest(store.records) if master else None,
                        inputs=inputs, diverged=guard.diverged)

    run.finish(cfg, policy, tok, oracle, heldout, eos_ids, log, sft_eval, "PbPO")
    guard.fail_if_diverged()


if __name__ == "__main__":
    config = run.parse_flags(Config, __doc__)
    with run.friendly_errors("train_pbpo.py", config.out_dir):
        main(config)

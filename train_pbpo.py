"""PbPO: preference-based policy optimization (ALGORITHMS.md, "PbPO"). A min-max game between the
policy π (the leader) and a reward model r_w(τ) = ⟨w, φ(τ)⟩ (the follower), one round per episode:

  for episode k = 1..K:
    π_ref = π, frozen for the episode
    (I) reward-agnostic exploration, for each of M prompts x:
        y⁰ ~ π_ref(·|x);  y¹..y^N ~ π_enh(·|x), the enhancer: π_ref at temperature T_enh
        j* = argmax_j ‖φ(x, y⁰) − φ(x, y^j)‖_{Σ⁻¹};  o = oracle(x, y⁰, y^{j*})
        D ← D ∪ {(x, y⁰, y^{j*}, o)};  Σ ← Σ + Δφ Δφᵀ
    (II) reward-aware exploitation, T_out times: G samples per prompt from π, R from π_ref
        follower, T_in steps:  w ← Proj_B(w − η_r ∇_w [L_BT(w; D) + ρ (E_π r_w − E_π_ref r_w)])
                               (each step on a minibatch of D)
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
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as M
import run
from explore import Covariance, select_pair, trajectory_features
from reward import RewardModel, bt_loss, make_oracle


@dataclass
class Config:
    # PbPO's symbols (ALGORITHMS.md)
    episodes: int = 6  # K, episodes
    explore_prompts: int = 64  # M, exploration prompts per episode (all ranks)
    n_candidates: int = 4  # N, enhancer candidates per prompt; 1 = no reward-agnostic exploration
    enh_temp: float = 1.2  # T_enh, the enhancer's sampling temperature
    lam: float = 1.0  # λ, Σ = λI + Σ_i Δφ_i Δφ_iᵀ
    t_out: int = 8  # T_out, leader steps per episode
    t_in: int = 10  # T_in, follower steps per leader step
    group: int = 8  # G, on-policy samples per prompt for the leave-one-out advantage
    ref_samples: int = 8  # R, π_ref samples per prompt for the follower's gap
    adv_coef: float = 0.1  # ρ, weight of the adversarial gap (0 = a plain maximum-likelihood RM)
    kl_coef: float = 0.5  # κ, weight of KL(π_θ ‖ π_anchor), per sequence
    anchor: str = "sft"  # π_anchor: sft (π⁰, the starting policy) or ref (π_ref, this episode's)
    bound: float = 10.0  # B, ‖w‖ ≤ B
    lr: float = 1e-4  # η_π, policy learning rate (AdamW)
    rm_lr: float = 1.0  # η_r, reward-head step size (plain gradient steps)
    level: str = "seq"  # seq | token: reward model and advantages per sequence or per token
    # the reward model
    normalize: bool = True  # L2-normalise the features φ
    rm_batch: int = 512  # preference pairs per follower step
    # model, data and oracle
    model: str = ""  # π⁰, an HF checkpoint dir (default: the toy SFT model, built on first use)
    rm_backbone: str = ""  # the RM backbone's checkpoint dir (default: the SFT policy)
    prompts: str = ""  # training prompts (no --model: the toy train split)
    heldout: str = ""  # held-out prompts for the gold evaluation (no --model: the toy's; else none)
    oracle: str = "gold"  # gold | gsm8k | rm:PATH
    oracle_temp: float = 0.0  # Bradley-Terry label temperature; 0 = deterministic labels
    # sampling and batching
    temperature: float = 1.0  # T: y⁰, the leader's samples and its log-probs are at T
    max_new_tokens: int = 48
    max_prompt_len: int = 256
    leader_prompts: int = 16  # P, prompts per leader step (all ranks)
    micro_batch: int = 64  # sequences per forward / backward
    # the run
    out_dir: str = "out/pbpo"
    seed: int = 0
    resume: bool = False  # continue the run in out_dir from its checkpoint
    eval_max: int = 256  # held-out prompts evaluated at the start and the end
    on_nonfinite: str = "skip"  # skip | stop: a NaN/inf gradient, or diverged weights (README)
    dist_timeout: int = 1800  # seconds a collective waits (e.g. for a dead rank) before failing

    AT_LEAST = {"episodes": (1, "K"), "explore_prompts": (1, "M"), "n_candidates": (1, "N"),
                "t_out": (1, "T_out"), "t_in": (1, "T_in"), "ref_samples": (1, "R"),
                "group": (2, "the leave-one-out baseline needs G >= 2"), "leader_prompts": (1, "P"),
                "max_new_tokens": (1, "a response needs a token"), "max_prompt_len": (1, ""),
                "micro_batch": (1, ""), "rm_batch": (1, ""), "eval_max": (1, ""),
                "lam": (1e-8, "Σ = λI + ... must be invertible"), "bound": (1e-8, "B"),
                "temperature": (1e-6, "T: the leader scores its samples' log-probs at T"),
                "enh_temp": (1e-6, "T_enh: logits / T_enh must stay finite")}
    CHOICES = {"level": ("seq", "token"), "anchor": ("sft", "ref"),
               "on_nonfinite": ("skip", "stop")}
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
    """η = η_r / (1 + β|D|L): F's curvature is at most β|D|L (gap is linear, ∇²ℓ_i ≤ ‖ΔΦ‖²/4 ≤ L: 1
    for unit-norm φ, H² at the token level), so with η_r ≤ 1 every step lowers F, whatever β|D|."""
    return rm_lr / (1.0 + beta * n_pairs * curvature)


def zeta(c, d, k):  # ζ_k = c d log(1 + k), the theory's O(d log k); log k would pin w to ŵ at k = 1
    return c * d * math.log1p(k)


def fit_mle(phi0, phi1, labels, bound, w=None, steps=10_000, tol=1e-6):
    """ŵ = argmin_{‖w‖≤B} ℓ_D(w) on the whole of D -> (ŵ, ℓ_D(ŵ)): FISTA (momentum restarted when it
    points uphill) in float64 from w (a warm start) or 0, step 1/L, L = ‖X‖²/4 ≥ ∇²ℓ_D, until the
    projected gradient's norm is below tol; stopped early, ℓ_D(ŵ) is high, which widens the set."""
    x = (2.0 * labels.double() - 1.0)[:, None] * (phi1 - phi0).double()  # (n, d) X: rows s_i ΔΦ_i
    lipschitz = max(torch.linalg.matrix_norm(x, ord=2).item() ** 2 / 4, 1e-12)
    w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if w is None else w.double()
    previous = w
    momentum = 1.0
    for _ in range(steps):
        momentum_next = (1 + math.sqrt(1 + 4 * momentum ** 2)) / 2
        y = w + (momentum - 1) / momentum_next * (w - previous)  # (d,)
        step = y + x.T @ torch.sigmoid(-(x @ y)) / lipschitz  # y − ∇ℓ_D(y) / L
        step = step * (bound / step.norm()).clamp(max=1.0)  # Proj_B
        if torch.dot(y - step, step - w) > 0:  # the momentum points uphill: restart it
            momentum_next = 1.0
        previous, w, momentum = w, step, momentum_next
        if (y - step).norm() * lipschitz <= tol:
            break
    return w.to(phi0.dtype), torch.nn.functional.softplus(-(x @ w)).sum().item()


def dual_ascent(beta, nll_sum, nll_mle, zeta, lr):  # β ← max(0, β + lr (ℓ_D(w) − ℓ_D(ŵ) − ζ_k))
    return max(0.0, beta + lr * (nll_sum - nll_mle - zeta))  # rises while w is outside the set


def leave_one_out(values, group):  # A_i = v_i − mean_{j≠i} v_j among each prompt's G samples
    v = values.view(-1, group, *values.shape[1:])  # (P, G, ...) from values (n, ...), n = P · G
    return (v - (v.sum(1, keepdim=True) - v) / (group - 1)).view_as(values)


def advantages(rewards, log_ratio, response_mask, kl_coef, group):
    """The leave-one-out advantage of the KL-regularised reward r̃ = r_w − κ log(π_θ / π_anchor),
    the sampled tokens' log-ratio held constant -> (n, T), 0 off the response. log_ratio and
    response_mask (n, T); rewards (n,) r_w(τ) at the sequence level, one advantage for all of τ's
    tokens, or (n, T) ⟨w, φ_h⟩ at the token level: R_h = Σ_{h'≥h} r̃_h' against h's baseline."""
    if rewards.dim() == 1:
        shaped = rewards - kl_coef * log_ratio.sum(-1)  # (n,)
        return leave_one_out(shaped, group)[:, None] * response_mask
    returns = (rewards - kl_coef * log_ratio).flip(-1).cumsum(-1).flip(-1)  # (n, T)
    return leave_one_out(returns, group) * response_mask


def leader_loss(logp, advantage, n_samples):
    """−(1/n) Σ_τ Σ_h A_h log π_θ(y_h | x, y_<h), whose gradient over samples of π_θ estimates
    −∇_θ (E r_w − κ KL(π_θ ‖ π_anchor)). logp, advantage (b, T); n_samples: all ranks' samples."""
    return -(advantage * logp).sum() / n_samples


def on_response(values, response_mask):  # per-row token values at a batch's response positions
    flat = torch.tensor([v for row in values for v in row], device=response_mask.device)
    return torch.zeros(response_mask.shape, device=flat.device).masked_scatter(response_mask, flat)


if __name__ == "__main__":
    run.friendly_errors("train_pbpo.py")
    cfg = run.parse_flags(Config, __doc__)
    rank, world, device = run.init_distributed(cfg.dist_timeout)
    master = rank == 0
    if cfg.explore_prompts % world or cfg.leader_prompts % world:
        raise ValueError(f"--explore_prompts={cfg.explore_prompts} and --leader_prompts="
                         f"{cfg.leader_prompts} must be multiples of the world size {world}")
    mode = run.start(cfg, rank, world)  # 'fresh', 'resume' or 'restart'

    # ---------------------------------------------------------------- setup
    tok = data.load_tokenizer(cfg.model)
    eos_ids = M.stop_ids(cfg.model, tok)  # a response ends on any of them
    if cfg.rm_backbone:  # its embedding is given the policy's token ids
        data.load_tokenizer(cfg.rm_backbone, like=tok)
    prompts = data.load_prompts(cfg.prompts, tok, cfg.max_prompt_len)  # all of them, on every rank
    heldout = data.load_prompts(cfg.heldout, tok, cfg.max_prompt_len) if cfg.heldout else []
    oracle = make_oracle(cfg.oracle, cfg.oracle_temp, device)
    oracle.check(prompts + heldout[:cfg.eval_max])  # every record before the first oracle call
    heldout = data.shard(heldout[:cfg.eval_max], rank, world)
    policy = M.from_pretrained(cfg.model, device)
    longest = max(len(p["prompt_ids"]) for p in prompts)
    for prompts_flag, n_flag in (("explore_prompts", "n_candidates"), ("leader_prompts", "group"),
                                 ("leader_prompts", "ref_samples")):  # each sampled at once
        count, per_prompt = getattr(cfg, prompts_flag), getattr(cfg, n_flag)
        what = f"--{prompts_flag}={count} × --{n_flag}={per_prompt}"
        M.check_fits(policy, count * per_prompt // world, longest, cfg.max_new_tokens, what)
    ref = M.from_pretrained(cfg.model, device).requires_grad_(False)  # π_ref, reset every episode
    sft = M.from_pretrained(cfg.model, device).requires_grad_(False)  # π⁰, for the KL to it
    backbone = M.from_pretrained(cfg.rm_backbone or cfg.model, device)
    rm = RewardModel(backbone, cfg.level, cfg.bound, cfg.normalize).to(device)  # backbone frozen
    if world > 1 or device.type == "cuda":  # FSDP2, bf16 compute; one CPU process runs plain fp32
        for m in (policy, ref, sft, rm.backbone):
            run.shard_model(m)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    rm_opt = torch.optim.SGD([rm.w], lr=cfg.rm_lr)  # no momentum: no state to checkpoint
    cov = Covariance(rm.w.numel(), cfg.lam, device)
    pairs = {"phi0": [], "phi1": [], "label": []}  # D, with the features cached
    store = (data.PreferenceStore(os.path.join(cfg.out_dir, "preferences.jsonl"), "episode")
             if master else None)  # D as labelled, on disk
    log = run.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master)
    ckpt_path = os.path.join(cfg.out_dir, run.CHECKPOINT)
    start, sft_eval, calls = 1, None, 0  # calls: oracle calls of the whole job, all ranks

    def draw(count, *purpose):
        """`count` prompts for this purpose -> (this rank's block, its offset). Keyed by purpose,
        never rank: any world size draws the same prompts (with per-row seeds, responses)."""
        picked = torch.randint(len(prompts), (count,), generator=run.generator(cfg.seed, *purpose))
        share = count // world
        return [prompts[i] for i in picked[rank * share:(rank + 1) * share]], rank * share

    def sample(model, items, n, temperature, offset, *purpose):
        """n responses per prompt: (each row's prompt ids, response ids, sampled log-probs). Row j
        of the whole draw (all ranks) is seeded seed_of(purpose) + j."""
        prompt_ids = [p["prompt_ids"] for p in items]
        responses, logps = M.sample(model, prompt_ids, cfg.max_new_tokens, temperature, n=n,
                                    seed=run.seed_of(cfg.seed, *purpose) + offset * n,
                                    logprobs=True, eos_ids=eos_ids, pad_id=tok.pad_token_id)
        return [p for p in prompt_ids for _ in range(n)], responses, logps

    def batch(prompt_ids, responses):
        return [t.to(device) for t in data.collate(prompt_ids, responses, tok.pad_token_id)]

    @torch.no_grad()
    def features(prompt_ids, responses):  # Φ(τ) (n, d) by the RM backbone, micro_batch at a time
        return torch.cat([trajectory_features(rm.phi(*batch(prompt_ids[i:i + cfg.micro_batch],
                                                            responses[i:i + cfg.micro_batch])))
                          for i in range(0, len(responses), cfg.micro_batch)])  # (n, d)

    def mean_all(values):  # the mean of a 1-d tensor's values over all ranks
        total, count = run.all_sum([float(values.sum()), values.numel()], device)
        return total / max(count, 1)

    def log_metrics(kind, **metrics):
        log.write(kind=kind, oracle_calls=calls, **metrics)

    norm0 = run.param_norm(sft)  # ‖θ⁰‖: weights far past it have diverged

    if mode == "restart":  # killed before its first checkpoint: its pairs are labelled again
        log.cut(0)
        if master and store.records:
            store.keep_before(1)  # episodes count from 1: every pair is set aside
            print(f"{ckpt_path} does not exist yet: starting over; the pairs labelled before are "
                  f"kept in {store.dropped_path} and labelled again")
    if mode == "resume":
        state = run.load_checkpoint(ckpt_path, {"policy": (policy, opt)})
        if state["episode"] > cfg.episodes:
            raise ValueError(f"--episodes={cfg.episodes}: the run is past episode "
                             f"{state['episode']} already")
        start = state["episode"] + 1
        rm.w.data.copy_(state["w"])
        log.cut(state["log_size"])
        cov.load_state_dict(state["cov"])
        calls, sft_eval = state["oracle_calls"], state["sft_eval"]
        pairs.update(state["pairs"])
        if master:  # pairs labelled after the checkpoint are set aside and labelled again
            store.keep_before(start)
            print(f"resumed from {ckpt_path} after episode {start - 1} with {len(store)} pairs")

    if sft_eval is None and heldout:
        sft_eval = oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=eos_ids)
        log_metrics("sft_eval", **sft_eval)

    # ---------------------------------------------------------------- episodes
    bar = tqdm(range(start, cfg.episodes + 1), desc="episodes", disable=not master)
    for episode in bar:
        ref.load_state_dict(policy.state_dict())  # π_ref = π, frozen for this episode
        gen_seconds = train_seconds = 0.0

        # ------------------------------------------------ (I) reward-agnostic exploration
        t0 = time.time()
        items, offset = draw(cfg.explore_prompts, "explore", episode)
        rows0, y0, _ = sample(ref, items, 1, cfg.temperature, offset, "y0", episode)
        rows, candidates, _ = sample(ref, items, cfg.n_candidates, cfg.enh_temp, offset, "enh",
                                     episode)
        gen_seconds += time.time() - t0
        phi0 = features(rows0, y0).cpu()  # (m, d)
        phi_cand = features(rows, candidates).cpu().view(len(items), cfg.n_candidates, -1)
        N = cfg.n_candidates  # every rank holds every prompt's candidates, in the global order
        everyone = run.gather([(it, a, candidates[i * N:(i + 1) * N], f0, fc) for i, (it, a, f0, fc)
                               in enumerate(zip(items, y0, phi0, phi_cand))])
        new, potential = [], 0.0  # the pairs worth an oracle call: two different responses
        for item, a, cands, f0, fc in everyone:
            j, dphi, u = select_pair(cov, f0.to(device), fc.to(device))
            potential += cov.update(dphi[None])  # a zero Δφ (y^{j*} = y⁰) leaves Σ unchanged
            if cands[j] != a:
                new.append((item, a, cands[j], f0, fc[j], u))
        if not new and not pairs["label"]:
            raise ValueError(f"episode {episode}: every candidate repeated y⁰, so there is no pair "
                             "to label; raise --enh_temp or --n_candidates")
        lo, hi = len(new) * rank // world, len(new) * (rank + 1) // world  # this rank labels these
        mine = [new[i][0] for i in range(lo, hi)]
        text0 = [data.decode(tok, p[1]) for p in new]
        text1 = [data.decode(tok, p[2]) for p in new]
        s0, s1 = oracle.score(mine, text0[lo:hi]), oracle.score(mine, text1[lo:hi])
        calls += 2 * len(new)  # over all ranks: both responses of every new pair scored
        score0, score1 = torch.tensor(run.gather(list(zip(s0.tolist(), s1.tolist())))).view(-1, 2).T
        labels = oracle.label(score0, score1, run.generator(cfg.seed, "oracle", episode))
        with torch.no_grad():  # the current RM on the new pairs, before it is fit on them
            right = [bool(rm(f1[None].to(device)) > rm(f0[None].to(device))) == bool(o)
                     for (*_, f0, f1, _), o in zip(new, labels)]
        for i, (item, a, b, f0, f1, u) in enumerate(new):  # every rank keeps all of D
            record = dict(episode=episode, prompt=item["prompt"], prompt_ids=item["prompt_ids"],
                          response0=text0[i], response1=text1[i], response0_ids=a, response1_ids=b,
                          label=int(labels[i]), score0=float(score0[i]), score1=float(score1[i]),
                          uncertainty=u)
            if master:
                store.append(record)
            pairs["phi0"].append(f0)
            pairs["phi1"].append(f1)
            pairs["label"].append(record["label"])
        log_metrics("explore", episode=episode, pairs=len(pairs["label"]), new_pairs=len(new),
                    identical=len(everyone) - len(new), potential=potential,
                    uncertainty=sum(u for *_, u in new) / max(len(new), 1),
                    rm_acc_fresh=sum(right) / len(right) if new else None,
                    oracle_score=float(torch.cat([score0, score1]).mean()) if new else None)

        # ------------------------------------------------ (II) reward-aware exploitation
        phi0_all = torch.stack(pairs["phi0"]).to(device)  # (n, d)
        phi1_all = torch.stack(pairs["phi1"]).to(device)  # (n, d)
        label_all = torch.tensor(pairs["label"], device=device)  # (n,)
        for step in range(cfg.t_out):
            t0 = time.time()
            where = f"episode {episode}, leader step {step}"
            items, offset = draw(cfg.leader_prompts, "leader", episode, step)
            rows, responses, sampled_logp = sample(policy, items, cfg.group, cfg.temperature,
                                                   offset, "policy", episode, step)
            ref_rows, ref_responses, _ = sample(ref, items, cfg.ref_samples, cfg.temperature,
                                                offset, "ref", episode, step)
            gen_seconds += time.time() - t0
            t0 = time.time()
            ids, attn, resp = batch(rows, responses)  # (n, T)
            micro, temp = torch.arange(len(ids)).split(cfg.micro_batch), cfg.temperature
            with torch.no_grad():
                phi = torch.cat([rm.phi(ids[r], attn[r], resp[r]) for r in micro])  # (n, [T,] d)

            # follower: T_in steps on L_BT + ρ·gap, the same on every rank (all ranks' samples)
            phi_pi = torch.cat(run.gather([trajectory_features(phi).cpu()])).to(device)  # (P·G, d)
            phi_base = torch.cat(run.gather([features(ref_rows, ref_responses).cpu()])).to(device)
            for i in range(cfg.t_in):
                idx = torch.randperm(len(label_all), generator=run.generator(
                    cfg.seed, "follower", episode, step, i))[:cfg.rm_batch].to(device)
                loss, fit, gap = follower_loss(rm, phi0_all[idx], phi1_all[idx], label_all[idx],
                                               phi_pi, phi_base, cfg.adv_coef)
                loss.backward()
                if run.finite(rm.w.grad.norm().item(), "reward-model gradient", where, log,
                              cfg.on_nonfinite, ckpt_path, episode=episode, step=step):
                    rm_opt.step()
                    rm.project()
                rm_opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # the gap prompt by prompt: its spread gives its standard error
                gap_by_prompt = (rm(phi_pi).view(-1, cfg.group).mean(1)
                                 - rm(phi_base).view(-1, cfg.ref_samples).mean(1))  # (P,)

            # leader: REINFORCE on r̃ = r_w − κ log(π_θ/π_anchor), all at the sampling temperature T
            with torch.no_grad():
                rewards = phi @ rm.w  # (n,) r_w(τ) seq, (n, T) ⟨w, φ_h⟩ per response token
                logp = on_response(sampled_logp, resp)  # (n, T), the sampler's log π_θ, constant
                logp_sft = M.token_logprobs(sft, ids, attn, temp, micro_batch=cfg.micro_batch)
                logp_anchor = (logp_sft if cfg.anchor == "sft" else
                               M.token_logprobs(ref, ids, attn, temp, micro_batch=cfg.micro_batch))
                log_ratio = (logp - logp_anchor) * resp  # (n, T)
                advantage = advantages(rewards, log_ratio, resp, cfg.kl_coef, cfg.group)
                r_pi = rm(phi)  # (n,) r_w(τ) per response (at the token level: summed over h)
            for r in micro:  # the loss divides by all ranks' count, FSDP averages ranks: · world
                logp_theta = M.token_logprobs(policy, ids[r], attn[r], temp)  # (b, T), with grad
                (leader_loss(logp_theta, advantage[r], len(phi_pi)) * world).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            if run.finite(float(grad_norm), "policy gradient", where, log, cfg.on_nonfinite,
                          ckpt_path, episode=episode, step=step):
                opt.step()
                run.check_weights(policy, norm0, where, log, cfg.on_nonfinite,
                                  ckpt_path, episode=episode, step=step)
            opt.zero_grad(set_to_none=True)
            train_seconds += time.time() - t0

            # health signals, over all ranks: what over-optimisation of r_w looks like
            gold = torch.tensor(oracle.score_fn([p for p in items for _ in range(cfg.group)],
                                                [data.decode(tok, y) for y in responses]))
            both = torch.tensor(run.gather(list(zip(r_pi.tolist(), gold.tolist())))).T  # (2, n)
            kl_sft = mean_all(((logp - logp_sft) * resp).sum(-1))
            gap_se = gap_by_prompt.std() / len(gap_by_prompt) ** 0.5
            log_metrics("step", episode=episode, step=step, rm_bt=fit.item(),
                        rm_gap=gap_by_prompt.mean().item(), rm_gap_se=gap_se.item(),
                        rm_reward=both[0].mean().item(), gold_reward=both[1].mean().item(),
                        rm_gold_corr=torch.corrcoef(both)[0, 1].item(),
                        kl_anchor=mean_all(log_ratio.sum(-1)), kl_sft=kl_sft,
                        grad_norm=float(grad_norm), w_norm=rm.w.norm().item(),
                        length=mean_all(resp.sum(-1).float()))
            bar.set_postfix(gold=f"{both[1].mean().item():.3f}", kl_sft=f"{kl_sft:.2f}")

        log_metrics("episode", episode=episode, gen_s=gen_seconds, train_s=train_seconds)
        run.save_checkpoint(ckpt_path, {"policy": (policy, opt)}, config=asdict(cfg),
                            episode=episode, w=rm.w.detach().cpu(), cov=cov.state_dict(),
                            oracle_calls=calls, sft_eval=sft_eval, log_size=log.size(), pairs=pairs,
                            store_pairs=len(pairs["label"]),
                            store_sha256=data.digest(store.records) if master else None)

    # ---------------------------------------------------------------- final evaluation and export
    final_eval = (oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=eos_ids)
                  if heldout else {})
    log_metrics("final_eval", **final_eval)
    export = os.path.join(cfg.out_dir, "final")
    M.save_pretrained(policy, export, state_dict=run.full_state_dict(policy))
    if master:
        tok.save_pretrained(export)
        if final_eval:
            print(f"held-out gold accuracy: SFT {sft_eval['accuracy']:.3f} -> PbPO "
                  f"{final_eval['accuracy']:.3f}; mean gold reward: SFT {sft_eval['reward']:.3f} "
                  f"-> PbPO {final_eval['reward']:.3f}")
        print(f"policy exported to {export}; metrics in {cfg.out_dir}/metrics.jsonl")
    if world > 1:
        dist.destroy_process_group()
    run.fail_if_diverged(log.path)

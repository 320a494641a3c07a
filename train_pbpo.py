"""
PbPO: preference-based policy optimization (ALGORITHMS.md, "PbPO"). A min-max game between the
policy π (the leader) and a reward model r_w(τ) = ⟨w, φ(τ)⟩ (the follower), one round per episode:

  for episode k = 1..K:
    π_ref = π, frozen for the episode
    (I) reward-agnostic exploration, for each of M prompts x:
        y⁰ ~ π_ref(·|x);  y¹..y^N ~ π_enh(·|x), the policy at temperature T_enh
        j* = argmax_j ‖φ(x, y⁰) − φ(x, y^j)‖_{Σ⁻¹};  o = oracle(x, y⁰, y^{j*})
        D ← D ∪ {(x, y⁰, y^{j*}, o)};  Σ ← Σ + Δφ Δφᵀ
    (II) reward-aware exploitation, T_out times:
        sample G responses per prompt from π and one from π_ref
        follower, T_in steps:  w ← Proj_B(w − η_r ∇_w [L_BT(w; D) + ρ (E_π r_w − E_π_ref r_w)])
        leader, one step:      θ ← θ + η_π ∇_θ [E_π A_w(τ) log π_θ(τ) − κ KL(π_θ ‖ π_ref)]
    with A_w the leave-one-out advantage of r_w among a prompt's G samples.

  python train_pbpo.py                                              # the built-in toy task, CPU
  python train_pbpo.py --model=PATH --prompts=FILE --oracle=gsm8k   # one GPU
  torchrun --nproc_per_node=8 train_pbpo.py --model=PATH --prompts=FILE --oracle=rm:RM_PATH
  python train_pbpo.py --resume                                     # continue out_dir's run
"""
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
    adv_coef: float = 0.1  # ρ, weight of the adversarial gap (0 = a plain maximum-likelihood RM)
    kl_coef: float = 0.05  # κ, weight of KL(π_θ ‖ π_ref)
    bound: float = 10.0  # B, ‖w‖ ≤ B
    lr: float = 1e-4  # η_π, policy learning rate (AdamW)
    rm_lr: float = 1.0  # η_r, reward-head step size (plain gradient steps)
    level: str = "seq"  # seq | token: reward model and advantages per sequence or per token
    # the reward model
    normalize: bool = True  # L2-normalise the features φ
    train_backbone: bool = False  # train the RM backbone too (the theory keeps it frozen)
    rm_backbone_lr: float = 1e-5  # AdamW lr of the RM backbone when --train_backbone
    rm_batch: int = 512  # preference pairs per follower step
    # model, data and oracle
    model: str = ""  # π⁰, an HF checkpoint dir (default: the toy SFT model, built on first use)
    rm_backbone: str = ""  # the RM backbone's checkpoint dir (default: the SFT policy)
    prompts: str = ""  # training prompts (default: the toy train split)
    heldout: str = ""  # held-out prompts for the gold evaluation (default: the toy held-out split)
    oracle: str = "gold"  # gold | gsm8k | rm:PATH
    oracle_temp: float = 0.0  # Bradley-Terry label temperature; 0 = deterministic labels
    # sampling and batching
    temperature: float = 1.0  # sampling temperature of y⁰ and the leader's samples
    max_new_tokens: int = 48
    max_prompt_len: int = 256
    leader_prompts: int = 16  # prompts per leader step (all ranks)
    micro_batch: int = 64  # sequences per forward / backward
    # the run
    out_dir: str = "out/pbpo"
    seed: int = 0
    resume: bool = False  # continue the run in out_dir from its checkpoint
    eval_max: int = 256  # held-out prompts evaluated at the start and the end
    on_nonfinite: str = "skip"  # skip | stop: a NaN/inf loss or gradient skips the update, or stops
    dist_timeout: int = 1800  # seconds a collective waits (e.g. for a dead rank) before failing

    AT_LEAST = {"episodes": (1, "K"), "explore_prompts": (1, "M"), "n_candidates": (1, "N"),
                "t_out": (1, "T_out"), "t_in": (1, "T_in"), "eval_max": (1, ""),
                "group": (2, "the leave-one-out baseline needs G >= 2"),
                "leader_prompts": (1, ""), "max_new_tokens": (1, "a response needs a token"),
                "max_prompt_len": (1, ""), "micro_batch": (1, ""), "rm_batch": (1, ""),
                "lam": (1e-8, "Σ = λI + ... must be invertible"), "bound": (1e-8, "B")}
    CHOICES = {"level": ("seq", "token"), "on_nonfinite": ("skip", "stop")}
    RESUME_MAY_CHANGE = ("episodes", "micro_batch", "on_nonfinite", "dist_timeout")  # README


# ---------------------------------------------------------------- the objectives
def follower_loss(rm, phi0, phi1, labels, phi_pi, phi_ref, rho):
    """L_BT(w; D) + ρ (mean r_w(τ~π) − mean r_w(τ~π_ref)): the pessimistic reward model inside the
    confidence set of D. Returns (loss, the BT loss, the gap)."""
    fit = bt_loss(rm(phi0), rm(phi1), labels)
    gap = rm(phi_pi).mean() - rm(phi_ref).mean()
    return fit + rho * gap, fit.detach(), gap.detach()


def leave_one_out(values, group):
    """A_i = v_i − mean_{j≠i} v_j among each prompt's G samples; values (n, ...), n = P · G."""
    v = values.view(-1, group, *values.shape[1:])  # (P, G, ...)
    return (v - (v.sum(1, keepdim=True) - v) / (group - 1)).view_as(values)


def leader_loss(logp, logp_ref, advantages, response_mask, kl_coef, n_seqs, n_tokens):
    """−(1/n) Σ_τ Σ_h A_h log π_θ(y_h | ·) + κ · KL, the KL estimated per token as
    exp(δ) − δ − 1 with δ = log π_ref − log π_θ and averaged over all n_tokens response tokens.
    logp, logp_ref, advantages (b, T), response_mask (b, T). Returns (loss, pg term, KL sum)."""
    delta = logp_ref - logp
    kl = (delta.exp() - delta - 1) * response_mask  # (b, T)
    pg = -(advantages * logp).sum() / n_seqs
    return pg + kl_coef * kl.sum() / n_tokens, pg.detach(), kl.sum().detach()


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
    if cfg.rm_backbone:  # its embedding is given the policy's token ids
        data.load_tokenizer(cfg.rm_backbone, like=tok)
    prompts = data.shard(data.load_prompts(cfg.prompts, tok, cfg.max_prompt_len), rank, world)
    heldout = data.load_prompts(cfg.heldout, tok, cfg.max_prompt_len) if cfg.heldout else []
    heldout = data.shard(heldout[:cfg.eval_max], rank, world)
    oracle = make_oracle(cfg.oracle, cfg.oracle_temp, device)
    policy = M.from_pretrained(cfg.model, device)
    stop = M.stop_ids(cfg.model, tok)  # a response ends on any of them
    ref = M.from_pretrained(cfg.model, device).requires_grad_(False)  # π_ref, reset every episode
    backbone = M.from_pretrained(cfg.rm_backbone or cfg.model, device)
    rm = RewardModel(backbone, cfg.level, cfg.bound, cfg.normalize, cfg.train_backbone).to(device)
    if world > 1 or device.type == "cuda":  # FSDP2, bf16 compute; one CPU process runs plain fp32
        for m in (policy, ref, rm.backbone):
            run.shard_model(m)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    rm_opt = torch.optim.SGD([rm.w], lr=cfg.rm_lr)  # no momentum: no state to checkpoint
    bb_opt = torch.optim.AdamW(rm.backbone.parameters(), lr=cfg.rm_backbone_lr) \
        if cfg.train_backbone else None
    cov = Covariance(rm.w.numel(), cfg.lam, device)
    pairs = {"phi0": [], "phi1": [], "label": [], "records": []}  # D, with the features cached
    store = data.PreferenceStore(os.path.join(cfg.out_dir, "preferences.jsonl")) if master else None
    log = run.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master)
    ckpt_path = os.path.join(cfg.out_dir, run.CHECKPOINT)
    start, sft_eval, calls = 1, None, 0  # calls: oracle calls of the whole job, all ranks

    def sample(model, items, n, temperature, key):
        """n responses per prompt: (prompt ids, response ids), one row each."""
        prompt_ids = [p["prompt_ids"] for p in items]
        seed = int(torch.randint(2**31, (1,), generator=key))
        responses = M.sample(model, prompt_ids, cfg.max_new_tokens, temperature, n=n, seed=seed,
                             eos_ids=stop, pad_id=tok.pad_token_id)
        return [p for p in prompt_ids for _ in range(n)], responses

    def batch(prompt_ids, responses):
        return [t.to(device) for t in data.collate(prompt_ids, responses, tok.pad_token_id)]

    def features(prompt_ids, responses, grad=False):
        """Φ(τ) (n, d) from the RM backbone, micro_batch trajectories at a time."""
        out = []
        with torch.set_grad_enabled(grad):
            for i in range(0, len(responses), cfg.micro_batch):
                rows = slice(i, i + cfg.micro_batch)
                phi = rm.phi(*batch(prompt_ids[rows], responses[rows]))
                out.append(trajectory_features(phi))
        return torch.cat(out)  # (n, d)

    def log_metrics(kind, **metrics):
        log.write(kind=kind, oracle_calls=calls, **metrics)

    def checkpoint_modules():
        modules = {"policy": (policy, opt)}
        if cfg.train_backbone:
            modules["rm_backbone"] = (rm.backbone, bb_opt)
        return modules

    if mode == "restart" and master:  # killed before its first checkpoint: labelled again
        print(f"{ckpt_path} does not exist yet: starting over, the {len(store)} pairs in the store "
              "are labelled again")
        store.rewrite([])
        log.cut(0)
    if mode == "resume":
        state = run.load_checkpoint(ckpt_path, checkpoint_modules())
        if state["episode"] > cfg.episodes:
            raise ValueError(f"--episodes={cfg.episodes}: the run is past episode "
                             f"{state['episode']} already")
        rm.w.data.copy_(state["w"])
        log.cut(state["log_size"])
        cov.load_state_dict(state["cov"])
        calls, sft_eval, start = state["oracle_calls"], state["sft_eval"], state["episode"] + 1
        pairs.update(state["pairs"])
        if master:  # pairs labelled after the checkpoint are dropped and labelled again
            store.rewrite([r for r in store.records if r["episode"] < start])
        pairs["records"] = list(run.broadcast(store.records if master else None))  # a copy
        if len(pairs["records"]) != len(pairs["label"]):
            raise ValueError(f"{os.path.join(cfg.out_dir, 'preferences.jsonl')} holds "
                             f"{len(pairs['records'])} pairs up to episode {start - 1} but "
                             f"{ckpt_path} has {len(pairs['label'])}: not the same run")
        if master:
            print(f"resumed from {ckpt_path} after episode {start - 1} with "
                  f"{len(pairs['label'])} pairs")

    if sft_eval is None and heldout:
        sft_eval = oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=stop)
        log_metrics("sft_eval", **sft_eval)

    # ---------------------------------------------------------------- episodes
    bar = tqdm(range(start, cfg.episodes + 1), desc="episodes", disable=not master)
    for episode in bar:
        ref.load_state_dict(policy.state_dict())  # π_ref = π, frozen for this episode
        gen_seconds = train_seconds = 0.0

        # ------------------------------------------------ (I) reward-agnostic exploration
        t0 = time.time()
        key = run.generator(cfg.seed, "explore", episode, rank)
        picked = torch.randint(len(prompts), (cfg.explore_prompts // world,), generator=key)
        items = [prompts[i] for i in picked]
        ref_prompts, ref_responses = sample(policy, items, 1, cfg.temperature, key)  # y⁰ ~ π_ref
        cand_prompts, candidates = sample(policy, items, cfg.n_candidates, cfg.enh_temp, key)
        gen_seconds += time.time() - t0
        with torch.no_grad():
            phi_ref = features(ref_prompts, ref_responses)  # (m, d)
            phi_cand = features(cand_prompts, candidates).view(len(items), cfg.n_candidates, -1)
        potential, picks, uncertainty = 0.0, [], []
        for i in range(len(items)):  # lock-step across ranks: Σ sees every Δφ in the same order
            j, dphi, u = select_pair(cov, phi_ref[i], phi_cand[i])
            potential += cov.update_all_ranks(dphi[None])
            picks.append(j)
            uncertainty.append(u)
        chosen = [candidates[i * cfg.n_candidates + j] for i, j in enumerate(picks)]  # y^{j*}
        phi_chosen = phi_cand[torch.arange(len(items)), torch.tensor(picks)]  # (m, d)
        text0 = [data.decode(tok, y) for y in ref_responses]
        text1 = [data.decode(tok, y) for y in chosen]
        before = oracle.calls
        labels, score0, score1 = oracle.compare(items, text0, text1, run.generator(
            cfg.seed, "oracle", episode, rank))
        with torch.no_grad():  # the current RM on pairs it has not been fit on yet
            rm_acc = ((rm(phi_chosen) > rm(phi_ref)).long().cpu() == labels).float().mean().item()
        new_pairs = []
        for i, item in enumerate(items):
            record = dict(episode=episode, prompt=item["prompt"], prompt_ids=item["prompt_ids"],
                          response0=text0[i], response1=text1[i], response0_ids=ref_responses[i],
                          response1_ids=chosen[i], label=int(labels[i]), score0=float(score0[i]),
                          score1=float(score1[i]), uncertainty=uncertainty[i])
            new_pairs.append((record, phi_ref[i].cpu(), phi_chosen[i].cpu()))
        for record, phi0, phi1 in run.gather(new_pairs):  # every rank keeps all of D, in rank order
            if master:
                store.append(record)
            pairs["records"].append(record)
            pairs["phi0"].append(phi0)
            pairs["phi1"].append(phi1)
            pairs["label"].append(record["label"])
        calls += int(sum(run.gather([oracle.calls - before])))
        records = pairs["records"]
        store_hash = run.digest([(r["label"], r["response0_ids"], r["response1_ids"])
                                 for r in records])
        log_metrics("explore", episode=episode, pairs=len(pairs["label"]),
                    uncertainty=sum(uncertainty) / len(uncertainty), potential=potential,
                    rm_acc_fresh=rm_acc, oracle_score=float((score0.mean() + score1.mean()) / 2),
                    sigma_hash=run.gather([run.digest(cov.sigma.cpu().numpy().tobytes())]),
                    store_hash=run.gather([store_hash]))

        # ------------------------------------------------ (II) reward-aware exploitation
        phi0_all = torch.stack(pairs["phi0"]).to(device)  # (n, d)
        phi1_all = torch.stack(pairs["phi1"]).to(device)  # (n, d)
        label_all = torch.tensor(pairs["label"], device=device)  # (n,)
        for step in range(cfg.t_out):
            t0 = time.time()
            key = run.generator(cfg.seed, "leader", episode, step, rank)
            picked = torch.randint(len(prompts), (cfg.leader_prompts // world,), generator=key)
            items = [prompts[i] for i in picked]
            pi_prompts, pi_responses = sample(policy, items, cfg.group, cfg.temperature, key)
            base_prompts, base_responses = sample(ref, items, 1, cfg.temperature, key)  # π_ref
            gen_seconds += time.time() - t0
            t0 = time.time()

            # follower: T_in steps on L_BT + ρ·gap
            where = f"episode {episode}, leader step {step}"
            with torch.no_grad():
                phi_pi = features(pi_prompts, pi_responses)  # (n, d)
                phi_base = features(base_prompts, base_responses)  # (P, d)
            for i in range(cfg.t_in):
                perm = torch.randperm(len(label_all), generator=run.generator(
                    cfg.seed, "follower", episode, step, i))
                idx = perm[:cfg.rm_batch][rank::world].to(device)
                if cfg.train_backbone:  # features move with the backbone: recompute, with grad
                    recs = [pairs["records"][j] for j in idx.tolist()]
                    rec_prompts = [r["prompt_ids"] for r in recs]
                    phi0 = features(rec_prompts, [r["response0_ids"] for r in recs], grad=True)
                    phi1 = features(rec_prompts, [r["response1_ids"] for r in recs], grad=True)
                    phi_pi = features(pi_prompts, pi_responses, grad=True)
                    phi_base = features(base_prompts, base_responses, grad=True)
                else:
                    phi0, phi1 = phi0_all[idx], phi1_all[idx]
                loss, fit, gap = follower_loss(rm, phi0, phi1, label_all[idx], phi_pi, phi_base,
                                               cfg.adv_coef)
                loss.backward()
                if world > 1:  # w is replicated, not sharded: average its gradient by hand
                    dist.all_reduce(rm.w.grad, op=dist.ReduceOp.AVG)
                if run.finite(rm.w.grad.norm().item(), "reward-model gradient", where, log,
                              cfg.on_nonfinite, ckpt_path, episode=episode, step=step):
                    rm_opt.step()
                    rm.project()
                    if bb_opt:
                        bb_opt.step()
                rm_opt.zero_grad(set_to_none=True)
                if bb_opt:
                    bb_opt.zero_grad(set_to_none=True)

            # leader: policy-gradient ascent on the pessimistic reward, KL-anchored to π_ref
            ids, attn, resp = batch(pi_prompts, pi_responses)  # (n, T)
            micro = torch.arange(len(ids)).split(cfg.micro_batch)
            with torch.no_grad():
                phi = torch.cat([rm.phi(ids[r], attn[r], resp[r]) for r in micro])
                if cfg.level == "token":  # returns R_h = Σ_{h'≥h} ⟨w, φ_h'⟩, baseline at the same h
                    returns = rm.token_rewards(phi).flip(-1).cumsum(-1).flip(-1)  # (n, T)
                    advantages = leave_one_out(returns, cfg.group) * resp
                else:
                    advantages = leave_one_out(rm(phi), cfg.group)[:, None] * resp  # (n, T)
                logp_ref = M.token_logprobs(ref, ids, attn, micro_batch=cfg.micro_batch)
            n_tokens, pg_sum, kl_sum = resp.sum(), 0.0, 0.0
            for r in micro:
                logp = M.token_logprobs(policy, ids[r], attn[r])  # (b, T)
                loss, pg, kl = leader_loss(logp, logp_ref[r], advantages[r], resp[r], cfg.kl_coef,
                                           len(ids), n_tokens)
                loss.backward()
                pg_sum, kl_sum = pg_sum + pg.item(), kl_sum + kl.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            if run.finite(float(grad_norm), "policy gradient", where, log, cfg.on_nonfinite,
                          ckpt_path, episode=episode, step=step):
                opt.step()
            opt.zero_grad(set_to_none=True)
            train_seconds += time.time() - t0
            with torch.no_grad():
                rm_reward = rm(phi).mean().item()
            texts = [data.decode(tok, y) for y in pi_responses]
            rows = [p for p in items for _ in range(cfg.group)]
            gold = torch.tensor(oracle.score_fn(rows, texts))
            kl_per_token = kl_sum / n_tokens.item()
            log_metrics("step", episode=episode, step=step, rm_bt=fit.item(), rm_gap=gap.item(),
                        rm_reward=rm_reward, gold_reward=gold.mean().item(), kl=kl_per_token,
                        pg_loss=pg_sum, grad_norm=float(grad_norm), w_norm=rm.w.norm().item(),
                        length=resp.sum(-1).float().mean().item())
            bar.set_postfix(gold=f"{gold.mean().item():.3f}", kl=f"{kl_per_token:.3f}")

        log_metrics("episode", episode=episode, gen_s=gen_seconds, train_s=train_seconds)
        run.save_checkpoint(ckpt_path, checkpoint_modules(), config=asdict(cfg), episode=episode,
                            w=rm.w.detach().cpu(), cov=cov.state_dict(), oracle_calls=calls,
                            sft_eval=sft_eval, log_size=log.size(),
                            pairs={k: v for k, v in pairs.items() if k != "records"})

    # ---------------------------------------------------------------- final evaluation and export
    final_eval = oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=stop) \
        if heldout else {}
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

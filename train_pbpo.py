"""
PbPO: preference-based policy optimization (ALGORITHMS.md, "PbPO"). Each episode: (I) reward-agnostic
exploration picks the most informative pair per prompt by elliptical uncertainty and asks the oracle;
(II) reward-aware exploitation plays the min-max game: the follower fits a pessimistic reward model
inside the confidence set of the preference data, the leader takes a KL-anchored policy-gradient step.

  python train_pbpo.py                                              # the built-in toy task, CPU
  python train_pbpo.py --model=PATH --prompts=FILE --oracle=gsm8k   # one GPU
  torchrun --nproc_per_node=8 train_pbpo.py --model=PATH --prompts=FILE --oracle=rm:RM_PATH
  python train_pbpo.py --resume                                     # continue from out_dir's checkpoint
"""
import hashlib
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as evaluate
import model as M
from explore import Covariance, select_pair, trajectory_features
from reward import RewardModel, follower_loss, make_oracle


@dataclass
class Config:
    model: str = ""  # SFT policy π⁰, an HF checkpoint dir (default: the toy SFT model, built on first use)
    rm_backbone: str = ""  # RM backbone checkpoint (default: the SFT policy)
    prompts: str = ""  # training prompts, JSONL (default: the toy train split)
    heldout: str = ""  # held-out prompts for the final gold evaluation (default: the toy held-out split)
    oracle: str = "gold"  # gold | gsm8k | rm:PATH
    oracle_temp: float = 0.0  # BT label temperature; 0 = deterministic labels
    out_dir: str = "out/pbpo"
    seed: int = 0
    resume: bool = False
    episodes: int = 6  # K
    explore_prompts: int = 64  # M, prompts per episode for reward-agnostic exploration (all ranks)
    n_candidates: int = 4  # N, enhancer candidates per prompt; 1 = no reward-agnostic exploration
    enh_temp: float = 1.2  # T_enh, the enhancer's sampling temperature
    t_out: int = 8  # T_out, leader steps per episode
    t_in: int = 10  # T_in, follower steps per leader step
    group: int = 8  # G, on-policy samples per prompt for the leave-one-out advantage
    leader_prompts: int = 16  # prompts per leader step (all ranks)
    adv_coef: float = 0.1  # ρ, Lagrangian weight of the adversarial gap (0 = plain MLE reward model)
    kl_coef: float = 0.05  # κ, KL(π_θ ‖ π_ref^k) anchor
    lr: float = 1e-4  # η_π, policy learning rate (AdamW)
    rm_lr: float = 1.0  # η_r, reward-head step size (plain gradient step, as in the spec)
    rm_backbone_lr: float = 1e-5  # AdamW lr of the RM backbone when --train_backbone
    rm_batch: int = 512  # preference pairs per follower step
    bound: float = 10.0  # B, ‖w‖ ≤ B
    lam: float = 1.0  # λ, Σ = λI + Σ ΔφΔφᵀ
    level: str = "seq"  # seq | token reward model (and token-level advantages)
    normalize: bool = True  # L2-normalise features φ
    train_backbone: bool = False  # train the RM backbone too (the theory keeps it frozen)
    temperature: float = 1.0  # policy sampling temperature for y⁰ and the leader's samples
    max_new_tokens: int = 48
    max_prompt_len: int = 256
    micro_batch: int = 64  # sequences per forward/backward in the leader step
    eval_max: int = 256  # held-out prompts evaluated at the start and the end
    on_nonfinite: str = "skip"  # skip | stop: a NaN/inf loss or gradient skips that update, or stops the run
    dist_timeout: int = 1800  # seconds a collective waits (e.g. for a dead rank) before the job fails

    AT_LEAST = {"episodes": (1, "K"), "explore_prompts": (1, "M"), "n_candidates": (1, "N"), "t_out": (1, "T_out"),
                "group": (2, "the leave-one-out baseline needs G >= 2"), "leader_prompts": (1, ""),
                "max_new_tokens": (1, "a response needs a token"), "max_prompt_len": (1, ""), "micro_batch": (1, ""),
                "rm_batch": (1, ""), "lam": (1e-8, "Σ = λI + ... must be invertible"), "bound": (1e-8, "B")}
    CHOICES = {"level": ("seq", "token"), "on_nonfinite": ("skip", "stop")}


data.friendly_errors("train_pbpo.py")
cfg = data.parse_config(Config, __doc__)
rank, world, device = M.init_distributed(cfg.dist_timeout)
master = rank == 0
if cfg.explore_prompts % world or cfg.leader_prompts % world:
    raise ValueError(f"--explore_prompts={cfg.explore_prompts} and --leader_prompts={cfg.leader_prompts} must be "
                     f"multiples of the world size {world}")
mode = data.start_run(cfg, rank, world)  # the toy task by default; 'fresh', 'resume' or 'restart'


def digest(obj):
    return hashlib.sha256(obj if isinstance(obj, bytes) else repr(obj).encode()).hexdigest()[:16]


def seeded(*keys):
    """A generator for one (purpose, episode, ..., rank): resume needs no RNG state, ranks never share samples."""
    return torch.Generator().manual_seed(int(digest((cfg.seed,) + keys), 16) % 2**62)


# ---------------------------------------------------------------------------- setup
tok = data.load_tokenizer(cfg.model)
prompts = data.shard(data.load_prompts(cfg.prompts, tok, cfg.max_prompt_len), rank, world)
heldout = data.shard(data.load_prompts(cfg.heldout, tok, cfg.max_prompt_len), rank, world) if cfg.heldout else []
oracle = make_oracle(cfg.oracle, cfg.oracle_temp, device)
policy = M.from_pretrained(cfg.model, device)
ref = M.from_pretrained(cfg.model, device)  # π_ref^k: reloaded from the policy at each episode's start
ref.requires_grad_(False)
rm = RewardModel(M.from_pretrained(cfg.rm_backbone or cfg.model, device), cfg.level, cfg.bound,
                 cfg.normalize, cfg.train_backbone).to(device)
if world > 1 or device.type == "cuda":  # FSDP2 with bf16 compute; a single CPU process runs plain fp32
    for m in (policy, ref, rm.backbone):
        M.shard_model(m)
opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
rm_opt = torch.optim.SGD([rm.w], lr=cfg.rm_lr)  # no momentum: no state to checkpoint
bb_opt = torch.optim.AdamW(rm.backbone.parameters(), lr=cfg.rm_backbone_lr) if cfg.train_backbone else None
cov = Covariance(rm.w.numel(), cfg.lam, device)
pairs = {"phi0": [], "phi1": [], "label": [], "records": []}  # D, with Φ cached for the frozen backbone
store = data.PreferenceStore(os.path.join(cfg.out_dir, "preferences.jsonl")) if master else None
log = data.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master)
ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
start_episode, sft_eval, calls = 1, None, 0  # calls: oracle calls of the whole job, all ranks


def log_metrics(kind, **metrics):
    log.write(kind=kind, oracle_calls=calls, **metrics)


def sample(model, items, n, temperature, key):
    """n responses per prompt: (prompt ids per row, response ids per row, sampler output)."""
    prompt_ids = [p["prompt_ids"] for p in items for _ in range(n)]
    gen = M.generate(model, prompt_ids, cfg.max_new_tokens, temperature, eos_ids=[tok.eos_token_id],
                     pad_id=tok.pad_token_id, seed=int(torch.randint(2**31, (1,), generator=key)))
    return prompt_ids, gen.responses()


def batch(prompt_ids, responses):
    return [t.to(device) for t in data.collate(prompt_ids, responses, tok.pad_token_id)]


def traj_phi(prompt_ids, responses, grad=False):
    """Φ(τ) (n, d) of trajectories from the RM backbone, micro-batched."""
    out = []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(responses), cfg.micro_batch):
            rows = slice(i, i + cfg.micro_batch)
            out.append(trajectory_features(rm.phi(*batch(prompt_ids[rows], responses[rows]))))
    return torch.cat(out)  # (n, d)


def broadcast(obj):
    """Rank 0's object on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(items):
    """Every rank's list, concatenated in rank order: what keeps D and Σ identical across ranks."""
    if world == 1:
        return items
    out = [None] * world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def leave_one_out(values, group):
    """A_i = v_i − mean_{j≠i} v_j within each prompt's G samples; values (n, ...) with n = P·G."""
    v = values.view(-1, group, *values.shape[1:])  # (P, G, ...)
    return (v - (v.sum(1, keepdim=True) - v) / (group - 1)).view_as(values)


def finite(value, what):
    return data.finite(value, what, f"episode {episode}, leader step {t}", log, cfg.on_nonfinite, ckpt_path,
                       oracle_calls=calls, episode=episode, step=t)


def checkpoint_modules():
    return {"policy": (policy, opt), **({"rm_backbone": (rm.backbone, bb_opt)} if cfg.train_backbone else {})}


if mode == "restart" and master:  # killed before its first checkpoint: what it labelled is labelled again
    print(f"{ckpt_path} does not exist yet: starting over, {len(store)} pairs in the store are labelled again")
    store.rewrite([])
    log.cut(0)
if mode == "resume":
    state = M.load_checkpoint(ckpt_path, checkpoint_modules())
    rm.w.data.copy_(state["w"])
    log.cut(state["log_size"])
    cov.load_state_dict(state["cov"])
    calls, sft_eval, start_episode = state["oracle_calls"], state["sft_eval"], state["episode"] + 1
    pairs.update(state["pairs"])
    if master:  # pairs labelled after the checkpoint are dropped and labelled again, never duplicated
        store.rewrite([r for r in store.records if r["episode"] < start_episode])
    pairs["records"] = list(broadcast(store.records if master else None))  # a copy: the store appends to its own
    if len(pairs["records"]) != len(pairs["label"]):
        raise ValueError(f"{os.path.join(cfg.out_dir, 'preferences.jsonl')} holds {len(pairs['records'])} pairs up to "
                         f"episode {start_episode - 1} but {ckpt_path} has {len(pairs['label'])}: not the same run")
    if master:
        print(f"resumed from {ckpt_path} after episode {start_episode - 1} with {len(pairs['label'])} pairs")

if sft_eval is None and heldout:
    sft_eval = evaluate.generation(policy, tok, heldout[:cfg.eval_max // world], oracle.score_fn, cfg.max_new_tokens)
    log_metrics("sft_eval", **sft_eval)

# ---------------------------------------------------------------------------- episodes
bar = tqdm(range(start_episode, cfg.episodes + 1), desc="episodes", disable=not master)
for episode in bar:
    ref.load_state_dict(policy.state_dict())  # π_ref^k = π^{k-1}, frozen for this episode
    t_gen = t_train = 0.0

    # ---------------------------------------------------------------- (I) reward-agnostic exploration
    t0 = time.time()
    key = seeded("explore", episode, rank)
    items = [prompts[i] for i in torch.randint(len(prompts), (cfg.explore_prompts // world,), generator=key)]
    p0, y0 = sample(policy, items, 1, cfg.temperature, key)  # y⁰ ~ π_ref^k
    pc, yc = sample(policy, items, cfg.n_candidates, cfg.enh_temp, key)  # y¹..y^N ~ π_enh
    t_gen += time.time() - t0
    with torch.no_grad():
        phi0 = traj_phi(p0, y0)  # (m, d)
        phic = traj_phi(pc, yc).view(len(items), cfg.n_candidates, -1)  # (m, N, d)
    potential, picks, unc = 0.0, [], []
    for i in range(len(items)):  # lock-step across ranks, so Σ sees every rank's Δφ in the same order
        j, dphi, u = select_pair(cov, phi0[i], phic[i])
        potential += cov.update_all_ranks(dphi[None])
        picks.append(j)
        unc.append(u)
    y1 = [yc[i * cfg.n_candidates + j] for i, j in enumerate(picks)]
    phi1 = phic[torch.arange(len(items)), torch.tensor(picks)]  # (m, d)
    text0, text1 = [data.decode(tok, y) for y in y0], [data.decode(tok, y) for y in y1]
    before = oracle.calls
    labels, s0, s1 = oracle.compare(items, text0, text1, seeded("oracle", episode, rank))
    with torch.no_grad():  # prequential RM accuracy: the current RM on pairs it has not been fit on
        rm_acc = ((rm(phi1) > rm(phi0)).long().cpu() == labels).float().mean().item()
    fresh = gather([(dict(episode=episode, prompt=it["prompt"], prompt_ids=it["prompt_ids"], response0=a, response1=b,
                          response0_ids=ya, response1_ids=yb, label=int(o), score0=float(sa), score1=float(sb),
                          uncertainty=u), f0.cpu(), f1.cpu())
                    for it, a, b, ya, yb, o, sa, sb, u, f0, f1 in
                    zip(items, text0, text1, y0, y1, labels, s0, s1, unc, phi0, phi1)])
    for record, f0, f1 in fresh:
        if master:
            store.append(record)
        pairs["records"].append(record)
        pairs["phi0"].append(f0)
        pairs["phi1"].append(f1)
        pairs["label"].append(record["label"])
    calls += sum(gather([oracle.calls - before]))
    log_metrics("explore", episode=episode, pairs=len(pairs["label"]), uncertainty=sum(unc) / len(unc),
                potential=potential, rm_acc_fresh=rm_acc, oracle_score=float((s0.mean() + s1.mean()) / 2),
                sigma_hash=gather([digest(cov.sigma.cpu().numpy().tobytes())]),
                store_hash=gather([digest([(r["label"], r["response0_ids"], r["response1_ids"]) for r in pairs["records"]])]))

    # ---------------------------------------------------------------- (II) reward-aware exploitation
    PHI0, PHI1 = torch.stack(pairs["phi0"]).to(device), torch.stack(pairs["phi1"]).to(device)  # (n, d)
    LABEL = torch.tensor(pairs["label"], device=device)  # (n,)
    for t in range(cfg.t_out):
        t0 = time.time()
        key = seeded("leader", episode, t, rank)
        items = [prompts[i] for i in torch.randint(len(prompts), (cfg.leader_prompts // world,), generator=key)]
        pp, ys = sample(policy, items, cfg.group, cfg.temperature, key)  # G on-policy samples per prompt
        pr, yr = sample(ref, items, 1, cfg.temperature, key)  # one π_ref^k sample per prompt
        t_gen += time.time() - t0
        t0 = time.time()
        # follower: T_in steps on L_BT + ρ·gap, the pessimistic RM inside the confidence set
        with torch.no_grad():
            phi_pi, phi_ref = traj_phi(pp, ys), traj_phi(pr, yr)  # (n, d), (P, d)
        for i in range(cfg.t_in):
            idx = torch.randperm(len(LABEL), generator=seeded("follower", episode, t, i))[:cfg.rm_batch][rank::world]
            if cfg.train_backbone:  # features move with the backbone: recompute them with grad
                recs = [pairs["records"][j] for j in idx.tolist()]
                ph0 = traj_phi([r["prompt_ids"] for r in recs], [r["response0_ids"] for r in recs], grad=True)
                ph1 = traj_phi([r["prompt_ids"] for r in recs], [r["response1_ids"] for r in recs], grad=True)
                phi_pi, phi_ref = traj_phi(pp, ys, grad=True), traj_phi(pr, yr, grad=True)
            else:
                ph0, ph1 = PHI0[idx.to(device)], PHI1[idx.to(device)]
            loss, fit, gap = follower_loss(rm, ph0, ph1, LABEL[idx.to(device)], phi_pi, phi_ref, cfg.adv_coef)
            loss.backward()
            if world > 1:  # w is replicated, not sharded: average its gradient by hand
                dist.all_reduce(rm.w.grad, op=dist.ReduceOp.AVG)
            if finite(rm.w.grad.norm().item(), "reward-model gradient"):  # the same verdict on every rank
                rm_opt.step()
                rm.project()
                if bb_opt:
                    bb_opt.step()
            rm_opt.zero_grad(set_to_none=True)
            if bb_opt:
                bb_opt.zero_grad(set_to_none=True)
        # leader: policy-gradient ascent on the pessimistic reward, KL-anchored to π_ref^k
        ids, attn, resp = batch(pp, ys)  # (n, T)
        with torch.no_grad():
            phi = torch.cat([rm.phi(ids[r], attn[r], resp[r]) for r in torch.arange(len(ids)).split(cfg.micro_batch)])
            if cfg.level == "token":  # per-token returns R_h = Σ_{h'≥h} ⟨w, φ_h'⟩, baseline at the same h
                returns = rm.token_rewards(phi).flip(-1).cumsum(-1).flip(-1)  # (n, T)
                adv = leave_one_out(returns, cfg.group) * resp
            else:
                adv = leave_one_out(rm(phi), cfg.group)[:, None] * resp  # (n, T)
            logp_ref = torch.cat([M.token_logprobs(ref, ids[r], attn[r]) for r in torch.arange(len(ids)).split(cfg.micro_batch)])
        n_tok = resp.sum()
        pg_sum = kl_sum = 0.0
        for r in torch.arange(len(ids)).split(cfg.micro_batch):
            logp = M.token_logprobs(policy, ids[r], attn[r])  # (b, T)
            delta = logp_ref[r] - logp
            kl = (delta.exp() - delta - 1) * resp[r]  # (b, T) k3 estimate of KL(π_θ ‖ π_ref^k) per token
            pg = -(adv[r] * logp).sum() / len(ids)
            ((pg + cfg.kl_coef * kl.sum() / n_tok)).backward()
            pg_sum, kl_sum = pg_sum + pg.item(), kl_sum + kl.sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        if finite(float(grad_norm), "policy gradient"):
            opt.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.time() - t0
        with torch.no_grad():
            r_pi = rm(phi).mean().item()
        gold = torch.tensor(oracle.score_fn([it for it in items for _ in range(cfg.group)],
                                            [data.decode(tok, y) for y in ys]), dtype=torch.float)
        log_metrics("step", episode=episode, step=t, rm_bt=fit.item(), rm_gap=gap.item(), rm_reward=r_pi,
                    gold_reward=gold.mean().item(), kl=kl_sum / n_tok.item(), pg_loss=pg_sum,
                    grad_norm=float(grad_norm), length=resp.sum(-1).float().mean().item(), w_norm=rm.w.norm().item())
        bar.set_postfix(gold=f"{gold.mean().item():.3f}", kl=f"{kl_sum / n_tok.item():.3f}")

    log_metrics("episode", episode=episode, gen_s=t_gen, train_s=t_train)
    M.save_checkpoint(ckpt_path, checkpoint_modules(), config=asdict(cfg), episode=episode, w=rm.w.detach().cpu(),
                      cov=cov.state_dict(), oracle_calls=calls, sft_eval=sft_eval, log_size=log.size(),
                      pairs={k: v for k, v in pairs.items() if k != "records"})

# ---------------------------------------------------------------------------- final evaluation and export
final_eval = evaluate.generation(policy, tok, heldout[:cfg.eval_max // world], oracle.score_fn, cfg.max_new_tokens) \
    if heldout else None
log_metrics("final_eval", **(final_eval or {}))
export = os.path.join(cfg.out_dir, "final")
M.save_pretrained(policy, export, state_dict=M.full_state_dict(policy))
if master:
    tok.save_pretrained(export)
    if final_eval:
        print(f"held-out gold accuracy: SFT {sft_eval['accuracy']:.3f} -> PbPO {final_eval['accuracy']:.3f}; "
              f"mean gold reward: SFT {sft_eval['reward']:.3f} -> PbPO {final_eval['reward']:.3f}")
    print(f"policy exported to {export}; metrics in {cfg.out_dir}/metrics.jsonl")
if world > 1:
    dist.destroy_process_group()

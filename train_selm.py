"""
SELM: self-exploring language models, and iterative DPO as its α = 0 special case (ALGORITHMS.md,
"SELM"). The preference set is split into T equal parts; iteration t samples y_ref from π_ref on
part t, lets the oracle rank {y_ref, chosen, rejected} (best becomes chosen, worst rejected), then
trains π_θ from π_ref on the DPO loss plus the optimism term α β (logp_θ(y_ref) − logp_ref(y_ref)).

  python train_selm.py                      # SELM on the built-in toy preference file, CPU
  python train_selm.py --alpha=0            # iterative DPO, the baseline
  python train_selm.py --model=PATH --prefs=FILE --oracle=rm:RM_PATH        # one GPU
  torchrun --nproc_per_node=8 train_selm.py --model=PATH --prefs=FILE --oracle=rm:RM_PATH
  python train_selm.py --resume             # continue from out_dir's checkpoint
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as evaluate
import model as M
from reward import make_oracle


@dataclass
class Config:
    model: str = ""  # SFT policy, an HF checkpoint dir (default: the toy SFT model, built on first use)
    prefs: str = ""  # preference file, TRL layout prompt/chosen/rejected (default: the toy preference file)
    heldout: str = ""  # held-out prompts for the final gold evaluation (default: the toy held-out split)
    oracle: str = "gold"  # gold | gsm8k | rm:PATH: ranks {y_ref, chosen, rejected}
    out_dir: str = "out/selm"
    seed: int = 0
    resume: bool = False
    iterations: int = 3  # T
    beta: float = 0.01  # β, DPO temperature
    alpha: float = 0.001  # α, optimism weight; 0 = iterative DPO
    lr: float = 1e-4  # peak AdamW learning rate, warm-up then linear decay across all iterations (toy; SELM used 5e-7 at 7B)
    warmup_ratio: float = 0.1
    epochs: int = 1  # passes over each part D_t
    batch_size: int = 16  # pairs per optimizer step (all ranks)
    micro_batch: int = 16  # pairs per forward/backward
    sample_ref: bool = False  # sample y_ref at temperature 1 instead of greedy
    max_new_tokens: int = 48
    max_prompt_len: int = 256
    max_pairs: int = 0  # use at most this many pairs of the file (0 = all)
    eval_max: int = 256  # held-out prompts evaluated at the start and the end
    on_nonfinite: str = "skip"  # skip | stop: a NaN/inf loss or gradient skips that step, or stops the run
    dist_timeout: int = 1800  # seconds a collective waits (e.g. for a dead rank) before the job fails

    AT_LEAST = {"iterations": (1, "T"), "epochs": (1, ""), "batch_size": (1, ""), "micro_batch": (1, ""),
                "max_new_tokens": (1, "y_ref needs a token"), "max_prompt_len": (1, "")}
    CHOICES = {"on_nonfinite": ("skip", "stop")}


def selm_loss(logp, logp_ref, beta, alpha):
    """DPO on (chosen, rejected) plus α β (logp_θ(y_ref) − logp_ref(y_ref)); inputs are dicts of summed
    response log-probs (B,) keyed chosen / rejected / ref. Returns (loss, DPO margin, optimism term)."""
    drift = {k: logp[k] - logp_ref[k] for k in logp}  # (B,) each
    margin = beta * (drift["chosen"] - drift["rejected"])  # (B,)
    optimism = alpha * beta * drift["ref"]  # (B,)
    return (-F.logsigmoid(margin) + optimism).mean(), margin.detach(), optimism.detach()


def best_and_worst(scores):
    """scores (n, 3) of {y_ref, chosen, rejected} -> column indices (n,) of the best and the worst. Ties go to the
    file's pair (chosen first, rejected last), so a three-way tie keeps the original (chosen, rejected)."""
    priority = torch.tensor([1, 0, 2])  # chosen, ref, rejected
    order = priority[scores[:, priority].sort(dim=1, descending=True, stable=True).indices]  # (n, 3) column indices
    return order[:, 0], order[:, 2]


if __name__ == "__main__":
    data.friendly_errors("train_selm.py")
    cfg = data.parse_config(Config, __doc__)
    rank, world, device = M.init_distributed(cfg.dist_timeout)
    master = rank == 0
    mode = data.start_run(cfg, rank, world)  # the toy task by default; 'fresh', 'resume' or 'restart'

    # ------------------------------------------------------------------------ setup
    tok = data.load_tokenizer(cfg.model)
    pairs = data.load_preferences(cfg.prefs, tok, cfg.max_prompt_len)
    pairs = pairs[:cfg.max_pairs] if cfg.max_pairs else pairs
    heldout = data.shard(data.load_prompts(cfg.heldout, tok, cfg.max_prompt_len), rank, world) if cfg.heldout else []
    if len(pairs) < cfg.iterations * world:
        raise ValueError(f"{cfg.prefs}: {len(pairs)} pairs cannot be split into {cfg.iterations} parts over {world} ranks")
    oracle = make_oracle(cfg.oracle, 0.0, device)
    policy = M.from_pretrained(cfg.model, device)
    if world > 1 or device.type == "cuda":
        M.shard_model(policy)
    part = len(pairs) // cfg.iterations  # |D_t|; each rank takes part // world of it, so steps agree across ranks
    local_batch = max(1, cfg.batch_size // world)
    steps_per_iter = math.ceil(cfg.epochs * (part // world) / local_batch)
    total, warmup = cfg.iterations * steps_per_iter, max(1, int(cfg.warmup_ratio * cfg.iterations * steps_per_iter))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    log = data.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master)
    log_metrics = log.write

    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    start, sft_eval, calls = 1, None, 0  # calls: oracle calls of the whole job, all ranks
    if mode == "restart":  # killed before its first checkpoint
        log.cut(0)
    if mode == "resume":
        state = M.load_checkpoint(ckpt_path, {"policy": (policy, opt)})
        sched.load_state_dict(state["sched"])
        log.cut(state["log_size"])
        calls, sft_eval, start = state["oracle_calls"], state["sft_eval"], state["iteration"] + 1
    if sft_eval is None and heldout:
        sft_eval = evaluate.generation(policy, tok, heldout[:cfg.eval_max // world], oracle.score_fn, cfg.max_new_tokens)
        log_metrics(kind="sft_eval", oracle_calls=calls, **sft_eval)

    def seq_logp(batch_prompts, responses):
        """Summed response log-probs (n,) under the policy, with the fused kernel."""
        ids, attn, resp = [t.to(device) for t in data.collate(batch_prompts, responses, tok.pad_token_id)]
        return (M.token_logprobs(policy, ids, attn) * resp).sum(-1)  # (n,)

    # ------------------------------------------------------------------------ iterations
    for it in range(start, cfg.iterations + 1):
        t0 = time.time()
        d_t = data.shard(pairs[(it - 1) * part: it * part], rank, world)[:part // world]  # D_t, this rank's share
        prompt_ids = [p["prompt_ids"] for p in d_t]
        gen = M.generate(policy, prompt_ids, cfg.max_new_tokens, 1.0 if cfg.sample_ref else 0.0,
                         eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=cfg.seed * 1000 + it * 10 + rank)
        y_ref = gen.responses()
        # rank {y_ref, chosen, rejected}: best becomes chosen, worst rejected (one oracle call per response)
        texts = {"ref": [data.decode(tok, y) for y in y_ref], "chosen": [p["chosen"] for p in d_t],
                 "rejected": [p["rejected"] for p in d_t]}
        ids = {"ref": y_ref, "chosen": [p["chosen_ids"] for p in d_t], "rejected": [p["rejected_ids"] for p in d_t]}
        before = oracle.calls
        scores = torch.stack([oracle.score(d_t, texts[k]) for k in ("ref", "chosen", "rejected")], 1)  # (n, 3)
        calls += int(evaluate.all_ranks_sum([oracle.calls - before], device)[0])
        top, bottom = best_and_worst(scores)
        cands = [ids["ref"], ids["chosen"], ids["rejected"]]
        best = [cands[j][i] for i, j in enumerate(top.tolist())]
        worst = [cands[j][i] for i, j in enumerate(bottom.tolist())]
        resp = {"chosen": best, "rejected": worst, "ref": y_ref}
        t_gen = time.time() - t0
        with torch.no_grad():  # logp_ref of every response, once per iteration (π_ref = π_θ right now)
            ref_logp = {k: torch.cat([seq_logp(prompt_ids[i:i + cfg.micro_batch], v[i:i + cfg.micro_batch])
                                      for i in range(0, len(v), cfg.micro_batch)]) for k, v in resp.items()}
        g = torch.Generator().manual_seed(cfg.seed * 100003 + it * 101 + rank)
        perm = torch.cat([torch.randperm(len(d_t), generator=g) for _ in range(cfg.epochs)])  # (epochs·n,)
        bar = tqdm(range(steps_per_iter), desc=f"iteration {it}", disable=not master)
        for step in bar:
            rows = perm[step * local_batch:(step + 1) * local_batch].tolist()
            totals = {"loss": 0.0, "margin": 0.0, "acc": 0.0, "optimism": 0.0, "chosen": 0.0, "rejected": 0.0, "ref": 0.0}
            for i in range(0, len(rows), cfg.micro_batch):
                mb = rows[i:i + cfg.micro_batch]
                logp = {k: seq_logp([prompt_ids[j] for j in mb], [v[j] for j in mb]) for k, v in resp.items()}
                lref = {k: v[mb] for k, v in ref_logp.items()}
                loss, margin, optimism = selm_loss(logp, lref, cfg.beta, cfg.alpha)
                (loss * len(mb) / len(rows)).backward()
                w = len(mb) / len(rows)
                totals["loss"] += loss.item() * w
                totals["margin"] += margin.mean().item() * w
                totals["acc"] += (margin > 0).float().mean().item() * w
                totals["optimism"] += optimism.mean().item() * w
                for k in ("chosen", "rejected", "ref"):
                    totals[k] += (logp[k] - lref[k]).mean().item() * w
            grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0))
            if data.finite(grad_norm, "policy gradient", f"iteration {it}, step {step}", log, cfg.on_nonfinite, ckpt_path,
                           iteration=it, step=step):
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            log_metrics(kind="step", iteration=it, step=step, lr=sched.get_last_lr()[0], loss=totals["loss"],
                          dpo_margin=totals["margin"], dpo_acc=totals["acc"], optimism=totals["optimism"],
                          drift_chosen=totals["chosen"], drift_rejected=totals["rejected"], drift_ref=totals["ref"],
                          oracle_calls=calls)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", acc=f"{totals['acc']:.2f}")
        log_metrics(kind="iteration", iteration=it, gen_s=t_gen, train_s=time.time() - t0 - t_gen, oracle_calls=calls,
                      len_chosen=sum(map(len, best)) / len(best), len_rejected=sum(map(len, worst)) / len(worst),
                      len_ref=sum(map(len, y_ref)) / len(y_ref), ref_best=(top == 0).float().mean().item())
        M.save_checkpoint(ckpt_path, {"policy": (policy, opt)}, iteration=it, sched=sched.state_dict(), oracle_calls=calls,
                          sft_eval=sft_eval, config=asdict(cfg), log_size=log.size())  # π_ref ← π_θ: the next iteration starts here

    # ------------------------------------------------------------------------ final evaluation and export
    final = evaluate.generation(policy, tok, heldout[:cfg.eval_max // world], oracle.score_fn, cfg.max_new_tokens) \
        if heldout else None
    export = os.path.join(cfg.out_dir, "final")
    M.save_pretrained(policy, export, state_dict=M.full_state_dict(policy))
    if master:
        tok.save_pretrained(export)
        if final:
            log_metrics(kind="final_eval", oracle_calls=calls, **final)
            print(f"held-out gold accuracy: SFT {sft_eval['accuracy']:.3f} -> {'SELM' if cfg.alpha else 'iterative DPO'} "
                  f"{final['accuracy']:.3f}; mean gold reward: SFT {sft_eval['reward']:.3f} -> {final['reward']:.3f}")
    if world > 1:
        dist.destroy_process_group()

"""
Evaluators for a policy checkpoint, and the theory check on a synthetic linear preference task.

  python eval.py generation --model=out/pbpo/final --prompts=out/toy/heldout.jsonl           # greedy accuracy
  python eval.py generation --model=PATH --prompts=gsm8k_test.jsonl --oracle=gsm8k --k=8 --temperature=0.8  # pass@8
  python eval.py choice --model=PATH --data=arc_challenge.jsonl      # multiple choice by log-likelihood
  python eval.py winrate --model=out/pbpo/final --ref=SFT_DIR --prompts=out/toy/heldout.jsonl --oracle=gold
  python eval.py rewards --model=out/pbpo/final --prompts=out/toy/heldout.jsonl --bins=10
  python eval.py regret --d=8 --K=400 --seeds=5         # cumulative regret, uncertainty-guided vs random pairs
  python eval.py compare --out=out/compare              # every method on the toy task, equal oracle budget, 3 seeds
  python eval.py compare --quick --out=/tmp/compare     # the same in miniature (a minute on CPU)

Every command prints a short table and writes JSON (--out=FILE); regret and compare also write CSV (and a PNG
when matplotlib is installed). The command line runs one process, on CPU or one GPU (--device=cuda, the default when
there is one). Under torchrun (train_pbpo.py, train_selm.py call these functions) every rank evaluates its own
shard of the items and the counts are summed over ranks. Tests: python -m pytest -q tests/test_eval.py
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import model as M
from explore import Covariance, select_pair
from reward import Oracle, bt_loss, make_oracle


def all_ranks_sum(values, device):
    """Sum a list of numbers over ranks (each rank evaluated its own shard of the items)."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces device tensors only
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def sample_texts(policy, tok, items, max_new_tokens, batch_size=64, temperature=0.0, seed=0, k=1):
    """k decoded responses per item (greedy at temperature 0): len(items) * k texts, item-major; batch_size
    counts sequences."""
    prompts = [p["prompt_ids"] for p in items for _ in range(k)]
    return data.sample_texts(policy, tok, prompts, max_new_tokens, temperature, seed, batch_size)


def generation(policy, tok, items, score_fn, max_new_tokens, batch_size=64, temperature=0.0, seed=0, k=1):
    """Exact-match accuracy of the final `#### N` (items with an answer; pass@k when k > 1: an item counts if any
    of its k samples is right) and the mean oracle reward over all samples, summed over every rank's share."""
    if k > 1 and temperature <= 0:
        raise ValueError(f"pass@{k} needs k samples at a temperature > 0, got temperature={temperature}")
    texts = sample_texts(policy, tok, items, max_new_tokens, batch_size, temperature, seed, k)
    reward = sum(float(s) for s in score_fn([p for p in items for _ in range(k)], texts)) / k
    correct = sum(any(data.is_correct(t, p["answer"]) for t in texts[i * k:(i + 1) * k])
                  for i, p in enumerate(items) if p.get("answer") is not None)
    correct, reward, n = all_ranks_sum([correct, reward, len(items)], next(policy.parameters()).device)
    out = {"accuracy": correct / max(n, 1.0), "reward": reward / max(n, 1.0), "n": int(n)}
    return out if k == 1 else {**out, "k": k}


# ---------------------------------------------------------------------------- multiple choice
def load_choices(path, tok):
    """ARC / MMLU style JSONL (or .json array): {"question", "choices": [str, ...], "answer": 0-based index or
    letter} (also ARC's {"choices": {"text", "label"}, "answerKey"}). Context "Question: q\\nAnswer:", options " c"."""
    items = []
    for where, rec in data._records(path):  # data.py's reader: 'file:line' in every error
        question, choices, labels = data._field(where, rec, "question", messages_ok=False), rec.get("choices"), None
        if isinstance(choices, dict):  # ARC on the Hub: {"text": [...], "label": ["A", ...]}
            choices, labels = choices.get("text"), choices.get("label")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings")
        key = answer = rec.get("answer", rec.get("answerKey"))
        if labels is not None and key in labels:
            answer = labels.index(key)
        elif isinstance(key, str) and len(key) == 1 and key.isalpha():
            answer = ord(key.upper()) - ord("A")
        if type(answer) is not int or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: field 'answer' {key!r} is not the 0-based index or letter of one of the "
                             f"{len(choices)} choices")
        items.append({"context_ids": tok(f"Question: {question}\nAnswer:").input_ids,
                      "option_ids": [tok(" " + c, add_special_tokens=False).input_ids for c in choices],
                      "choices": choices, "answer": answer})
    return items


@torch.no_grad()
def choice(policy, items, pad_id, batch_size=32):
    """Accuracy of argmax_i log π(option_i | context) (summed over the option's tokens) and of the same per
    UTF-8 byte of the option (acc_norm, as lm-evaluation-harness reports it). Also returns every option's log-lik."""
    pairs = [(p["context_ids"], o) for p in items for o in p["option_ids"]]
    device, logliks = next(policy.parameters()).device, []
    for i in range(0, len(pairs), batch_size):
        ctx, opt = zip(*pairs[i:i + batch_size])
        ids, attn, resp = [t.to(device) for t in data.collate(list(ctx), list(opt), pad_id)]  # (B, T) each
        logliks += (M.token_logprobs(policy, ids, attn) * resp).sum(-1).tolist()  # (B,)
    starts = torch.tensor([0] + [len(p["choices"]) for p in items]).cumsum(0).tolist()
    per_item = [logliks[a:b] for a, b in zip(starts, starts[1:])]  # each item's option log-liks
    argmax = lambda v: max(range(len(v)), key=v.__getitem__)
    correct = sum(argmax(ll) == p["answer"] for ll, p in zip(per_item, items))
    correct_norm = sum(argmax([l / max(len(c.encode()), 1) for l, c in zip(ll, p["choices"])]) == p["answer"]
                       for ll, p in zip(per_item, items))
    correct, correct_norm, n = all_ranks_sum([correct, correct_norm, len(items)], device)
    return {"accuracy": correct / max(n, 1.0), "accuracy_norm": correct_norm / max(n, 1.0), "n": int(n),
            "loglik": per_item}


# ---------------------------------------------------------------------------- win rate and reward distribution
def wilson(p, n, z=1.96):
    """Wilson score interval for a proportion p̂ observed over n trials."""
    if n == 0:
        return 0.0, 1.0
    c = z * z / n
    center, half = (p + c / 2) / (1 + c), z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return max(center - half, 0.0), min(center + half, 1.0)


def winrate(policy, ref, tok, items, score_fn, max_new_tokens, batch_size=64, temperature=0.0, seed=0, z=1.96):
    """Share of prompts where the policy's response scores above the reference policy's under the oracle
    (ties count half), with a Wilson interval over the n prompts."""
    texts = [sample_texts(m, tok, items, max_new_tokens, batch_size, temperature, seed) for m in (policy, ref)]
    s, s_ref = (torch.tensor([float(v) for v in score_fn(items, t)]) for t in texts)  # (n,) each
    wins, ties, n, r, r_ref = all_ranks_sum([(s > s_ref).sum(), (s == s_ref).sum(), len(items), s.sum(), s_ref.sum()],
                                            next(policy.parameters()).device)
    p = (wins + 0.5 * ties) / max(n, 1.0)
    lo, hi = wilson(p, n, z)
    return {"win_rate": p, "ci_low": lo, "ci_high": hi, "wins": int(wins), "ties": int(ties),
            "losses": int(n - wins - ties), "n": int(n), "reward": r / max(n, 1.0), "reward_ref": r_ref / max(n, 1.0)}


def rewards(policy, tok, items, score_fn, max_new_tokens, bins=10, batch_size=64, temperature=0.0, seed=0):
    """Histogram (bin edges + counts), mean and std of the oracle reward of greedy samples, over all ranks."""
    scores = [float(v) for v in score_fn(items, sample_texts(policy, tok, items, max_new_tokens, batch_size,
                                                             temperature, seed))]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, scores)
        scores = sum(gathered, [])
    s = torch.tensor(scores, dtype=torch.float64)  # (n,)
    counts, edges = torch.histogram(s, bins=bins)
    return {"mean": s.mean().item(), "std": s.std(correction=0).item(), "n": len(scores),
            "edges": edges.tolist(), "counts": [int(c) for c in counts]}


# ---------------------------------------------------------------------------- the theory check
def linear_task(d=8, d_hard=4, prompts=64, n=32, n_rare=1, seed=0):
    """Fixed features φ (P, n, d) and θ* (d,) with r*(x, y) = ⟨θ*, φ(x, y)⟩. Common responses differ along the
    d − d_hard 'easy' directions (by more, in Euclidean norm); the last n_rare of each prompt lie along the d_hard
    'hard' ones, shifted towards θ*'s hard part, so they are often the best: the informative comparisons are rare."""
    g, de = torch.Generator().manual_seed(seed), d - d_hard
    phi = torch.cat([torch.randn(prompts, n, de, generator=g), 0.1 * torch.randn(prompts, n, d_hard, generator=g)], -1)
    u_hard = F.normalize(torch.randn(d_hard, generator=g), dim=0)  # (d_hard,)
    phi[:, n - n_rare:, :de] *= 0.3
    phi[:, n - n_rare:, de:] = torch.randn(prompts, n_rare, d_hard, generator=g) + u_hard
    theta = torch.cat([1.5 * F.normalize(torch.randn(de, generator=g), dim=0), 3.0 * u_hard])  # (d,)
    return phi, theta


def regret_run(phi, theta, arm, K=400, M=4, lam=1.0, bound=10.0, steps=20, lr=4.0, seed=0):
    """Per-round regret J(π*, r*) − J(π^k, r*), k = 1..K, of the policy greedy under ŵ (J: mean r* over all prompts).
    Each round: M prompts, y⁰ = the greedy response, y¹ by `arm` (uncertainty: select_pair's argmax ‖Δφ‖_{Σ⁻¹};
    random: a uniform other response), o ~ Bernoulli(σ(r*(τ¹) − r*(τ⁰))), Σ += ΔφΔφᵀ, then ŵ refit by projected
    gradient steps on the summed BT loss, preconditioned by Σ⁻¹ (a Gauss–Newton step: Σ bounds the BT Hessian)."""
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
            y0s.append(y0), y1s.append(y1)
        labels.append(labeller.label(r_star[xs, y0s], r_star[xs, y1s], g_label))  # (M,)
        phi0.append(phi[xs, y0s]), phi1.append(phi[xs, y1s])  # (M, d) each
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


def regret(d=8, d_hard=4, prompts=64, n=32, n_rare=1, K=400, M=4, seeds=5, lam=1.0, bound=10.0):
    """Cumulative regret curves (seeds, K) of both arms on one task per seed, and their log-log slopes."""
    threads, out = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # d-sized ops: thread-pool wake-ups would cost more than the work
    for arm in ("uncertainty", "random"):
        curves = torch.tensor([regret_run(*linear_task(d, d_hard, prompts, n, n_rare, seed), arm, K, M, lam, bound,
                                          seed=seed) for seed in range(seeds)], dtype=torch.float64).cumsum(1)
        out[arm] = {"cum_mean": curves.mean(0).tolist(), "cum_std": curves.std(0, correction=0).tolist(),
                    "slope": loglog_slope(curves.mean(0).tolist()),
                    "slope_per_seed": [loglog_slope(c) for c in curves.tolist()]}
    torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------- the paper's comparison on the toy task
ARMS = {"sft": None, "dpo": ("train_selm.py", "--alpha=0"), "selm": ("train_selm.py",), "pbpo": ("train_pbpo.py",),
        "pbpo_token": ("train_pbpo.py", "--level=token"), "pbpo_n1": ("train_pbpo.py", "--n_candidates=1"),
        "pbpo_rho0": ("train_pbpo.py", "--adv_coef=0"), "pbpo_rho0.04": ("train_pbpo.py", "--adv_coef=0.04"),
        "pbpo_rho0.3": ("train_pbpo.py", "--adv_coef=0.3"), "pbpo_rho1": ("train_pbpo.py", "--adv_coef=1.0")}
QUICK_ARMS = "sft,dpo,selm,pbpo,pbpo_n1,pbpo_rho0"
QUICK_FLAGS = {"train_pbpo.py": ["--t_out=2", "--t_in=2", "--group=2", "--leader_prompts=4"],
               "train_selm.py": ["--iterations=1", "--batch_size=4", "--micro_batch=4"]}


def run_arm(script, flags, out_dir):
    """Train one arm in a subprocess, its output in out_dir/log.txt; returns its metrics.jsonl lines. A finished run
    of the same command (out_dir/command.json) is reused, anything else in out_dir is deleted first."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *flags,
           f"--out_dir={out_dir}"]
    done = os.path.join(out_dir, "command.json")
    if not os.path.exists(done) or json.load(open(done)) != cmd[1:]:
        shutil.rmtree(out_dir, ignore_errors=True)  # the scripts append to an existing metrics / preference file
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "log.txt"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; its output is in {out_dir}/log.txt")
        with open(done, "w") as f:
            json.dump(cmd[1:], f)
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item() if len(values) > 1 else 0.0  # sample std over seeds


def compare(out="out/compare", budget=0, seeds=3, arms="", quick=False, device="cpu"):
    """Every arm at an equal oracle budget over seeds 0..seeds-1 of training, one shared toy SFT model. Budget: PbPO
    spends 2 calls per exploration prompt (episodes = budget // (2 M)); SELM / DPO 3 per pair ranking {y_ref, chosen,
    rejected} plus the 2 the offline toy file spent labelling it (max_pairs = budget // 5). Greedy held-out accuracy
    and mean gold reward from each run's final_eval, win rate vs the SFT policy by eval.winrate on the same items."""
    budget, arms = budget or (32 if quick else 768), (arms or (QUICK_ARMS if quick else ",".join(ARMS))).split(",")
    if set(arms) - set(ARMS):
        raise ValueError(f"--arms: unknown {', '.join(sorted(set(arms) - set(ARMS)))}; known: {', '.join(ARMS)}")
    toy = data.build_toy(os.path.join(out, "toy"), quick=quick)
    m, eval_max, max_new = (8, 16, 16) if quick else (64, 256, 48)
    shared = [f"--model={toy.model}", f"--heldout={toy.heldout}", f"--eval_max={eval_max}",
              f"--max_new_tokens={max_new}"]
    flags = {"train_pbpo.py": shared + [f"--prompts={toy.train}", f"--explore_prompts={m}",
                                        f"--episodes={budget // (2 * m)}"],
             "train_selm.py": shared + [f"--prefs={toy.prefs}", f"--max_pairs={budget // 5}"]}
    tok, score_fn = data.load_tokenizer(toy.model), make_oracle("gold").score_fn
    items = data.load_prompts(toy.heldout, tok, 256)[:eval_max]
    sft = M.from_pretrained(toy.model, device).eval()
    sft_eval = generation(sft, tok, items, score_fn, max_new)
    results, curves = {}, []
    for arm in arms:
        res = results[arm] = {"oracle_calls": [], "accuracy": [], "win_rate": [], "reward": []}
        for seed in range(seeds):
            t0, spec = time.time(), ARMS[arm]
            if spec is None:  # the SFT policy itself: greedy, so every seed is the same
                final, win, offline = {**sft_eval, "oracle_calls": 0}, {"win_rate": 0.5}, 0
                curves.append((arm, seed, "final_eval", 0, sft_eval["reward"]))
            else:
                run_dir = os.path.join(out, arm, f"seed{seed}")
                lines = run_arm(spec[0], flags[spec[0]] + QUICK_FLAGS[spec[0]] * quick + [*spec[1:], f"--seed={seed}"],
                                run_dir)
                final = next(l for l in lines if l["kind"] == "final_eval")
                offline = 2 * (budget // 5) if spec[0] == "train_selm.py" else 0  # the toy file's labels
                curves += [(arm, seed, l["kind"], l["oracle_calls"] + offline * (l["kind"] != "sft_eval"),
                            l.get("gold_reward", l.get("reward"))) for l in lines
                           if "gold_reward" in l or l["kind"] in ("sft_eval", "final_eval")]
                policy = M.from_pretrained(os.path.join(run_dir, "final"), device).eval()
                win = winrate(policy, sft, tok, items, score_fn, max_new)
            for key, value in zip(res, (final["oracle_calls"] + offline, final["accuracy"], win["win_rate"],
                                        final["reward"])):
                res[key].append(value)
            print(f"{arm:>12} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in res.items()) +
                  f" ({time.time() - t0:.0f} s)", flush=True)
        res.update({f"{k}_mean_std": mean_std(v) for k, v in list(res.items())})
    table = [f"Toy task, budget {budget} oracle calls, seeds 0..{seeds - 1} (mean ± sample std over seeds); "
             f"held-out greedy, first {len(items)} prompts.\n",
             "| arm | oracle calls | accuracy | win rate vs SFT | gold reward |", "|---|---|---|---|---|"]
    table += [f"| {arm} | {r['oracle_calls_mean_std'][0]:.0f} | " + " | ".join(
        "{:.3f} ± {:.3f}".format(*r[f"{k}_mean_std"]) for k in ("accuracy", "win_rate", "reward")) + " |"
        for arm, r in results.items()]
    print("\n".join(table))
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    report({"config": dict(budget=budget, seeds=seeds, quick=quick, flags=flags, n_heldout=len(items)), **results},
           os.path.join(out, "compare.json"))
    with open(os.path.join(out, "curves.csv"), "w") as f:  # step: a PbPO leader step's on-policy samples (train
        f.write("arm,seed,kind,oracle_calls,gold_reward\n")  # prompts, temperature 1); *_eval: held-out greedy
        f.writelines(",".join(map(str, row)) + "\n" for row in curves)
    if importlib.util.find_spec("matplotlib"):  # optional
        import matplotlib.pyplot as plt
        plt.figure(figsize=(8, 5))
        for i, arm in enumerate(results):  # means over seeds (and a PbPO episode's steps) per oracle-call count
            for kind, style in (("step", ".-"), ("final_eval", "o")):
                points = [(calls, r) for a, _, k, calls, r in curves if a == arm and k == kind]
                xs = sorted({calls for calls, _ in points})
                if xs:
                    plt.plot(xs, [mean_std([r for c, r in points if c == x])[0] for x in xs], style,
                             color=f"C{i % 10}", label=arm if kind == "final_eval" else None)
        plt.xlabel("oracle calls"), plt.ylabel("gold reward (line: training samples, o: held-out greedy)")
        plt.legend(fontsize=8), plt.savefig(os.path.join(out, "curves.png"), dpi=120)
    return results


# ---------------------------------------------------------------------------- command line
def report(metrics, out):
    for key, v in metrics.items():
        if not isinstance(v, (list, dict)):
            print(f"{key:>16}  {v:.4f}" if isinstance(v, float) else f"{key:>16}  {v}")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ckpt, gen = argparse.ArgumentParser(add_help=False), argparse.ArgumentParser(add_help=False)
    ckpt.add_argument("--model", required=True, help="HF checkpoint directory (with its tokenizer)")
    gen.add_argument("--prompts", required=True, help="prompt JSONL: GSM8K {question, answer}, {prompt}, {messages}")
    rg, cmp = sub.add_parser("regret"), sub.add_parser("compare")
    cmp.add_argument("--quick", action="store_true", help="tiny toy task and arms, 1 seed by default: a smoke test")
    for parser, flags in ((ckpt, dict(device="cuda" if torch.cuda.is_available() else "cpu", batch_size=64, limit=0,
                                      out="")),  # limit: the first N items only (0: all)
                          (gen, dict(oracle="gold", max_new_tokens=256, max_prompt_len=512, temperature=0.0, seed=0)),
                          (rg, dict(d=8, d_hard=4, prompts=64, n=32, n_rare=1, K=400, M=4, seeds=5, lam=1.0,
                                    bound=10.0, out="out/regret.json")),
                          (cmp, dict(out="out/compare", budget=0, seeds=0, arms="",  # budget 0: 768 (32 --quick)
                                     device="cuda" if torch.cuda.is_available() else "cpu"))):  # seeds 0: 3 (1 --quick)
        for key, default in flags.items():
            parser.add_argument(f"--{key}", type=type(default), default=default)
    sub.add_parser("generation", parents=[ckpt, gen]).add_argument("--k", type=int, default=1, help="pass@k")
    sub.add_parser("choice", parents=[ckpt]).add_argument("--data", required=True, help="multiple-choice JSONL")
    sub.add_parser("winrate", parents=[ckpt, gen]).add_argument("--ref", required=True, help="reference checkpoint")
    sub.add_parser("rewards", parents=[ckpt, gen]).add_argument("--bins", type=int, default=10)
    args = ap.parse_args(argv)
    print(vars(args))

    if args.cmd == "regret":
        res = regret(**{k: v for k, v in vars(args).items() if k not in ("cmd", "out")})
        print(f"{'K':>6} {'uncertainty':>18} {'random':>18}   (cumulative regret, mean ± std over {args.seeds} seeds)")
        for k in sorted({min(2 ** i, args.K) for i in range(math.ceil(math.log2(args.K)) + 1)}):
            print(f"{k:>6}" + "".join(f" {res[a]['cum_mean'][k - 1]:>10.3f} ± {res[a]['cum_std'][k - 1]:<5.2f}"
                                      for a in res))
        print(f"log-log slope over K ∈ [{args.K // 10}, {args.K}]: uncertainty {res['uncertainty']['slope']:.3f}, "
              f"random {res['random']['slope']:.3f} (the Õ(d√K) bound: 0.5)")
        report({"config": vars(args), **res}, args.out)
        stem = os.path.splitext(args.out)[0]
        with open(stem + ".csv", "w") as f:
            f.write("K,uncertainty_mean,uncertainty_std,random_mean,random_std\n")
            f.writelines(f"{k + 1},{','.join(str(res[a][s][k]) for a in res for s in ('cum_mean', 'cum_std'))}\n"
                         for k in range(args.K))
        if importlib.util.find_spec("matplotlib"):  # optional
            import matplotlib.pyplot as plt
            for arm in res:
                plt.loglog(range(1, args.K + 1), res[arm]["cum_mean"], label=f"{arm} (slope {res[arm]['slope']:.2f})")
            plt.xlabel("K"), plt.ylabel("cumulative regret"), plt.legend(), plt.savefig(stem + ".png", dpi=120)
        return print(f"wrote {stem}.csv")

    if args.cmd == "compare":
        seeds = args.seeds or (1 if args.quick else 3)
        return compare(args.out, args.budget, seeds, args.arms, args.quick, args.device)

    tok = data.load_tokenizer(args.model)
    policy = M.from_pretrained(args.model, device=args.device).eval()
    if args.cmd == "choice":
        items = load_choices(args.data, tok)[:args.limit or None]
        return report({"config": vars(args), **choice(policy, items, tok.pad_token_id, args.batch_size)}, args.out)
    items = data.load_prompts(args.prompts, tok, args.max_prompt_len)[:args.limit or None]
    score_fn = make_oracle(args.oracle, device=args.device).score_fn  # gold | gsm8k | rm:PATH
    common = dict(batch_size=args.batch_size, temperature=args.temperature, seed=args.seed)
    if args.cmd == "generation":
        res = generation(policy, tok, items, score_fn, args.max_new_tokens, k=args.k, **common)
    elif args.cmd == "winrate":
        ref = M.from_pretrained(args.ref, device=args.device).eval()
        res = winrate(policy, ref, tok, items, score_fn, args.max_new_tokens, **common)
    else:
        res = rewards(policy, tok, items, score_fn, args.max_new_tokens, args.bins, **common)
        for lo, hi, c in zip(res["edges"], res["edges"][1:], res["counts"]):
            print(f"  [{lo:8.3f}, {hi:8.3f})  {c}")
    report({"config": vars(args), **res}, args.out)


if __name__ == "__main__":
    main()

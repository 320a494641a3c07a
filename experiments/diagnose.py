"""
Where PbPO loses to DPO on the toy task, measured: how well does each kind of reward tell the better of
two responses on held-out prompts?

  - PbPO's reward model: a linear head (Bradley–Terry, ‖w‖ ≤ B) on frozen SFT features, for several
    feature maps (the last response token or the mean over response tokens, of the final or the first
    layer), fit on the same preference pairs DPO trains on; and on PbPO's φ of the toy's own
    reward-model backbone (toy.py: the SFT policy grown and pretrained without labels), the
    default backbone of a toy run;
  - DPO's implicit reward β (log π_θ(y) − log π_SFT(y)) after iterative DPO on those pairs
    (train_selm.py --alpha=0, run as a subprocess), and the SFT policy's own log-likelihood.

Held-out pairs: two temperature-1 SFT samples per validation prompt, labelled by the gold reward (ties
dropped), as the toy's preference file is built from the train prompts.

  python -m experiments.diagnose --out=out/diagnose             # about 3 minutes on 2 CPU cores
  python -m experiments.diagnose --rare --out=out/diagnose_rare   # the rare setting, out/toy_rare
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import model as M
import ranks
import run
from run import knob
import toy
from reward import bt_loss
from train_selm import load_preferences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gold_pairs(policy, tok, items, seed):
    """(prompt ids, better ids, worse ids) from two temperature-1 samples per item, ties dropped."""
    ids = [p["prompt_ids"] for p in items]
    samples = M.sample(policy, ids, 48, 1.0, n=2, seed=seed, batch_size=256,
                       eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    out = []
    for item, a, b in zip(items, samples[0::2], samples[1::2]):
        ra, rb = (toy.gold_reward(data.decode(tok, y), item["answer"]) for y in (a, b))
        if ra != rb:
            out.append((item["prompt_ids"], a, b) if ra > rb else (item["prompt_ids"], b, a))
    return out


@torch.no_grad()
def hidden_states(model, prompt_ids, responses, pad_id, layers):
    """{layer: (h_last (n, D), h_mean (n, D))} of unit-normalised hidden states: at the last response
    token, and averaged over the response tokens. Layer -1 is the final (normed) output."""
    ids, attn, resp = data.collate(prompt_ids, responses, pad_id)
    captured = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, args, out, i=i: captured.__setitem__(i, out)) for i in layers if i >= 0]
    captured[-1] = model(ids, attn)
    for h in hooks:
        h.remove()
    last = ids.shape[1] - 1 - resp.flip(-1).int().argmax(-1)  # (n,)
    out = {}
    for i, h in captured.items():
        h = F.normalize(h.float(), dim=-1)  # (n, T, D)
        mean = (h * resp[..., None]).sum(1) / resp.sum(1, keepdim=True)
        out[i] = (h[torch.arange(len(h)), last], F.normalize(mean, dim=-1))
    return out


def fit_head(phi_better, phi_worse, bound=10.0, steps=500, lr=1.0):
    """The follower with ρ = 0 run to convergence: projected gradient descent on L_BT, ‖w‖ ≤ B."""
    w = torch.zeros(phi_better.shape[1], requires_grad=True)
    labels = torch.ones(len(phi_better), dtype=torch.long)  # τ¹ = the better response won
    for _ in range(steps):
        loss = bt_loss(phi_worse @ w, phi_better @ w, labels)
        grad, = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
            w *= min(1.0, bound / (w.norm().item() + 1e-12))
    return w.detach(), loss.item()


def features(model, triples, pad_id, layers):
    """{(layer, pooling): (φ better, φ worse)} for a list of (prompt, better, worse)."""
    prompts, better, worse = zip(*triples)
    hb = hidden_states(model, list(prompts), list(better), pad_id, layers)
    hw = hidden_states(model, list(prompts), list(worse), pad_id, layers)
    return {(i, pool): (hb[i][k], hw[i][k]) for i in hb for k, pool in enumerate(("last", "mean"))}


@torch.no_grad()
def implicit_margin(policy, sft, triples, pad_id):
    """(log π(better) − log π_SFT(better)) − (same for worse) per pair: DPO's reward margin / β."""
    prompts, better, worse = map(list, zip(*triples))
    out = []
    for responses in (better, worse):
        ids, attn, resp = data.collate(prompts, responses, pad_id)
        drift = (M.token_logprobs(policy, ids, attn) - M.token_logprobs(sft, ids, attn)) * resp
        out.append(drift.sum(-1))
    return out[0] - out[1]


def gold_rl(paths, tok, steps, lr, kl_coef, seed, prompts_per_step=16, group=8):
    """PbPO's leader with the gold reward in place of r_w: how far the leader's optimisation gets in
    `steps` steps when its reward is perfect. -> greedy accuracy / gold reward on validation prompts."""
    from reward import make_oracle
    from train_pbpo import advantages, leader_loss, on_response
    policy, sft = M.from_pretrained(paths.model), M.from_pretrained(paths.model).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    prompts, oracle = data.load_prompts(paths.train, tok, 256), make_oracle("gold")
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    for step in range(steps):
        pick = torch.randint(len(prompts), (prompts_per_step,), generator=ranks.generator(seed, step))
        items = [prompts[i] for i in pick]
        responses, logps = M.sample(policy, [p["prompt_ids"] for p in items], 48, 1.0, n=group,
                                    seed=ranks.seed_of(seed, "rl", step), logprobs=True, **kw)
        rows = [p for p in items for _ in range(group)]
        gold = torch.tensor(oracle.score_fn(rows, [data.decode(tok, y) for y in responses]))
        ids, attn, resp = data.collate([p["prompt_ids"] for p in rows], responses, tok.pad_token_id)
        with torch.no_grad():
            log_ratio = (on_response(logps, resp) - M.token_logprobs(sft, ids, attn)) * resp
        adv = advantages(gold, log_ratio, resp, kl_coef, group)
        leader_loss(M.token_logprobs(policy, ids, attn), adv, len(rows)).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    valid = data.load_prompts(paths.valid, tok, 256)[:256]
    return oracle.evaluate(policy.eval(), tok, valid, 48)


def report(results):
    """A diagnose.json as the markdown table RESULTS.md quotes (its test recomputes it)."""
    setting = "rare" if results["config"].get("rare") else "standard"
    lines = [f"{setting}: {results['heldout_pairs']} held-out gold pairs (validation prompts, SFT "
             "samples, ties dropped)", "",
             "| pairs | reward | held-out acc | train acc | BT loss |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        train = f"{r['train_acc']:.3f} | {r['bt_loss']:.3f}" if "train_acc" in r else "- | -"
        lines.append(f"| {r['pairs']} | {r['reward']} | {r['heldout_acc']:.3f} | {train} |")
    lines.append("")
    lines += [f"gold-reward leader, {results['config']['rl_steps']} steps at lr {lr}: validation "
              f"accuracy {res['accuracy']:.3f}, gold reward {res['reward']:.3f}"
              for lr, res in results["gold_rl"].items()]
    return "\n".join(lines)


@dataclass
class Config:
    out: str = knob("out/diagnose", "results and the DPO runs")
    toy_dir: str = knob("", "the toy task, built if missing (out/toy; --rare: out/toy_rare)")
    rare: bool = knob(False, "the toy's rare setting (as toy.py --rare)")
    pairs: str = knob("153,763", "sizes of the training pair sets (prefixes of the toy preference "
                                 "file)")
    dpo_epochs: int = knob(4, "epochs of iterative DPO on each training set")
    rl_steps: int = knob(48, "gold-reward leader steps (PbPO's default: 6 episodes × 8)")
    rl_lrs: str = knob("1e-4,3e-4", "learning rates of the gold-reward leader")
    seed: int = knob(0, "")


if __name__ == "__main__":
    cfg = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/diagnose.py"):
        toy_dir = cfg.toy_dir or ("out/toy_rare" if cfg.rare else "out/toy")
        paths = toy.build(toy_dir, rare=cfg.rare)
        tok, sft = data.load_tokenizer(paths.model), M.from_pretrained(paths.model).eval()
        pad = tok.pad_token_id
        heldout = gold_pairs(sft, tok, data.load_prompts(paths.valid, tok, 256), cfg.seed)
        train_all = [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])
                     for p in load_preferences(paths.prefs, tok, 256)]
        layers = [0, -1]  # the first block's output and the final normed hidden state
        rm = M.from_pretrained(paths.rm).eval()  # the toy's RM backbone: PbPO's φ only

        def heads_features(triples):  # {a head's features: (φ better, φ worse)}
            out = {f"layer {i}, {pool}": phi
                   for (i, pool), phi in features(sft, triples, pad, layers).items()}
            out["toy RM backbone, last"] = features(rm, triples, pad, [-1])[(-1, "last")]
            return out

        test_phi = heads_features(heldout)
        build = json.load(open(os.path.join(toy_dir, "build.json")))  # which toy was measured
        results = {"config": asdict(cfg), "toy_dir": toy_dir, "toy_key": build["key"],
                   "heldout_pairs": len(heldout), "rows": []}
        lengths = torch.tensor([len(b) - len(w) for _, b, w in heldout], dtype=torch.float)
        for size in map(int, cfg.pairs.split(",")):
            train = train_all[:size]
            for name, (fb, fw) in heads_features(train).items():
                w, loss = fit_head(fb, fw)
                tb, tw = test_phi[name]
                acc = ((tb @ w) > (tw @ w)).float().mean().item()
                train_acc = ((fb @ w) > (fw @ w)).float().mean().item()
                results["rows"].append(dict(pairs=size, reward=f"linear head, {name}",
                                            heldout_acc=acc, train_acc=train_acc, bt_loss=loss))
            out_dir = os.path.join(cfg.out, f"dpo_{size}")
            if not os.path.exists(os.path.join(out_dir, "final", "model.safetensors")):
                import shutil
                shutil.rmtree(out_dir, ignore_errors=True)
                cmd = [sys.executable, os.path.join(ROOT, "train_selm.py"), f"--model={paths.model}",
                       f"--prefs={paths.prefs}", f"--heldout={paths.valid}", f"--max_pairs={size}",
                       "--alpha=0", f"--epochs={cfg.dpo_epochs}", f"--out_dir={out_dir}"]
                subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            dpo = M.from_pretrained(os.path.join(out_dir, "final")).eval()
            margin = implicit_margin(dpo, sft, heldout, pad)
            results["rows"].append(dict(pairs=size, reward=f"DPO implicit, {cfg.dpo_epochs} epochs",
                                        heldout_acc=(margin > 0).float().mean().item()))
        # references that need no training: SFT log-likelihood and response length
        prompts, better, worse = map(list, zip(*heldout))
        ll = []
        for responses in (better, worse):
            ids, attn, resp = data.collate(prompts, responses, pad)
            with torch.no_grad():
                ll.append((M.token_logprobs(sft, ids, attn) * resp).sum(-1))
        for name, better_wins in (("SFT log-likelihood", ll[0] > ll[1]), ("longer response", lengths > 0)):
            results["rows"].append(dict(pairs=0, reward=name, heldout_acc=better_wins.float().mean().item()))
        results["gold_rl"] = {lr: gold_rl(paths, tok, cfg.rl_steps, float(lr), 0.05, cfg.seed)
                              for lr in cfg.rl_lrs.split(",")}
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "diagnose.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(report(results))

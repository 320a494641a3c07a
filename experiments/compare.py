"""
The paper's comparison on the built-in toy task: every method at an equal oracle budget, over
several training seeds, one shared toy SFT model. Each arm trains as its own subprocess in
OUT/ARM/seedS/ (a finished run with the same command is reused).

  python -m experiments.compare --out=out/compare          # every arm, 3 seeds
  python -m experiments.compare --quick --out=/tmp/compare  # the same in miniature (a few minutes)

Writes compare.md (the table), compare.json (per-seed values), curves.csv and, with matplotlib,
curves.png; experiments/RESULTS.md reports the run.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

import data
import model as M
import run
import toy
from eval import winrate
from reward import make_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    cmd = [sys.executable, os.path.join(ROOT, script), *flags,
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
    paths = toy.build(os.path.join(out, "toy"), quick=quick)
    m, eval_max, max_new = (8, 16, 16) if quick else (64, 256, 48)
    shared = [f"--model={paths.model}", f"--heldout={paths.heldout}", f"--eval_max={eval_max}",
              f"--max_new_tokens={max_new}"]
    flags = {"train_pbpo.py": shared + [f"--prompts={paths.train}", f"--explore_prompts={m}",
                                        f"--episodes={budget // (2 * m)}"],
             "train_selm.py": shared + [f"--prefs={paths.prefs}", f"--max_pairs={budget // 5}"]}
    tok, oracle = data.load_tokenizer(paths.model), make_oracle("gold")
    items = data.load_prompts(paths.heldout, tok, 256)[:eval_max]
    sft = M.from_pretrained(paths.model, device).eval()
    sft_eval = oracle.evaluate(sft, tok, items, max_new)
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
                win = winrate(policy, sft, tok, items, oracle.score_fn, max_new)
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
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"config": dict(budget=budget, seeds=seeds, quick=quick, flags=flags,
                                  n_heldout=len(items)), **results}, f, indent=1)
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


@dataclass
class Config:
    out: str = "out/compare"  # where the runs, tables and plots go
    budget: int = 0  # oracle calls per run (0: 768, or 32 with --quick)
    seeds: int = 0  # training seeds 0..seeds-1 (0: 3, or 1 with --quick)
    arms: str = ""  # comma-separated subset of the arms (default: all, or the quick ones)
    quick: bool = False  # a tiny toy task and short runs: a smoke test
    device: str = "cpu"  # where the evaluation runs


if __name__ == "__main__":
    run.friendly_errors("experiments/compare.py")
    cfg = run.parse_flags(Config, __doc__)
    compare(cfg.out, cfg.budget, cfg.seeds or (1 if cfg.quick else 3), cfg.arms, cfg.quick, cfg.device)

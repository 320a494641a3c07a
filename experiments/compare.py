"""
The comparison on the built-in task, as a reviewer would accept it:
  1. every arm tuned by one protocol on the validation prompts (a small stated grid in at most two
     stages of at most 8 points, 2 tuning seeds, at the top budget, scored by the mean greedy gold
     reward; the chosen flags are written out), never on the held-out prompts;
  2. every arm run at equal oracle budgets, every labelled response counted (the offline pairs
     too), over paired seeds (10 for the main arms, 5 for ablations and sweeps) that change every
     arm's data: the pair subset, the prompts, the samples;
  3. every policy evaluated on all held-out prompts: greedy accuracy and gold reward, and at the top
     budget the expected gold reward of 8 samples at temperature 1 and the KL to the SFT policy;
  4. the paper's claims judged by paired differences with 95% intervals: a claim holds only when
     its interval excludes 0.
Two settings: `standard` (toy.py's task) and `rare` (toy.py --rare: the demonstrators guess far
more often, so the correct behaviour is rare under the SFT policy).

  python -m experiments.compare --out=out/compare             # everything (reuses finished runs)
  python -m experiments.compare --quick --out=/tmp/compare    # the same path in miniature (CI)

Writes OUT/compare.json (every number), OUT/compare.md (the tables), OUT/curves.png and
OUT/frontier.png (with matplotlib); experiments/RESULTS.md reports the run. Every flag is checked
before any work. Ctrl-C or SIGTERM stops the runs and evaluations in flight, and a killed driver
takes them with it; a restart reuses every finished run and evaluation and starts the others over.
"""
import collections
import functools
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

import data
import model as M
import ranks
import run
from run import knob
import toy
from experiments.tune import (STOPPING, grid_points, integers, mean_ci, run_arm,
                              stop_children_on_interrupt)
from reward import make_oracle

SETTINGS = ("standard", "rare")
TUNING_SEEDS = (100, 101)
LOCKS = collections.defaultdict(threading.Lock)  # one per run dir and evaluation file
RANKING_CALLS = 1  # train_selm.py scores y_ref once per offline pair (the file keeps the others')


@dataclass(frozen=True)
class Arm:
    name: str
    script: str = ""  # "" = the SFT policy itself
    flags: tuple = ()  # fixed flags (what makes the arm)
    stages: tuple = ()  # tuning grids, run one after the other, each on the best of the last
    like: str = ""  # start from this arm's tuned flags (then tune `stages`, if any, on top)
    seeds: int = 10
    settings: tuple = ("standard", "rare")


DPO_GRID = ("epochs=1,4 lr=1e-4,3e-4 beta=0.01,0.1", "epochs=4,8,16 lr=5e-5,1e-4")
ARMS = [
    Arm("sft"),
    Arm("dpo", "train_selm.py", ("--alpha=0",), DPO_GRID),
    Arm("dpo_online", "train_selm.py", ("--alpha=0", "--online"), DPO_GRID),
    Arm("selm", "train_selm.py", (), ("alpha=0.001,0.01,0.1,1,3,10",), like="dpo"),  # DPO + α
    Arm("pbpo", "train_pbpo.py", (),
        ("kl_coef=0.2,0.5,1 anchor=sft,ref", "beta=0.01,0.04,0.1 t_out=4,8")),
    Arm("pbpo_token", "train_pbpo.py", ("--level=token",), like="pbpo", settings=("standard",)),
    Arm("pbpo_best_of_n", "train_pbpo.py", ("--enhancer=best_of_n",), like="pbpo", seeds=5),
    Arm("pbpo_no_enhancer", "train_pbpo.py",
        ("--enhancer=best_of_n", "--n_candidates=1", "--enh_temp=1"), like="pbpo", seeds=5),
    Arm("pbpo_mle", "train_pbpo.py", ("--beta_form=mle",), like="pbpo", seeds=5),
    *[Arm(f"pbpo_beta{beta}", "train_pbpo.py", (f"--beta={beta}",), like="pbpo", seeds=5,
          settings=("standard",)) for beta in ("0", "0.01", "0.02", "0.04", "0.1")],
]
MAIN = ("sft", "dpo", "dpo_online", "selm", "pbpo", "pbpo_token")
CLAIMS = [  # (claim, arm a, arm b): holds when a − b > 0, its 95% interval above 0
    ("PbPO ≥ SELM", "pbpo", "selm"), ("SELM ≥ iterative DPO", "selm", "dpo"),
    ("iterative DPO ≥ SFT", "dpo", "sft"), ("PbPO ≥ online iterative DPO", "pbpo", "dpo_online"),
    ("token-level PbPO ≥ PbPO", "pbpo_token", "pbpo"),
    ("the enhancer helps (PbPO ≥ no enhancer)", "pbpo", "pbpo_no_enhancer"),
    ("the enhancer policy ≥ best-of-N", "pbpo", "pbpo_best_of_n"),
    ("reward-aware exploration helps (PbPO ≥ MLE RM)", "pbpo", "pbpo_mle"),
    *[(f"β = {b} beats β = 0", f"pbpo_beta{b}", "pbpo_beta0") for b in ("0.01", "0.02", "0.04",
                                                                       "0.1")],
]


# ---------------------------------------------------------------- runs at a budget
def offline_pairs(paths, budget, seed, out):
    """A seed's random subset of the toy's offline pairs, as many as the budget pays for: building
    the file scored two SFT samples per train prompt (ties dropped, so each kept pair cost
    2 · prompts / pairs calls) and keeps the scores, so train_selm.py pays only for y_ref's."""
    pairs = open(paths.prefs).read().splitlines()
    prompts = sum(1 for _ in open(paths.train))
    cost = 2 * prompts / len(pairs) + RANKING_CALLS
    keep = max(3, int(budget // cost))
    random.Random(seed).shuffle(pairs)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"pairs_{budget}_seed{seed}.jsonl")
    with open(path, "w") as f:
        f.writelines(p + "\n" for p in pairs[:keep])
    return path, keep * (cost - RANKING_CALLS)  # the calls spent before the run


EXPLORE_PROMPTS = {False: 64, True: 8}  # PbPO's M, by --quick: 2 calls a prompt (0 if identical)


def budget_flags(arm, paths, budget, seed, out, quick, more=0):
    """The flags that make a run spend `budget` oracle calls, and the calls spent offline. more:
    PbPO's episodes beyond budget // (2M), for a run whose identical pairs left calls unspent."""
    if arm.script == "train_pbpo.py":
        m = EXPLORE_PROMPTS[quick]
        return [f"--prompts={paths.train}", f"--explore_prompts={m}",
                f"--episodes={max(1, budget // (2 * m)) + more}"], 0.0
    if "--online" in arm.flags:  # 2 calls per prompt and iteration
        iterations = 1 if quick else 3
        per_iteration = max(1, budget // (2 * iterations))
        return [f"--prompts={paths.train}", f"--online_prompts={per_iteration}"], 0.0
    prefs, offline = offline_pairs(paths, budget, seed, out)
    return [f"--prefs={prefs}"], offline


def merge(*flag_lists):
    """The flags of all lists, sorted; of two values of one flag the later list's wins."""
    return sorted({f.split("=")[0]: f for flags in flag_lists for f in flags}.values())


def train(arm, flags, paths, seed, out, quick, split, budgets):
    """An arm's runs at every budget for one seed: {budget: (final policy dir, oracle calls, all
    counted)}. A PbPO run at a larger budget continues the one below (--resume with more episodes,
    which is bit-identical to one long run), so one run gives every point of its curve. A pair of
    identical responses costs PbPO no call, so it runs more episodes while one more fits."""
    flags = merge(flags, arm.flags)  # the arm's own flags win over tuned ones
    common = [f"--model={paths.model}", f"--heldout={getattr(paths, split)}", "--eval_max=1",
              *(QUICK_FLAGS[arm.script] if quick else []), *flags, f"--seed={seed}"]
    done, previous = {}, None
    for budget in budgets:  # the same command shares one run dir, whichever arm asks for it
        for more in range(budget):  # PbPO: episodes beyond budget // (2m) while one more fits
            extra, offline = budget_flags(arm, paths, budget, seed, os.path.join(out, "data"),
                                          quick, more)
            tag = ranks.seed_of(arm.script, *common, *extra) % 10**10
            run_dir = os.path.join(out, "runs", f"{arm.script[6:-3]}_{budget}_s{seed}_{tag}")
            with LOCKS[run_dir]:  # two arms may ask for the same run at once
                calls = run_arm(arm.script, common + extra, run_dir, previous)[-1]["oracle_calls"]
            previous = run_dir if arm.script == "train_pbpo.py" else None
            if not previous or calls + 2 * EXPLORE_PROMPTS[quick] > budget:
                break
        done[budget] = os.path.join(run_dir, "final"), calls + offline
    return done


QUICK_FLAGS = {"train_pbpo.py": ["--t_out=2", "--t_in=2", "--group=2", "--ref_samples=2",
                                 "--leader_prompts=4", "--max_new_tokens=16"],
               "train_selm.py": ["--iterations=1", "--batch_size=4", "--micro_batch=4",
                                 "--max_new_tokens=16"]}


# ---------------------------------------------------------------- evaluation
def evaluator_starts():
    """An evaluation process: one thread; Ctrl-C is left to the driver, which terminates these;
    it ends when the driver does, even by kill -9 (a pool's worker would wait for work forever)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with, args=(multiprocessing.parent_process(),),
                     daemon=True).start()


def exit_with(driver):
    driver.join()  # returns when the driver's end of the spawn pipe closes: when it dies
    os._exit(1)


@functools.lru_cache(maxsize=None)
def sft_policy(model_dir):
    """The SFT policy π_SFT of a toy, its tokenizer and stop ids: loaded once per evaluation
    process."""
    tok = data.load_tokenizer(model_dir)
    return tok, M.from_pretrained(model_dir).eval(), M.stop_ids(model_dir, tok)


@torch.no_grad()
def evaluate(policy_dir, paths, split, samples, max_new):
    """Greedy accuracy and gold reward, the expected gold reward of `samples` samples at
    temperature 1, and KL(π ‖ π_SFT) on those samples (the mean of Σ_h log π/π_SFT), on every
    prompt of the split."""
    tok, sft, eos = sft_policy(paths.model)
    oracle, items = make_oracle("gold"), data.load_prompts(getattr(paths, split), tok, 256)
    policy = M.from_pretrained(policy_dir).eval()
    res = oracle.evaluate(policy, tok, items, max_new, eos, batch_size=500)
    if not samples:
        return {**res, "expected_reward": None, "kl_sft": None}
    prompts = [p["prompt_ids"] for p in items]
    responses, logps = M.sample(policy, prompts, max_new, 1.0, n=samples, seed=12345, logprobs=True,
                                batch_size=512, eos_ids=eos, pad_id=tok.pad_token_id)
    rows = [p for p in items for _ in range(samples)]
    gold = oracle.score_fn(rows, [data.decode(tok, y) for y in responses])
    ids, attn, resp = data.collate([p["prompt_ids"] for p in rows], responses, tok.pad_token_id)
    logp_sft = (M.token_logprobs(sft, ids, attn, micro_batch=512) * resp).sum(-1)  # (n,)
    kl = sum(map(sum, logps)) / len(rows) - logp_sft.mean().item()
    return {**res, "expected_reward": sum(gold) / len(gold), "kl_sft": kl}


def evaluation(evaluators, policy_dir, paths, split, samples, max_new):
    """evaluate()'s results, read from policy_dir/eval_{split}_{samples}.json if it exists, else
    computed in one of the `evaluators` processes (started once per comparison, one thread each,
    so an evaluation pays for no interpreter start, import or SFT load) and written there."""
    out_file = os.path.join(policy_dir, f"eval_{split}_{samples}.json")
    with LOCKS[out_file]:
        if not os.path.exists(out_file):
            if STOPPING.is_set():
                raise RuntimeError(f"not evaluated, the driver is stopping: {policy_dir}")
            res = evaluators.submit(evaluate, policy_dir, paths, split, samples, max_new).result()
            with open(out_file + ".tmp", "w") as f:
                json.dump(res, f)
            os.replace(out_file + ".tmp", out_file)  # a run killed mid-write leaves no half file
    with open(out_file) as f:
        return json.load(f)


# ---------------------------------------------------------------- tuning, runs, claims
def paired(a, b):
    """Mean and 95% interval of the paired differences a_s − b_s over the seeds both have."""
    diffs = [a[s] - b[s] for s in a if s in b]
    return (*mean_ci(diffs), len(diffs)) if diffs else (float("nan"), float("nan"), 0)


def names(flag, text, known):
    """'a,b' -> ['a', 'b'], each one of `known`, none twice; otherwise a ValueError naming the
    flag."""
    chosen = text.split(",")
    if not set(chosen) <= set(known) or len(set(chosen)) < len(chosen):
        raise ValueError(f"{flag}={text}: expected comma-separated names, each once, of "
                         f"{', '.join(known)}")
    return chosen


def checked(cfg):
    """The flags that list things, each checked before any work: -> (budgets, arms, settings)."""
    budgets = integers("--budgets", cfg.budgets, low=1, increasing=True)
    chosen = names("--arms", cfg.arms or ",".join(a.name for a in ARMS), [a.name for a in ARMS])
    arms = [a for a in ARMS if a.name in chosen]
    for arm in arms:
        if arm.like and arm.like not in chosen:
            raise ValueError(f"--arms={cfg.arms}: {arm.name} starts from the tuned flags of "
                             f"{arm.like}: add {arm.like}")
    settings = names("--settings", cfg.settings, SETTINGS)
    if settings[0] not in names("--tune_on", cfg.tune_on, SETTINGS):
        raise ValueError(f"--settings={cfg.settings}: the first setting must be tuned (one of "
                         f"--tune_on={cfg.tune_on}); the others take its tuned flags")
    return (32, 64) if cfg.quick else tuple(budgets), arms, settings


def compare(cfg):
    t_start = time.time()
    budgets, arms, settings = checked(cfg)
    results = {"config": asdict(cfg), "budgets": budgets, "settings": {}}
    max_new = 16 if cfg.quick else 48
    spawn = multiprocessing.get_context("spawn")  # not fork: forking a process that runs
    # threads can deadlock the child. The runners stop before the evaluators they wait on.
    with (ProcessPoolExecutor(cfg.jobs, mp_context=spawn,
                              initializer=evaluator_starts) as evaluators,
          ThreadPoolExecutor(cfg.jobs) as runners,
          stop_children_on_interrupt()):  # exits first: stops what the pools would wait for
        for setting in settings:
            rare = setting == "rare"
            toy_dir = os.path.join(cfg.out, setting, "toy")
            paths = toy.build(toy_dir, quick=cfg.quick, rare=rare)
            out = os.path.join(cfg.out, setting)
            here = [a for a in arms if setting in a.settings]
            evaluate_job = lambda d, split, samples=cfg.samples: evaluation(
                evaluators, d, paths, split, samples, max_new)
            # 1. tuning: each stage's grid × tuning seeds at the top budget, on valid.jsonl; a
            # setting not in --tune_on takes the tuned flags of the first setting
            if setting in cfg.tune_on.split(","):
                tuned, tuning_calls = {"sft": []}, {}
            else:
                tuned, tuning_calls = dict(first["tuned"]), {}
            for arm in [a for a in here if a.script and a.name not in tuned and a.stages]:
                best, calls = list(tuned.get(arm.like, [])), 0
                for stage in arm.stages:
                    points = grid_points(stage)[:1] if cfg.quick else grid_points(stage)
                    seeds = TUNING_SEEDS[:1] if cfg.quick else TUNING_SEEDS
                    jobs = [(p, s) for p in points for s in seeds]

                    def tune_job(job):  # a run at the top budget, scored greedily on valid.jsonl
                        policy, used = train(arm, best + job[0], paths, job[1], out, cfg.quick,
                                             "valid", budgets[-1:])[budgets[-1]]
                        return used, evaluate_job(policy, "valid", samples=0)["reward"]

                    scores = list(runners.map(tune_job, jobs))
                    calls += sum(used for used, _ in scores)
                    by_point = {}
                    for (p, _), (_, score) in zip(jobs, scores):
                        by_point.setdefault(tuple(p), []).append(score)
                    mean = lambda p: sum(by_point[p]) / len(by_point[p])
                    best = merge(best, max(by_point, key=mean))
                    print(f"[{setting}] {arm.name}: tuned {' '.join(best)} "
                          f"({time.time() - t_start:.0f} s)", flush=True)
                tuned[arm.name], tuning_calls[arm.name] = best, calls
            for arm in here:
                if arm.like and not arm.stages:
                    tuned[arm.name] = tuned[arm.like]
            # 2. the runs: every arm × budget × seed, then their evaluation on the held-out split
            jobs = [(arm, s) for arm in here if arm.script
                    for s in range(1 if cfg.quick else arm.seeds)]

            def job(arm_seed):  # an arm's runs at every budget for a seed, then their evaluation
                arm, seed = arm_seed  # (below the top budget: greedy only, for the curves)
                runs = train(arm, tuned[arm.name], paths, seed, out, cfg.quick, "heldout", budgets)
                return {b: {**evaluate_job(d, "heldout", cfg.samples if b == budgets[-1] else 0),
                            "calls": c} for b, (d, c) in runs.items()}

            finished = list(runners.map(job, jobs))
            print(f"[{setting}] runs and evaluations done ({time.time() - t_start:.0f} s)",
                  flush=True)
            sft_eval = {**evaluate_job(paths.model, "heldout"), "calls": 0}
            table = {"sft": {b: {s: sft_eval for s in range(10)} for b in budgets}}
            for (arm, seed), by_budget in zip(jobs, finished):
                for b, res in by_budget.items():
                    table.setdefault(arm.name, {}).setdefault(b, {})[seed] = res
            claims = []
            for claim, a, b in CLAIMS:
                if a in table and b in table:
                    for budget in budgets:  # the sampled metric only where it was measured
                        for metric in ("reward", "expected_reward")[:1 + (budget == budgets[-1])]:
                            va = {s: r[metric] for s, r in table[a][budget].items()}
                            vb = {s: r[metric] for s, r in table[b][budget].items()}
                            mean, half, n = paired(va, vb)
                            claims.append(dict(claim=claim, budget=budget, metric=metric, diff=mean,
                                               ci=half, seeds=n, holds=n > 1 and mean - half > 0))
            as_run = {a.name: merge(tuned[a.name], a.flags) for a in here}  # the runs' flags
            results["settings"][setting] = {"tuned": as_run, "tuning_calls": tuning_calls,
                                            "table": table, "claims": claims}
            first = results["settings"][settings[0]]
    results["seconds"] = time.time() - t_start
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "compare.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(cfg.out, "compare.md"), "w") as f:
        f.write(report(results))
    plots(results, cfg.out)
    print(report(results))
    return results


# ---------------------------------------------------------------- tables and plots
def report(results):
    lines = [f"Wall time {results['seconds'] / 60:.0f} min. Mean ± 95% interval over seeds; "
             "held-out split, all prompts.\n"]
    for setting, res in results["settings"].items():
        lines += [f"### {setting}\n", "| arm | tuned flags | tuning calls |", "|---|---|---|"]
        spent = lambda a: round(res["tuning_calls"].get(a, 0)) or "reused"
        lines += [f"| {a} | `{' '.join(f) or '-'}` | {spent(a)} |"
                  for a, f in res["tuned"].items() if a != "sft"]
        lines += ["", "| arm | budget | calls | seeds | accuracy | gold reward | "
                      "expected gold (T=1) | KL to SFT |", "|---|---|---|---|---|---|---|---|"]
        for arm, by_budget in res["table"].items():
            for budget, by_seed in by_budget.items():
                rows = list(by_seed.values())
                cell = lambda k: "-" if rows[0][k] is None else \
                    "{:.3f} ± {:.3f}".format(*mean_ci([r[k] for r in rows]))
                lines.append(f"| {arm} | {budget} | {sum(r['calls'] for r in rows) / len(rows):.0f}"
                             f" | {len(rows)} | {cell('accuracy')} | {cell('reward')} | "
                             f"{cell('expected_reward')} | {cell('kl_sft')} |")
        lines += ["", "| claim | budget | metric | paired difference | seeds | holds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['budget']} | {c['metric']} | {c['diff']:+.4f} ± "
                  f"{c['ci']:.4f} | {c['seeds']} | {'yes' if c['holds'] else 'no'} |"
                  for c in res["claims"]]
        lines.append("")
    return "\n".join(lines)


def plots(results, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plots")
    settings = results["settings"]
    colour = {a.name: plt.cm.tab20(i) for i, a in enumerate(ARMS)}  # one colour an arm
    for name, x_key, y_key, x_label in (("curves", "calls", "reward", "oracle calls"),
                                        ("frontier", "kl_sft", "expected_reward",
                                         "KL(π ‖ π_SFT), nats")):
        fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
        for ax, (setting, res) in zip(axes[0], settings.items()):
            for arm, by_budget in res["table"].items():
                pts = sorted((sum(r[x_key] for r in s.values()) / len(s),
                              sum(r[y_key] for r in s.values()) / len(s))
                             for s in by_budget.values()
                             if next(iter(s.values()))[x_key] is not None)
                if name == "curves" and arm != "sft":
                    sft = res["table"]["sft"]
                    pts = [(0, next(iter(next(iter(sft.values())).values()))[y_key])] + pts
                ax.plot(*zip(*pts), "o-" if name == "curves" else "o", color=colour[arm],
                        label=arm, markersize=4)
            ax.set_title(setting)
            ax.set_xlabel(x_label)
            ax.set_ylabel("held-out gold reward (greedy)" if name == "curves" else
                          "expected gold reward, 8 samples at T = 1")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)


@dataclass
class Config:
    out: str = knob("out/compare", "runs, tables and plots")
    settings: str = knob("standard,rare", "standard | rare, comma-separated")
    tune_on: str = knob("standard", "settings tuned on their own validation split; the others take")
    # the first setting's tuned flags
    budgets: str = knob("384,768", "oracle-call budgets")
    arms: str = knob("", "a comma-separated subset of the arms (default: all)")
    samples: int = knob(8, "samples per prompt for the expected gold reward at temperature 1")
    jobs: int = knob(2, "runs at a time, and as many evaluation processes; one thread each",
                     at_least=1)
    quick: bool = knob(False, "the quick toy, one seed, the first grid point: a smoke test")



if __name__ == "__main__":
    config = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/compare.py"):
        compare(config)

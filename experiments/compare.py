"""
The comparison on the built-in task, as a reviewer would accept it:
  1. every arm tuned by one protocol on the validation prompts, at every budget: a stated grid in
     stages, each on the best point of the one before, every point trained with the 2 tuning
     seeds (100, 101: the same for every arm, disjoint from the comparison's) and scored by the
     mean greedy gold reward. A choice on the lowest or highest value tried of a numeric axis
     extends that axis one step past the edge, until the choice is inside or EXTENSIONS steps
     were taken (tune_stages). Every run is counted, and the held-out prompts never choose;
  2. every arm run at equal oracle budgets with the flags tuned at that budget, every labelled
     response counted (the offline pairs too), over 10 paired seeds (0..9; --seeds and
     --ablation_seeds run fewer) that change every arm's data: the pair subset, the prompts, the
     samples;
  3. every policy evaluated on all held-out prompts at every budget: greedy accuracy and gold
     reward, the expected gold reward of 8 samples at temperature 1 and the KL to the SFT policy;
     and what it cost: oracle calls, optimizer steps and training wall seconds (run_cost);
  4. the paper's claims judged by paired differences with 95% intervals: a claim holds only when
     its interval excludes 0.
Two settings: `standard` (toy.py's task) and `rare` (toy.py --rare: the demonstrators guess far
more often, so the correct behaviour is rare under the SFT policy). The ablations run in both.

  python -m experiments.compare --out=out/compare             # everything (reuses finished runs)
  python -m experiments.compare --plan                        # what that runs, and how long
  python -m experiments.compare --quick --out=/tmp/compare    # the same path in miniature (CI)

Writes OUT/compare.json (every number), OUT/compare.md (the tables), OUT/curves.png and
OUT/frontier.png (with matplotlib); experiments/RESULTS.md reports the run. Every flag is checked
before any work. Ctrl-C or SIGTERM stops the runs and evaluations in flight, and a killed driver
takes them with it; a restart reuses every finished run and evaluation and starts the others over.
--jobs_file=FILE also keeps each finished job's results (a tuning point's score, a seed's rows) in
FILE, one JSON line each, so a comparison stopped on one machine goes on from that file on another
(where OUT's runs are gone): the file the reported comparison was made in is committed,
experiments/data/compare_jobs.jsonl.

  python -m experiments.compare --out=out/compare --jobs_file=experiments/data/compare_jobs.jsonl
"""
import collections
import functools
import hashlib
import inspect
import itertools
import json
import math
import multiprocessing
import os
import re
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
from experiments.tune import (SCRIPTS, STOPPING, check_flag, code_digest, integers, mean_ci,
                              pair_subset, run_arm, start_child, stop_children_on_interrupt)
from reward import make_oracle

SETTINGS = ("standard", "rare")
TUNING_SEEDS = (100, 101)
EXTENSIONS = 2  # at most this many points past the edges of one axis, per stage and budget
QUICK_POINTS = 1  # --quick trains the first this many points of each stage
LOCKS = collections.defaultdict(threading.Lock)  # one per run dir and evaluation file
RANKING_CALLS = 1  # train_selm.py scores y_ref once per offline pair (the file keeps the others')


@dataclass(frozen=True)
class Arm:
    name: str
    script: str = ""  # "" = the SFT policy itself
    flags: tuple = ()  # fixed flags (what makes the arm)
    stages: tuple = ()  # tuning grids, run one after the other, each on the best of the last
    like: str = ""  # start from this arm's tuned flags (then tune `stages`, if any, on top)
    ablation: bool = False  # run over --ablation_seeds seeds, not --seeds


# Every arm's lr and its number of passes (SELM's epochs, PbPO's leader steps an episode T_out)
# are on its grid, so they are tuned at every budget.
DPO_GRID = ("epochs=1,4 lr=1e-4,3e-4 beta=0.01,0.1", "epochs=4,8,16 lr=5e-5,1e-4")
SELM_GRID = (DPO_GRID[0], "alpha=0.001,0.01,0.1,1", DPO_GRID[1])  # its own lr, β and epochs
PBPO_GRID = ("kl_coef=0.2,0.5,1 anchor=sft,ref", "lr=5e-5,1e-4,2e-4 t_out=4,8",
             "beta=0.01,0.04,0.1")
ARMS = [
    Arm("sft"),
    Arm("dpo", "train_selm.py", ("--alpha=0",), DPO_GRID),
    Arm("dpo_online", "train_selm.py", ("--alpha=0", "--online"), DPO_GRID),
    Arm("selm", "train_selm.py", (), SELM_GRID),
    Arm("pbpo", "train_pbpo.py", (), PBPO_GRID),
    Arm("pbpo_best_of_n", "train_pbpo.py", ("--enhancer=best_of_n",), like="pbpo", ablation=True),
    Arm("pbpo_no_enhancer", "train_pbpo.py",
        ("--enhancer=best_of_n", "--n_candidates=1", "--enh_temp=1"), like="pbpo", ablation=True),
    Arm("pbpo_mle", "train_pbpo.py", ("--beta_form=mle",), like="pbpo", ablation=True),
    Arm("pbpo_small_rm", "train_pbpo.py", ("--rm_backbone=",), (PBPO_GRID[2],), like="pbpo",
        ablation=True),  # β re-tuned: the follower is what the RM's features change
    *[Arm(f"pbpo_beta{beta}", "train_pbpo.py", (f"--beta={beta}",), like="pbpo", ablation=True)
      for beta in ("0", "0.01", "0.02", "0.04", "0.1")],
]
CLAIMS = [  # (claim, arm a, arm b): holds when a − b > 0, its 95% interval above 0
    ("PbPO ≥ SELM", "pbpo", "selm"), ("SELM ≥ iterative DPO", "selm", "dpo"),
    ("iterative DPO ≥ SFT", "dpo", "sft"), ("PbPO ≥ online iterative DPO", "pbpo", "dpo_online"),
    ("the enhancer helps (PbPO ≥ no enhancer)", "pbpo", "pbpo_no_enhancer"),
    ("the enhancer policy ≥ best-of-N", "pbpo", "pbpo_best_of_n"),
    ("reward-aware exploration helps (PbPO ≥ MLE RM)", "pbpo", "pbpo_mle"),
    ("a large RM beats a small one (PbPO ≥ the SFT features)", "pbpo", "pbpo_small_rm"),
    *[(f"β = {b} beats β = 0", f"pbpo_beta{b}", "pbpo_beta0") for b in ("0.01", "0.02", "0.04",
                                                                       "0.1")],
]


# ---------------------------------------------------------------- runs at a budget
def offline_pairs(paths, budget, seed, out):
    """A seed's random subset of the toy's offline pairs, as many as the budget pays for: building
    the file scored two SFT samples per train prompt (ties dropped, so each kept pair cost
    2 · prompts / pairs calls) and keeps the scores, so train_selm.py pays only for y_ref's."""
    pairs = sum(1 for _ in open(paths.prefs))
    prompts = sum(1 for _ in open(paths.train))
    cost = 2 * prompts / pairs + RANKING_CALLS
    keep = max(3, int(budget // cost))
    offline = keep * (cost - RANKING_CALLS)  # the calls spent on these pairs before the run
    return pair_subset(paths.prefs, keep, seed, out), offline


EXPLORE_PROMPTS = {False: 64, True: 8}  # PbPO's M, by --quick: 2 calls a prompt (0 if identical)
ONLINE_ITERATIONS = {False: 3, True: 1}  # online DPO's, by --quick: B / (2 I) prompts each


def budget_flags(arm, paths, budget, seed, out, quick, more=0):
    """The flags that make a run spend `budget` oracle calls, and the calls spent offline. more:
    PbPO's episodes beyond budget // (2M), for a run whose identical pairs left calls unspent."""
    if arm.script == "train_pbpo.py":
        m = EXPLORE_PROMPTS[quick]
        return [f"--prompts={paths.train}", f"--explore_prompts={m}",
                f"--episodes={max(1, budget // (2 * m)) + more}"], 0.0
    if "--online" in arm.flags:  # 2 calls per prompt and iteration
        per_iteration = max(1, budget // (2 * ONLINE_ITERATIONS[quick]))
        return [f"--prompts={paths.train}", f"--online_prompts={per_iteration}"], 0.0
    prefs, offline = offline_pairs(paths, budget, seed, out)
    return [f"--prefs={prefs}"], offline


def merge(*flag_lists):
    """The flags of all lists, sorted; of two values of one flag the later list's wins."""
    return sorted({f.split("=")[0]: f for flags in flag_lists for f in flags}.values())


def flag_value(script, flags, name):
    """--name's value in a run's flags (the last one given), else the script's default."""
    field = SCRIPTS[script].__dataclass_fields__[name]
    given = [f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")]
    return field.type(given[-1]) if given else field.default


def run_cost(script, flags, lines):
    """(optimizer steps, training wall seconds) of a run up to its end, from its metrics.jsonl,
    which for a continued PbPO run holds the runs it continues. Steps: AdamW steps on a policy,
    each a `step` line (SELM's steps; PbPO's leader steps), plus PbPO's enhancer steps, which are
    not logged one by one: --enh_steps in each `episode` when the enhancer is a policy (the
    follower's steps on the d weights of r_w are not counted). Seconds: the `wall_s` of the
    `episode` / `iteration` lines (sampling, labelling, updates; not the start, the evaluations
    or the export)."""
    steps = sum(line["kind"] == "step" for line in lines)
    units = [line for line in lines if line["kind"] in ("episode", "iteration")]
    if script == "train_pbpo.py" and flag_value(script, flags, "enhancer") == "policy":
        steps += flag_value(script, flags, "enh_steps") * len(units)
    return steps, sum(line["wall_s"] for line in units)


@dataclass
class Run:
    """A finished run at a budget. path: every training process that led to it, first to last,
    as (run dir, oracle calls to its end): a PbPO run continues the ones before it."""
    policy: str  # the exported policy's directory
    calls: float  # oracle calls to here, the offline pairs' included
    steps: int  # optimizer steps to here (run_cost)
    wall_s: float  # training wall seconds to here (run_cost)
    path: tuple


def train(arm, flags, paths, seed, out, quick, split, budgets):
    """An arm's runs at every budget for one seed: {budget: Run}. A PbPO run at a larger budget
    continues the one below (--resume with more episodes, which is bit-identical to one long
    run), so one run gives every point of its curve. A pair of identical responses costs PbPO no
    call, so it runs more episodes while one more fits."""
    rm = [f"--rm_backbone={paths.rm}"] if arm.script == "train_pbpo.py" else []  # the toy's
    flags = merge(rm, flags, arm.flags)  # the arm's own flags win over tuned ones
    common = [f"--model={paths.model}", f"--heldout={getattr(paths, split)}", "--eval_max=1",
              *(QUICK_FLAGS[arm.script] if quick else []), *flags, f"--seed={seed}"]
    done, previous = {}, None
    path = []  # the processes that led to this budget's run: (run dir, calls)
    for budget in budgets:  # the same command shares one run dir, whichever arm asks for it
        for more in range(budget):  # PbPO: episodes beyond budget // (2m) while one more fits
            extra, offline = budget_flags(arm, paths, budget, seed, os.path.join(out, "data"),
                                          quick, more)
            tag = ranks.seed_of(arm.script, *common, *extra) % 10**10
            run_dir = os.path.join(out, "runs", f"{arm.script[6:-3]}_{budget}_s{seed}_{tag}")
            with LOCKS[run_dir]:  # two arms may ask for the same run at once
                lines = run_arm(arm.script, common + extra, run_dir, previous)
            calls = lines[-1]["oracle_calls"]
            path.append((run_dir, calls + offline))
            previous = run_dir if arm.script == "train_pbpo.py" else None
            if not previous or calls + 2 * EXPLORE_PROMPTS[quick] > budget:
                break
        steps, wall_s = run_cost(arm.script, common, lines)
        done[budget] = Run(os.path.join(run_dir, "final"), calls + offline, steps, wall_s,
                           tuple(path))
        path = path if previous else []
    return done


def chain(arm, budgets, i):
    """The budgets a run at budgets[i] passes through: PbPO's continue each other."""
    return budgets[:i + 1] if arm.script == "train_pbpo.py" else budgets[i:i + 1]


def spent(runs):
    """(training processes, oracle calls) of a set of runs, each process counted once: a PbPO
    run's calls past the run it continues, so two budgets sharing a run are not paid twice."""
    increments = {}
    for r in runs:
        before = 0
        for run_dir, calls in r.path:
            increments[run_dir] = calls - before
            before = calls
    return len(increments), sum(increments.values())


def stored(r, out):  # a Run as JSON, its directories relative to the comparison's --out
    return dict(asdict(r), policy=os.path.relpath(r.policy, out),
                path=[(os.path.relpath(d, out), calls) for d, calls in r.path])


def loaded(r, out):  # stored()'s inverse
    return Run(**dict(r, policy=os.path.join(out, r["policy"]),
                      path=tuple((os.path.join(out, d), calls) for d, calls in r["path"])))


CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def toy_digest(paths):
    """SHA-256 of the files a toy build wrote and the runs read (not build.json, with its
    timings, nor the evaluations written beside them later). The build is meant to come out bit
    for bit anywhere; this checks it did."""
    files = []
    for p in paths:  # a checkpoint directory, or a prompt or pair file
        files += [os.path.join(p, f) for f in CHECKPOINT_FILES] if os.path.isdir(p) else [p]
    return toy.files_digest(files)


@functools.lru_cache(maxsize=None)
def job_code_digest():
    """SHA-256 of the code a job's result depends on: the scripts (tune.code_digest), torch's
    version, and this driver's functions and constants that make a job's runs and evaluations
    (JOB_CODE), comments and docstrings included. A new function a job calls belongs in JOB_CODE;
    the tables, claims and plots do not, so editing them reuses every job."""
    sources = [inspect.getsource(f) for f in JOB_CODE]
    constants = [EXPLORE_PROMPTS, ONLINE_ITERATIONS, QUICK_FLAGS, RANKING_CALLS, TUNING_SEEDS]
    text = json.dumps([code_digest(), torch.__version__, sources, repr(constants)])
    return hashlib.sha256(text.encode()).hexdigest()


def job_of(kind, arm, flags, seed, budgets, code, toy_files, samples, max_new):
    """What decides a job's result, the JobFile's key. kind 'tune': a tuning point, flags a list,
    budgets the chain its run passes through, scored greedily on the validation split; kind
    'heldout': a seed's runs, flags {budget: list}, evaluated on the held-out split with
    `samples` samples a prompt."""
    return dict(kind=kind, code=code, toy=toy_files, script=arm.script, arm_flags=list(arm.flags),
                flags=flags, seed=seed, budgets=list(budgets),
                samples=samples if kind == "heldout" else 0, max_new=max_new)


RUN_FIELDS = ("policy", "calls", "steps", "wall_s", "path")
ROW_FIELDS = ("accuracy", "reward", "n", "expected_reward", "kl_sft", "calls", "steps", "wall_s")
MAY_BE_NONE = ("expected_reward", "kl_sft")  # not measured when --samples=0


def check_job(record, where):
    """A JobFile line, checked as data before any of it is used: the key is its job's, and the
    value has the shape compare gives it, every number finite. -> the record; a ValueError naming
    `where` otherwise."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def inside(step):  # [a run directory relative to --out, inside it; its oracle calls]
        return (isinstance(step, list) and len(step) == 2 and isinstance(step[0], str)
                and not os.path.isabs(step[0]) and ".." not in step[0].split("/")
                and number(step[1]))

    def fail(what):
        raise ValueError(f"{where}: expected {what}, as compare writes it")

    if not isinstance(record, dict) or not {"key", "job", "value"} <= set(record):
        fail("a JSON object with 'key', 'job' and 'value'")
    job, value = record["job"], record["value"]
    if not isinstance(job, dict) or job.get("kind") not in ("tune", "heldout") or \
            not isinstance(job.get("budgets"), list):
        fail("a 'job' object whose kind is 'tune' or 'heldout', with a list of budgets")
    if record["key"] != job_key(job):
        fail("'key' to be the SHA-256 of its 'job'")
    if job["kind"] == "tune":
        if not isinstance(value, dict) or set(value) != {"score", "runs"} or \
                not number(value["score"]) or not isinstance(value["runs"], list):
            fail("a tuning job's value {'score': number, 'runs': [...]}")
        for r in value["runs"]:
            if not isinstance(r, dict) or set(r) != set(RUN_FIELDS) or \
                    not all(map(number, (r["calls"], r["steps"], r["wall_s"]))) or \
                    not isinstance(r["steps"], int) or not isinstance(r["path"], list):
                fail(f"each run to have {', '.join(RUN_FIELDS)}")
            if not all(map(inside, [[r["policy"], 0], *r["path"]])):
                fail("a run's directories relative to --out, inside it, with their calls")
    elif not isinstance(value, dict) or sorted(value) != sorted(map(str, job["budgets"])) or \
            not all(isinstance(row, dict) and set(row) == set(ROW_FIELDS) and
                    all(number(v) or v is None and k in MAY_BE_NONE for k, v in row.items())
                    for row in value.values()):
        fail(f"a held-out job's value {{budget: {{{', '.join(ROW_FIELDS)}}}}} for its budgets")
    return record


def job_key(job):
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


class JobFile:
    """Finished jobs of a comparison, one JSON line each: {"key", "job", "value", "seconds"}.
    `job` is everything that decides its result (job_of: the code's and the toy's digests, the
    script, its flags, the seed, the budgets, the split), the key its SHA-256: a job of other code
    or another toy is never reused. A job is deterministic (one thread a run), so on the same kind
    of machine a reused one is bit for bit the result it would give again; another CPU may round
    otherwise, and its runs then are other draws of the same protocol. One driver a file, with the
    same --out on every machine (the runs' directories are named under it). Read as data: every line is checked before any
    work (check_job) and a bad one refused by its number, except a last line cut short by a kill,
    which is dropped (its job runs again)."""

    def __init__(self, path):
        self.path, self.lock, self.done = path, threading.Lock(), {}
        if not path:
            return
        folder = os.path.dirname(path) or "."
        if os.path.isdir(path) or not os.access(folder, os.W_OK) or \
                os.path.exists(path) and not os.access(path, os.W_OK):
            raise ValueError(f"--jobs_file={path}: cannot write a file there")
        if not os.path.exists(path):
            return
        text = data.read_text(path)
        lines = text.split("\n")  # the last: "" after a whole line
        if lines[-1]:  # no newline after it: whole (a kill after the write) or cut short
            try:
                data.parse_json(lines[-1], path, len(lines))
                lines.append("")
            except ValueError:  # not JSON: cut short
                print(f"{path}:{len(lines)}: cut short (a killed write): dropped, its job runs "
                      "again")
                lines[-1] = ""
        for number, line in enumerate(lines[:-1], 1):
            record = check_job(data.parse_json(line, path, number), f"{path}:{number}")
            self.done[record["key"]] = record["value"]
        if "\n".join(lines) != text:  # every line checked: the file rewritten whole, atomically
            with open(path + ".tmp", "w") as f:
                f.write("\n".join(lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)

    def run(self, job, compute):
        """compute()'s JSON-able result for `job` (job_of), from the file or computed and added
        to it; either way as JSON gives it back (a dict's keys are strings)."""
        key = job_key(job)
        if key in self.done:
            return self.done[key]
        started = time.time()
        value = json.loads(json.dumps(compute()))
        if self.path:
            line = json.dumps({"key": key, "job": job, "value": value,
                               "seconds": round(time.time() - started, 1)})
            with self.lock, open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.done[key] = value
        return value


QUICK_FLAGS = {"train_pbpo.py": ["--t_out=2", "--t_in=2", "--group=2", "--ref_samples=2",
                                 "--leader_prompts=4", "--max_new_tokens=16"],
               "train_selm.py": ["--iterations=1", "--batch_size=4", "--micro_batch=4",
                                 "--max_new_tokens=16"]}


def tuning_point(arm, flags, seed, passes, paths, out, cfg, evaluate):
    """A tuning job: the arm's run with `flags` through the budgets `passes` (PbPO's continue
    each other), scored by the greedy gold reward on the validation split at the last ->
    {"score", "runs": every run it made, stored()}."""
    runs = train(arm, flags, paths, seed, out, cfg.quick, "valid", passes)
    return {"score": evaluate(runs[passes[-1]].policy, "valid", samples=0)["reward"],
            "runs": [stored(r, cfg.out) for r in runs.values()]}


def heldout_rows(arm, flags, seed, budgets, paths, out, cfg, evaluate):
    """A comparison job: the arm's runs for one seed at every budget with that budget's tuned
    flags, evaluated on the held-out split -> {budget: evaluate()'s metrics, calls, steps,
    wall_s}."""
    rows = {}
    for i, budget in enumerate(budgets):
        r = train(arm, flags[budget], paths, seed, out, cfg.quick, "heldout",
                  chain(arm, budgets, i))[budget]
        rows[budget] = {**evaluate(r.policy, "heldout"), "calls": r.calls, "steps": r.steps,
                        "wall_s": r.wall_s}
    return rows


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
    """evaluate()'s results, read from policy_dir/eval_{split}_{samples}_{max_new}_{code}.json
    if it exists, else computed in one of the `evaluators` processes (started once per
    comparison, one thread each, so an evaluation pays for no interpreter start, import or SFT
    load) and written there. code: job_code_digest()'s first 12: other code evaluates again."""
    tag = f"{split}_{samples}_{max_new}_{job_code_digest()[:12]}"
    out_file = os.path.join(policy_dir, f"eval_{tag}.json")
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


# what a job's result depends on in this driver (job_code_digest), beside the scripts themselves
JOB_CODE = (tuning_point, heldout_rows, train, budget_flags, offline_pairs, pair_subset, merge,
            flag_value, run_cost, chain, stored, run_arm, start_child, evaluator_starts, sft_policy,
            evaluate, evaluation)


# ---------------------------------------------------------------- tuning: the stages, the edges
def axes_of(stage):
    """'a=1,2 b=x' -> {'a': ['1', '2'], 'b': ['x']}"""
    return dict((name, values.split(",")) for name, values in
                (item.split("=", 1) for item in stage.split()))


def flags_of(point):  # (('a', '1'), ('b', 'x')) -> ['--a=1', '--b=x']
    return [f"--{name}={value}" for name, value in point]


def is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def edge_side(values, chosen):
    """'low' or 'high' when `chosen` is the lowest or the highest of the values tried on a numeric
    axis of two or more values; None inside, or on a categorical axis (anchor=sft,ref)."""
    if not all(map(is_number, values)) or len({float(v) for v in values}) < 2:
        return None
    numbers = [float(v) for v in values]
    if float(chosen) == min(numbers):
        return "low"
    return "high" if float(chosen) == max(numbers) else None


def step_past(script, name, values, side):
    """The value one step past the `side` edge of an axis's values tried, by the grid's own step
    there: arithmetic for integers (epochs, T_out: the difference of the two outermost values,
    stopped at the flag's least value), geometric otherwise (lr, β, α span decades: their ratio,
    10 from a 0). None when no step is left: 0 is the edge, or the flag refuses the value."""
    numbers = sorted({float(v) for v in values}, reverse=side == "high")
    edge, inner = numbers[0], numbers[1]
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        least = (SCRIPTS[script].__dataclass_fields__[name].metadata.get("at_least") or 0
                 if script in SCRIPTS else 0)
        value = int(max(2 * edge - inner, least))
        return None if value == edge else str(value)
    if edge == 0:
        return None
    value = f"{edge * 10:.3g}" if inner == 0 else f"{edge * edge / inner:.3g}"
    if script in SCRIPTS:
        try:
            check_flag(script, name, value, "an extension")
        except ValueError:
            return None
    return value


def tune_stages(script, stages, start, score, quick=False):
    """The stages one after the other, each on the best point of the one before. score(flag lists)
    -> their scores, higher is better. After a stage's grid, each numeric axis whose best value is
    the lowest or highest tried gets one more point past that edge (step_past), the best point's
    other values kept; then the best is chosen again, until every choice is inside or an axis
    took EXTENSIONS steps. -> (the chosen flags, a record of every point scored, every extension
    and every choice left on an edge, with why: 'cap' or 'bound')."""
    best = list(start)
    record = {"points": [], "extensions": [], "edges": []}
    for i, stage in enumerate(stages):
        axes = axes_of(stage)
        new = [tuple(zip(axes, values)) for values in itertools.product(*axes.values())]
        new = new[:QUICK_POINTS] if quick else new
        tried = {}  # point -> score, in the order tried
        steps = dict.fromkeys(axes, 0)  # extensions of each axis
        while new:
            for point, value in zip(new, score([merge(best, flags_of(p)) for p in new])):
                tried[point] = value
                record["points"].append({"stage": i, "flags": flags_of(point), "score": value})
            chosen = max(tried, key=tried.get)  # the first tried of equal scores
            new = []
            for k, (name, value) in enumerate(chosen):
                values = [p[k][1] for p in tried]
                side = edge_side(values, value)
                if side is None or steps[name] == EXTENSIONS:
                    continue
                past = step_past(script, name, values, side)
                if past is not None:
                    steps[name] += 1
                    new.append(chosen[:k] + ((name, past),) + chosen[k + 1:])
                    record["extensions"].append({"stage": i, "axis": name, "value": past,
                                                 "side": side})
        for k, (name, value) in enumerate(chosen):
            side = edge_side([p[k][1] for p in tried], value)
            if side is not None:
                why = "cap" if steps[name] == EXTENSIONS else "bound"
                record["edges"].append({"stage": i, "axis": name, "value": value, "side": side,
                                        "why": why})
        best = merge(best, flags_of(chosen))
    return best, record


# ---------------------------------------------------------------- the comparison
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
    for flag, seeds in (("--seeds", cfg.seeds), ("--ablation_seeds", cfg.ablation_seeds)):
        if seeds > min(TUNING_SEEDS):
            raise ValueError(f"{flag}={seeds}: at most {min(TUNING_SEEDS)}, so that the "
                             f"comparison's seeds stay apart from the tuning seeds")
    return (32, 64) if cfg.quick else tuple(budgets), arms, settings


def seeds_of(arm, cfg):  # the comparison's seeds of an arm: 0..n-1
    if cfg.quick:
        return 1
    return cfg.ablation_seeds if arm.ablation else cfg.seeds


def same_runs(arms, tuned):
    """{arm: the earlier arm whose runs it shares}: the same script and flags at every budget
    (e.g. pbpo_beta0.04 is pbpo when PbPO's tuned β is 0.04). Its rows are those runs again."""
    first, same = {}, {}
    for arm in arms:
        key = (arm.script, json.dumps({b: merge(f, arm.flags) for b, f in tuned[arm.name].items()}))
        if arm.script and key in first:
            same[arm.name] = first[key]
        first.setdefault(key, arm.name)
    return same


def compare(cfg):
    t_start = time.time()
    budgets, arms, settings = checked(cfg)
    results = {"config": asdict(cfg), "budgets": budgets, "settings": {}}
    max_new = 16 if cfg.quick else 48
    jobs_file = JobFile(cfg.jobs_file)  # read and checked before any work
    code = job_code_digest()
    spawn = multiprocessing.get_context("spawn")  # not fork: forking a process that runs
    # threads can deadlock the child. The runners stop before the evaluators they wait on, the
    # tuners (one thread an arm, waiting on runners) before the runners.
    with (ProcessPoolExecutor(cfg.jobs, mp_context=spawn,
                              initializer=evaluator_starts) as evaluators,
          ThreadPoolExecutor(cfg.jobs) as runners,
          ThreadPoolExecutor(len(arms)) as tuners,
          stop_children_on_interrupt()):  # exits first: stops what the pools would wait for
        for setting in settings:
            rare = setting == "rare"
            toy_dir = os.path.join(cfg.out, setting, "toy")
            paths = toy.build(toy_dir, quick=cfg.quick, rare=rare)
            toy_files = toy_digest(paths)
            out = os.path.join(cfg.out, setting)
            here = [a for a in arms if a.script]
            evaluate_job = lambda d, split, samples=cfg.samples: evaluation(
                evaluators, d, paths, split, samples, max_new)
            job_here = functools.partial(job_of, code=code, toy_files=toy_files, samples=cfg.samples,
                                    max_new=max_new)  # a job's key, less what is its own

            # 1. tuning, at every budget: each stage's points × the tuning seeds, on valid.jsonl;
            # a setting not in --tune_on takes the tuned flags of the first setting
            def tune_arm(arm, like):
                """The arm's stages at every budget, lowest first (PbPO's runs at a higher one
                continue them), from the tuned flags of the arm it is like -> (tuned flags and
                record by budget, every run made)."""
                tuned_like = like.result()[0] if like else {}
                flags = {}  # budget -> the chosen flags
                records = {}  # budget -> tune_stages' record
                made = []  # every run, at every budget
                for i, budget in enumerate(budgets):
                    def tune_job(job):  # a run at `budget`, scored greedily on valid.jsonl
                        point, seed = job
                        passes = chain(arm, budgets, i)
                        done = jobs_file.run(job_here("tune", arm, point, seed, passes),
                                             lambda: tuning_point(arm, point, seed, passes, paths,
                                                                  out, cfg, evaluate_job))
                        made.extend([loaded(r, cfg.out) for r in done["runs"]])  # atomic
                        return done["score"]

                    def score(points):  # the mean over the tuning seeds of each point
                        seeds = TUNING_SEEDS[:1] if cfg.quick else TUNING_SEEDS
                        scores = list(runners.map(tune_job, [(p, s) for p in points
                                                             for s in seeds]))
                        return [sum(scores[j:j + len(seeds)]) / len(seeds)
                                for j in range(0, len(scores), len(seeds))]

                    start = tuned_like.get(budget, [])
                    flags[budget], records[budget] = tune_stages(arm.script, arm.stages, start,
                                                                 score, cfg.quick)
                    print(f"[{setting}] {arm.name} at {budget} calls: tuned "
                          f"{' '.join(flags[budget])} ({time.time() - t_start:.0f} s)",
                          flush=True)
                return flags, records, made

            flags_from = setting if setting in cfg.tune_on.split(",") else settings[0]
            if flags_from == setting:
                futures = {}
                for arm in here:
                    if arm.stages:
                        futures[arm.name] = tuners.submit(tune_arm, arm, futures.get(arm.like))
                tuning = {name: f.result() for name, f in futures.items()}
                tuned = {name: flags for name, (flags, _, _) in tuning.items()}
            else:
                tuned, tuning = dict(first["tuned_flags"]), {}
            for arm in here:
                if arm.like and not arm.stages:
                    tuned[arm.name] = tuned[arm.like]
            same = same_runs(here, tuned)

            # 2. the runs: every arm × seed at every budget with that budget's tuned flags, then
            # their evaluation on the held-out split
            jobs = [(arm, s) for arm in here for s in range(seeds_of(arm, cfg))]

            def job(arm_seed):  # an arm's runs at every budget for a seed, then their evaluation
                arm, seed = arm_seed
                by_budget = {str(b): tuned[arm.name][b] for b in budgets}
                rows = jobs_file.run(job_here("heldout", arm, by_budget, seed, budgets),
                                     lambda: heldout_rows(arm, tuned[arm.name], seed, budgets,
                                                          paths, out, cfg, evaluate_job))
                return {int(b): row for b, row in rows.items()}

            finished = list(runners.map(job, jobs))
            print(f"[{setting}] runs and evaluations done ({time.time() - t_start:.0f} s)",
                  flush=True)
            sft_eval = {**evaluate_job(paths.model, "heldout"), "calls": 0, "steps": 0,
                        "wall_s": 0.0}
            most = max(seeds_of(a, cfg) for a in here)
            table = {"sft": {b: {s: sft_eval for s in range(most)} for b in budgets}}
            for (arm, seed), by_budget in zip(jobs, finished):
                for b, res in by_budget.items():
                    table.setdefault(arm.name, {}).setdefault(b, {})[seed] = res
            results["settings"][setting] = {
                "tuned_flags": tuned, "flags_from": flags_from,
                "tuned": {a.name: {b: merge(tuned[a.name][b], a.flags) for b in budgets}
                          for a in here},  # the runs' flags
                "same_runs": same, "tuning": tuning_summary(tuning, budgets),
                "table": table, "claims": claims(table, budgets),
                "plots": plot_data(table, same)}
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


def tuning_summary(tuning, budgets):
    """What tuning did and cost, per arm and in all: every run on the validation split counted
    once (spent): {"arms": {arm: {runs, calls, by_budget: {budget: record}}}, "runs", "calls"}."""
    arms = {}
    for name, (flags, records, made) in tuning.items():
        runs, calls = spent(made)
        arms[name] = {"runs": runs, "calls": calls,
                      "by_budget": {b: {"flags": flags[b], **records[b]} for b in budgets}}
    return {"arms": arms, "runs": sum(a["runs"] for a in arms.values()),
            "calls": sum(a["calls"] for a in arms.values())}


def claims(table, budgets):
    """Every claim whose two arms ran, at every budget, on the greedy and the sampled reward."""
    judged = []
    for claim, a, b in CLAIMS:
        if a in table and b in table:
            for budget in budgets:
                for metric in ("reward", "expected_reward"):
                    va = {s: r[metric] for s, r in table[a][budget].items()}
                    vb = {s: r[metric] for s, r in table[b][budget].items()}
                    mean, half, n = paired(va, vb)
                    judged.append(dict(claim=claim, budget=budget, metric=metric, diff=mean,
                                       ci=half, seeds=n, holds=n > 1 and mean - half > 0))
    return judged


# ---------------------------------------------------------------- what a comparison costs
# Seconds of one run (one thread) on the 2-core machine, measured with `python train_*.py` on the
# default toy, --eval_max=1, one seed, another job on the other core (RESULTS.md, "What a
# comparison costs"): start-up, and per oracle call of the budget (SELM: per call and epoch).
RUN_SECONDS = {"offline": (5.0, 0.0025), "online": (4.5, 0.0042), "train_pbpo.py": (8.0, 0.077)}
EVAL_SECONDS = {0: 1.0, 8: 12.0}  # an evaluation on 500 prompts: greedy; and with 8 samples
TOY_SECONDS = 185  # one toy build, once per setting, its RM backbone's included (about 70 s)
EPOCHS_UNTUNED = 4  # SELM's epochs where a stage does not set them: the value tuned before


def run_seconds(arm, flags, calls):
    """Estimated seconds of one training process of `arm` with `flags` that spends `calls`."""
    if arm.script == "train_pbpo.py":
        start, per_call = RUN_SECONDS["train_pbpo.py"]
        return start + per_call * calls
    start, per_call_epoch = RUN_SECONDS["online" if "--online" in arm.flags else "offline"]
    epochs = [int(f.split("=")[1]) for f in flags if f.startswith("--epochs=")]
    return start + per_call_epoch * calls * (epochs[-1] if epochs else EPOCHS_UNTUNED)


def chain_seconds(arm, flags, budgets, i, shared):
    """(seconds, processes) of what a run at budgets[i] needs: one run, or for PbPO the runs it
    continues too, unless they were made already (shared) and only its own calls are left."""
    if arm.script != "train_pbpo.py":
        return run_seconds(arm, flags, budgets[i]), 1
    segments = list(zip((0, *budgets[:i]), budgets[:i + 1]))
    segments = segments[-1:] if shared else segments
    return sum(run_seconds(arm, flags, high - low) for low, high in segments), len(segments)


def planned_tuning(arm, budgets, quick):
    """([runs, seconds] of tuning an arm at every budget when no axis is extended and PbPO's
    budgets share their runs, [runs, seconds] at most: every numeric axis extended EXTENSIONS
    times, each extension costed as the stage's dearest point, no run shared)."""
    seeds = len(TUNING_SEEDS[:1] if quick else TUNING_SEEDS)
    least, most = [0, 0.0], [0, 0.0]
    for i in range(len(budgets)):
        for stage in arm.stages:
            axes = axes_of(stage)
            points = [flags_of(zip(axes, v)) for v in itertools.product(*axes.values())]
            points = points[:QUICK_POINTS] if quick else points
            numeric = sum(len(v) > 1 and all(map(is_number, v)) for v in axes.values())
            for flags in points:
                seconds, _ = chain_seconds(arm, flags, budgets, i, shared=True)
                least[0] += seeds
                least[1] += seeds * (seconds + EVAL_SECONDS[0])
            costs = [chain_seconds(arm, flags, budgets, i, shared=False) for flags in points]
            costs += [max(costs)] * (0 if quick else EXTENSIONS * numeric)
            for seconds, processes in costs:
                most[0] += seeds * processes
                most[1] += seeds * (seconds + EVAL_SECONDS[0])
    return least, most


def plan(cfg):
    """What `compare` with these flags runs, per setting and arm, and its estimated wall time,
    without running anything: the runs' and evaluations' seconds (RUN_SECONDS, EVAL_SECONDS)
    shared by --jobs processes, plus the toy's builds. -> the rows printed."""
    budgets, arms, settings = checked(cfg)
    evaluation = EVAL_SECONDS[8] if cfg.samples else EVAL_SECONDS[0]
    rows = []
    for setting in settings:
        for arm in [a for a in arms if a.script]:
            least, most = [0, 0.0], [0, 0.0]
            if setting in cfg.tune_on.split(",") and arm.stages:
                least, most = planned_tuning(arm, budgets, cfg.quick)
            seeds = seeds_of(arm, cfg)
            runs = seconds = 0
            for i in range(len(budgets)):  # the table's runs, with the same flags at each budget
                run_s, processes = chain_seconds(arm, [], budgets, i, shared=True)
                runs += seeds * processes
                seconds += seeds * (run_s + evaluation)
            rows.append(dict(setting=setting, arm=arm.name, seeds=seeds, tuning_runs=least[0],
                             tuning_runs_most=most[0], runs=runs, seconds=least[1] + seconds,
                             seconds_most=most[1] + seconds))
    build = TOY_SECONDS * len(settings)
    least = build + sum(r["seconds"] for r in rows) / cfg.jobs
    most = build + sum(r["seconds_most"] for r in rows) / cfg.jobs
    print(f"plan: budgets {', '.join(map(str, budgets))}; settings {', '.join(settings)}, tuned "
          f"on {cfg.tune_on}; {cfg.jobs} jobs. Seconds: one thread's, estimated (RUN_SECONDS)")
    print(f"{'setting':<9} {'arm':<17} {'seeds':>5} {'tuning runs':>13} {'runs':>5} "
          f"{'seconds':>15}")
    for r in rows:
        print(f"{r['setting']:<9} {r['arm']:<17} {r['seeds']:>5} {r['tuning_runs']:>5} – "
              f"{r['tuning_runs_most']:<5} {r['runs']:>5} {r['seconds']:>7.0f} – "
              f"{r['seconds_most']:<7.0f}")
    print(f"in all: {sum(r['tuning_runs'] for r in rows)} – "
          f"{sum(r['tuning_runs_most'] for r in rows)} tuning runs and "
          f"{sum(r['runs'] for r in rows)} comparison runs; the toy's builds {build / 60:.0f} min; "
          f"wall time {least / 3600:.1f} – {most / 3600:.1f} h (least: no axis extended, PbPO's "
          "budgets sharing runs; most: every extension, nothing shared)")
    return rows


# ---------------------------------------------------------------- tables and plots
def cell(rows, key, digits=3):
    """'mean ± half-width' over the seeds' rows, '-' where the metric was not measured."""
    if rows[0][key] is None:
        return "-"
    mean, half = mean_ci([r[key] for r in rows])
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def report(results):
    like = {a.name: a.like for a in ARMS}
    lines = [f"Wall time {results['seconds'] / 60:.0f} min. Mean ± 95% interval over seeds; "
             "held-out split, all prompts. Steps: AdamW steps on a policy (PbPO: the leader's "
             "and the enhancer's); wall s: training seconds of the run and those it continues "
             "(run_cost).\n"]
    for setting, res in results["settings"].items():
        tuning = res["tuning"]
        lines += [f"### {setting}\n", "| arm | budget | tuned flags | extensions | left on an "
                  "edge |", "|---|---|---|---|---|"]
        for arm, by_budget in res["tuned"].items():
            for budget, flags in by_budget.items():
                record = tuning["arms"].get(arm, {}).get("by_budget", {}).get(budget)
                if record is None:  # not tuned here
                    how = f"{like[arm]}'s, with its own flags"
                    if arm in res["same_runs"]:
                        how = f"the runs of {res['same_runs'][arm]}"
                    elif res["flags_from"] != setting:
                        how = f"tuned on {res['flags_from']}"
                    lines.append(f"| {arm} | {budget} | `{' '.join(flags)}` ({how}) | - | - |")
                    continue
                extended = ", ".join(f"{e['axis']}={e['value']}" for e in record["extensions"])
                edges = ", ".join(f"{e['axis']}={e['value']} ({e['side']}, {e['why']})"
                                  for e in record["edges"])
                lines.append(f"| {arm} | {budget} | `{' '.join(flags)}` | {extended or '-'} | "
                             f"{edges or '-'} |")
        lines += ["", "Tuning on the validation split, every run counted once (a PbPO run that "
                  "continues another pays only its own calls):", "",
                  "| arm | tuning runs | tuning oracle calls |", "|---|---|---|"]
        lines += [f"| {arm} | {a['runs']} | {a['calls']:.0f} |"
                  for arm, a in tuning["arms"].items()]
        lines += [f"| all | {tuning['runs']} | {tuning['calls']:.0f} |", ""]
        lines += ["| arm | budget | calls | steps | wall s | seeds | accuracy | gold reward | "
                  "expected gold (T=1) | KL to SFT |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, by_budget in res["table"].items():
            name = arm if arm not in res["same_runs"] else f"{arm} (= {res['same_runs'][arm]})"
            for budget, by_seed in by_budget.items():
                rows = list(by_seed.values())
                mean = lambda k: sum(r[k] for r in rows) / len(rows)
                lines.append(f"| {name} | {budget} | {mean('calls'):.0f} | {mean('steps'):.0f} | "
                             f"{mean('wall_s'):.1f} | {len(rows)} | {cell(rows, 'accuracy')} | "
                             f"{cell(rows, 'reward')} | {cell(rows, 'expected_reward')} | "
                             f"{cell(rows, 'kl_sft')} |")
        lines += ["", "| claim | budget | metric | paired difference | seeds | holds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['budget']} | {c['metric']} | {c['diff']:+.4f} ± "
                  f"{c['ci']:.4f} | {c['seeds']} | {'yes' if c['holds'] else 'no'} |"
                  for c in res["claims"]]
        lines.append("")
    return "\n".join(lines)


PLOTS = {"curves": ("calls", "reward", "oracle calls", "held-out gold reward (greedy)"),
         "frontier": ("kl_sft", "expected_reward", "KL(π ‖ π_SFT), nats",
                      "expected gold reward, 8 samples at T = 1")}


def finite_or_none(x):  # a 95% interval of one seed is NaN: JSON has no NaN, the plot no bar
    return x if math.isfinite(x) else None


def plot_data(table, same):
    """{plot: {arm: [points]}}: at SFT (0 calls, its own KL) and then at every budget, x and y as
    the mean over seeds and the half-width of its 95% interval. The frontier is drawn along
    training: each budget's policy, from the SFT policy on (a PbPO run at a larger budget
    continues the one below when its tuned flags are the same; the other arms' budgets are
    runs of their own). An arm whose runs are another's is left out: it would hide under it."""
    sft = next(iter(next(iter(table["sft"].values())).values()))
    out = {}
    for plot, (x_key, y_key, _, _) in PLOTS.items():
        out[plot] = {}
        for arm, by_budget in table.items():
            if arm in same:
                continue
            points = [dict(budget=0, x=sft[x_key], x_ci=0.0, y=sft[y_key], y_ci=0.0)]
            for budget, by_seed in by_budget.items() if arm != "sft" else ():
                x, x_ci = mean_ci([r[x_key] for r in by_seed.values()])
                y, y_ci = mean_ci([r[y_key] for r in by_seed.values()])
                points.append(dict(budget=budget, x=x, x_ci=finite_or_none(x_ci), y=y,
                                   y_ci=finite_or_none(y_ci)))
            out[plot][arm] = points
    return out


MARKERS = "osD^v<>pXh*P"
LINE_STYLES = ("-", "--", "-.", ":")


def plots(results, out):
    """curves.png and frontier.png: one panel a setting, every arm in its own colour, marker and
    line style (a colour comes back only with another marker and line style), 95% intervals as
    error bars in both directions."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plots")
    settings = results["settings"]
    style = {a.name: dict(color=plt.cm.tab10(i % 10), marker=MARKERS[i % len(MARKERS)],
                          linestyle=LINE_STYLES[i % len(LINE_STYLES)])
             for i, a in enumerate(ARMS)}
    for plot, (_, _, x_label, y_label) in PLOTS.items():
        fig, axes = plt.subplots(1, len(settings), figsize=(9 * len(settings), 5), squeeze=False)
        for ax, (setting, res) in zip(axes[0], settings.items()):
            for arm, points in res["plots"][plot].items():
                twins = [a for a, b in res["same_runs"].items() if b == arm]
                label = arm + "".join(f" = {t}" for t in twins)  # the same runs: one line
                ax.errorbar([p["x"] for p in points], [p["y"] for p in points],
                            xerr=[p["x_ci"] or 0 for p in points],
                            yerr=[p["y_ci"] or 0 for p in points], label=label, markersize=5,
                            capsize=2, linewidth=1.2, **style[arm])
            ax.set_title(f"{setting} (95% intervals over seeds)")
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))  # hides no curve
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{plot}.png"), dpi=110)
        plt.close(fig)


@dataclass
class Config:
    out: str = knob("out/compare", "runs, tables and plots")
    settings: str = knob("standard,rare", "standard | rare, comma-separated")
    tune_on: str = knob("standard", "settings tuned on their own validation split; the others take")
    # the first setting's tuned flags
    budgets: str = knob("384,768", "oracle-call budgets")
    arms: str = knob("", "a comma-separated subset of the arms (default: all)")
    seeds: int = knob(10, "paired seeds 0..n-1 of the main arms", at_least=1)
    ablation_seeds: int = knob(10, "paired seeds 0..n-1 of the ablations", at_least=1)
    samples: int = knob(8, "samples per prompt for the expected gold reward at temperature 1")
    jobs: int = knob(2, "runs at a time, and as many evaluation processes; one thread each",
                     at_least=1)
    quick: bool = knob(False, "the quick toy, one seed, the first grid point: a smoke test")
    jobs_file: str = knob("", "a JSONL file of every finished job's results, reused by a later "
                          "run, on this machine or another (the run reported is committed)")
    plan: bool = knob(False, "print the runs this would make and an estimate of the time; run none")


if __name__ == "__main__":
    config = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/compare.py"):
        if config.plan:
            plan(config)
        else:
            compare(config)

"""
Tuning on the validation split, the same protocol for every method: each setting of a small grid is
trained with a few tuning seeds and scored by the mean gold reward of greedy decoding on the toy's
validation prompts (valid.jsonl), never on the held-out prompts. Runs are subprocesses; a finished
run with the same command is reused.

  python -m experiments.tune --script=train_pbpo.py --grid="kl_coef=0.02,0.05,0.2 anchor=sft,ref"
  python -m experiments.tune --script=train_selm.py --grid="epochs=1,4 lr=1e-4,3e-4" \
      --flags="--alpha=0"
  python -m experiments.tune --script=train_selm.py --grid="beta=0.01,0.1" --flags="--alpha=0" \
      --subset=136 --split=heldout --seeds=0,1,2   # each seed its own 136 pairs, as compare's
  python -m experiments.tune --rare                # PbPO's defaults on the rare setting
  python -m experiments.tune --report=experiments/data/tune_pbpo_dual.json   # a table again

Writes OUT/tune.json (every run, the flags as run: a PbPO run gets the toy's RM backbone, as a
run with no --model does) and prints the table, best first, as RESULTS.md quotes it. Every flag is checked before
any work. Ctrl-C or SIGTERM stops the runs in flight, and a killed driver takes them with it; a
restart reuses every finished run and starts the others over.
"""
import contextlib
import ctypes
import fcntl
import glob
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import data
import run
from run import knob
import toy
import train_pbpo
import train_selm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_pbpo.py": train_pbpo.Config, "train_selm.py": train_selm.Config}
DRIVER_SETS = ("out_dir", "seed", "resume")  # flags the driver gives every run itself


# ---------------------------------------------------------------- runs as children of the driver
CHILDREN = set()  # the training runs in flight (Popen), stopped with the driver
CHILDREN_LOCK = threading.Lock()  # no run starts while stop_children() takes its list
STOPPING = threading.Event()  # set by stop_children(): nothing new starts


def dies_with_driver():
    """A preexec_fn that has the kernel SIGKILL the child when the driver dies, kill -9 included
    (Linux's PR_SET_PDEATHSIG; None elsewhere). The signal fires when the *thread* that forked
    the child exits: run_arm forks from a pool thread that blocks in wait() till the child ends,
    so the thread outlives the child. prctl is looked up here, in the driver: the forked child of
    a threaded process only calls it, no import or dlopen that could wait on another thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    driver = os.getpid()

    def set_parent_death_signal():
        prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != driver:  # the driver died before prctl: no signal would come
            os._exit(1)

    return set_parent_death_signal


def start_child(cmd, log):
    """Popen cmd, registered in CHILDREN, unless the driver is stopping."""
    with CHILDREN_LOCK:
        if STOPPING.is_set():
            raise RuntimeError(f"not started, the driver is stopping: {' '.join(cmd)}")
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 preexec_fn=dies_with_driver())
        CHILDREN.add(child)
    return child


def stop_children(grace_s=60):
    """SIGTERM to every training run in flight (each stops at once, saying in its log.txt where
    it resumes) and to every multiprocessing worker (compare's evaluators); SIGKILL to any still
    there after grace_s. Nothing starts after this."""
    with CHILDREN_LOCK:
        STOPPING.set()
        runs = list(CHILDREN)
    workers = multiprocessing.active_children()
    for child in runs:
        child.terminate()
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + grace_s
    for child in runs:
        try:
            child.wait(max(0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    for worker in workers:
        worker.join(max(0, deadline - time.monotonic()))
        worker.kill()


@contextlib.contextmanager
def stop_children_on_interrupt():
    """Ctrl-C, or SIGTERM through run.friendly_errors, raises KeyboardInterrupt in the main thread
    while the pool threads wait on their runs: stop the runs, so the pools' exits (which wait for
    their threads) end at once. Enter it after the pools, so that it exits before them."""
    STOPPING.clear()  # a driver called again after a stop starts runs again
    try:
        yield
    except KeyboardInterrupt:
        stop_children()
        raise


def delete_unless_running(out_dir):
    """rmtree(out_dir), refused while a run holds its lock (run.start's flock on out_dir/lock):
    deleting the files under a live run would leave two runs writing one directory."""
    path = os.path.join(out_dir, "lock")
    if os.path.exists(path):
        with open(path, "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock.read().decode(errors="replace") or "another run"
                raise FileExistsError(f"{out_dir} is in use by {holder}: not deleting it to "
                                      "start over; stop that run or wait for it to end") from None
    shutil.rmtree(out_dir, ignore_errors=True)


def recorded_command(path):
    """The command and code digest a run wrote to its command.json (or command.begun.json), or
    None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # ValueError: a half file of an older driver
        return None


TRACES = ("checkpoint.safetensors", "checkpoints.log", "preferences.jsonl", "metrics.jsonl")


def code_digest():  # SHA-256 of the top-level .py files: a run of other code is never reused
    return toy.files_digest(sorted(glob.glob(os.path.join(ROOT, "*.py"))))


def run_arm(script, flags, out_dir, resume_from=None):
    """Train one run in a subprocess (one thread), its output in out_dir/log.txt; returns its
    metrics.jsonl lines. A finished run of the same command on the same code (out_dir/command.json
    holds both) is reused; an interrupted one (command.begun.json) is continued with --resume, so
    what it labelled is kept; anything else in out_dir is deleted first. resume_from: a finished run
    whose files this one starts from, with --resume (e.g. more episodes)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *flags, f"--out_dir={out_dir}",
           *["--resume"] * bool(resume_from)]
    done = os.path.join(out_dir, "command.json")
    begun = os.path.join(out_dir, "command.begun.json")
    key = {"command": cmd[1:], "code": code_digest()}
    if recorded_command(done) != key:
        if STOPPING.is_set():  # before deleting anything
            raise RuntimeError(f"not started, the driver is stopping: {' '.join(cmd)}")
        again = recorded_command(begun) == key
        if not again:
            delete_unless_running(out_dir)
            if resume_from:
                shutil.copytree(resume_from, out_dir, ignore=shutil.ignore_patterns(
                    "command*.json", "final", "lock", "log.txt"))
            else:
                os.makedirs(out_dir)
            write_command(begun, key)
        traces = [f for f in TRACES if os.path.exists(os.path.join(out_dir, f))]
        resume = ["--resume"] if again and traces and "--resume" not in cmd else []
        with open(os.path.join(out_dir, "log.txt"), "a" if again else "w") as log:
            child = start_child(cmd + resume, log)
            try:
                rc = child.wait()
            finally:
                with CHILDREN_LOCK:
                    CHILDREN.discard(child)
        if rc:
            raise RuntimeError(f"{' '.join(cmd + resume)} exited with {rc}; its output is in "
                               f"{out_dir}/log.txt")
        write_command(done, key)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_command(path, command):  # atomically: a driver killed mid-write leaves no half file
    with open(path + ".tmp", "w") as f:
        json.dump(command, f)
    os.replace(path + ".tmp", path)


T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}  # by n


def mean_ci(values):
    """(mean, half-width of the 95% t-interval) of a list; past 10 values the t quantile is
    1.96 + 2.6 / (n - 1), within 1% of the exact one."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T_975.get(n, 1.96 + 2.6 / (n - 1))
    return mean, t * sd / math.sqrt(n)


# ---------------------------------------------------------------- flags, checked before any work
def integers(flag, text, low=0, increasing=False):
    """'1,2,3' -> [1, 2, 3]: comma-separated integers >= low, none twice (increasing, if asked);
    otherwise a ValueError naming the flag."""
    expected = f"comma-separated integers >= {low}, " + ("increasing" if increasing else "distinct")
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}={text}: expected {expected}") from None
    repeated = len(set(values)) < len(values)
    if min(values) < low or repeated or (increasing and values != sorted(values)):
        raise ValueError(f"{flag}={text}: expected {expected}")
    return values


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def check_flag(script, name, text, where):
    """--name=text as the script's parse_flags would take it: a field of its Config, of the field's
    type, a finite number at least its knob's at_least, one of its choices; and not one the driver
    sets itself. Otherwise a ValueError naming the driver's flag `where` that carries it."""
    cls = SCRIPTS[script]
    field = cls.__dataclass_fields__.get(name)
    if field is None:
        raise ValueError(f"{where}: {script} has no flag --{name} (python {script} --help)")
    if name in DRIVER_SETS:
        raise ValueError(f"{where}: --{name} is set by the driver for every run")
    try:
        value = run.boolean(text) if field.type is bool else field.type(text)
    except ValueError:
        raise ValueError(f"{where}: --{name}={text}: expected {TYPE_NAMES[field.type]}") from None
    low = field.metadata.get("at_least") or 0
    if field.type in (int, float) and not low <= value < math.inf:
        raise ValueError(f"{where}: --{name}={text}: expected a finite number >= {low} "
                         f"({field.metadata['help']})")
    allowed = field.metadata.get("choices")
    if allowed and value not in allowed:
        raise ValueError(f"{where}: --{name}={text}: expected one of {', '.join(allowed)}")


def check_tuning(script, flags, grid):
    """tune()'s flags: a known script, --flags as --name=value (or --name, a bool) items of it,
    --grid as name=v1,v2,... items, each name once, each value once and one the script takes."""
    if script not in SCRIPTS:
        raise ValueError(f"--script={script}: expected one of {', '.join(SCRIPTS)}")
    for flag in flags:
        name, eq, value = flag.partition("=")
        if not name.startswith("--"):
            raise ValueError(f"--flags: {flag!r}: expected space-separated --name=value items")
        check_flag(script, name[2:], value if eq else "true", "--flags")
    names = []
    for item in grid.split():
        name, _, values = item.partition("=")
        if not name or not values:
            raise ValueError(f"--grid: {item!r}: expected space-separated name=value1,value2,... "
                             "items")
        if name in names or len(set(values.split(","))) < len(values.split(",")):
            raise ValueError(f"--grid: {item!r}: each flag once, each of its values once")
        names.append(name)
        for value in values.split(","):
            check_flag(script, name, value, "--grid")


def grid_points(grid):
    """'a=1,2 b=x' -> [['--a=1', '--b=x'], ['--a=2', '--b=x']]"""
    axes = [[f"--{k}={v}" for v in values.split(",")] for k, values in
            (item.split("=", 1) for item in grid.split())]
    return [list(point) for point in itertools.product(*axes)]


def pair_subset(prefs, n, seed, out_dir):
    """A seed's random subset of n pairs of a preference file, written to out_dir -> its path."""
    pairs = data.read_text(prefs).splitlines()
    random.Random(seed).shuffle(pairs)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"pairs_{n}_seed{seed}.jsonl")
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # two runs may draw it at once
    with open(tmp, "w") as f:
        f.writelines(p + "\n" for p in pairs[:n])
    os.replace(tmp, path)  # whole, never half written: the same lines whoever wrote it
    return path


def tune(script, flags, grid, seeds, out, jobs=2, split="valid", subset=0, rare=False):
    """Every grid point × seed, evaluated on `split`; -> rows sorted by mean gold reward.
    subset: train_selm.py runs each seed on its own random subset of that many of the toy's pairs
    (pair_subset, as experiments/compare.py draws them), not on the whole file. rare: on the
    toy's rare setting (out/toy_rare)."""
    check_tuning(script, flags, grid)
    if subset and script != "train_selm.py":
        raise ValueError(f"--subset={subset}: only train_selm.py trains on the pair file")
    paths = toy.build("out/toy_rare", rare=True) if rare else toy.build()
    if script == "train_pbpo.py" and not any(f.startswith("--rm_backbone=") for f in flags):
        flags = [*flags, f"--rm_backbone={paths.rm}"]  # as a run with no --model: recorded
    if subset and subset > len(data.read_text(paths.prefs).splitlines()):
        raise ValueError(f"--subset={subset}: {paths.prefs} has fewer pairs")
    base = [f"--model={paths.model}", f"--heldout={getattr(paths, split)}", *flags]
    if script == "train_pbpo.py":
        base.append(f"--prompts={paths.train}")
    else:
        base.append(f"--prefs={paths.prefs}")
    todo = [(point, seed) for point in grid_points(grid) for seed in seeds]
    name = lambda point, seed: os.path.join(out, "_".join(f.strip("-") for f in point) or "default",
                                            f"seed{seed}")
    def command(point, seed):  # a later --prefs replaces the whole file's
        pairs = [f"--prefs={pair_subset(paths.prefs, subset, seed, out)}"] if subset else []
        return base + point + pairs + [f"--seed={seed}"]

    with ThreadPoolExecutor(jobs) as pool, stop_children_on_interrupt():
        finals = list(pool.map(lambda ps: run_arm(script, command(*ps), name(*ps)), todo))
    rows = {}
    for (point, seed), lines in zip(todo, finals):
        final = next(l for l in lines if l["kind"] == "final_eval")
        sft = next(l for l in lines if l["kind"] == "sft_eval")
        row = rows.setdefault(" ".join(point) or "(defaults)", {"reward": [], "accuracy": [],
                                                                  "gain": [], "calls": []})
        row["reward"].append(final["reward"])
        row["accuracy"].append(final["accuracy"])
        row["gain"].append(final["reward"] - sft["reward"])
        row["calls"].append(final["oracle_calls"])
    ranked = sorted(rows.items(), key=lambda kv: -mean_ci(kv[1]["reward"])[0])
    result = {"script": script, "flags": flags, "grid": grid, "seeds": seeds, "split": split,
              "subset": subset, "rare": rare, "rows": ranked}
    with open(os.path.join(out, "tune.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result))
    return ranked


def report(result):
    """A tune.json as the markdown table RESULTS.md quotes (its test recomputes it from the file):
    a row a grid point, best first, each value the mean ± the 95% t-interval over the seeds."""
    pairs = f", each seed its own {result['subset']} random pairs" if result.get("subset") else ""
    where = result["split"] + (" of the rare setting" if result.get("rare") else "") + pairs
    lines = [f"`{result['script']} {' '.join(result['flags'])}` on {where}, "
             f"seeds {', '.join(map(str, result['seeds']))}:", "",
             "| flags | gold reward | accuracy | gain over SFT | worst gain | oracle calls |",
             "|---|---|---|---|---|---|"]
    for point, r in result["rows"]:
        (m, h), (a, ah), (g, gh) = (mean_ci(r[k]) for k in ("reward", "accuracy", "gain"))
        lines.append(f"| {point} | {m:.3f} ± {h:.3f} | {a:.3f} ± {ah:.3f} | {g:+.3f} ± {gh:.3f} | "
                     f"{min(r['gain']):+.3f} | {min(r['calls'])}–{max(r['calls'])} |")
    return "\n".join(lines)


@dataclass
class Config:
    script: str = knob("train_pbpo.py", "train_pbpo.py | train_selm.py")
    grid: str = knob("", "space-separated flag=v1,v2,... axes")
    flags: str = knob("", "fixed extra flags, space-separated")
    seeds: str = knob("100,101,102", "tuning seeds (the comparison's seeds are 0..9)")
    out: str = knob("out/tune", "")
    jobs: int = knob(2, "runs at a time (each on one thread)", at_least=1)
    # valid: tuning; heldout: only to report the chosen settings, never to choose
    split: str = knob("valid", "", choices=("valid", "heldout"))
    subset: int = knob(0, "train_selm.py: each seed its own random subset of this many of the "
                       "toy's pairs (as compare.py draws them); 0: the whole file", at_least=0)
    rare: bool = knob(False, "the toy's rare setting (built into out/toy_rare)")
    report: str = knob("", "print the table of this tune.json as RESULTS.md quotes it; run nothing")



if __name__ == "__main__":
    cfg = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/tune.py"):
        if cfg.report:
            print(report(data.parse_json(data.read_text(cfg.report), cfg.report)))
        else:
            tune(cfg.script, cfg.flags.split(), cfg.grid, integers("--seeds", cfg.seeds), cfg.out,
                 cfg.jobs, cfg.split, cfg.subset, cfg.rare)

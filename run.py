"""The life of a run, shared by every entry point: flags, the process group and FSDP2 sharding, sums
and gathers across ranks, the seeding rule, the out_dir, the metrics log, checkpoints, the
non-finite guard, one clear line for bad input. Tests: tests/test_reliability.py, test_fsdp.py"""
import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import warnings
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import data

CHECKPOINT, HISTORY = "checkpoint.safetensors", "checkpoints.log"  # in out_dir
RUN = {}  # this process's run: out_dir once start() checked it, inputs' digests, divergence


# ---------------------------------------------------------------- flags and errors
def boolean(text):  # a bool flag: 1/true/yes/on or 0/false/no/off, else a ValueError argparse names
    return ("0", "false", "no", "off", "1", "true", "yes", "on").index(text.lower()) >= 4


def parse_flags(cls, doc, argv=None):
    """A dataclass of knobs -> one --flag each, its comment the help. NaN, negative numbers (no knob
    of ours means anything below zero) and breaches of AT_LEAST or CHOICES are refused by name."""
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in cls.__dataclass_fields__.items():
        kind = field.type if field.type is not bool else boolean
        text = comments.get(name, "").replace("%", "%%")  # argparse %-formats help texts
        parser.add_argument(f"--{name}", type=kind, default=field.default, help=text,
                            **({"nargs": "?", "const": True} if field.type is bool else {}))
    cfg = cls(**vars(parser.parse_args(argv)))
    for name, value in vars(cfg).items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not 0 <= value < math.inf:
            parser.error(f"--{name}={value}: expected a finite number >= 0")
    for name, (low, why) in getattr(cls, "AT_LEAST", {}).items():
        if getattr(cfg, name) < low:
            parser.error(f"--{name}={getattr(cfg, name)}: expected at least {low}" + (
                f" ({why})" if why else ""))
    for name, allowed in getattr(cls, "CHOICES", {}).items():
        if getattr(cfg, name) not in allowed:
            parser.error(f"--{name}={getattr(cfg, name)!r}: expected one of {', '.join(allowed)}")
    return cfg


def stop(signum, frame):
    """SIGTERM, SIGHUP (a closed terminal), Ctrl-C: a stop; later ones wait for its clean-up."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def friendly_errors(script):
    """Bad input (an error naming the file, line or flag) ends the run with that one message, exit
    code 1 (PBPO_TRACEBACK=1: the traceback); a signal, with a line saying where it resumes."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):  # SIG_IGN stays
            signal.signal(sig, stop)

    def hook(kind, error, tb):
        stopped = issubclass(kind, KeyboardInterrupt)
        if os.environ.get("PBPO_TRACEBACK") or not (stopped or issubclass(kind, (
                ValueError, OSError, ArithmeticError))):
            return sys.__excepthook__(kind, error, tb)
        message, ckpt = f"error: {error}", os.path.join(RUN.get("out_dir", ""), CHECKPOINT)
        if stopped:
            message = "stopped" + ("" if "out_dir" not in RUN else f"; --resume continues from "
                                   f"{ckpt}" if os.path.isfile(ckpt) else
                                   "; no checkpoint yet, --resume starts over")
        if not stopped or os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            with contextlib.suppress(OSError):  # the terminal is gone (SIGHUP): nobody to tell
                print(f"{script}: {message}", file=sys.stderr)

    sys.excepthook = hook


# ---------------------------------------------------------------- process group and sharding
def init_distributed(timeout_s=1800):
    """-> (rank, world_size, device). torchrun: nccl (GPU) or gloo (CPU), timed out so a dead rank
    fails the others; plain python: rank 0 of 1, on GPU a one-rank group (FSDP2's bf16 needs it)."""
    timeout = timedelta(seconds=timeout_s)
    if "RANK" not in os.environ:
        if not torch.cuda.is_available():
            return 0, 1, torch.device("cpu")
        device = torch.device("cuda", 0)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout, device_id=device)
        torch.cuda.set_device(device)
        return 0, 1, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def shard_model(model, activation_checkpointing=False):
    """FSDP2 over all ranks: each block, then the root; on CUDA, bf16 compute on fp32 weights."""
    cuda = torch.cuda.is_available()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                              reduce_dtype=torch.float32 if cuda else None,
                              cast_forward_inputs=False)  # RoPE's cos/sin stay fp32
    for block in model.model.layers:
        block.checkpoint = activation_checkpointing  # recompute the block's activations in backward
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_sum(values, device):  # each number of the list summed over ranks (each has its share)
    totals = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces device tensors
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def gather(items):  # every rank's list, concatenated in rank order
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def seed_of(*keys):
    """The seeding rule: one seed per purpose, keyed by (seed, purpose, episode, ...), the same on
    every rank. A resumed run needs no saved RNG state, and no two purposes share a stream."""
    return int(hashlib.sha256(repr(keys).encode()).hexdigest()[:16], 16) % 2**62


def generator(*keys):  # a torch.Generator seeded by the rule
    return torch.Generator().manual_seed(seed_of(*keys))


# ---------------------------------------------------------------- out_dir and metrics
LOADED = (".json", ".safetensors", ".model", ".jinja", ".txt", ".tiktoken")  # what loaders read


def sha256_of(path):
    """SHA-256 of a file; past 256 MiB (weights), of its size and 64 MiB spread over it."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    whole = size <= 2**28
    offsets = [0] if whole else range(0, size, size // 64 + 1)
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(size if whole else 2**20))
    return h.hexdigest()


def input_digests(cfg):  # {flag: {file: SHA-256}} of the files (or directories) cfg.INPUTS name
    digests = {}
    for flag in cfg.INPUTS:
        path = getattr(cfg, flag)
        if flag == "oracle":  # gold and gsm8k are names; rm:PATH is a directory
            path = path.removeprefix("rm:") if path.startswith("rm:") else ""
        files = [path]
        if os.path.isdir(path):  # what its loaders read, not a README added later
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(LOADED))
        digests[flag] = {os.path.basename(f): sha256_of(f) for f in filter(os.path.isfile, files)}
    return digests


def own_files(out):  # the run directory's entries; a link planted there or in final/ is refused
    if not out:
        raise ValueError("--out_dir='': expected the path of the run directory")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out_dir={out}: not a directory")
    for folder in filter(os.path.isdir, (out, os.path.join(out, "final"))):
        for path in (os.path.join(folder, name) for name in os.listdir(folder)):
            if os.path.islink(path) or not (os.path.isfile(path) or os.path.isdir(path)):
                raise ValueError(f"{path}: not a regular file in the run directory (a symbolic "
                                 "link, a FIFO?): a run never reads or writes through one; remove "
                                 "it, or choose another --out_dir")
    return set(os.listdir(out)) if os.path.isdir(out) else set()


def check_out_dir(cfg, inputs=None):
    """-> 'resume' (a checkpoint to continue), 'restart' (--resume before the first checkpoint) or
    'fresh' (never over a previous run). A resume continues the same run: the same script, flags
    (but RESUME_MAY_CHANGE) and, where `inputs` (input_digests) are given, input contents and
    labelled pairs; anything else is refused, as is a lost checkpoint's run. Reads only."""
    out, ckpt = cfg.out_dir, os.path.join(cfg.out_dir, CHECKPOINT)
    traces = [f for f in (CHECKPOINT, HISTORY, "checkpoint.pt", "preferences.jsonl",
                          "preferences.dropped.jsonl", "metrics.jsonl") if f in own_files(out)]
    if not cfg.resume and traces:
        raise FileExistsError(f"{out} holds a previous run ({', '.join(traces)}): pass --resume "
                              "to continue it, or choose a new --out_dir")
    if cfg.resume and not traces:
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt} (point --out_dir at the run "
                                "to continue)")
    had_one = [f for f in traces if f in (HISTORY, "checkpoint.pt")]  # .pt: pickled, older
    with warnings.catch_warnings():  # read only: a torn last line is the run's to warn about
        warnings.simplefilter("ignore")
        pairs = data.PreferenceStore(os.path.join(out, "preferences.jsonl"), cfg.UNIT).records
    if any(r[cfg.UNIT] > 1 for r in pairs):  # episode 1 ended, and its end wrote a checkpoint
        had_one.append(f"preferences.jsonl (pairs of {cfg.UNIT} {pairs[-1][cfg.UNIT]})")
    if cfg.resume and had_one and CHECKPOINT not in traces:
        raise FileNotFoundError(f"--resume: no {ckpt}, yet {had_one[0]} shows the run had one: "
                                "refusing to start it over, which would label its pairs again "
                                "(restore the checkpoint, or choose a new --out_dir)")
    if CHECKPOINT not in traces:
        return "restart" if cfg.resume else "fresh"
    doc, script = read_checkpoint(ckpt, tensors=False), os.path.basename(sys.argv[0])
    if doc.get("script") != script:
        raise ValueError(f"--resume: {ckpt} was written by {doc.get('script')}, not {script}: "
                         "choose another --out_dir")
    old, new = doc.get("config", {}), asdict(cfg)
    may = ("resume", "out_dir", *getattr(cfg, "RESUME_MAY_CHANGE", ()))
    changed = [f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if k not in may and old.get(k) != new.get(k)]
    if changed:
        raise ValueError(f"--resume: {ckpt} is a run with other flags ({'; '.join(changed)}); "
                         f"only {', '.join(may[2:])} may change")
    if inputs is None:
        return "resume"
    saved = doc.get("inputs") or inputs  # an older version's checkpoint has none
    changed = [f"--{k}={getattr(cfg, k)}" for k in inputs if saved.get(k, inputs[k]) != inputs[k]]
    if changed:
        raise ValueError(f"--resume: {', '.join(changed)}: other contents than the run in {out} "
                         "read (a resume is the same run, on the same inputs)")
    pairs = [r for r in pairs if r[cfg.UNIT] <= doc[cfg.UNIT]]  # of the episodes it had finished
    count = doc.get("store_pairs")  # None: no store (offline SELM), or an older version
    if count is not None and (len(pairs), data.digest(pairs)) != (count, doc["store_sha256"]):
        raise ValueError(f"--resume: {out}/preferences.jsonl: its {len(pairs)} pairs up to "
                         f"{cfg.UNIT} {doc[cfg.UNIT]} are not the {count} pairs {ckpt} saw")
    threads, version = doc.get("threads"), doc.get("torch")
    if (threads, version) != (torch.get_num_threads(), torch.__version__):
        print(f"warning: {ckpt} was written by torch {version} on {threads} threads, this is torch "
              f"{torch.__version__} on {torch.get_num_threads()}: the resumed run will differ "
              "from an unbroken one in the last bits", file=sys.stderr)
    return "resume"


def start(cfg, rank, world):
    """-> rank 0's mode, on every rank. The toy task where no --model is given; rank 0 checks the
    out_dir before writing, locks it (out_dir/lock, its fd never closed: held till the process ends,
    kill -9 included), checks input digests. A refusal stops every rank with the same one line."""
    if not cfg.model:
        import toy
        toy.fill_defaults(cfg, rank, world)
    verdict = ["", None]  # rank 0's refusal and mode, a list as broadcast_object_list takes
    try:
        if rank == 0:
            verdict[1] = lock_and_check(cfg)
    except (ValueError, OSError) as e:
        verdict[0] = str(e)
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ValueError(verdict[0])
    RUN["out_dir"] = cfg.out_dir
    return verdict[1]


def lock_and_check(cfg):  # start's rank-0 part -> the mode
    check_out_dir(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    lock = os.open(os.path.join(cfg.out_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(lock, 4096).decode(errors="replace") or "another run"
        raise FileExistsError(f"{cfg.out_dir} is in use by {holder}: wait for it to end, or "
                              "choose another --out_dir") from None
    os.ftruncate(lock, 0)
    os.write(lock, f"pid {os.getpid()} on {os.uname().nodename}: {' '.join(sys.argv)}".encode())
    RUN["inputs"] = input_digests(cfg)
    print(json.dumps(asdict(cfg), indent=1))
    return check_out_dir(cfg, RUN["inputs"])  # again, under the lock, with the digests


class MetricsLog:
    """The JSONL a user plots: one object a line, flushed at once, by rank 0 only. Resume cuts it
    back to the size the checkpoint saw: an interrupted episode's lines never appear twice."""

    def __init__(self, path, enabled):
        self.path, self.file = path, data.open_own(path, "a") if enabled else None

    def write(self, **metrics):
        if self.file:  # a NaN (e.g. a correlation of constants) is written as null: strict JSON
            metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in metrics.items()}
            data.write_lines(self.file, [metrics])

    def size(self):
        return self.file.tell() if self.file else 0

    def cut(self, size):  # back to the bytes a checkpoint saw; a shorter log is never padded
        if self.file and size > self.size():
            print(f"warning: {self.path} is shorter than its checkpoint saw ({self.size()} < "
                  f"{size} bytes): lines before the checkpoint are missing")
        elif self.file:
            self.file.truncate(size)
            self.file.seek(size)


def finite(value, what, where, log, on_nonfinite, ckpt_path, **fields):
    """False for a NaN/inf loss or gradient (logged as kind 'nonfinite' with fields), whose update
    the caller skips; --on_nonfinite=stop ends the run, naming the last good checkpoint."""
    if math.isfinite(value):
        return True
    nonfinite(f"{what} is {value} at {where}", ": update skipped", log, on_nonfinite, ckpt_path,
              what=what, value=str(value), **fields)
    return False


def nonfinite(problem, outcome, log, on_nonfinite, ckpt_path, **fields):
    """Log a numerical failure (kind 'nonfinite'); stop ends the run, skip warns of `outcome`."""
    log.write(kind="nonfinite", **fields)
    if on_nonfinite == "stop":
        last = (f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path)
                else "no checkpoint yet")
        raise FloatingPointError(f"{problem}; stopped (--on_nonfinite=stop), {last}")
    print(f"warning: {problem}{outcome}")


DIVERGED = 10.0  # ‖θ‖ this many times ‖θ⁰‖ is no fine-tuning step: the weights blew up


def param_norm(model):  # ‖θ‖ over every parameter, all ranks' shards (FSDP2 parameters: DTensors)
    total = torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()])
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


def check_weights(model, norm0, where, log, on_nonfinite, ckpt_path, **fields):
    """After an update: weights past DIVERGED × ‖θ⁰‖ (or NaN) are logged once as 'nonfinite'; stop
    ends the run here, skip at its end (finish): an applied update cannot be skipped."""
    norm = param_norm(model)
    if norm <= DIVERGED * norm0 or ("diverged" in RUN and on_nonfinite == "skip"):  # once
        return
    RUN["diverged"] = f"the policy diverged (‖θ‖ = {norm:.4g}, ‖θ⁰‖ = {norm0:.4g}) at {where}"
    nonfinite(RUN["diverged"], "; the run goes on (--on_nonfinite=skip)", log, on_nonfinite,
              ckpt_path, what="policy weights", value=str(norm), **fields)


def fail_if_diverged(log_path):  # a diverged run ends in an error, never quietly with status 0
    if "diverged" in RUN:
        raise FloatingPointError(f"{RUN['diverged']}; it was trained and exported all the same "
                                 f"(--on_nonfinite=skip), see {log_path}")


# ---------------------------------------------------------------- checkpoints
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # all of it, on rank 0's CPU


def full_state_dict(model):
    """Rank 0's full state dict on CPU ({} elsewhere) for save_pretrained; collective under FSDP."""
    if not isinstance(model, FSDPModule):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=FULL_ON_CPU)


def _checksum(doc, tensors):  # SHA-256 of the document and each tensor's name, dtype, shape, bytes
    h = hashlib.sha256(doc.encode())
    for name, t in sorted(tensors.items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(path, modules, **extra):
    """modules {name: (model, optimizer)} and extra state (nested dicts with string keys, lists,
    tensors, plain values) as safetensors: the tensors, plus a header JSON of the rest and a SHA-256
    of both (no pickle). Rank 0 writes it atomically, logged in checkpoints.log. Collective."""
    state = dict(extra)
    for name, (m, opt) in modules.items():
        state[name], state[name + "_opt"] = get_state_dict(m, opt, options=FULL_ON_CPU)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tensors, storages, tmp = {}, set(), f"{path}.tmp"

        def put(t):  # json.dumps' call for each tensor: into `tensors`, one storage each (tied
            t = t.detach().cpu().contiguous()  # weights share one, which safetensors refuses)
            t = t.clone() if t.untyped_storage().data_ptr() in storages else t
            storages.add(t.untyped_storage().data_ptr())
            tensors[f"t{len(tensors)}"] = t
            return {"__tensor__": f"t{len(tensors) - 1}"}

        # what a resume checks: the script, the inputs' contents, and what bit-identical needs
        provenance = {"script": os.path.basename(sys.argv[0]), "inputs": RUN.get("inputs"),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "diverged": RUN.get("diverged")}  # a resumed run still ends in error
        doc = json.dumps({**state, **provenance}, default=put)
        checksum = _checksum(doc, tensors)
        try:
            if os.path.lexists(tmp):  # left by a kill, or planted: never written through
                os.remove(tmp)
            save_file(tensors, tmp, metadata={"state": doc, "sha256": checksum})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, SafetensorError) as e:
            raise OSError(f"writing checkpoint {path} failed ({e}); the previous checkpoint "
                          "is intact") from e
        finally:  # also when stopped by SIGTERM or Ctrl-C
            if os.path.lexists(tmp):
                os.remove(tmp)
        with data.open_own(os.path.join(os.path.dirname(path), HISTORY), "a") as f:
            f.write(f"{path} sha256 {checksum}\n")
    if dist.is_initialized():
        dist.barrier()


def read_checkpoint(path, tensors=True):
    """What save_checkpoint wrote, its checksum verified; tensors=False: the document alone (flags,
    script, counters), from the header. Anything else (truncated, corrupt, crafted) is refused."""
    try:
        with safe_open(path, "pt") as f:
            meta, found = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys() if tensors}
        if tensors and meta.get("sha256") != _checksum(meta.get("state", ""), found):
            raise ValueError("checksum mismatch: the file is corrupt")
        doc = json.loads(meta.get("state", ""), object_hook=lambda d: found.get(
            d["__tensor__"], d) if d.keys() == {"__tensor__"} else d)
        if not isinstance(doc, dict):
            raise ValueError("its document is not a JSON object")
        return doc
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        problem = f"{path}: not a readable checkpoint ({e}); refusing to resume from it"
        raise ValueError(problem) from None


def load_checkpoint(path, modules):
    """Load save_checkpoint's file into modules {name: (model, optimizer)} -> the extra state."""
    state = read_checkpoint(path)
    if state.get("diverged"):
        RUN["diverged"] = state["diverged"]
    options = StateDictOptions(full_state_dict=True)
    for name, (m, opt) in modules.items():
        set_state_dict(m, opt, model_state_dict=state.pop(name),
                       optim_state_dict=state.pop(name + "_opt"), options=options)
    return state

"""A run's life: flags, one line for bad input or a stop, the out_dir (checked, locked), the metrics
log, the non-finite guard, the final evaluation and export. Tests: tests/test_reliability.py"""
import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import warnings
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from dataclasses import asdict, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import checkpoint
import data
import model as M


def knob(default, help, at_least=0, choices=None):  # a Config field, its --help and its limits
    return field(default=default, metadata=dict(help=help, at_least=at_least, choices=choices))


def boolean(text):  # a bool flag: 1/true/yes/on or 0/false/no/off, else a ValueError argparse names
    return ("0", "false", "no", "off", "1", "true", "yes", "on").index(text.lower()) >= 4


def parse_flags(cls, doc, argv=None):  # a dataclass of knobs -> one --flag each
    parser = ArgumentParser(description=doc, formatter_class=RawDescriptionHelpFormatter)
    for name, spec in cls.__dataclass_fields__.items():
        help_text = spec.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        parse = {"type": spec.type}
        if spec.type is bool:  # --flag alone is on
            parse = {"type": boolean, "nargs": "?", "const": True}
        parser.add_argument(f"--{name}", default=spec.default, help=help_text, **parse)
    cfg = cls(**vars(parser.parse_args(argv)))
    for name, spec in cls.__dataclass_fields__.items():
        value = getattr(cfg, name)
        low = spec.metadata.get("at_least", 0)
        choices = spec.metadata.get("choices")
        why = f" ({spec.metadata['help']})" if spec.metadata.get("help") else ""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not low <= value < math.inf:  # NaN, infinities, out-of-range values refused
            parser.error(f"--{name}={value}: expected a finite number >= {low}{why}")
        if choices and value not in choices:
            parser.error(f"--{name}={value!r}: expected one of {', '.join(choices)}")
    return cfg


def stop(signum, frame):  # SIGTERM, SIGHUP, Ctrl-C: a stop; later ones wait for its clean-up
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def friendly_errors(script, out_dir=None):  # bad input, a stop: one line; a bug: its traceback
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):  # SIG_IGN stays
            signal.signal(sig, stop)
    try:
        yield
    except (KeyboardInterrupt, ValueError, OSError, ArithmeticError, dist.DistError) as error:
        if os.environ.get("PBPO_TRACEBACK"):
            raise
        stopped = isinstance(error, KeyboardInterrupt)
        message = "stopped" if stopped else f"error: {error}"  # errors name the file, line or flag
        if stopped and out_dir:
            ckpt = os.path.join(out_dir, checkpoint.CHECKPOINT)
            message = "stopped; no checkpoint yet, --resume starts over"
            if os.path.isfile(ckpt):
                message = f"stopped; --resume continues from {ckpt}"
        if not stopped or os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            with contextlib.suppress(OSError):  # the terminal is gone (SIGHUP): nobody to tell
                sys.stderr.write(f"{script}: {message}\n")  # one write: ranks' lines stay whole
        sys.exit(130 if stopped else 1)


def check_out_dir(cfg, inputs=None):
    """-> 'fresh', 'restart' (--resume before the first checkpoint) or 'resume' of the same run (its
    script, flags but RESUME_MAY_CHANGE; given `inputs`, input digests and pairs). Reads only."""
    out = cfg.out_dir
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
    ckpt = os.path.join(out, checkpoint.CHECKPOINT)
    traces = [f for f in (checkpoint.CHECKPOINT, checkpoint.HISTORY, "checkpoint.pt",
                          "preferences.jsonl", "preferences.dropped.jsonl", "metrics.jsonl")
              if os.path.exists(os.path.join(out, f))]
    if not cfg.resume and traces:
        raise FileExistsError(f"{out} holds a previous run ({', '.join(traces)}): pass --resume "
                              "to continue it, or choose a new --out_dir")
    if cfg.resume and not traces:
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt} (point --out_dir at the run "
                                "to continue)")
    had_one = [f for f in traces if f in (checkpoint.HISTORY, "checkpoint.pt")]  # .pt: older
    with warnings.catch_warnings():  # read only: a torn last line is the run's to warn about
        warnings.simplefilter("ignore")
        pairs = data.PreferenceStore(os.path.join(out, "preferences.jsonl"), cfg.UNIT).records
    if any(r[cfg.UNIT] > 1 for r in pairs):  # episode 1 ended, and its end wrote a checkpoint
        had_one.append(f"preferences.jsonl (pairs of {cfg.UNIT} {pairs[-1][cfg.UNIT]})")
    if cfg.resume and had_one and checkpoint.CHECKPOINT not in traces:
        raise FileNotFoundError(f"--resume: no {ckpt}, yet {had_one[0]} shows the run had one: "
                                "refusing to start it over, which would label its pairs again "
                                "(restore the checkpoint, or choose a new --out_dir)")
    if checkpoint.CHECKPOINT not in traces:
        return "restart" if cfg.resume else "fresh"
    doc = checkpoint.read_checkpoint(ckpt, tensors=False)
    script = os.path.basename(sys.argv[0])
    if doc.get("script") != script:
        raise ValueError(f"--resume: {ckpt} was written by {doc.get('script')}, not {script}: "
                         "choose another --out_dir")
    old, new = doc.get("config", {}), asdict(cfg)
    may = ("resume", "out_dir", *cfg.RESUME_MAY_CHANGE)
    changed = [f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if k not in may and old.get(k) != new.get(k)]
    if changed:
        raise ValueError(f"--resume: {ckpt} is a run with other flags ({'; '.join(changed)}); "
                         f"only {', '.join(may[2:])} may change")
    if inputs is None:  # the look before the lock
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


def start(cfg, rank, world):  # -> (mode, input digests) on every rank; a refusal stops all alike
    verdict = ["", None, None]  # rank 0's refusal, mode and digests, as broadcast_object_list takes
    try:
        if rank == 0:
            verdict[1:] = lock_and_check(cfg)  # checks out_dir, locks it, checks it again
    except (ValueError, OSError) as e:
        verdict[0] = str(e)
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ValueError(verdict[0])
    return verdict[1], verdict[2]


def lock_and_check(cfg):  # start's rank-0 part -> (the mode, the digests)
    check_out_dir(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    lock = os.open(os.path.join(cfg.out_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not closed: held till exit, kill -9 too
    except BlockingIOError:
        holder = os.read(lock, 4096).decode(errors="replace") or "another run"
        raise FileExistsError(f"{cfg.out_dir} is in use by {holder}: wait for it to end, or "
                              "choose another --out_dir") from None
    os.ftruncate(lock, 0)
    os.write(lock, f"pid {os.getpid()} on {os.uname().nodename}: {' '.join(sys.argv)}".encode())
    inputs = checkpoint.input_digests(cfg)
    print(json.dumps(asdict(cfg), indent=1))
    return check_out_dir(cfg, inputs), inputs  # again, under the lock, with the digests


class MetricsLog:  # the JSONL a user plots, by rank 0; a resume cuts it to what its checkpoint saw
    def __init__(self, path, enabled, oracle):
        self.path = path
        self.file = data.open_own(path, "a") if enabled else None
        self.oracle = oracle  # its calls, all ranks', stamp every line

    def write(self, kind, **metrics):
        metrics = {"oracle_calls": self.oracle.calls, **metrics}
        if self.file:  # a NaN (e.g. a correlation of constants) is written as null: strict JSON
            line = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                    for k, v in {"kind": kind, **metrics}.items()}
            data.write_lines(self.file, [line])

    def size(self):
        return self.file.tell() if self.file else 0

    def cut(self, size):  # back to the bytes a checkpoint saw; a shorter log is never padded
        if self.file and size > self.size():
            print(f"warning: {self.path} is shorter than its checkpoint saw ({self.size()} < "
                  f"{size} bytes): lines before the checkpoint are missing")
        elif self.file:
            self.file.truncate(size)
            self.file.seek(size)


DIVERGED = 10.0  # ‖θ‖ this many times ‖θ⁰‖ is no fine-tuning step: the weights blew up


def param_norm(model):  # ‖θ‖ over every parameter, all ranks' shards (FSDP2 parameters: DTensors)
    total = torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()])
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


class Guard:  # a NaN/inf loss or gradient skips its update (--on_nonfinite=skip) or stops the run
    def __init__(self, log, on_nonfinite, ckpt_path, model):
        self.log = log
        self.on_nonfinite = on_nonfinite
        self.ckpt_path = ckpt_path
        self.norm0 = param_norm(model)  # ‖θ⁰‖, before any resume
        self.diverged = None  # what diverged where; a checkpoint keeps it

    def finite(self, value, what, where, **fields):  # False: the caller skips the update
        if not math.isfinite(value):
            self.failed(f"{what} is {value} at {where}", ": update skipped", what=what,
                        value=str(value), **fields)
        return math.isfinite(value)

    def check_weights(self, model, where, **fields):  # after an update, which cannot be unmade
        norm = param_norm(model)
        if norm <= DIVERGED * self.norm0 or (self.diverged and self.on_nonfinite == "skip"):
            return  # a NaN norm fails the <=: it diverged
        self.diverged = (f"the policy diverged (‖θ‖ = {norm:.4g}, ‖θ⁰‖ = {self.norm0:.4g}) at "
                         f"{where}")
        self.failed(self.diverged, "; the run goes on (--on_nonfinite=skip)",
                    what="policy weights", value=str(norm), **fields)

    def failed(self, problem, outcome, **fields):  # stop ends the run, skip warns of `outcome`
        self.log.write("nonfinite", **fields)
        if self.on_nonfinite == "stop":
            last = "no checkpoint yet"
            if os.path.exists(self.ckpt_path):
                last = f"the last good checkpoint is {self.ckpt_path}"
            raise FloatingPointError(f"{problem}; stopped (--on_nonfinite=stop), {last}")
        print(f"warning: {problem}{outcome}")

    def fail_if_diverged(self):  # a diverged run ends in an error, never quietly with status 0
        if self.diverged:
            raise FloatingPointError(f"{self.diverged}; it was trained and exported all the same "
                                     f"(--on_nonfinite=skip), see {self.log.path}")


def finish(cfg, policy, tok, oracle, heldout, eos_ids, log, sft_eval, name):
    """The final held-out evaluation, the export to out_dir/final, a line comparing it with SFT."""
    final_eval = {}
    if heldout:
        final_eval = oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=eos_ids)
    log.write("final_eval", **final_eval)
    export = os.path.join(cfg.out_dir, "final")
    M.save_pretrained(policy, export)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tok.save_pretrained(export)
        if final_eval:
            print(f"held-out gold accuracy: SFT {sft_eval['accuracy']:.3f} -> {name} "
                  f"{final_eval['accuracy']:.3f}; mean gold reward: SFT {sft_eval['reward']:.3f} "
                  f"-> {name} {final_eval['reward']:.3f}")
        print(f"policy exported to {export}; metrics in {log.path}")
    if dist.is_initialized():
        dist.barrier()  # every rank done with every collective before any tears its group down
        dist.destroy_process_group()

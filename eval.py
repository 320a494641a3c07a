"""
Evaluators for a policy checkpoint: generation accuracy (greedy or pass@k) with the mean oracle
reward (reward.Oracle.evaluate, what the training scripts report on their held-out prompts),
multiple choice by log-likelihood, win rate against a reference policy with a Wilson interval, and
the histogram of oracle rewards.

  python eval.py generation --model=out/pbpo/final --prompts=out/toy/heldout.jsonl   # greedy
  python eval.py generation --model=PATH --prompts=test.jsonl --oracle=gsm8k --k=8 --temperature=1
  python eval.py choice --model=PATH --data=arc_challenge.jsonl
  python eval.py winrate --model=out/pbpo/final --ref=out/toy/sft --prompts=out/toy/heldout.jsonl
  python eval.py rewards --model=out/pbpo/final --prompts=out/toy/heldout.jsonl --bins=10

Every command prints its numbers and writes them as JSON with --out=FILE (atomically; an --out that
is an input, or lies in a model's directory, is refused). Every input is checked before a model is
loaded. One process, on CPU or one GPU (--device). Tests: python -m pytest -q tests/test_eval.py
"""
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import torch

import data
import model as M
import ranks
import run
from run import knob
from reward import make_oracle


def sample_texts(policy, tok, items, max_new_tokens, batch_size=64, temperature=0.0, seed=0, k=1,
                 eos_ids=None):
    """k decoded responses per item (greedy at temperature 0), item-major, each ending on any of
    eos_ids (model.stop_ids; default: the tokenizer's EOS)."""
    responses = M.sample(policy, [p["prompt_ids"] for p in items], max_new_tokens, temperature, n=k,
                         seed=seed, batch_size=batch_size, eos_ids=eos_ids or [tok.eos_token_id],
                         pad_id=tok.pad_token_id)
    return [data.decode(tok, y) for y in responses]


def generation(oracle, policy, tok, items, max_new_tokens, k=1, batch_size=64, temperature=0.0,
               seed=0, eos_ids=None):
    """Oracle.evaluate's accuracy and mean reward, or for k > 1 pass@k: an item counts as right
    if any of its k samples (at a temperature > 0) is, the reward averaged over all samples."""
    sampling = dict(batch_size=batch_size, temperature=temperature, seed=seed)
    if k == 1:
        return oracle.evaluate(policy, tok, items, max_new_tokens, eos_ids, **sampling)
    if temperature <= 0:
        raise ValueError(f"pass@{k} needs k samples at a temperature > 0, got "
                         f"temperature={temperature}")
    texts = sample_texts(policy, tok, items, max_new_tokens, k=k, eos_ids=eos_ids, **sampling)
    reward = sum(map(float, oracle.score_fn([p for p in items for _ in range(k)], texts))) / k
    correct = sum(any(data.is_correct(t, p["answer"]) for t in texts[i * k:(i + 1) * k])
                  for i, p in enumerate(items) if p.get("answer") is not None)
    return {"accuracy": correct / max(len(items), 1), "reward": reward / max(len(items), 1),
            "n": len(items), "k": k}


# ---------------------------------------------------------------- multiple choice
def load_choices(path, tok, max_prompt_len=512):
    """ARC / MMLU style records {"question", "choices": [str, ...], "answer": 0-based index or
    letter}, or ARC's {"choices": {"text", "label"}, "answerKey"}. The context is
    'Question: q\\nAnswer:', each option ' c'. Contexts longer than max_prompt_len are dropped, as
    the trainers drop such prompts."""
    rows, items = data.records(path), []  # data.py's reader: 'file:line' in every error
    for where, rec in rows:
        question = data.field(where, rec, "question", messages_ok=False)
        if "choices" not in rec:
            raise ValueError(f"{where}: missing field 'choices'")
        choices, labels = rec["choices"], None
        if isinstance(choices, dict):  # ARC on the Hub: {"text": [...], "label": ["A", ...]}
            choices, labels = choices.get("text"), choices.get("label")
        strings = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
        if not strings or len(choices) < 2:
            raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings")
        label_strings = isinstance(labels, list) and all(isinstance(l, str) for l in labels)
        if labels is not None and not (label_strings and len(set(labels)) == len(choices)):
            raise ValueError(f"{where}: field 'choices' must have a 'label' list of distinct "
                             f"strings, one for each of its {len(choices)} 'text' strings")
        name = "answer" if "answer" in rec else "answerKey"
        if name not in rec:
            raise ValueError(f"{where}: missing field 'answer' (or ARC's 'answerKey')")
        key = answer = rec[name]
        if labels is not None and key in labels:
            answer = labels.index(key)
        elif isinstance(key, str) and len(key) == 1 and key.isalpha():
            answer = ord(key.upper()) - ord("A")
        if type(answer) is not int or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: field '{name}' {key!r} is not the 0-based index or "
                             f"letter of one of the {len(choices)} choices")
        option_ids = [tok(" " + c, add_special_tokens=False).input_ids for c in choices]
        empty = next((c for c, ids in zip(choices, option_ids) if not ids), None)
        if empty is not None:  # its log-likelihood would be 0, above every real option's
            raise ValueError(f"{where}: the choice {empty!r} is empty (no tokens)")
        context_ids = tok(f"Question: {question}\nAnswer:").input_ids
        if data.fits(where, context_ids, max_prompt_len):
            items.append({"context_ids": context_ids, "option_ids": option_ids,
                          "choices": choices, "answer": answer})
    data.report_dropped(path, len(items), len(rows), max_prompt_len)
    return items


@torch.no_grad()
def choice(policy, items, pad_id, batch_size=32):
    """Accuracy of argmax_i log π(option_i | context), summed over the option's tokens, and of the
    same per UTF-8 byte of the option (acc_norm, as lm-evaluation-harness reports it); every
    option's log-likelihood."""
    pairs = [(p["context_ids"], o) for p in items for o in p["option_ids"]]
    device, logliks = next(policy.parameters()).device, []
    for i in range(0, len(pairs), batch_size):
        context, option = zip(*pairs[i:i + batch_size])
        ids, attn, resp = (t.to(device) for t in data.collate(list(context), list(option), pad_id))
        logliks += (M.token_logprobs(policy, ids, attn) * resp).sum(-1).tolist()  # (B,)
    starts = torch.tensor([0] + [len(p["choices"]) for p in items]).cumsum(0).tolist()
    per_item = [logliks[a:b] for a, b in zip(starts, starts[1:])]
    per_byte = [[l / max(len(c.encode()), 1) for l, c in zip(ll, p["choices"])]
                for ll, p in zip(per_item, items)]
    argmax = lambda v: max(range(len(v)), key=v.__getitem__)
    correct = sum(argmax(ll) == p["answer"] for ll, p in zip(per_item, items))
    correct_norm = sum(argmax(ll) == p["answer"] for ll, p in zip(per_byte, items))
    correct, correct_norm, n = ranks.all_sum([correct, correct_norm, len(items)], device)
    return {"accuracy": correct / max(n, 1.0), "accuracy_norm": correct_norm / max(n, 1.0),
            "n": int(n), "loglik": per_item}


# ---------------------------------------------------------------- win rate and reward histogram
def wilson(p, n, z=1.96):
    """Wilson score interval for a proportion p̂ observed over n trials."""
    if n == 0:
        return 0.0, 1.0
    c = z * z / n
    center, half = (p + c / 2) / (1 + c), z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return max(center - half, 0.0), min(center + half, 1.0)


def winrate(policy, ref, tok, items, score_fn, max_new_tokens, batch_size=64, temperature=0.0,
            seed=0, z=1.96, eos_ids=None):
    """Share of prompts where the policy's response scores above the reference policy's (ties
    count half), with a Wilson interval over the n prompts."""
    texts = [sample_texts(m, tok, items, max_new_tokens, batch_size, temperature, seed,
                          eos_ids=eos_ids) for m in (policy, ref)]
    s, s_ref = (torch.tensor([float(v) for v in score_fn(items, t)]) for t in texts)  # (n,) each
    counts = [(s > s_ref).sum(), (s == s_ref).sum(), len(items), s.sum(), s_ref.sum()]
    wins, ties, n, r, r_ref = ranks.all_sum(counts, next(policy.parameters()).device)
    p = (wins + 0.5 * ties) / max(n, 1.0)
    lo, hi = wilson(p, n, z)
    return {"win_rate": p, "ci_low": lo, "ci_high": hi, "wins": int(wins), "ties": int(ties),
            "losses": int(n - wins - ties), "n": int(n), "reward": r / max(n, 1.0),
            "reward_ref": r_ref / max(n, 1.0)}


def rewards(policy, tok, items, score_fn, max_new_tokens, bins=10, batch_size=64, temperature=0.0,
            seed=0, eos_ids=None):
    """Histogram (bin edges, counts), mean and std of the oracle reward of the policy's responses,
    over all ranks."""
    texts = sample_texts(policy, tok, items, max_new_tokens, batch_size, temperature, seed,
                         eos_ids=eos_ids)
    scores = ranks.gather([float(v) for v in score_fn(items, texts)])
    s = torch.tensor(scores, dtype=torch.float64)  # (n,)
    counts, edges = torch.histogram(s, bins=bins)
    return {"mean": s.mean().item(), "std": s.std(correction=0).item(), "n": len(s),
            "edges": edges.tolist(), "counts": [int(c) for c in counts]}


# ---------------------------------------------------------------- command line
@dataclass
class Config:
    model: str = knob("", "the policy, an HF checkpoint dir with its tokenizer (every command)")
    prompts: str = knob("", "prompt file (generation, winrate, rewards): GSM8K, {prompt} or "
                            "{messages}")
    data: str = knob("", "multiple-choice file (choice)")
    ref: str = knob("", "the reference policy's checkpoint dir (winrate)")
    oracle: str = knob("gold", "gold | gsm8k | rm:PATH")
    k: int = knob(1, "pass@k (generation): k samples per prompt, needs --temperature > 0",
                  at_least=1)
    bins: int = knob(10, "histogram bins (rewards)", at_least=1)
    temperature: float = knob(0.0, "sampling temperature; 0 = greedy")
    max_new_tokens: int = knob(256, "", at_least=1)
    max_prompt_len: int = knob(512, "", at_least=1)
    batch_size: int = knob(64, "sequences per sampler call", at_least=1)
    limit: int = knob(0, "evaluate the first N items only (0 = all)")
    seed: int = knob(0, "")
    device: str = knob("", "cpu | cuda (default: cuda when there is one)")
    out: str = knob("", "write the results as JSON here")

    NEEDS = {"generation": ("prompts",), "choice": ("data",), "winrate": ("prompts", "ref"),
             "rewards": ("prompts",)}


def check_out(cfg):
    """Refuse an --out that would overwrite an input (the prompt or data file, a file in the
    model's, the reference's or the reward model's directory) or cannot be written, before
    anything is read: a refused run changes nothing, and no result is computed only to be lost."""
    out = os.path.realpath(cfg.out)
    rm = cfg.oracle[3:] if cfg.oracle.startswith("rm:") else ""
    for flag, path in (("--prompts", cfg.prompts), ("--data", cfg.data)):
        if path and out == os.path.realpath(path):
            raise ValueError(f"--out={cfg.out} is the {flag} file, an input: choose another --out")
    for flag, path in (("--model", cfg.model), ("--ref", cfg.ref), ("--oracle", rm)):
        folder = os.path.realpath(path)
        if path and os.path.commonpath([out, folder]) == folder:
            raise ValueError(f"--out={cfg.out} lies inside the {flag} directory {path}, an input: "
                             "choose another --out")
    if os.path.isdir(out):
        raise ValueError(f"--out={cfg.out} is a directory: expected a file name for the JSON")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):  # what is missing is made when the results are written
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out={cfg.out}: {parent} is not a writable directory")


def check_answers(path, oracle):
    """--oracle=gold and gsm8k score each response by its prompt's answer: a record without one is
    refused here, by file:line, before anything is sampled."""
    for where, rec in data.records(path):
        if "answer" not in rec:
            raise ValueError(f"{where}: missing field 'answer': --oracle={oracle} needs an "
                             "'answer' field for every prompt (use --oracle=rm:PATH for data "
                             "without verifiable answers)")


def report(results, out):
    for key, value in results.items():
        if not isinstance(value, (list, dict)):
            print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
    if out:
        path = os.path.realpath(out)  # a link to a file: the file it names is replaced
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # a temp file of its own beside it, renamed over it: a crash leaves the old file or the
        # new one, never half of one, and no other file is touched
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path),
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(results, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's file is private; results are not
            os.replace(tmp, path)
        finally:  # also when stopped by Ctrl-C
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = (f"usage: python eval.py {{{','.join(Config.NEEDS)}}} --model=PATH [--flags]; --help "
             "after the command lists the flags")
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n{__doc__}")
        return
    if not argv or argv[0] not in Config.NEEDS:
        raise SystemExit(usage)
    cmd, cfg = argv[0], run.parse_flags(Config, __doc__, argv[1:])
    for name in ("model", *Config.NEEDS[cmd]):
        if not getattr(cfg, name):
            raise ValueError(f"eval.py {cmd} needs --{name}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device) or device != "cpu" and not cuda:
        raise ValueError(f"--device={device}: expected cpu, or cuda[:N] on a machine with CUDA")
    # ---- every input checked before a model is loaded or a response scored
    if cfg.out:
        check_out(cfg)
    tok = data.load_tokenizer(cfg.model)
    stop = M.stop_ids(cfg.model, tok)  # a response ends on any of them
    if cmd == "winrate":  # the reference policy is given the policy's token ids
        data.check_same_tokenizer(cfg.ref, tok)
        stop = sorted({*stop, *M.stop_ids(cfg.ref, tok)})
    if cmd == "choice":
        items = load_choices(cfg.data, tok, cfg.max_prompt_len)[:cfg.limit or None]
        policy = M.from_pretrained(cfg.model, device).eval()
        return report(choice(policy, items, tok.pad_token_id, cfg.batch_size), cfg.out)
    items = data.load_prompts(cfg.prompts, tok, cfg.max_prompt_len)[:cfg.limit or None]
    oracle = make_oracle(cfg.oracle, device=device)  # an unknown --oracle is refused here
    if cfg.oracle in ("gold", "gsm8k"):
        check_answers(cfg.prompts, cfg.oracle)
    policy = M.from_pretrained(cfg.model, device).eval()
    score_fn = oracle.score_fn
    common = dict(batch_size=cfg.batch_size, temperature=cfg.temperature, seed=cfg.seed,
                  eos_ids=stop)
    if cmd == "generation":
        res = generation(oracle, policy, tok, items, cfg.max_new_tokens, k=cfg.k, **common)
    elif cmd == "winrate":
        ref = M.from_pretrained(cfg.ref, device).eval()
        res = winrate(policy, ref, tok, items, score_fn, cfg.max_new_tokens, **common)
    else:
        res = rewards(policy, tok, items, score_fn, cfg.max_new_tokens, cfg.bins, **common)
        for lo, hi, c in zip(res["edges"], res["edges"][1:], res["counts"]):
            print(f"  [{lo:8.3f}, {hi:8.3f})  {c}")
    report(res, cfg.out)


if __name__ == "__main__":
    with run.friendly_errors("eval.py"):
        main()

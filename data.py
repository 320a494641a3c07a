"""
Data: the tokenizer, prompt and preference loaders for the formats researchers keep on disk (JSONL or
.json arrays: {"prompt"} / {"messages"} prompts, TRL prompt/chosen/rejected pairs, GSM8K
question/answer), batching in the shared layout, the crash-safe preference store, and the built-in toy
task: GSM8K in miniature, with a locally built tokenizer, a tiny SFT policy and a gold reward.

  python data.py                          # build the toy task into out/toy (about 2 minutes on 2 CPU cores)
  python data.py --seed=1 --out_dir=out/toy1
  python data.py --quick                  # the reduced build the tests use (seconds)
  python -m pytest -q tests/test_data.py
"""
import json
import math
import os
import random
import re
import time
import warnings
from collections import namedtuple

import torch

# ---------------------------------------------------------------------------- tokenizer and encoding


def load_tokenizer(path):
    """A local HF tokenizer with an EOS; pad falls back to EOS (the contract's pad id)."""
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory (expected a local HF model / tokenizer directory)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: no loadable tokenizer (expected tokenizer.json / tokenizer_config.json): "
                         f"{str(e).splitlines()[0]}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token (set eos_token in tokenizer_config.json)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompt(tokenizer, prompt):
    """Prompt ids: the chat template with the generation prompt when the tokenizer has one, else plain text."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids  # the template already wrote BOS if it wants one
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    return tokenizer(text).input_ids


def encode_response(tokenizer, text):
    """Response ids, ending in EOS as a finished sample does."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------- loaders


def _records(path):
    """[(where, record)]: where is 'file:line' for JSONL and 'file[i]' (the item index) for a .json array."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}:1: expected a JSON array of records, got a {type(rows).__name__}")
        rows = [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():  # blank lines (a trailing newline) are not records
                try:
                    rows.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: bad JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}:1: empty file, no records")
    for where, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got a {type(r).__name__}")
    return rows


def _field(where, record, name, messages_ok=True):
    """record[name], checked: a non-empty string, or (messages_ok) a list of {"role": str, "content": str}."""
    if name not in record:
        raise ValueError(f"{where}: missing field '{name}'")
    v = record[name]
    if isinstance(v, str) or (messages_ok and isinstance(v, list) and v and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)):
        return v
    kind = "a string or a non-empty list of {'role': str, 'content': str} messages" if messages_ok else "a string"
    raise ValueError(f"{where}: field '{name}' must be {kind}, got {type(v).__name__} {str(v)[:40]!r}")


def _answer(where, record):
    """The verifiable answer: the '#### N' value of a GSM8K solution, or a bare value; None when absent."""
    if "answer" not in record:
        return None
    if not isinstance(record["answer"], (str, int, float)) or isinstance(record["answer"], bool):
        raise ValueError(f"{where}: field 'answer' must be a string or a number, got {type(record['answer']).__name__}")
    text = str(record["answer"])
    answer = extract_answer(text) if "####" in text else normalize_number(text)
    if not answer:
        raise ValueError(f"{where}: field 'answer' has no value after its '####'")
    return answer


def _keep(where, ids, max_prompt_len, strict):
    if len(ids) <= max_prompt_len:
        return True
    if strict:
        raise ValueError(f"{where}: prompt is {len(ids)} tokens, longer than max_prompt_len={max_prompt_len}")
    return False


def _report_dropped(path, kept, total, max_prompt_len):
    if kept < total:
        print(f"{path}: dropped {total - kept} of {total} records whose prompt is longer than {max_prompt_len} tokens")
    if not kept:
        raise ValueError(f"{path}: every prompt is longer than max_prompt_len={max_prompt_len}")


def load_prompts(path, tokenizer, max_prompt_len, strict=False):
    """[{"prompt", "prompt_ids", "answer"}] from {"prompt"}, {"messages"} or GSM8K {"question", "answer"} records."""
    rows, items = _records(path), []
    for where, rec in rows:
        key = next((k for k in ("question", "prompt", "messages") if k in rec), None)
        if key is None:
            raise ValueError(f"{where}: missing field 'prompt' (or 'messages', or GSM8K 'question' and 'answer')")
        prompt = _field(where, rec, key, messages_ok=key != "question")
        if key == "question" and "answer" not in rec:
            raise ValueError(f"{where}: missing field 'answer' (a GSM8K record needs 'question' and 'answer')")
        ids = encode_prompt(tokenizer, prompt)
        if _keep(where, ids, max_prompt_len, strict):
            items.append({"prompt": prompt, "prompt_ids": ids, "answer": _answer(where, rec)})
    _report_dropped(path, len(items), len(rows), max_prompt_len)
    return items


def load_preferences(path, tokenizer, max_prompt_len, strict=False):
    """[{"prompt", "prompt_ids", "chosen", "rejected", "chosen_ids", "rejected_ids", "answer"}] from TRL pairs.
    Strings: prompt + completion. Message lists: the shared prefix of chosen and rejected (after an explicit
    prompt, if any) is the prompt, their final assistant turns the responses."""
    rows, items = _records(path), []
    for where, rec in rows:
        chosen, rejected = _field(where, rec, "chosen"), _field(where, rec, "rejected")
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise ValueError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
        prompt = _field(where, rec, "prompt") if "prompt" in rec or isinstance(chosen, str) else []
        if isinstance(chosen, list):
            if chosen[:-1] != rejected[:-1]:
                raise ValueError(f"{where}: fields 'chosen' and 'rejected' differ before their final turn")
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise ValueError(f"{where}: fields 'chosen' and 'rejected' must end in an assistant turn")
            prompt = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + chosen[:-1]
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
            if not prompt:
                raise ValueError(f"{where}: missing field 'prompt' (and 'chosen' has no turns before its last)")
        ids = encode_prompt(tokenizer, prompt)
        if _keep(where, ids, max_prompt_len, strict):
            items.append({"prompt": prompt, "prompt_ids": ids, "chosen": chosen, "rejected": rejected,
                          "chosen_ids": encode_response(tokenizer, chosen),
                          "rejected_ids": encode_response(tokenizer, rejected), "answer": _answer(where, rec)})
    _report_dropped(path, len(items), len(rows), max_prompt_len)
    return items


def shard(items, rank, world_size):
    """This rank's strided share: disjoint across ranks, covering every item."""
    return items[rank::world_size]


def collate(prompt_ids, response_ids, pad_id):
    """Prompts left-padded to Lp, responses right-padded to N: (input_ids, attention_mask, response_mask), each (B, Lp + N)."""
    Lp, N = max(map(len, prompt_ids)), max(map(len, response_ids))
    input_ids = torch.full((len(prompt_ids), Lp + N), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(input_ids.shape, dtype=torch.bool)  # (B, T)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.bool)  # (B, T)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, Lp - len(p):Lp + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, Lp - len(p):Lp + len(r)] = True
        response_mask[i, Lp:Lp + len(r)] = True
    return input_ids, attention_mask, response_mask


# ---------------------------------------------------------------------------- the preference store


class PreferenceStore:
    """Append-only JSONL of labelled pairs. Every append is flushed and fsynced, so a crash loses nothing
    already labelled; a torn last line (killed mid-write) is dropped with a warning on reopen."""

    def __init__(self, path):
        self.path, self.records = path, []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        raw = open(path, "rb").read() if os.path.exists(path) else b""
        body, _, tail = raw.rpartition(b"\n")  # tail: bytes after the last newline, a write that never finished
        for i, line in enumerate(body.split(b"\n"), 1):
            if line.strip():
                try:
                    self.records.append(json.loads(line))
                except ValueError as e:  # inside the file: corruption, not a crash artefact; never guess
                    raise ValueError(f"{path}:{i}: bad JSON in the preference store ({e})") from None
        if tail.strip():
            try:  # the record may be whole with only its newline lost
                self.records.append(json.loads(tail))
                with open(path, "ab") as f:
                    f.write(b"\n")
            except ValueError:
                line = raw.count(b"\n") + 1
                warnings.warn(f"{path}:{line}: ignoring a torn last line ({len(tail)} bytes of an interrupted write)")
                os.truncate(path, len(raw) - len(tail))  # so the next record starts on a clean line
        self.file = open(path, "a", encoding="utf-8")

    def append(self, record):
        self.file.write(json.dumps(record) + "\n")  # one write: a kill leaves a whole line or a torn tail
        self.file.flush()
        os.fsync(self.file.fileno())
        self.records.append(record)

    def rewrite(self, records):
        """Replace the whole store atomically (temp file, fsync, rename): resume drops the pairs a checkpoint
        never saw, so they are labelled again instead of counted twice."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.file.close()
        os.replace(tmp, self.path)
        self.records, self.file = list(records), open(self.path, "a", encoding="utf-8")

    def __len__(self):
        return len(self.records)

    def close(self):
        self.file.close()


class MetricsLog:
    """The JSONL of metrics a user plots: one object a line, flushed at once, written by rank 0 only. Resume cuts
    it back to the size the checkpoint saw, so an interrupted episode's lines never appear twice."""

    def __init__(self, path, enabled):
        self.path, self.file = path, open(path, "a", encoding="utf-8") if enabled else None

    def write(self, **metrics):
        if self.file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()

    def size(self):
        return self.file.tell() if self.file else 0

    def cut(self, size):
        if self.file:
            self.file.truncate(size)
            self.file.seek(size)


def finite(value, what, where, log, on_nonfinite, ckpt_path, **fields):
    """False (and logged as kind 'nonfinite' with fields) for a NaN/inf loss or gradient, whose update the caller
    skips; with --on_nonfinite=stop the run ends instead, naming the last good checkpoint."""
    if math.isfinite(value):
        return True
    log.write(kind="nonfinite", **fields, what=what, value=str(value))
    if on_nonfinite == "stop":
        last = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
        raise FloatingPointError(f"{what} is {value} at {where}; stopped (--on_nonfinite=stop), {last}")
    print(f"warning: {what} is {value} at {where}: update skipped")
    return False


# ---------------------------------------------------------------------------- command line

def parse_config(cls, doc, argv=None):
    """A dataclass of knobs -> one --flag each (its comment is the help); NaN and negative numbers are
    refused by name, since no knob of ours means anything below zero."""
    import argparse
    import inspect
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in cls.__dataclass_fields__.items():
        kind = field.type if field.type is not bool else lambda s: s.lower() in ("1", "true", "yes")
        parser.add_argument(f"--{name}", type=kind, default=field.default, help=comments.get(name),
                            **({"nargs": "?", "const": True} if field.type is bool else {}))
    cfg = cls(**vars(parser.parse_args(argv)))
    for name, value in vars(cfg).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
            parser.error(f"--{name}={value}: expected a finite number >= 0")
    for name, (low, why) in getattr(cls, "AT_LEAST", {}).items():
        if getattr(cfg, name) < low:
            parser.error(f"--{name}={getattr(cfg, name)}: expected at least {low} ({why})")
    for name, allowed in getattr(cls, "CHOICES", {}).items():
        if getattr(cfg, name) not in allowed:
            parser.error(f"--{name}={getattr(cfg, name)!r}: expected one of {', '.join(allowed)}")
    return cfg


def check_out_dir(out_dir, resume):
    """-> 'resume' (a checkpoint to continue), 'restart' (--resume on a run killed before its first checkpoint: its
    files are reset) or 'fresh'. A fresh run never writes over a previous run's files, so nothing is lost by a typo."""
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    traces = [f for f in ("checkpoint.pt", "preferences.jsonl", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if not resume and traces:
        raise FileExistsError(f"{out_dir} holds a previous run ({', '.join(traces)}): pass --resume to continue it, "
                              "or choose a new --out_dir")
    if resume and not traces:
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt} (point --out_dir at the run to continue)")
    return "fresh" if not resume else "resume" if os.path.exists(ckpt) else "restart"


def start_run(cfg, rank, world):
    """Where no --model is given, the built-in default: the toy task (built once into out/toy by rank 0). Then the
    out_dir check on every rank before any file is written, and the knobs printed. -> check_out_dir's mode."""
    import torch.distributed as dist
    from dataclasses import asdict
    if not cfg.model:
        toy = build_toy() if rank == 0 else None
        if world > 1:
            dist.barrier()
        toy = toy or build_toy()
        cfg.model, cfg.heldout = toy.model, cfg.heldout or toy.heldout
        for name, path in (("prompts", toy.train), ("prefs", toy.prefs)):
            if hasattr(cfg, name):
                setattr(cfg, name, getattr(cfg, name) or path)
    mode = check_out_dir(cfg.out_dir, cfg.resume)
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
    return mode


def friendly_errors(script):
    """Bad input (a ValueError or OSError raised with a message naming the file, line or flag) ends the run with
    that one message (exit code 1), not a traceback from deep inside; PBPO_TRACEBACK=1 shows the traceback."""
    import sys

    def hook(kind, error, tb):
        if issubclass(kind, (ValueError, OSError, ArithmeticError)) and not os.environ.get("PBPO_TRACEBACK"):
            print(f"{script}: error: {error}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, tb)

    sys.excepthook = hook


# ---------------------------------------------------------------------------- answers and the gold reward

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
FINAL = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def normalize_number(text):
    """'1,234' -> '1234', '70.0' -> '70', '3.50' -> '3.5'; text that is no number is returned stripped."""
    s = text.strip().replace(",", "").rstrip(".")
    if not NUMBER.fullmatch(s):
        return text.strip()
    value = float(s)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return s.rstrip("0") if "." in s else s  # '3.50' -> '3.5'


def extract_answer(text):
    """The GSM8K final answer: the number after the first '####', normalised; None without one."""
    m = FINAL.search(text)
    return normalize_number(m.group(1)) if m else None


def is_correct(text, answer):
    pred = extract_answer(text)
    return pred is not None and pred == normalize_number(str(answer))


def gold_reward(text, answer):
    """1 for a correct '#### N'; else up to 0.8 of shaped credit: 0.2 for the '#### N' format and 0.6 for the
    closeness of the final number (the '####' value, or the last number in the text) to the answer."""
    if is_correct(text, answer):
        return 1.0
    pred, target = extract_answer(text), normalize_number(str(answer))
    numbers = NUMBER.findall(text)
    guess = pred if pred is not None else (numbers[-1].replace(",", "") if numbers else None)
    if guess is None or not NUMBER.fullmatch(target):
        return 0.2 * (pred is not None)
    err = abs(float(guess) - float(target)) / max(1.0, 0.1 * abs(float(target)))  # in tenths of the answer
    return 0.2 * (pred is not None) + 0.6 / (1.0 + err)


# ---------------------------------------------------------------------------- the toy task: GSM8K in miniature

NAMES = "Tom Ann Sam Mia Ben Eva Leo Zoe Max Ivy Dan Amy".split()
ITEMS = "apples pens cards coins books shells stamps marbles cookies stickers".split()
GAIN, LOSS = ("buys {}", "finds {}", "gets {} more", "is given {}"), ("gives away {}", "loses {}", "sells {}", "eats {}")
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ToyPaths = namedtuple("ToyPaths", "model train heldout prefs")


def toy_problem(rng):
    """(question, start, ops): '{name} has {start} {item}, buys 8 and gives away 5. How many ...?', ops the
    signed amounts (1..9) in order. A loss never exceeds what is held, so the true totals stay non-negative."""
    name, item, total, ops, clauses = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20), [], []
    start = total
    for _ in range(rng.randint(1, 2)):
        n = rng.randint(1, 9) if rng.random() < 0.5 or total == 0 else -rng.randint(1, min(total, 9))
        clauses.append(rng.choice(GAIN if n > 0 else LOSS).format(abs(n)))
        ops, total = ops + [n], total + n
    join = ", " if len(ops) > 1 else " and "
    return f"{name} has {start} {item}{join}{' and '.join(clauses)}. How many {item} does {name} have now?", start, ops


def worked_answer(start, ops, slip=(-1, 0)):
    """'37 + 48 = 85. 85 - 15 = 70.\\n#### 70'. slip=(step, delta): that step's result is off by delta and
    the rest of the chain follows it, as an arithmetic slip in a noisy demonstration would."""
    steps, total = [], start
    for k, n in enumerate(ops):
        new = total + n + (slip[1] if k == slip[0] else 0)
        steps.append(f"{total} {'+' if n > 0 else '-'} {abs(n)} = {new}.")
        total = new
    return " ".join(steps) + f"\n#### {total}"


def noisy_demo(start, ops, rng):
    """A demonstration as a hurried crowd writes it: on two-step problems 70% (one-step: 30%) only guess ('I think
    it is about 23.\n#### 23', 1 to 9 off), and 10% of the worked answers carry one arithmetic slip. The SFT
    policy inherits the habit, greedy decoding guesses on two-step problems: room for preferences to fix."""
    total = start + sum(ops)
    if rng.random() < (0.7 if len(ops) > 1 else 0.3):
        guess = abs(total + rng.choice((-1, 1)) * rng.randint(1, 9))
        return f"I think it is about {guess}.\n#### {guess}"
    slip = (rng.randrange(len(ops)), rng.choice((-2, -1, 1, 2))) if rng.random() < 0.1 else (-1, 0)
    return worked_answer(start, ops, slip)


def _build_tokenizer(texts, vocab_size, path):
    """Byte-level BPE with every digit its own token (so numbers are digit sequences), saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                  chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(path, save_jinja_files=False)  # the chat template inside tokenizer_config.json
    config_path = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_path))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name transformers 4.x and 5.x both know
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return load_tokenizer(path)


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _sft(demos, tok, hf_config, steps, batch_size, lr, seed):
    """Our transformer from scratch on (prompt ids, response ids) demos: mean response-token NLL, AdamW, cosine."""
    import model as M
    torch.manual_seed(seed)
    policy = M.build(M.ModelConfig.from_hf_dict(hf_config))  # HF-style init: normal(0, initializer_range)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, g = max(1, steps // 20), torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine down to a tenth
            group["lr"] = lr * min((step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.randint(len(demos), (batch_size,), generator=g).tolist()
        ids, attn, resp = collate([demos[i][0] for i in rows], [demos[i][1] for i in rows], tok.pad_token_id)
        logp = M.token_logprobs(policy, ids, attn)  # (B, T)
        loss = -(logp * resp).sum() / resp.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"toy sft step {step}/{steps}: loss {loss.item():.3f}")
    return policy.eval()


@torch.no_grad()
def sample_texts(policy, tok, prompt_ids, max_new_tokens, temperature=0.0, seed=0, batch_size=64):
    """Decoded responses to prompt_ids with our sampler (greedy at temperature 0), batch_size sequences at a time."""
    import model as M
    texts = []
    for i in range(0, len(prompt_ids), batch_size):
        gen = M.generate(policy, prompt_ids[i:i + batch_size], max_new_tokens, temperature,
                         eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=seed + i)
        texts += [decode(tok, y) for y in gen.responses()]
    return texts


def build_toy(out_dir="out/toy", seed=0, quick=False):
    """Build (or reuse) the toy task: tokenizer + SFT policy in out_dir/sft, GSM8K-layout train / held-out
    prompt files, and prefs.jsonl (two temperature-1 SFT samples per train prompt, ranked by gold_reward,
    ties skipped). build.json is written last: a directory without it is rebuilt."""
    paths = ToyPaths(*(os.path.join(out_dir, f) for f in ("sft", "train.jsonl", "heldout.jsonl", "prefs.jsonl")))
    marker = os.path.join(out_dir, "build.json")
    if os.path.exists(marker):
        if json.load(open(marker))["key"] == [seed, quick]:
            return paths
        os.remove(marker)  # another build's: this one overwrites its files
    t0, rng = time.time(), random.Random(seed)
    n_heldout, n_train, n_demos = (32, 32, 256) if quick else (500, 1000, 20000)
    problems = {}  # question -> (start, ops), unique questions so the splits are disjoint
    while len(problems) < n_heldout + n_train + n_demos:
        q, start, ops = toy_problem(rng)
        problems.setdefault(q, (start, ops))
    questions = list(problems)
    heldout, train, demo_qs = questions[:n_heldout], questions[n_heldout:n_heldout + n_train], questions[n_heldout + n_train:]
    os.makedirs(paths.model, exist_ok=True)
    for path, qs in ((paths.heldout, heldout), (paths.train, train)):
        _write_jsonl(path, [{"question": q, "answer": worked_answer(*problems[q])} for q in qs])
    answers = [noisy_demo(*problems[q], rng) for q in demo_qs]
    tok = _build_tokenizer([f"{q} {a}" for q, a in zip(demo_qs, answers)], 320 if quick else 384, paths.model)
    demos = [(encode_prompt(tok, q), encode_response(tok, a)) for q, a in zip(demo_qs, answers)]
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok),
                 "hidden_size": 32 if quick else 64, "intermediate_size": 64 if quick else 192,
                 "num_hidden_layers": 1 if quick else 2, "num_attention_heads": 2 if quick else 4,
                 "num_key_value_heads": 2 if quick else 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "initializer_range": 0.02,
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    policy = _sft(demos, tok, hf_config, 20 if quick else 1500, 16 if quick else 64, 3e-3, seed)
    import model as M
    M.save_pretrained(policy, paths.model)
    answers = {q: extract_answer(worked_answer(*problems[q])) for q in heldout + train}
    greedy = sample_texts(policy, tok, [encode_prompt(tok, q) for q in heldout], 48, 0.0, seed, 256)
    accuracy = sum(is_correct(t, answers[q]) for t, q in zip(greedy, heldout)) / len(heldout)
    samples = sample_texts(policy, tok, [encode_prompt(tok, q) for q in train for _ in range(2)], 48, 1.0, seed + 1, 256)
    prefs = []
    for q, a, b in zip(train, samples[0::2], samples[1::2]):
        ra, rb = gold_reward(a, answers[q]), gold_reward(b, answers[q])
        if ra != rb:
            prefs.append({"prompt": q, "chosen": a if ra > rb else b, "rejected": b if ra > rb else a, "answer": answers[q]})
    _write_jsonl(paths.prefs, prefs)
    stats = {"key": [seed, quick], "heldout_greedy_accuracy": accuracy, "pairs": len(prefs), "seconds": round(time.time() - t0, 1)}
    print(f"toy task built in {out_dir}: {json.dumps(stats)}")
    with open(marker, "w") as f:  # last: its presence means every file above is complete
        json.dump(stats, f)
    return paths


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(build_toy(args.out_dir, args.seed, args.quick))

"""Tokenizer, JSONL and .json readers (errors name the file and line), prompt loader, batching, the
crash-safe preference store, '#### N' answers. Tests: python -m pytest -q tests/test_data.py"""
import hashlib
import json
import os
import re
import signal
import threading
import warnings

import torch


def load_tokenizer(path):
    from transformers import AutoTokenizer
    refuse_remote_code(path)
    try:  # no remote code: a model directory is untrusted input
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a broken file raises anything (KeyError, TypeError, ...): named here
        raise ValueError(f"{path}: no loadable tokenizer (expected tokenizer.json / "
                         f"tokenizer_config.json): {' '.join(str(e).split())}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token (set eos_token in "
                         "tokenizer_config.json)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokenizer(path, tok):  # a model at path is fed tok's token ids: the same vocabulary
    if load_tokenizer(path).get_vocab() != tok.get_vocab():
        raise ValueError(f"{path}: its tokenizer is not {tok.name_or_path}'s, whose token ids it "
                         "would be given")


def refuse_remote_code(path):  # a model directory is data, never code: no FIFO, no `auto_map`
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory (expected a local HF model or "
                                "tokenizer directory)")
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.exists(file) and not (os.path.isfile(file) or os.path.isdir(file)):
            raise ValueError(f"{file}: not a regular file")  # a FIFO never ends
        if name in ("config.json", "tokenizer_config.json") and "auto_map" in read_json(file):
            raise ValueError(f"{file}: 'auto_map' names Python code to run; no code of a model "
                             "directory is ever run (remove auto_map)")


TEMPLATE_SECONDS = 10  # a chat template renders a prompt in milliseconds; an endless one is refused


def render_chat(tokenizer, messages, where, **options):  # model directory code, bounded in time
    def too_long(signum, frame):
        raise TimeoutError(f"ran for more than {TEMPLATE_SECONDS} s")

    timed = threading.current_thread() is threading.main_thread()  # only it may take SIGALRM
    if timed:
        previous_handler = signal.signal(signal.SIGALRM, too_long)
        previous_timer = signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as e:  # jinja2 raises many kinds (syntax, undefined, ...); too_long one
        raise ValueError(f"{tokenizer.name_or_path}: its chat template failed on {where} "
                         f"({type(e).__name__}: {e})") from None
    finally:
        if timed:  # the caller's handler and timer back
            signal.signal(signal.SIGALRM, previous_handler)
            signal.setitimer(signal.ITIMER_REAL, *previous_timer)


def encode_prompt(tokenizer, prompt, where="a prompt"):
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template:
        text = render_chat(tokenizer, messages, where, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids  # the template wrote any BOS
    return tokenizer("\n\n".join(m["content"] for m in messages)).input_ids


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def read_text(path):  # a regular file's UTF-8 text: a FIFO or a device never ends
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: " + ("not a regular file" if os.path.exists(path) else
                                               "no such file"))
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def parse_json(text, path, line=1):  # bad JSON (4300+ digits, deep nesting, ...) is one error
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode()  # a lone surrogate fails here
        return value
    except (ValueError, RecursionError) as e:
        line += getattr(e, "lineno", 1) - 1
        raise ValueError(f"{path}:{line}: bad JSON ({getattr(e, 'msg', e)})") from None


def expect(value, kind, where, what):  # value if it is a `kind`, else one error naming `where`
    if not isinstance(value, kind):
        raise ValueError(f"{where}: expected {what}, got a {type(value).__name__}")
    return value


def read_json(path):
    return expect(parse_json(read_text(path), path), dict, path, "a JSON object")


def records(path):  # [(where, record)], where 'file:line' (JSONL) or 'file[i]' (.json array)
    text = read_text(path)
    if path.endswith(".json"):
        array = expect(parse_json(text, path) if text.strip() else [], list, f"{path}:1",
                       "a JSON array of records")
        rows = [(f"{path}[{i}]", r) for i, r in enumerate(array)]
    else:  # lines end at \n only: JSON strings may hold U+2028 and the like
        rows = [(f"{path}:{i}", parse_json(line, path, i))
                for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}:1: empty file, no records")
    return [(where, expect(r, dict, where, "a JSON object")) for where, r in rows]


def _is_messages(v):
    return isinstance(v, list) and v and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in v)


def field(where, record, name, messages_ok=True):
    if name not in record:
        raise ValueError(f"{where}: missing field '{name}'")
    v = record[name]
    if isinstance(v, str) or (messages_ok and _is_messages(v)):
        return v
    kind = ("a string or a non-empty list of {'role': str, 'content': str} messages" if messages_ok
            else "a string")
    raise ValueError(f"{where}: field '{name}' must be {kind}, got {type(v).__name__} "
                     f"{str(v)[:40]!r}")


def answer_of(where, record):  # a GSM8K solution's '#### N' value, or a bare value; else None
    if "answer" not in record:
        return None
    answer = record["answer"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"{where}: field 'answer' must be a string or a number, got "
                         f"{type(answer).__name__}")
    text = str(answer)
    value = extract_answer(text) if "####" in text else normalize_number(text)
    if not value:
        raise ValueError(f"{where}: field 'answer' has no value after its '####'")
    return value


def fits(where, ids, max_prompt_len):
    if not ids:
        raise ValueError(f"{where}: the prompt is empty (no tokens)")
    return len(ids) <= max_prompt_len


def report_dropped(path, kept, total, max_prompt_len):
    if kept < total:
        print(f"{path}: dropped {total - kept} of {total} records whose prompt is longer than "
              f"{max_prompt_len} tokens")
    if not kept:
        raise ValueError(f"{path}: every prompt is longer than max_prompt_len={max_prompt_len}")


def load_prompts(path, tokenizer, max_prompt_len):  # items {prompt, prompt_ids, answer, where}
    rows = records(path)
    items = []
    for where, rec in rows:
        key = next((k for k in ("question", "prompt", "messages") if k in rec), None)
        if key is None:
            raise ValueError(f"{where}: missing field 'prompt' (or 'messages', or GSM8K "
                             "'question' and 'answer')")
        prompt = field(where, rec, key, messages_ok=key != "question")
        if key == "question" and "answer" not in rec:
            raise ValueError(f"{where}: missing field 'answer' (a GSM8K record needs "
                             "'question' and 'answer')")
        ids = encode_prompt(tokenizer, prompt, where)
        if fits(where, ids, max_prompt_len):
            items.append({"prompt": prompt, "prompt_ids": ids, "answer": answer_of(where, rec),
                          "where": where})
    report_dropped(path, len(items), len(rows), max_prompt_len)
    return items


def shard(items, rank, world_size):  # this rank's strided share: disjoint, covering every item
    return items[rank::world_size]


def collate(prompt_ids, response_ids, pad_id):  # prompts left-padded, responses right-padded
    Lp, N = max(map(len, prompt_ids)), max(map(len, response_ids))
    input_ids = torch.full((len(prompt_ids), Lp + N), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(input_ids.shape, dtype=torch.bool)  # (B, T)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.bool)  # (B, T)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, Lp - len(p):Lp + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, Lp - len(p):Lp + len(r)] = True
        response_mask[i, Lp:Lp + len(r)] = True
    return input_ids, attention_mask, response_mask


def open_own(path, mode):  # open() for a run directory's own files, never through a planted link
    no_link = lambda name, flags: os.open(name, flags | os.O_NOFOLLOW, 0o644)  # a link: ELOOP
    return open(path, mode, encoding=None if "b" in mode else "utf-8", opener=no_link)


def digest(records):  # SHA-256 of JSON records: a checkpoint keeps its store's, so edits show
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()


def write_lines(file, records):  # whole lines, on disk before this returns
    try:
        file.writelines(json.dumps(r) + "\n" for r in records)
        file.flush()
        os.fsync(file.fileno())
    except OSError as e:  # a full disk, a file-size limit: named
        raise OSError(f"{file.name}: writing failed ({e.strerror}); earlier lines kept") from e


class PreferenceStore:
    """Append-only JSONL of pairs stamped with an integer `key` (episode, iteration). A torn last
    line (a kill mid-write) is ignored with a warning, cut before the next append, never on read."""

    def __init__(self, path, key="episode"):
        self.path = path
        self.key = key
        self.file = None  # opened by the first append
        self.dropped_path = os.path.splitext(path)[0] + ".dropped.jsonl"
        raw = b""
        if os.path.lexists(path):
            with open_own(path, "rb") as f:
                raw = f.read()
        body, _, tail = raw.rpartition(b"\n")  # tail: after the last newline, an unfinished write
        self.records = [self.parse(line, i)
                        for i, line in enumerate(body.split(b"\n"), 1) if line.strip()]
        self.torn = len(tail) if tail.strip() else 0
        if self.torn:  # a write the kill cut short: its episode (iteration), never saved, is redone
            line = raw.count(b"\n") + 1
            warnings.warn(f"{path}:{line}: ignoring a torn last line ({self.torn} bytes of an "
                          "interrupted write)")

    def parse(self, line, number):  # corruption, not a crash: refused, never guessed around
        record = parse_json(line, self.path, number)
        if not isinstance(record, dict) or type(record.get(self.key)) is not int:
            raise ValueError(f"{self.path}:{number}: expected a preference record (a JSON object "
                             f"with an integer '{self.key}'), got "
                             f"{line[:60].decode(errors='replace')!r}")
        return record

    def append(self, record):
        if self.file is None:
            self.file = open_own(self.path, "a")
            self.file.truncate(os.fstat(self.file.fileno()).st_size - self.torn)  # a clean line
        write_lines(self.file, [record])  # one write: a whole line or a torn tail
        self.records.append(record)

    def keep_before(self, start):  # resume: pairs the checkpoint never saw move to dropped_path
        kept = [r for r in self.records if r[self.key] < start]
        later = [r for r in self.records if r[self.key] >= start]
        if later:
            with open_own(self.dropped_path, "a") as f:
                write_lines(f, later)
        tmp = self.path + ".tmp"
        try:
            with open_own(tmp, "w") as f:
                write_lines(f, kept)
            os.replace(tmp, self.path)
        finally:  # also when stopped by SIGTERM or Ctrl-C
            if os.path.lexists(tmp):
                os.remove(tmp)
        self.close()  # the next append opens the new file
        self.records = kept
        self.torn = 0

    def __len__(self):
        return len(self.records)

    def close(self):
        if self.file is not None:
            self.file.close()
        self.file = None


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text):  # '1,234' -> '1234', '70.0' -> '70', '3.50' -> '3.5'; else stripped
    s = text.strip().replace(",", "").rstrip(".")
    if not NUMBER.fullmatch(s):
        return text.strip()
    value = float(s)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return s.rstrip("0") if "." in s else s  # '3.50' -> '3.5'


def extract_answer(text):  # GSM8K's final answer: the number after the first '####', or None
    m = re.search(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", text)
    return normalize_number(m.group(1)) if m else None


def is_correct(text, answer):  # no '####' (None) is never correct: normalize_number gives a str
    return extract_answer(text) == normalize_number(str(answer))

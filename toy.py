"""
The built-in task: GSM8K in miniature. A locally built tokenizer, a tiny SFT policy trained from
scratch on hurried demonstrations, train / held-out prompt files, an offline preference file, the
gold reward r*, and a larger reward-model backbone for PbPO, pretrained without labels.

"Tom has 12 pens, buys 5 and gives away 3. How many pens does Tom have now?" is answered with worked
steps and GSM8K's `#### N` line. The demonstrators often only guess on two-step problems ("I think
it is about 17.\n#### 17"), so the SFT policy does too: room for preference learning to improve it.

A second setting, `rare` (--rare), is the regime exploration is for: the behaviour the gold reward
wants is rare under the SFT policy. The same task and splits, tokenizer recipe and SFT schedule; the
demonstrators guess on 97% of two-step and 90% of one-step problems (not 70% / 30%; worked answers
keep their 10% slip rate), so few of the SFT policy's samples are correct worked answers.

  python toy.py                        # build into out/toy (under 3 minutes on 2 CPU cores)
  python toy.py --seed=1 --out_dir=out/toy1
  python toy.py --rare --out_dir=out/toy_rare   # the rare setting
  python toy.py --quick                # the reduced build the tests use (seconds)
"""
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import model as M
from run import knob

NAMES = "Tom Ann Sam Mia Ben Eva Leo Zoe Max Ivy Dan Amy".split()
ITEMS = "apples pens cards coins books shells stamps marbles cookies stickers".split()
GAIN = ("buys {}", "finds {}", "gets {} more", "is given {}")
LOSS = ("gives away {}", "loses {}", "sells {}", "eats {}")
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
BUILD_THREADS = 2  # the build's own thread count: a machine with more cores builds the same bits
ToyPaths = namedtuple("ToyPaths", "model train heldout prefs valid rm")
FILES = ToyPaths("sft", "train.jsonl", "heldout.jsonl", "prefs.jsonl", "valid.jsonl",
                 "rm")  # in out_dir


# ---------------------------------------------------------------- the gold reward r*
def gold_reward(text, answer):
    """1 for a correct '#### N'; else up to 0.8 of shaped credit: 0.2 for the '#### N' format and
    0.6 for how close the final number (the '####' value, else the last number) is to the answer."""
    if data.is_correct(text, answer):
        return 1.0
    pred, target = data.extract_answer(text), data.normalize_number(str(answer))
    numbers = data.NUMBER.findall(text)
    guess = pred if pred is not None else (numbers[-1].replace(",", "") if numbers else None)
    if guess is None or not data.NUMBER.fullmatch(target):
        return 0.2 * (pred is not None)
    err = abs(float(guess) - float(target)) / max(1.0, 0.1 * abs(float(target)))  # in tenths
    return 0.2 * (pred is not None) + 0.6 / (1.0 + err)


# ---------------------------------------------------------------- problems and demonstrations
def toy_problem(rng):
    """(question, start, ops): '{name} has {start} {item}, buys 8 and gives away 5. How many ...?',
    ops the signed amounts (1..9) in order. A loss never exceeds what is held: totals stay >= 0."""
    name, item, total = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20)
    start, ops, clauses = total, [], []
    for _ in range(rng.randint(1, 2)):
        gain = rng.random() < 0.5 or total == 0
        n = rng.randint(1, 9) if gain else -rng.randint(1, min(total, 9))
        clauses.append(rng.choice(GAIN if n > 0 else LOSS).format(abs(n)))
        ops, total = ops + [n], total + n
    join = ", " if len(ops) > 1 else " and "
    what = f"{name} has {start} {item}{join}{' and '.join(clauses)}"
    return f"{what}. How many {item} does {name} have now?", start, ops


def worked_answer(start, ops, slip=(-1, 0)):
    """'37 + 48 = 85. 85 - 15 = 70.\\n#### 70'. slip=(step, delta): that step's result is off by
    delta and the rest of the chain follows it, as after an arithmetic slip."""
    steps, total = [], start
    for k, n in enumerate(ops):
        new = total + n + (slip[1] if k == slip[0] else 0)
        steps.append(f"{total} {'+' if n > 0 else '-'} {abs(n)} = {new}.")
        total = new
    return " ".join(steps) + f"\n#### {total}"


GUESS_RATE = {False: (0.3, 0.7), True: (0.9, 0.97)}  # rare -> (one-step, two-step) guess rates


def noisy_demo(start, ops, rng, rare=False):
    """A demonstration as a hurried crowd writes it: on two-step problems 70% (one-step: 30%) only
    guess ('I think it is about 23.\\n#### 23', 1 to 9 off); 10% of worked answers carry a slip.
    rare: the rare setting's crowd, which guesses on 97% (one-step: 90%)."""
    total = start + sum(ops)
    if rng.random() < GUESS_RATE[rare][len(ops) > 1]:
        guess = abs(total + rng.choice((-1, 1)) * rng.randint(1, 9))
        return f"I think it is about {guess}.\n#### {guess}"
    slip = (rng.randrange(len(ops)), rng.choice((-2, -1, 1, 2))) if rng.random() < 0.1 else (-1, 0)
    return worked_answer(start, ops, slip)


# ---------------------------------------------------------------- tokenizer and SFT policy
def build_tokenizer(texts, vocab_size, path):
    """Byte-level BPE, every digit its own token (numbers are digit strings), saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
    # the chat template inside tokenizer_config.json
    tok.save_pretrained(path, save_jinja_files=False)
    config_path = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_path))
    # a class name transformers 4.x and 5.x know
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return data.load_tokenizer(path)


@torch.no_grad()
def init_weights(model):
    """HF's init for training from scratch: normal(0, initializer_range), norms 1, biases 0."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, model.config.raw.get("initializer_range", 0.02))
    return model


def train_sft(demos, tok, hf_config, steps, batch_size, lr, seed):
    """Our transformer from scratch on (prompt ids, response ids): response-token NLL, AdamW."""
    torch.manual_seed(seed)
    policy = init_weights(M.build(M.model_config(hf_config)))
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, g = max(1, steps // 20), torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine down to a tenth
            cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min((step + 1) / warmup, cosine)
        rows = torch.randint(len(demos), (batch_size,), generator=g).tolist()
        ids, attn, resp = data.collate([demos[i][0] for i in rows], [demos[i][1] for i in rows],
                                       tok.pad_token_id)
        logp = M.token_logprobs(policy, ids, attn)  # (B, T)
        loss = -(logp * resp).sum() / resp.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"toy sft step {step}/{steps}: loss {loss.item():.3f}")
    return policy.eval()


# ---------------------------------------------------------------- the reward model's backbone
# PbPO's reward model is a linear head on a frozen backbone's features. The SFT policy's own
# features cannot rank two guesses ("I think it is about 17" against "... about 23"): that needs
# the answer. So the toy also builds a larger backbone, as real reward models are made: pretrained
# without labels on text of the task. It is the SFT policy grown by RM_BLOCKS blocks (each the
# identity at first), trained on fresh problems that none of the train, validation and held-out
# splits holds. It reads a problem and a crowd's answer to it (mostly estimates), the answer's
# number sometimes replaced (by another answer's, or by one drawn near the anchor), and says at the
# last token, one logit per distance d in RM_DISTANCES, "is this number within d of the anchor?".
# The anchor is the number the SFT policy's own greedy worked answer to the problem ends with (its
# response started with the question's first number, as a worked answer starts, so it works
# instead of guessing): the policy's arithmetic, right or wrong, as self-training uses a model's
# own outputs. The targets read no problem's answer, gold reward or oracle; the crowd's answers,
# the input text, are written from the problems, as a corpus's authors write.
# experiments/rm_backbone.py is the harness this recipe was chosen with, and the probe that
# measures it.
RM_BLOCKS = 2
RM_STEPS = {False: 1400, True: 10}  # by quick
RM_BATCH = 16  # crowd answers a step, and as many with their number replaced
RM_ESTIMATES = 0.8  # the share of the crowd's answers that are estimates
RM_DISTANCES = (0, 1, 2, 4, 8)  # one read-out logit each
RM_NEAR = 0.5  # the share of replaced numbers drawn 1 to RM_NEAR_MAX off the anchor (then abs)
RM_NEAR_MAX = 12


def answer_off_by(start, ops, error, guess, rng):
    """An estimate 'I think it is about t+e', or worked steps whose slip puts the result e off."""
    total = start + sum(ops)
    if total + error < 0:
        error = -error
    if guess:
        return f"I think it is about {total + error}.\n#### {total + error}"
    if error == 0:
        return worked_answer(start, ops)
    step = rng.randrange(len(ops))
    if start + sum(ops[:step + 1]) + error < 0:  # no negative numbers in the chain
        step = len(ops) - 1
    return worked_answer(start, ops, (step, error))


def crowd_answer(start, ops, rng, scale=3.0, estimates=RM_ESTIMATES, slips=0.1):
    """The pretraining crowd: that share of its answers are estimates, t ± k with
    k ~ Laplace(scale) (estimates cluster near the answer); the rest worked answers, `slips` of
    them with a slip of 1 or 2."""
    if rng.random() < estimates:
        k = min(20, int(rng.expovariate(1 / scale)))
        return answer_off_by(start, ops, k * rng.choice((-1, 1)), True, rng)
    slip = rng.choice((-2, -1, 1, 2)) if rng.random() < slips else 0
    return answer_off_by(start, ops, slip, False, rng)


def replace_number(answer, number):
    """The answer with its result (where it states it, and the '#### N' line) set to number."""
    body = answer.rsplit("\n#### ", 1)[0]
    if body.startswith("I think"):
        return f"I think it is about {number}.\n#### {number}"
    return f"{body.rsplit(' = ', 1)[0]} = {number}.\n#### {number}"


def grow(sft, extra, identity=True):
    """The SFT policy with `extra` blocks on top, each the identity at first (its o_proj and
    down_proj zero), so the grown model computes what the SFT policy does until it is trained.
    identity=False: the new blocks as init_weights draws them, outputs and all."""
    config = dict(sft.config.raw, num_hidden_layers=sft.config.num_hidden_layers + extra)
    big = init_weights(M.build(M.model_config(config)))
    big.load_state_dict(sft.state_dict(), strict=False)  # the new blocks keep their init
    if identity:
        with torch.no_grad():
            for block in big.model.layers[sft.config.num_hidden_layers:]:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    return big


def pad_left(rows, pad_id):  # [ids] -> ids, attention mask, each (B, S), the last tokens at S - 1
    S = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (S - len(x)) + x for x in rows])
    attn = torch.tensor([[False] * (S - len(x)) + [True] * len(x) for x in rows])
    return ids, attn


def top_token_features(model, ids, attn):
    """PbPO's φ (the final normed hidden state at the last token, unit norm) of left-padded rows,
    with gradients: the top block run for the last position only (its keys and values still span
    the sequence), all φ needs, at a fraction of the full forward's cost."""
    B, S = ids.shape
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, S)
    freqs = position_ids[..., None].float() * model.inv_freq  # (B, S, hd/2)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # (B, 1, S, hd/2)
    mask = M.attn_mask(attn, torch.arange(S))  # (B, 1, S, S)
    x = model.model.embed_tokens(ids)  # (B, S, D)
    *below, top = model.model.layers
    for block in below:
        x = block(x, cos, sin, mask)
    a = top.self_attn
    h = top.input_layernorm(x)
    q = a.q_norm(a.q_proj(h[:, -1:]).view(B, 1, a.n_head, a.hd)).transpose(1, 2)  # (B, H, 1, hd)
    k = a.k_norm(a.k_proj(h).view(B, S, a.n_kv, a.hd)).transpose(1, 2)  # (B, K, S, hd)
    v = a.v_proj(h).view(B, S, a.n_kv, a.hd).transpose(1, 2)  # (B, K, S, hd)
    q = M.apply_rope(q, cos[:, :, -1:], sin[:, :, -1:])
    k = M.apply_rope(k, cos, sin)
    y = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, :, -1:], enable_gqa=a.n_kv != a.n_head)  # (B, H, 1, hd)
    x = x[:, -1] + a.o_proj(y.transpose(1, 2).reshape(B, -1))  # (B, D)
    x = x + top.mlp(top.post_attention_layernorm(x))
    return torch.nn.functional.normalize(model.model.norm(x).float(), dim=-1)  # (B, D)


@torch.no_grad()
def self_anchors(policy, tok, questions, batch_size=256):
    """The number each question's greedy worked answer by `policy` ends with. Its response is
    prefilled with the question's first number, as a worked answer starts ('12 + 5 = ...'): left
    to itself, the rare setting's policy would mostly guess, and the anchor would be a guess. The
    '#### N' it writes, else (a chain cut short) the last number it wrote; as a whole number of
    at most 10⁶, its sign dropped (an untrained policy may write any digits)."""
    starts = [data.NUMBER.findall(q)[0] for q in questions]
    prompts = [data.encode_prompt(tok, q) + tok(s, add_special_tokens=False).input_ids
               for q, s in zip(questions, starts)]
    responses = M.sample(policy, prompts, 40, 0.0, batch_size=batch_size,
                         eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    anchors = []
    for s, y in zip(starts, responses):
        text = s + data.decode(tok, y)
        number = data.extract_answer(text) or data.NUMBER.findall(text)[-1]
        anchors.append(min(abs(int(float(number.replace(",", "")))), 10**6))
    return anchors


def train_rm_backbone(sft, tok, problems, steps, seed, lr=3e-3):
    """The grown SFT policy trained as the comment above says, on (question, start, ops) problems
    (the crowd's text is written from them; the anchors are the SFT policy's): its new blocks and
    final norm (the SFT's blocks and embedding frozen), AdamW with a warm-up and a cosine down to
    a tenth, gradients clipped at 1. The read-out is dropped after."""
    rng = random.Random(seed + 1)
    docs = [(q, crowd_answer(start, ops, rng)) for q, start, ops in problems]
    anchors = self_anchors(sft, tok, [q for q, _, _ in problems])
    number = lambda answer: int(answer.rsplit("#### ", 1)[1])
    torch.manual_seed(seed)  # the new blocks' and the read-out's initialisation
    model = grow(sft, RM_BLOCKS)
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[:sft.config.num_hidden_layers].requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, len(RM_DISTANCES))
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    encode = lambda q, a: (data.encode_prompt(tok, q) + tok(a, add_special_tokens=False).input_ids
                           + [tok.eos_token_id])
    warmup = max(1, steps // 20)
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine down to a tenth
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
            cosine = 0.1 + (1 - 0.1) * cosine
            group["lr"] = lr * min((step + 1) / warmup, cosine)
        rows = torch.randint(len(problems), (2 * RM_BATCH,), generator=g).tolist()
        real = rows[:RM_BATCH]
        stated = [number(docs[i][1]) for i in real]
        replaced = []
        for i, j in zip(real, rows[RM_BATCH:]):  # j: the answer that lends another number
            q, a = docs[i]
            other = number(docs[j][1])
            if rng.random() < RM_NEAR:  # or one near the anchor, 1 to RM_NEAR_MAX off
                other = abs(anchors[i] + rng.choice((-1, 1)) * rng.randint(1, RM_NEAR_MAX))
            other = other if other != number(a) else number(a) + 1
            replaced.append(encode(q, replace_number(a, other)))
            stated.append(other)
        texts = [encode(*docs[i]) for i in real] + replaced
        logits = head(top_token_features(model, *pad_left(texts, tok.pad_token_id)))  # (2B, K)
        distance = (torch.tensor(stated) - torch.tensor([anchors[i] for i in real] * 2)).abs()
        within = (distance[:, None] <= torch.tensor(RM_DISTANCES)).float()  # (2B, K) targets
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, within)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"toy rm backbone step {step}/{steps}: loss {loss.item():.3f}")
    return model.eval().requires_grad_(False)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------- the build
def files_digest(paths):  # SHA-256 of the files' names and bytes, in the order given
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()


def source_digest():  # of the code a build runs: another version of it builds again
    return files_digest((__file__, M.__file__, data.__file__))[:16]


def build(out_dir="out/toy", seed=0, quick=False, rare=False):
    """Build (or reuse) the task: tokenizer + SFT policy in out_dir/sft, GSM8K-layout train /
    held-out / validation prompt files, prefs.jsonl (two temperature-1 SFT samples per train
    prompt, ranked by gold_reward, ties skipped) and the RM backbone in out_dir/rm
    (train_rm_backbone). Tune on valid.jsonl, report on heldout.jsonl.
    rare: the rare setting (module docstring), the demonstrators of noisy_demo(rare=True); the
    prompt files are the default build's. build.json is written last, with the build's key
    ([seed, quick], plus "rare" in that setting, then source_digest()): a directory without it,
    without one of the files, with another key or with a build.json that cannot be read is
    rebuilt.
    The build runs on BUILD_THREADS threads, whatever the machine has: the same bits on any
    machine of the same CPU kind, torch and tokenizers versions (their kernels and the BPE
    trainer are what else it depends on)."""
    paths = ToyPaths(*(os.path.join(out_dir, f) for f in FILES))
    marker = os.path.join(out_dir, "build.json")
    key = [seed, quick] + (["rare"] if rare else []) + [source_digest()]
    if os.path.exists(marker):
        if built_key(marker) == key and all(map(os.path.exists, paths)):
            return paths
        os.remove(marker)  # another build's, or unreadable: this one overwrites its files
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        make(paths, marker, key, seed, quick, rare)
    finally:  # the caller's own count again (a trainer's checkpoint records it)
        torch.set_num_threads(threads)
    return paths


def make(paths, marker, key, seed, quick, rare):  # build()'s work, once it found none to reuse
    out_dir = os.path.dirname(marker)
    t0, rng = time.time(), random.Random(seed)
    n_heldout, n_train, n_demos = (32, 32, 256) if quick else (500, 1000, 20000)
    problems = {}  # question -> (start, ops); unique questions, so the splits are disjoint
    while len(problems) < n_heldout + n_train + n_demos:
        q, start, ops = toy_problem(rng)
        problems.setdefault(q, (start, ops))
    questions = list(problems)
    heldout, train = questions[:n_heldout], questions[n_heldout:n_heldout + n_train]
    demo_questions = questions[n_heldout + n_train:]
    valid, valid_rng = {}, random.Random(seed + 1_000_003)  # its own stream: the rest is unchanged
    while len(valid) < n_heldout:
        q, start, ops = toy_problem(valid_rng)
        if q not in problems:
            valid.setdefault(q, (start, ops))
    problems.update(valid)
    os.makedirs(paths.model, exist_ok=True)
    for path, qs in ((paths.heldout, heldout), (paths.train, train), (paths.valid, list(valid))):
        write_jsonl(path, [{"question": q, "answer": worked_answer(*problems[q])} for q in qs])
    answers = [noisy_demo(*problems[q], rng, rare) for q in demo_questions]
    texts = [f"{q} {a}" for q, a in zip(demo_questions, answers)]
    tok = build_tokenizer(texts, 320 if quick else 384, paths.model)
    eos = [tok.eos_token_id]  # a demonstration ends as a finished sample does
    demos = [(data.encode_prompt(tok, q), tok(a, add_special_tokens=False).input_ids + eos)
             for q, a in zip(demo_questions, answers)]
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                 "vocab_size": len(tok),
                 "hidden_size": 32 if quick else 64, "intermediate_size": 64 if quick else 192,
                 "num_hidden_layers": 1 if quick else 2, "num_attention_heads": 2 if quick else 4,
                 "num_key_value_heads": 2 if quick else 4, "max_position_embeddings": 256,
                 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
                 "tie_word_embeddings": True, "initializer_range": 0.02,
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}
    steps, batch_size = (20, 16) if quick else (1500, 64)
    policy = train_sft(demos, tok, hf_config, steps, batch_size, 3e-3, seed)
    M.save_pretrained(policy, paths.model)
    answers = {q: data.extract_answer(worked_answer(*problems[q])) for q in heldout + train}

    def texts(qs, n, temperature, seed):
        ids = [data.encode_prompt(tok, q) for q in qs]
        responses = M.sample(policy, ids, 48, temperature, n=n, seed=seed, batch_size=256,
                             eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
        return [data.decode(tok, y) for y in responses]

    greedy = texts(heldout, 1, 0.0, seed)
    accuracy = sum(data.is_correct(t, answers[q]) for t, q in zip(greedy, heldout)) / len(heldout)
    samples = texts(train, 2, 1.0, seed + 1)
    prefs = []
    for q, a, b in zip(train, samples[0::2], samples[1::2]):
        ra, rb = gold_reward(a, answers[q]), gold_reward(b, answers[q])
        if ra != rb:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            prefs.append({"prompt": q, "chosen": chosen, "rejected": rejected,
                          "answer": answers[q], "score_oracle": "gold",  # the scores it paid for
                          "chosen_score": max(ra, rb), "rejected_score": min(ra, rb)})
    write_jsonl(paths.prefs, prefs)
    t_rm = time.time()
    fresh = []  # the RM backbone's problems: in none of the three splits (demonstrations may recur)
    fresh_rng = random.Random(seed + 7_000_003)
    splits = set(heldout + train + list(valid))
    while len(fresh) < n_demos:
        q, start, ops = toy_problem(fresh_rng)
        if q not in splits:
            fresh.append((q, start, ops))
    rm = train_rm_backbone(policy, tok, fresh, RM_STEPS[quick], seed)
    M.save_pretrained(rm, paths.rm)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the policy's token ids
        shutil.copyfile(os.path.join(paths.model, name), os.path.join(paths.rm, name))
    stats = {"key": key, "heldout_greedy_accuracy": accuracy, "pairs": len(prefs),
             "rm_seconds": round(time.time() - t_rm, 1), "seconds": round(time.time() - t0, 1)}
    print(f"toy task built in {out_dir}: {json.dumps(stats)}")
    os.sync()  # every file above on disk before the marker says they are complete
    tmp = f"{marker}.tmp"
    try:  # last, atomically: a crash leaves no marker or a whole one, never an empty file
        with open(tmp, "w") as f:
            json.dump(stats, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
    finally:  # also when stopped by Ctrl-C
        if os.path.exists(tmp):
            os.remove(tmp)


def built_key(marker):
    """The build key recorded in build.json, None for a marker that cannot be read or has another
    shape. It is a cache marker (written last, nothing else depends on it), so a bad one means
    'no finished build': the caller rebuilds, and this says so."""
    try:
        stats = data.parse_json(data.read_text(marker), marker)
    except (OSError, ValueError) as e:
        print(f"{e}; not a finished build's marker: rebuilding the toy task")
        return None
    if not isinstance(stats, dict) or not isinstance(stats.get("key"), list):
        print(f"{marker}: expected a JSON object with a 'key' list; not a finished build's "
              "marker: rebuilding the toy task")
        return None
    return stats["key"]


def fill_defaults(cfg, rank, world):
    """A run given no --model: the toy task's SFT policy, and its files for the data flags left
    empty (--prompts, --prefs, --heldout, --rm_backbone: the toy's reward-model backbone);
    built once into out/toy by rank 0, the others waiting."""
    paths = build() if rank == 0 else None
    if world > 1:
        dist.barrier()
    paths = paths or build()
    cfg.model, cfg.heldout = paths.model, cfg.heldout or paths.heldout
    for name, path in (("prompts", paths.train), ("prefs", paths.prefs), ("rm_backbone", paths.rm)):
        if hasattr(cfg, name):
            setattr(cfg, name, getattr(cfg, name) or path)


@dataclass
class Config:
    out_dir: str = knob("out/toy", "where the task is built")
    seed: int = knob(0, "problems, demonstrations and SFT initialisation")
    quick: bool = knob(False, "the reduced build the tests use")
    rare: bool = knob(False, "the rare setting: the crowd guesses on 2- and 1-step problems at "
                             "0.97 and 0.9")


if __name__ == "__main__":
    import run
    cfg = run.parse_flags(Config, __doc__)
    with run.friendly_errors("toy.py"):
        print(build(cfg.out_dir, cfg.seed, cfg.quick, cfg.rare))

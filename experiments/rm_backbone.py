"""
Can a larger reward-model backbone, built without labels, give PbPO's linear head features that
rank held-out pairs? The measurement, and two label-free builds tried.

The probe is PbPO's reward model as the code has it: `reward.RewardModel.phi` (the backbone's final
normed hidden state at the last response token, L2-normalised), a Bradley–Terry head fit on the
toy preference file (train prompts), scored on held-out gold pairs (two temperature-1 SFT samples
per validation prompt, ties dropped: `experiments.diagnose.gold_pairs`). The accuracy comes with a
95% interval (normal approximation) and broken down by the kinds of the two responses (a guess
"I think it is about N" or a worked answer): a guess-against-guess pair is ranked by how close
each number is to the answer, which no feature of the response's style tells.

Builds (each from fresh problems, disjoint from the train, validation and held-out prompts, on a
random stream of its own; no gold reward, no oracle call, no label):

  --objective=detect   the SFT policy grown by --extra identity-initialised blocks on top (the
                       SFT's blocks and embedding frozen), trained to tell a pretraining crowd's
                       answers (worked answers with slips, estimates t ± Laplace(--scale)) from
                       the same answers with the final number replaced by another document's
                       (ELECTRA's replaced-token detection, on the answer's number), read at the
                       last token through a linear layer dropped after the build.
  --objective=lm       the same grown model, language modelling on worksheets: one writer
                       answers --turns problems, every answer off by the writer's own amount
                       (0 to 9), so turn 1's error predicts the later turns' numbers.

  python -m experiments.rm_backbone --toy_dir=out/toy                      # SFT features only
  python -m experiments.rm_backbone --toy_dir=out/toy --steps=400          # + a detect build
  python -m experiments.rm_backbone --toy_dir=out/toy_rare --rare --steps=400
  python -m experiments.rm_backbone --toy_dir=out/toy --objective=lm --steps=1500

One thread (the harness sets it), so the times compare across machines of any core count.

Measured (seed 0; held-out accuracy ± 95% half-width, n pairs; guess-guess in brackets):

  setting   SFT features (2 x 64)     detect, 400 steps (4 x 64)   detect, longer
  standard  0.712 ± 0.045 (392; 0.51)  0.827 ± 0.037 (0.74)         0.862 ± 0.034 at 1200 steps
  rare      0.487 ± 0.046 (450; 0.50)  0.696 ± 0.043 (0.69)         0.833 ± 0.034 at 1500 steps
  lm (worksheets), standard, 1500 steps: 0.681 ± 0.046 (0.47)

400 steps take about 50 s on one idle core (114 s on the shared machine here); the longer rows
took 3 to 7 minutes: the target of 0.85 in both settings within the toy build's 40 s is not met.
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import model as M
import run
import toy
from experiments.diagnose import fit_head, gold_pairs
from reward import RewardModel
from run import knob
from train_selm import load_preferences


# ---------------------------------------------------------------- the probe
@torch.no_grad()
def rm_features(backbone, triples, pad_id, batch_size=128):
    """(Φ better (n, d), Φ worse (n, d)) as PbPO's sequence-level reward model computes them."""
    rm = RewardModel(backbone, "seq", normalize=True)
    prompts, better, worse = map(list, zip(*triples))
    out = []
    for responses in (better, worse):
        rows = []
        for i in range(0, len(prompts), batch_size):
            ids, attn, resp = data.collate(prompts[i:i + batch_size],
                                           responses[i:i + batch_size], pad_id)
            rows.append(rm.phi(ids, attn, resp))
        out.append(torch.cat(rows))
    return out


def kind(tok, response):
    return "guess" if data.decode(tok, response).startswith("I think") else "worked"


def probe(backbone, tok, train, heldout):
    """A BT head on the train pairs' features -> held-out accuracy, its 95% half-width, by kind."""
    w, _ = fit_head(*rm_features(backbone, train, tok.pad_token_id))
    better, worse = rm_features(backbone, heldout, tok.pad_token_id)
    right = ((better @ w) > (worse @ w)).tolist()
    accuracy = sum(right) / len(right)
    by_kind = {}
    for ok, (_, b, w_) in zip(right, heldout):
        by_kind.setdefault("-".join(sorted((kind(tok, b), kind(tok, w_)))), []).append(ok)
    return {"accuracy": accuracy, "ci95": 1.96 * math.sqrt(accuracy * (1 - accuracy) / len(right)),
            "n": len(right), "by_kind": {k: [len(v), sum(v) / len(v)] for k, v in by_kind.items()}}


# ---------------------------------------------------------------- the pretraining text
def fresh_problems(rng, excluded, n):
    """n problems (question, start, ops) whose question is none of `excluded`."""
    out = []
    while len(out) < n:
        question, start, ops = toy.toy_problem(rng)
        if question not in excluded:
            out.append((question, start, ops))
    return out


def answer_off_by(start, ops, error, guess, rng):
    """An estimate 'I think it is about t+e', or worked steps whose slip puts the result e off."""
    total = start + sum(ops)
    if total + error < 0:
        error = -error
    if guess:
        return f"I think it is about {total + error}.\n#### {total + error}"
    if error == 0:
        return toy.worked_answer(start, ops)
    step = rng.randrange(len(ops))
    if start + sum(ops[:step + 1]) + error < 0:  # no negative numbers in the chain
        step = len(ops) - 1
    return toy.worked_answer(start, ops, (step, error))


def crowd_answer(start, ops, rng, scale):
    """The pretraining crowd: half estimates, t ± k with k ~ Laplace(scale) (estimates cluster
    near the answer); half worked answers, 10% with a slip of 1 or 2."""
    if rng.random() < 0.5:
        k = min(20, int(rng.expovariate(1 / scale)))
        return answer_off_by(start, ops, k * rng.choice((-1, 1)), True, rng)
    slip = rng.choice((-2, -1, 1, 2)) if rng.random() < 0.1 else 0
    return answer_off_by(start, ops, slip, False, rng)


def replace_number(answer, number):
    """The answer with its result (the '####' line and where the answer states it) set to number."""
    body = answer.rsplit("\n#### ", 1)[0]
    if body.startswith("I think"):
        return f"I think it is about {number}.\n#### {number}"
    return f"{body.rsplit(' = ', 1)[0]} = {number}.\n#### {number}"


def encode_chat(tok, messages):
    """(ids, loss mask) of a chat as toy.CHAT_TEMPLATE renders it; the mask marks the assistant's
    tokens and its EOS."""
    ids, mask = [tok.bos_token_id], [0]
    for m in messages:
        text = tok(m["content"], add_special_tokens=False).input_ids
        ids += [tok.convert_tokens_to_ids(f"<|{m['role']}|>")] + text
        mask += [0] + [int(m["role"] == "assistant")] * len(text)
        if m["role"] == "assistant":
            ids.append(tok.eos_token_id)
            mask.append(1)
    return ids, mask


def pad_batch(docs, pad_id):  # [(ids, mask)] -> ids, attention mask, loss mask, each (B, S)
    S = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), S), pad_id)
    attn = torch.zeros(len(docs), S, dtype=torch.bool)
    loss_mask = torch.zeros(len(docs), S)
    for i, (x, m) in enumerate(docs):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = True
        loss_mask[i, :len(x)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss_mask


# ---------------------------------------------------------------- the backbone
def grow(sft, extra):
    """The SFT policy with `extra` blocks on top, each the identity at the start (its o_proj and
    down_proj zero): the grown model computes what the SFT policy does until it is trained."""
    config = dict(sft.config.raw, num_hidden_layers=sft.config.num_hidden_layers + extra)
    big = toy.init_weights(M.build(M.model_config(config)))
    big.load_state_dict(sft.state_dict(), strict=False)
    with torch.no_grad():
        for block in big.model.layers[sft.config.num_hidden_layers:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return big


def last_token_features(model, ids, attn):  # φ as RewardModel.phi takes it, with gradients
    hidden = model(ids, attn).float()  # (B, S, D)
    last = attn.shape[1] - 1 - attn.flip(-1).int().argmax(-1)  # (B,)
    return F.normalize(hidden[torch.arange(len(hidden)), last], dim=-1)  # (B, D)


def train(model, trainable, loss_of, steps, lr, seed):
    """AdamW on `trainable` with the toy SFT's schedule; loss_of(step, generator) -> the loss."""
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine down to a tenth
            cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min((step + 1) / warmup, cosine)
        loss = loss_of(step, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"rm backbone step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    return model.eval().requires_grad_(False)


def build_detector(sft, tok, problems, cfg):
    """Replaced-number detection (module docstring) on the grown SFT policy."""
    rng = random.Random(cfg.seed + 1)
    docs = [(q, crowd_answer(start, ops, rng, cfg.scale)) for q, start, ops in problems]
    model = grow(sft, cfg.extra)
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[:sft.config.num_hidden_layers].requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, 1)  # the detector's read-out, not kept
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    chat = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    def loss_of(step, g):
        rows = torch.randint(len(docs), (2 * cfg.batch_size,), generator=g).tolist()
        real, donors = rows[:cfg.batch_size], rows[cfg.batch_size:]
        replaced = []
        for i, j in zip(real, donors):
            q, a = docs[i]
            number = a.rsplit("#### ", 1)[1]
            other = docs[j][1].rsplit("#### ", 1)[1]
            replaced.append((q, replace_number(a, other if other != number else int(number) + 1)))
        batch = [encode_chat(tok, chat(*docs[i])) for i in real]
        batch += [encode_chat(tok, chat(q, a)) for q, a in replaced]
        ids, attn, _ = pad_batch(batch, tok.pad_token_id)
        logits = head(last_token_features(model, ids, attn)).squeeze(-1)  # (2B,)
        is_real = torch.cat([torch.ones(cfg.batch_size), torch.zeros(cfg.batch_size)])
        return F.binary_cross_entropy_with_logits(logits, is_real)

    return train(model, trainable, loss_of, cfg.steps, cfg.lr, cfg.seed)


def build_worksheet_lm(sft, tok, problems, cfg):
    """Language modelling on worksheets (module docstring) on the grown SFT policy."""
    rng = random.Random(cfg.seed + 1)
    docs = []
    for first in range(0, len(problems) - cfg.turns + 1, cfg.turns):
        error = rng.choice((0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9))  # the writer's own amount
        guesses = rng.choice((0.0, 0.3, 0.7, 1.0))
        messages = []
        for q, start, ops in problems[first:first + cfg.turns]:
            a = answer_off_by(start, ops, error * rng.choice((-1, 1)), rng.random() < guesses, rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        docs.append(encode_chat(tok, messages))
    model = grow(sft, cfg.extra)
    trainable = list(model.parameters())

    def loss_of(step, g):
        rows = torch.randint(len(docs), (cfg.batch_size,), generator=g).tolist()
        ids, attn, loss_mask = pad_batch([docs[i] for i in rows], tok.pad_token_id)
        logp = M.token_logprobs(model, ids, attn)  # (B, S)
        return -(logp * loss_mask).sum() / loss_mask.sum()

    return train(model, trainable, loss_of, cfg.steps, cfg.lr, cfg.seed)


@dataclass
class Config:
    toy_dir: str = knob("out/toy", "the toy task (built if missing)")
    rare: bool = knob(False, "the toy's rare setting (as toy.py --rare)")
    objective: str = knob("detect", "detect (replaced-number detection) or lm (worksheets)")
    steps: int = knob(0, "training steps of the larger backbone; 0: probe the SFT features only")
    batch_size: int = knob(32, "documents a step (detect: as many again with a replaced number)")
    lr: float = knob(3e-3, "peak learning rate")
    extra: int = knob(2, "blocks grown on top of the SFT policy")
    problems: int = knob(20000, "fresh problems of the pretraining text")
    scale: float = knob(3.0, "the crowd's estimates: |error| ~ Laplace(scale)")
    turns: int = knob(3, "problems a worksheet (lm)")
    seed: int = knob(0, "")
    save: str = knob("", "write the built backbone (and the tokenizer) here")
    out: str = knob("", "append the results as a JSON line to this file")


if __name__ == "__main__":
    cfg = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/rm_backbone.py"):
        torch.set_num_threads(1)
        paths = toy.build(cfg.toy_dir, rare=cfg.rare)
        tok, sft = data.load_tokenizer(paths.model), M.from_pretrained(paths.model).eval()
        train_pairs = [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])
                       for p in load_preferences(paths.prefs, tok, 256)]
        heldout = gold_pairs(sft, tok, data.load_prompts(paths.valid, tok, 256), cfg.seed)
        rows = [dict(backbone="sft", **probe(sft, tok, train_pairs, heldout))]
        if cfg.steps:
            splits = (paths.train, paths.valid, paths.heldout)
            excluded = {p["prompt"] for f in splits for p in data.load_prompts(f, tok, 256)}
            t0 = time.time()
            problems = fresh_problems(random.Random(cfg.seed + 7_000_003), excluded, cfg.problems)
            build_fn = build_detector if cfg.objective == "detect" else build_worksheet_lm
            torch.manual_seed(cfg.seed)  # the new blocks' and the read-out's initialisation
            backbone = build_fn(sft, tok, problems, cfg)
            seconds = time.time() - t0
            rows.append(dict(backbone=f"{cfg.objective}, {cfg.steps} steps", seconds=seconds,
                             **probe(backbone, tok, train_pairs, heldout)))
            if cfg.save:
                M.save_pretrained(backbone, cfg.save)
                tok.save_pretrained(cfg.save)
        for r in rows:
            kinds = ", ".join(f"{k} {v[1]:.2f} (n={v[0]})" for k, v in sorted(r["by_kind"].items()))
            took = f", built in {r['seconds']:.0f} s" if "seconds" in r else ""
            print(f"{cfg.toy_dir}  {r['backbone']:<22} held-out accuracy {r['accuracy']:.3f} ± "
                  f"{r['ci95']:.3f} (n={r['n']}){took}; {kinds}")
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps({"config": asdict(cfg), "rows": rows}) + "\n")

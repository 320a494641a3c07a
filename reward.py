"""The reward model r_w(τ) = ⟨w, Φ(τ)⟩ on a frozen backbone, the Bradley–Terry loss and the oracles
that label pairs: gold, gsm8k, rm:PATH. Tests: python -m pytest -q tests/test_reward.py"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model as M
import ranks
from explore import trajectory_features


class RewardModel(nn.Module):  # r_w on a frozen backbone, as in the theory; ‖w‖ ≤ B by projection
    def __init__(self, backbone, level="seq", bound=10.0, normalize=True):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.level = level
        self.bound = bound  # B: ‖w‖ ≤ B
        self.normalize = normalize
        self.w = nn.Parameter(torch.zeros(backbone.config.hidden_size))  # (d,) starts at r ≡ 0

    def phi(self, input_ids, attention_mask, response_mask):  # fp32; no_grad is the caller's
        hidden = self.backbone(input_ids, attention_mask).float()  # (B, S, D) final hidden states
        if self.normalize:  # unit-norm features keep Σ well scaled whatever the backbone's scale
            hidden = F.normalize(hidden, dim=-1)
        if self.level == "token":
            return hidden * response_mask[..., None]  # (B, S, D)
        last = response_mask.shape[1] - 1 - response_mask.flip(-1).int().argmax(-1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)

    def forward(self, phi):  # r_w(τ) = ⟨w, Φ(τ)⟩ (B,) from phi (B, D) or (B, S, D), or Φ
        return trajectory_features(phi) @ self.w

    @torch.no_grad()
    def project(self):
        self.w.mul_(min(1.0, self.bound / (self.w.norm().item() + 1e-12)))


def bt_loss(r0, r1, labels):  # L_BT = −mean log σ(s (r(τ¹) − r(τ⁰))), s = +1 where τ¹ won, else −1
    return -F.logsigmoid((2.0 * labels.float() - 1.0) * (r1 - r0)).mean()  # s = 2 label − 1


class Oracle:  # scores responses with r*, labels pairs o ~ Bernoulli(σ((r*(τ¹) − r*(τ⁰)) / temp))
    def __init__(self, score_fn, temp=0.0, spec="", device="cpu"):
        self.score_fn = score_fn
        self.temp = temp
        self.spec = spec  # --oracle; gold and gsm8k score against each prompt's answer
        self.device = device  # where the count is summed over ranks (nccl: a GPU)
        self.calls = 0  # of the whole job, all ranks; a resumed run restores it

    def check(self, items):  # refused before the first call: a record this oracle cannot score
        missing = [item.get("where", "a prompt") for item in items if item.get("answer") is None]
        if missing and self.spec in ("gold", "gsm8k"):
            raise ValueError(f"{missing[0]}: --oracle={self.spec} needs an 'answer' field for "
                             "every prompt (--oracle=rm:PATH scores data without one)")

    def score(self, prompts, responses):  # r* of each (prompt record, response text): one call each
        scores = torch.tensor([float(s) for s in self.score_fn(prompts, responses)])  # (n,)
        self.calls += int(ranks.all_sum([len(responses)], self.device)[0])  # collective
        if not torch.isfinite(scores).all():  # named by the first item scored inf or NaN
            i = int(torch.isfinite(scores).int().argmin())
            raise ValueError(f"oracle returned {scores[i].item()} for pair item {i}: prompt "
                             f"{str(prompts[i]['prompt'])[:80]!r}, response {responses[i][:80]!r}")
        return scores

    def label(self, s0, s1, generator=None):  # o = 1 where τ¹ won; at temp 0 a tie is a fair coin
        p = torch.sigmoid((s1 - s0) / self.temp) if self.temp > 0 else (1 + torch.sign(s1 - s0)) / 2
        return (torch.rand(p.shape, generator=generator) < p).long()  # (n,)

    def evaluate(self, policy, tok, items, max_new_tokens, eos_ids=None, temperature=0.0,
                 **sampling):  # '#### N' accuracy and mean score over all ranks; calls not counted
        responses = M.sample(policy, [p["prompt_ids"] for p in items], max_new_tokens, temperature,
                             pad_id=tok.pad_token_id, eos_ids=eos_ids or [tok.eos_token_id],
                             **sampling)
        texts = [data.decode(tok, y) for y in responses]
        reward = sum(map(float, self.score_fn(items, texts)))
        correct = sum(data.is_correct(t, p["answer"]) for t, p in zip(texts, items)
                      if p.get("answer") is not None)
        correct, reward, n = ranks.all_sum([correct, reward, len(items)], policy.inv_freq.device)
        return {"accuracy": correct / max(n, 1.0), "reward": reward / max(n, 1.0), "n": int(n)}


def hf_reward_scorer(path, device="cpu", batch_size=16):  # r* by a local HF reward model
    from transformers import AutoModelForSequenceClassification

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--oracle=rm:{path}: expected a local HF reward model directory "
                                "with config.json")
    tok = data.load_tokenizer(path)  # no code of the directory is run
    rm = AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=True, trust_remote_code=False).to(device).eval()
    tok.padding_side = "right"

    def as_text(prompt, response):
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tok.chat_template:
            turn = {"role": "assistant", "content": response}
            return data.render_chat(tok, msgs + [turn], "a response to score")
        return "".join(m["content"] for m in msgs) + response

    @torch.no_grad()
    def score(prompts, responses):
        texts = [as_text(p["prompt"], r) for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                      truncation=True).to(device)
            out += rm(**enc).logits[:, 0].float().cpu().tolist()
        return out

    return score


def make_oracle(spec, temp=0.0, device="cpu"):
    if spec in ("gold", "gsm8k"):  # both score a response against its prompt's answer
        from toy import gold_reward
        reward_of = gold_reward if spec == "gold" else data.is_correct
        fn = lambda items, texts: [float(reward_of(t, i["answer"])) for i, t in zip(items, texts)]
    elif spec.startswith("rm:"):
        fn = hf_reward_scorer(spec[3:], device)
    else:
        raise ValueError(f"--oracle={spec!r}: expected gold, gsm8k or rm:PATH")
    return Oracle(fn, temp, spec, device)

import math

import pytest
import torch

from reward import Oracle, bt_loss, make_oracle


class LinearHead(torch.nn.Module):
    """Only the head of RewardModel: r_w(Φ) = ⟨w, Φ⟩, the part these tests exercise."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, phi):
        return phi @ self.w


def test_bt_loss_and_gradient_match_hand_computation():
    r0 = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    r1 = torch.tensor([1.0, 0.5, -0.5], requires_grad=True)
    labels = torch.tensor([1, 0, 1])
    loss = bt_loss(r0, r1, labels)
    sig = lambda z: 1 / (1 + math.exp(-z))
    margins = [0.7, -1.5, -2.5]  # s_i (r1 - r0): +0.7, -(1.5), +(-2.5)
    expected = -sum(math.log(sig(m)) for m in margins) / 3
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    # d/dr1 of -log σ(s Δ) = -s (1 - σ(s Δ)), averaged over 3
    signs = [1, -1, 1]
    g1 = [-s * (1 - sig(m)) / 3 for s, m in zip(signs, margins)]
    torch.testing.assert_close(r1.grad, torch.tensor(g1))
    torch.testing.assert_close(r0.grad, -torch.tensor(g1))


def test_oracle_labels_counts_and_nan():
    oracle = Oracle(lambda prompts, responses: [len(r) for r in responses], temp=0.0)
    prompts = [{"prompt": "p"}] * 3
    s0, s1 = oracle.score(prompts, ["aa", "a", "aaa"]), oracle.score(prompts, ["a", "aaaa", "bbb"])
    labels = oracle.label(s0, s1, torch.Generator().manual_seed(0))
    assert labels[:2].tolist() == [0, 1] and oracle.calls == 6
    # a tie at temp 0 is a fair coin: over many draws about half each way
    ties = oracle.label(torch.zeros(2000), torch.zeros(2000), torch.Generator().manual_seed(0))
    assert 0.45 < ties.float().mean() < 0.55
    # temp > 0 follows σ(Δ / temp)
    soft = Oracle(None, temp=2.0).label(torch.zeros(20000), torch.ones(20000),
                                        torch.Generator().manual_seed(0))
    assert abs(soft.float().mean().item() - 1 / (1 + math.exp(-0.5))) < 0.015
    bad = Oracle(lambda prompts, responses: [1.0, float("nan")])
    with pytest.raises(ValueError, match="pair item 1.*'q2'"):
        bad.score([{"prompt": "q1"}, {"prompt": "q2"}], ["x", "y"])


def test_answer_oracles_score_against_each_prompts_answer():
    items = [{"prompt": "q", "answer": "70"}, {"prompt": "q", "answer": "1,234"}]
    texts = ["35 + 35 = 70.\n#### 70", "#### 1235"]
    assert make_oracle("gsm8k").score(items, texts).tolist() == [1.0, 0.0]  # exact match
    # gold: 1 when right, else 0.2 for the '#### N' format and 0.6 / (1 + error in tenths)
    near_miss = 0.2 + 0.6 / (1 + 1 / 123.4)
    torch.testing.assert_close(make_oracle("gold").score(items, texts),
                               torch.tensor([1.0, near_miss]))
    with pytest.raises(ValueError, match="--oracle='magic': expected gold, gsm8k or rm:PATH"):
        make_oracle("magic")

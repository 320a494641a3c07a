"""eval.py's evaluators (and reward.Oracle.evaluate) against direct computations: answers, multiple choice,
pass@k, the Wilson interval, win rate and the reward histogram."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import data
import eval as E
import model as M
from reward import Oracle

WORDS = ("<eos> Question: Answer: what colour is the sky grass snow at night "
         "blue green red white black light dark").split()
ANSWER_TOKENS = ["#### 7", "#### 3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A word-level tokenizer (plus two whole-answer tokens) and a random 2-layer Llama saved by transformers,
    loaded back through model.from_pretrained: (tokenizer, our model, the transformers model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>", pad_token="<eos>")
    tok.add_tokens(ANSWER_TOKENS)  # ids len(WORDS), len(WORDS) + 1: one sampled token is a whole "#### N"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
                      tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return tok, M.from_pretrained(str(path)).eval(), hf


# ---------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, extracted, gold, correct", [
    ("2 + 5 = 7.\n#### 7", "7", "7", True),
    ("####7", "7", "7", True),  # no space
    ("#### 1,234", "1234", "1234", True),  # thousands separator
    ("#### 1,000,000", "1000000", "1,000,000", True),  # ... on both sides
    ("#### -5", "-5", "-5", True),
    ("#### -5", "-5", "5", False),  # the sign counts
    ("#### 70.0", "70", "70", True),  # an integer written as a decimal
    ("#### -0.5", "-0.5", "-0.5", True),
    ("#### $18", "18", "18", True),  # a currency sign before the number
    ("#### 007", "7", "7", True),  # leading zeros
    ("so 7. #### 7.", "7", "7", True),  # a sentence-ending period
    ("#### 5 apples", "5", "5", True),  # a unit after the number
    ("#### 12\n#### 13", "12", "13", False),  # the first '####' is the answer
    ("The answer is 7", None, "7", False),  # no '####': no answer, even if the number is right
    ("####", None, "0", False),
    ("#### seven", None, "7", False),
    ("#### 3.50", "3.5", "3.5", True),  # trailing zeros
])
def test_answer_extraction_table(text, extracted, gold, correct):
    assert data.extract_answer(text) == extracted
    assert data.is_correct(text, gold) is correct


# ---------------------------------------------------------------------------- multiple choice
def test_choice_logliks_match_direct_log_softmax(tiny, tmp_path):
    tok, policy, hf = tiny
    rows = [{"question": "what colour is the sky", "choices": ["blue", "light green", "red", "dark black at night"],
             "answer": "A"},
            {"question": "what colour is snow", "choices": ["white", "black"], "answer": 1},
            {"question": "grass", "choices": {"text": ["green", "dark red", "blue"], "label": ["1", "2", "3"]},
             "answerKey": "3"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = E.load_choices(str(path), tok)
    assert [p["answer"] for p in items] == [0, 1, 2]
    res = E.choice(policy, items, tok.pad_token_id, batch_size=3)  # batches cut across items, mixed lengths
    expected, correct, correct_norm = [], 0, 0
    for p in items:
        ll = []
        for option in p["option_ids"]:  # one unpadded sequence, the transformers model, log_softmax + gather
            ids = torch.tensor([p["context_ids"] + option])
            with torch.no_grad():
                logp = F.log_softmax(hf(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            ll.append(logp[len(p["context_ids"]) - 1:].sum().item())  # the option's tokens only
        expected.append(ll)
        norm = [l / len(c.encode()) for l, c in zip(ll, p["choices"])]
        correct += max(range(len(ll)), key=ll.__getitem__) == p["answer"]
        correct_norm += max(range(len(ll)), key=norm.__getitem__) == p["answer"]
    for got, want in zip(res["loglik"], expected):
        assert got == pytest.approx(want, abs=2e-4)
    assert len(set(map(len, (p["option_ids"][1] for p in items)))) > 1  # the test covers multi-token options
    assert res["accuracy"] == pytest.approx(correct / 3) and res["accuracy_norm"] == pytest.approx(correct_norm / 3)
    assert res["n"] == 3


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', "'C' is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "1"}', "'1' is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "2 is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "True is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2 strings"),
    ('{"question": "q", "answer": 0}', "field 'choices' must be a list"),
    ('{"choices": ["a", "b"], "answer": 0}', "missing field 'question'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "bad JSON"),
])
def test_bad_choice_file_names_file_and_line(tiny, tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the bad record sits on line 3, after a blank line
    with pytest.raises(ValueError, match=rf"mc\.jsonl:3: .*{message}"):
        E.load_choices(str(path), tiny[0])


# ---------------------------------------------------------------------------- generation, win rate, rewards
def test_pass_at_k_known_answer(tiny, tmp_path):
    tok, _, hf = tiny
    hf.save_pretrained(tmp_path)
    policy = M.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        policy.lm_head.weight.zero_()  # uniform over V tokens: one new token is '#### 7' with probability 1/V
    q = tok("what colour is the sky").input_ids
    items = [{"prompt": "a", "prompt_ids": q, "answer": "7"}, {"prompt": "b", "prompt_ids": q, "answer": "5"}]
    score = lambda prompts, texts: [float(data.is_correct(t, p["answer"])) for p, t in zip(prompts, texts)]
    V, k = len(tok), 200
    assert (1 - 1 / V) ** k < 1e-4  # P(item a has no '#### 7' among its k samples)
    res = E.generation(Oracle(score), policy, tok, items, max_new_tokens=1, temperature=1.0, k=k, seed=0)
    assert res["accuracy"] == 0.5 and res["k"] == k and res["n"] == 2  # a: some sample right; b: '#### 5' unreachable
    assert res["reward"] == pytest.approx(0.5 / V, abs=0.05)  # mean over samples: half of 1/V
    greedy = E.generation(Oracle(score), policy, tok, items, max_new_tokens=1)  # ties: argmax is token 0, EOS, text ''
    assert greedy == {"accuracy": 0.0, "reward": 0.0, "n": 2}
    with pytest.raises(ValueError, match="temperature"):
        E.generation(Oracle(score), policy, tok, items, max_new_tokens=1, k=4)


@pytest.mark.parametrize("p, n", [(0.5, 10), (0.9, 40), (0.0, 25), (1.0, 7), (0.35, 200)])
def test_wilson_interval_solves_the_score_equation(p, n):
    """The Wilson interval is the set of π with |p − π| ≤ z sqrt(π(1 − π)/n): the roots of
    (1 + z²/n) π² − (2p + z²/n) π + p² = 0."""
    z = 1.96
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    disc = math.sqrt(b * b - 4 * a * c)
    lo, hi = E.wilson(p, n, z)
    assert lo == pytest.approx((-b - disc) / (2 * a), abs=1e-12)
    assert hi == pytest.approx((-b + disc) / (2 * a), abs=1e-12)
    assert lo <= p <= hi


def test_winrate_against_itself_is_all_ties_and_rewards_histogram(tiny):
    tok, policy, _ = tiny
    items = [{"prompt": s, "prompt_ids": tok(s).input_ids, "answer": "7"}
             for s in ("what is the sky", "snow", "grass at night", "what colour is red")]
    score = lambda prompts, texts: [float(len(t)) for t in texts]
    res = E.winrate(policy, policy, tok, items, score, max_new_tokens=4)
    assert res["ties"] == 4 and res["win_rate"] == 0.5 and res["wins"] == res["losses"] == 0
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(E.wilson(0.5, 4))
    hist = E.rewards(policy, tok, items, score, max_new_tokens=4, bins=3)
    texts = E.sample_texts(policy, tok, items, 4)
    lengths = torch.tensor([float(len(t)) for t in texts], dtype=torch.float64)
    assert sum(hist["counts"]) == 4 and len(hist["edges"]) == 4 and hist["n"] == 4
    assert hist["mean"] == pytest.approx(lengths.mean().item())
    assert hist["std"] == pytest.approx(lengths.std(correction=0).item())

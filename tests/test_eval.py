"""eval.py's evaluators (and reward.Oracle.evaluate) against direct computations: multiple choice,
pass@k, the Wilson interval, win rate and the reward histogram; its command line: every input
checked before a model is loaded, an --out that never overwrites an input and is written atomically
(answer extraction: tests/test_data.py)."""
import json
import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import command

import data
import eval as E
import model as M
from reward import Oracle

WORDS = ("<eos> Question: Answer: what colour is the sky grass snow at night "
         "blue green red white black light dark").split()
ANSWER_TOKENS = ["#### 7", "#### 3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A word-level tokenizer (plus two whole-answer tokens) and a random 2-layer Llama saved by
    transformers, loaded back through model.from_pretrained: (tokenizer, our model, the
    transformers model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>", pad_token="<eos>")
    # ids len(WORDS), len(WORDS) + 1: one sampled token is a whole "#### N"
    tok.add_tokens(ANSWER_TOKENS)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, initializer_range=0.5, tie_word_embeddings=False,
                      eos_token_id=0, pad_token_id=0, bos_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return tok, M.from_pretrained(str(path)).eval(), hf


# ---------------------------------------------------------------------------- multiple choice
def test_choice_logliks_match_direct_log_softmax(tiny, tmp_path):
    tok, policy, hf = tiny
    rows = [{"question": "what colour is the sky",
             "choices": ["blue", "light green", "red", "dark black at night"], "answer": "A"},
            {"question": "what colour is snow", "choices": ["white", "black"], "answer": 1},
            {"question": "grass",
             "choices": {"text": ["green", "dark red", "blue"], "label": ["1", "2", "3"]},
             "answerKey": "3"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = E.load_choices(str(path), tok)
    assert [p["answer"] for p in items] == [0, 1, 2]
    # batches cut across items, mixed lengths
    res = E.choice(policy, items, tok.pad_token_id, batch_size=3)
    expected, correct, correct_norm = [], 0, 0
    for p in items:
        ll = []
        # one unpadded sequence, the transformers model, log_softmax + gather
        for option in p["option_ids"]:
            ids = torch.tensor([p["context_ids"] + option])
            with torch.no_grad():
                logp_all = F.log_softmax(hf(ids).logits[0, :-1].double(), -1)  # (T - 1, V)
            logp = logp_all.gather(-1, ids[0, 1:, None])[:, 0]  # (T - 1,)
            ll.append(logp[len(p["context_ids"]) - 1:].sum().item())  # the option's tokens only
        expected.append(ll)
        norm = [l / len(c.encode()) for l, c in zip(ll, p["choices"])]
        correct += max(range(len(ll)), key=ll.__getitem__) == p["answer"]
        correct_norm += max(range(len(ll)), key=norm.__getitem__) == p["answer"]
    for got, want in zip(res["loglik"], expected):
        assert got == pytest.approx(want, abs=2e-4)
    # the test covers multi-token options
    assert len(set(map(len, (p["option_ids"][1] for p in items)))) > 1
    assert res["accuracy"] == pytest.approx(correct / 3)
    assert res["accuracy_norm"] == pytest.approx(correct_norm / 3)
    assert res["n"] == 3


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}',
     "'C' is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "1"}',
     "'1' is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}',
     "2 is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}',
     "True is not the 0-based index or letter"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2 strings"),
    ('{"question": "q", "answer": 0}', "missing field 'choices'"),
    ('{"question": "q", "choices": {"label": ["A", "B"]}, "answer": 0}',
     "field 'choices' must be a list"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": 5}, "answerKey": "A"}',
     "field 'choices' must have a 'label' list of distinct strings, one for each of its 2"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "A"]}, "answerKey": "A"}',
     "'label' list of distinct strings"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}',
     "'label' list of distinct strings"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}',
     "field 'answerKey' 'C' is not the 0-based index"),
    # its loglik would be 0
    ('{"question": "q", "choices": ["", "b"], "answer": 1}', "the choice '' is empty"),
    ('{"choices": ["a", "b"], "answer": 0}', "missing field 'question'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "bad JSON"),
])
def test_bad_choice_file_names_file_and_line(tiny, tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
    # the bad record sits on line 3, after a blank line
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"mc\.jsonl:3: .*{message}"):
        E.load_choices(str(path), tiny[0])


def test_choice_contexts_longer_than_max_prompt_len_are_dropped_as_the_trainers_drop_prompts(
        tiny, tmp_path, capsys):
    tok = tiny[0]
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "sky", "choices": ["blue", "red"], "answer": 0},  # a context of 3 tokens
            {"question": "what colour is the sky at night", "choices": ["black", "blue"],
             "answer": 0}]  # 9 tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = E.load_choices(str(path), tok, max_prompt_len=5)
    assert [p["choices"] for p in kept] == [["blue", "red"]]
    assert "dropped 1 of 2 records whose prompt is longer than 5 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every prompt is longer than max_prompt_len=2"):
        E.load_choices(str(path), tok, max_prompt_len=2)


# ------------------------------------------------------------------ generation, win rate, rewards
def test_pass_at_k_known_answer(tiny, tmp_path):
    tok, _, hf = tiny
    hf.save_pretrained(tmp_path)
    policy = M.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        # uniform over V tokens: one new token is '#### 7' with probability 1/V
        policy.lm_head.weight.zero_()
    q = tok("what colour is the sky").input_ids
    items = [{"prompt": "a", "prompt_ids": q, "answer": "7"},
             {"prompt": "b", "prompt_ids": q, "answer": "5"}]

    def score(prompts, texts):
        return [float(data.is_correct(t, p["answer"])) for p, t in zip(prompts, texts)]

    V = len(tok)
    k = 200
    assert (1 - 1 / V) ** k < 1e-4  # P(item a has no '#### 7' among its k samples)
    res = E.generation(Oracle(score), policy, tok, items, max_new_tokens=1, temperature=1.0, k=k,
                       seed=0)
    # a: some sample right; b: '#### 5' unreachable
    assert res["accuracy"] == 0.5 and res["k"] == k and res["n"] == 2
    assert res["reward"] == pytest.approx(0.5 / V, abs=0.05)  # mean over samples: half of 1/V
    # ties: the argmax is token 0, EOS, the text ''
    greedy = E.generation(Oracle(score), policy, tok, items, max_new_tokens=1)
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


# ---------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def inputs(toy, tmp_path_factory):
    """What eval.py reads, where a test can watch it: a copy of the quick toy's policy (twice:
    policy and reference), its held-out prompts, a link to them, a multiple-choice file and two bad
    files."""
    root = tmp_path_factory.mktemp("inputs")
    t = toy[1]
    for name in ("model", "ref"):
        shutil.copytree(t.model, root / name)
    shutil.copy(t.heldout, root / "heldout.jsonl")
    os.symlink(root / "heldout.jsonl", root / "link.json")
    mc = {"question": "q", "choices": ["a", "b"], "answer": 0}
    (root / "mc.jsonl").write_text(json.dumps(mc) + "\n")
    (root / "badmc.jsonl").write_text('{"question": "q", "choices": {"text": ["a", "b"], '
                                      '"label": 5}, "answerKey": "A"}\n')
    (root / "noanswer.jsonl").write_text('{"question": "Tom has 2 pens.", "answer": "2"}\n'
                                         '{"prompt": "hi"}\n')
    return root


def files(root):
    """{path: bytes} of every file under root."""
    return {os.path.join(folder, f): open(os.path.join(folder, f), "rb").read()
            for folder, _, names in os.walk(root) for f in names}


REFUSED = [  # (the command and its flags, what its one message says); D: the inputs' folder
    (["generation", "--prompts=D/heldout.jsonl", "--out=D/heldout.jsonl"],
     "--out=D/heldout.jsonl is the --prompts file"),
    (["generation", "--prompts=D/heldout.jsonl", "--out=D/link.json"],
     "--out=D/link.json is the --prompts file"),
    (["choice", "--data=D/mc.jsonl", "--out=D/mc.jsonl"], "is the --data file"),
    (["generation", "--prompts=D/heldout.jsonl", "--out=D/model/config.json"],
     "lies inside the --model directory D/model"),
    (["rewards", "--prompts=D/heldout.jsonl", "--out=D/model/results/new.json"],
     "lies inside the --model directory"),
    (["winrate", "--prompts=D/heldout.jsonl", "--ref=D/ref", "--out=D/ref/model.safetensors"],
     "lies inside the --ref directory D/ref"),
    (["generation", "--prompts=D/heldout.jsonl", "--out=D/"], "--out=D/ is a directory"),
    (["generation", "--prompts=D/heldout.jsonl", "--out=D/mc.jsonl/results.json"],
     "D/mc.jsonl is not a writable directory"),
    (["generation", "--prompts=D/noanswer.jsonl"],
     "D/noanswer.jsonl:2: missing field 'answer': --oracle=gold needs"),
    (["generation", "--prompts=D/noanswer.jsonl", "--oracle=gsm8k", "--out=D/new.json"],
     "noanswer.jsonl:2: missing field"),
    (["choice", "--data=D/badmc.jsonl"],
     "D/badmc.jsonl:1: field 'choices' must have a 'label' list"),
    (["generation", "--prompts=D/heldout.jsonl", "--oracle=magic"],
     "--oracle='magic': expected gold, gsm8k or rm:PATH"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[m for _, m in REFUSED])
def test_eval_refuses_bad_input_before_loading_a_model_and_changes_nothing(inputs, monkeypatch,
                                                                           argv, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(M, "from_pretrained", no_model)
    before = files(inputs)
    with pytest.raises(ValueError) as refused:
        E.main([a.replace("D/", f"{inputs}/") for a in [*argv, "--model=D/model"]])
    assert message.replace("D/", f"{inputs}/") in str(refused.value)
    assert files(inputs) == before


def test_eval_refusal_is_one_line_and_the_input_survives(inputs):
    prompts = inputs / "heldout.jsonl"
    before = prompts.read_bytes()
    argv = command("eval.py", "generation", f"--model={inputs / 'model'}", f"--prompts={prompts}",
                   f"--out={prompts}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and proc.stdout == "" and prompts.read_bytes() == before
    assert proc.stderr == (f"eval.py: error: --out={prompts} is the --prompts file, an input: "
                           "choose another --out\n")


def test_eval_writes_out_atomically(inputs, tmp_path, monkeypatch):
    out = tmp_path / "results" / "generation.json"
    E.main(["generation", f"--model={inputs / 'model'}", f"--prompts={inputs / 'heldout.jsonl'}",
            "--limit=2", "--max_new_tokens=4", f"--out={out}"])
    written = json.loads(out.read_text())
    assert written.keys() == {"accuracy", "reward", "n"} and written["n"] == 2
    assert os.listdir(out.parent) == ["generation.json"]
    dump = json.dump

    def disk_full(obj, f, **kwargs):  # the results half written, then the disk is full
        f.write('{"accuracy": 0.')
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        E.report({"accuracy": 0.5, "n": 2}, str(out))
    assert json.loads(out.read_text()) == written  # the previous results, whole
    assert os.listdir(out.parent) == ["generation.json"]  # and nothing left beside them
    monkeypatch.setattr(json, "dump", dump)
    E.report({"accuracy": 0.5, "n": 2}, str(out))
    assert json.loads(out.read_text()) == {"accuracy": 0.5, "n": 2}

"""toy.py: the gold reward's shape, consistent problems, and a quick build (deterministic, reused,
rebuilt over a bad build.json, loads in transformers, its tokenizer round-trips); the rare setting;
every entry point's --help."""
import contextlib
import hashlib
import json
import os
import random
import runpy
import shutil
import sys

import pytest
import torch
from conftest import ROOT

import data
import run
import toy as T
from train_selm import load_preferences


@pytest.fixture(scope="module")
def tok(toy):
    return data.load_tokenizer(toy[1].model)


def test_gold_reward_is_shaped():
    answer = "70"
    rewards = {text: T.gold_reward(text, answer) for text in [
        "85 - 15 = 70.\n#### 70", "#### 71", "#### 60", "#### 7", "the answer is 71", "#### -70",
        "no idea", ""]}
    assert rewards["85 - 15 = 70.\n#### 70"] == 1.0
    assert all(0.0 <= r < 1.0 for t, r in rewards.items() if t != "85 - 15 = 70.\n#### 70")
    assert (rewards["#### 71"] > rewards["#### 60"] > rewards["#### 7"] > rewards["#### -70"]
            > rewards["no idea"])
    # the format earns credit; so does the number
    assert rewards["#### 71"] > rewards["the answer is 71"] > 0.2
    assert rewards["no idea"] == rewards[""] == 0.0
    assert T.gold_reward("#### 1,000", "1000") == 1.0
    # a non-numeric answer: only the format can earn credit
    assert T.gold_reward("#### 5", "yes") == 0.2


# ---------------------------------------------------------------------------- the toy task


def test_toy_problems_are_consistent():
    rng = random.Random(1)
    for _ in range(200):
        question, start, ops = T.toy_problem(rng)
        answer = T.worked_answer(start, ops)
        assert data.extract_answer(answer) == str(start + sum(ops)) and start + sum(ops) >= 0
        assert f"has {start} " in question and all(str(abs(n)) in question for n in ops)
        for step in answer.split("\n")[0].split(". "):
            lhs, rhs = step.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs)  # every step of a clean demonstration is right
        slipped = T.worked_answer(start, ops, slip=(0, 2))
        assert data.extract_answer(slipped) == str(start + sum(ops) + 2)


def digests(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name != "build.json":  # holds the build time
                path = os.path.join(folder, name)
                digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
                out[os.path.relpath(path, root)] = digest
    return out


def test_toy_build_is_deterministic_and_reused(toy, tmp_path):
    toy = toy[1]
    again = T.build(str(tmp_path / "toy"), seed=0, quick=True)
    first, second = digests(os.path.dirname(toy.model)), digests(str(tmp_path / "toy"))
    assert first == second
    assert {"sft/model.safetensors", "sft/tokenizer.json", "prefs.jsonl",
            "rm/model.safetensors", "rm/tokenizer.json"} <= set(first)
    stamp = os.path.getmtime(again.prefs)
    assert T.build(str(tmp_path / "toy"), seed=0, quick=True) == again
    assert os.path.getmtime(again.prefs) == stamp
    os.remove(str(tmp_path / "toy" / "build.json"))  # a half-built directory (no marker) is rebuilt
    T.build(str(tmp_path / "toy"), seed=0, quick=True)
    assert os.path.getmtime(again.prefs) > stamp and digests(str(tmp_path / "toy")) == first
    other = T.build(str(tmp_path / "toy1"), seed=1, quick=True)
    assert open(other.heldout).read() != open(toy.heldout).read()


def test_toy_files_load_and_tokenizer_round_trips(toy, tok):
    toy = toy[1]
    for text in ["Tom has 37 apples, buys 48 and gives away 15. How many apples does Tom have now?",
                 "37 + 48 = 85. 85 - 15 = 70.\n#### 70", "ünïcödé  and   spaces\t!"]:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # one token a digit
    assert all(len(tok.convert_ids_to_tokens(tok(str(d)).input_ids)) == 1 for d in range(10))
    heldout = data.load_prompts(toy.heldout, tok, 256)
    train = data.load_prompts(toy.train, tok, 256)
    assert not {p["prompt"] for p in heldout} & {p["prompt"] for p in train}
    assert all(p["answer"] is not None for p in heldout + train)
    pairs = load_preferences(toy.prefs, tok, 256)
    assert pairs and all(T.gold_reward(p["chosen"], p["answer"]) >
                         T.gold_reward(p["rejected"], p["answer"]) for p in pairs)


def test_rm_anchors_are_the_policys_own_worked_answers(tok, monkeypatch):
    """The RM backbone's anchors are what the policy wrote, read as a worked answer that starts
    with the question's first number: its '#### N' (right or wrong), else its last number. The
    policy is given only the question and that number, never the answer."""
    import model as M
    questions = ["Tom has 12 pens, buys 5 and gives away 3. How many pens does Tom have now?",
                 "Ann has 7 coins and finds 2. How many coins does Ann have now?",
                 "Sam has 4 cards and loses 1. How many cards does Sam have now?",
                 "Mia has 9 books and sells 2. How many books does Mia have now?"]
    written = [" + 5 = 17. 17 - 3 = 15.\n#### 15",  # a slip: the anchor is 15, not 14
               " + 2 = 9. I think", " - 1 = 3.\n#### 3", " - 2 = 12345678901234567890"]
    seen = []

    def policy_writes(policy, prompts, max_new_tokens, temperature, **kwargs):
        seen.extend(prompts)
        assert temperature == 0.0
        return [tok(w, add_special_tokens=False).input_ids for w in written]

    monkeypatch.setattr(M, "sample", policy_writes)
    assert T.self_anchors(None, tok, questions) == [15, 9, 3, 10**6]  # runaway digits: capped
    for q, prompt, start in zip(questions, seen, ("12", "7", "4", "9")):
        assert prompt == data.encode_prompt(tok, q) + tok(start, add_special_tokens=False).input_ids


def test_toy_rm_backbone_is_the_grown_sft_policy_built_on_fresh_text(toy, tok, monkeypatch):
    """The toy's RM backbone: the SFT policy's blocks and embedding unchanged under the grown
    blocks; the policy's tokenizer; a toy run with no --model takes it (an explicit one wins).
    Its build's pieces: the number replaced wherever an answer states it; a grown model starts
    as the SFT policy; the top-block-only φ is RewardModel.phi of the full forward."""
    import model as M
    import train_pbpo
    from reward import RewardModel
    paths = toy[1]
    sft, rm = M.from_pretrained(paths.model).eval(), M.from_pretrained(paths.rm).eval()
    assert rm.config.num_hidden_layers == sft.config.num_hidden_layers + T.RM_BLOCKS
    rm_weights = rm.state_dict()
    for name, value in sft.state_dict().items():
        if name != "model.norm.weight":  # the final norm reads the grown blocks: trained too
            assert torch.equal(rm_weights[name], value), name
    data.check_same_tokenizer(paths.rm, tok)
    monkeypatch.setattr(T, "build", lambda *args, **kwargs: paths)  # no default build here
    cfg = train_pbpo.Config()
    T.fill_defaults(cfg, 0, 1)
    assert (cfg.model, cfg.rm_backbone) == (paths.model, paths.rm)
    cfg = train_pbpo.Config(rm_backbone="elsewhere")
    T.fill_defaults(cfg, 0, 1)
    assert cfg.rm_backbone == "elsewhere"

    assert T.replace_number("3 + 4 = 7. 7 - 2 = 5.\n#### 5", 9) == "3 + 4 = 7. 7 - 2 = 9.\n#### 9"
    assert T.replace_number("I think it is about 6.\n#### 6", 9) == "I think it is about 9.\n#### 9"
    grown = T.grow(sft, 2).eval()
    rng = random.Random(0)
    problems = [T.toy_problem(rng) for _ in range(6)]
    prompts = [data.encode_prompt(tok, q) for q, _, _ in problems]
    responses = [tok(T.crowd_answer(start, ops, rng)).input_ids + [tok.eos_token_id]
                 for _, start, ops in problems]
    ids, attn, resp = data.collate(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(grown(ids, attn), sft(ids, attn))
        g = torch.Generator().manual_seed(0)
        for block in grown.model.layers[sft.config.num_hidden_layers:]:  # away from the identity
            block.self_attn.o_proj.weight.normal_(0.0, 0.1, generator=g)
            block.mlp.down_proj.weight.normal_(0.0, 0.1, generator=g)
        phi = RewardModel(grown).phi(ids, attn, resp)  # (6, d)
        rows = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, rows))
        left = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        torch.testing.assert_close(T.top_token_features(grown, left, left != tok.pad_token_id), phi)


def test_toy_checkpoint_loads_in_transformers(toy, tok):
    toy = toy[1]
    import model as M
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(toy.model).eval()
    ours = M.from_pretrained(toy.model)
    question = "Tom has 37 apples and buys 48. How many apples does Tom have now?"
    ids = torch.tensor([data.encode_prompt(tok, question)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.lm_head(ours(ids)), atol=1e-4, rtol=1e-4)
    assert hf.config.eos_token_id == tok.eos_token_id and hf.config.vocab_size == len(tok)


def test_toy_rare_setting_guesses_far_more_often():
    rng = random.Random(0)
    problems = [T.toy_problem(rng)[1:] for _ in range(4000)]

    def crowd(rare):
        """(one-step guess rate, two-step guess rate, slip rate of the worked answers)."""
        rng = random.Random(1)
        demos = [(len(ops) > 1, start + sum(ops), T.noisy_demo(start, ops, rng, rare))
                 for start, ops in problems]
        rate = lambda xs: sum(xs) / len(xs)
        guesses = [rate([d.startswith("I think") for two, _, d in demos if two == k])
                   for k in (False, True)]
        worked = [not data.is_correct(d, total) for _, total, d in demos
                  if not d.startswith("I think")]
        return guesses + [rate(worked)]

    assert crowd(False) == pytest.approx([0.3, 0.7, 0.1], abs=0.03)
    assert crowd(True) == pytest.approx([0.9, 0.97, 0.1], abs=0.04)


def test_toy_default_demonstrations_are_unchanged():
    """The default crowd's demonstrations, pinned as they were before the rare setting existed:
    the default build's texts (and so its tokenizer and SFT data) are the same byte for byte."""
    rng = random.Random(0)
    demos = []
    for _ in range(500):
        _, start, ops = T.toy_problem(rng)
        demos.append(T.noisy_demo(start, ops, rng))
    digest = hashlib.sha256("\n".join(demos).encode()).hexdigest()
    assert digest == "f1de4e576b9da3a51d0f978d62b009491451977e9d5721ed562b9b8a8a3cc8ab"


def test_toy_rare_build_is_its_own(toy, tmp_path):
    """Same prompt files, another SFT policy, a key of its own: a directory built in one setting
    is rebuilt, not reused, for the other, and the default build comes back byte for byte."""
    default = digests(os.path.dirname(toy[1].model))
    rare = T.build(str(tmp_path), seed=0, quick=True, rare=True)
    assert json.load(open(tmp_path / "build.json"))["key"] == [0, True, "rare", T.source_digest()]
    built = digests(str(tmp_path))
    assert set(built) == set(default)
    same = {f for f in built if built[f] == default[f]}
    assert {"train.jsonl", "heldout.jsonl", "valid.jsonl"} <= same
    assert {"sft/model.safetensors", "sft/tokenizer.json", "prefs.jsonl"}.isdisjoint(same)
    T.build(str(tmp_path), seed=0, quick=True)  # the default setting in the same directory
    assert json.load(open(tmp_path / "build.json"))["key"] == [0, True, T.source_digest()]
    assert digests(str(tmp_path)) == default
    assert T.build(str(tmp_path), seed=0, quick=True, rare=True) == rare
    assert digests(str(tmp_path)) == built


def test_toy_build_is_the_same_whatever_the_callers_thread_count(toy, tmp_path):
    """The build runs on BUILD_THREADS threads: a process on another count (the tests' 1, here 3)
    builds the same files byte for byte, and gets its own count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        T.build(str(tmp_path), seed=0, quick=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert digests(str(tmp_path)) == digests(os.path.dirname(toy[1].model))


@pytest.mark.parametrize("text", ["", '{"key": [0, tr', "[0, true]", '{"seconds": 1.0}',
                                  '{"key": "0 True"}', "null"])
def test_toy_marker_unreadable_or_of_another_shape_means_no_finished_build(tmp_path, capsys, text):
    marker = tmp_path / "build.json"
    marker.write_text(text)
    assert T.built_key(str(marker)) is None
    said = capsys.readouterr().out
    assert said.startswith(str(marker)) and said.endswith("rebuilding the toy task\n")
    marker.write_text('{"key": [0, true], "pairs": 3}')
    assert T.built_key(str(marker)) == [0, True]


def test_toy_marker_is_written_atomically_and_a_bad_one_rebuilds(toy, tmp_path, monkeypatch,
                                                                 capsys):
    """A build stopped while writing build.json (a full disk, say) leaves no marker, not half of
    one; an empty build.json, as one was left before, is rebuilt with a message, not a JSON
    error."""
    built = os.path.dirname(toy[1].model)
    out = tmp_path / "toy"
    shutil.copytree(built, out)
    os.remove(out / "build.json")  # an unfinished build: the next build() redoes it
    dump = json.dump

    def disk_full_at_the_marker(obj, f, **kwargs):
        if not os.path.basename(f.name).startswith("build.json"):
            return dump(obj, f, **kwargs)
        f.write('{"key": [0, ')
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full_at_the_marker)
    with pytest.raises(OSError, match="No space left"):
        T.build(str(out), seed=0, quick=True)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == sorted(set(os.listdir(built)) - {"build.json"})
    (out / "build.json").write_text("")  # what the old non-atomic write left behind
    capsys.readouterr()
    assert T.build(str(out), seed=0, quick=True) == T.ToyPaths(*(str(out / f) for f in T.FILES))
    said = capsys.readouterr().out
    assert f"{out / 'build.json'}:1: bad JSON" in said and "rebuilding the toy task" in said
    assert json.load(open(out / "build.json"))["key"] == [0, True, T.source_digest()]
    assert digests(str(out)) == digests(built)


EXPERIMENTS = ("bench", "compare", "diagnose", "regret", "rm_backbone", "tune")
ENTRY_POINTS = ["toy.py", "train_pbpo.py", "train_selm.py", "eval.py", "eval.py choice",
                *(f"-m experiments.{m}" for m in EXPERIMENTS)]


@pytest.mark.filterwarnings("ignore:'experiments.*' found in sys.modules")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_prints_its_help(entry, monkeypatch, capsys):
    """`python ENTRY --help` exits 0 with the usage (argparse formats help texts with %: a '%' in a
    flag's comment broke toy.py's). Each script's __main__ block runs here, as python runs it, in
    this process: one torch import for all of them, not one each."""
    script, *args = entry.split()
    monkeypatch.setattr(sys, "argv", [script, *args, "--help"])
    # pytest's signal handlers stay
    monkeypatch.setattr(run, "friendly_errors", lambda *args: contextlib.nullcontext())
    code = 0
    try:
        if script == "-m":
            runpy.run_module(args.pop(0), run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code in (0, None) and out.startswith("usage:"), (code, out[:300])

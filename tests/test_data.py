"""data.py: loaders on good and broken files, chat template, sharding, batching, the crash-safe
store, and answers: the `#### N` extraction and the correctness check the gold oracle uses."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import data
from train_selm import encode_response, load_preferences


@pytest.fixture(scope="module")
def tok(toy):
    return data.load_tokenizer(toy[1].model)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def dumps(*records):
    return [json.dumps(r) for r in records]


# ---------------------------------------------------------------------- tokenizer and chat template


def test_chat_template_round_trip(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tom has 37 apples."}]
    ids = data.encode_prompt(tok, messages)
    assert tok.decode(ids) == "<|bos|><|system|>Be brief.<|user|>Tom has 37 apples.<|assistant|>"
    # the template's BOS, not a second one
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a str is one user turn
    assert data.encode_prompt(tok, "Tom has 37 apples.") == data.encode_prompt(tok, messages[1:])
    assert data.decode(tok, ids) == "Be brief.Tom has 37 apples."  # specials skipped
    response = encode_response(tok, "37 + 48 = 85.\n#### 85")
    assert response[-1] == tok.eos_token_id
    assert data.decode(tok, response) == "37 + 48 = 85.\n#### 85"


def test_chat_template_renders_off_the_main_thread_and_keeps_a_callers_timer(tok):
    """The template's time bound uses SIGALRM, which only the main thread may set: elsewhere it
    renders unbounded; on the main thread a timer the caller had set is given back."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        off_main = pool.submit(data.encode_prompt, tok, "Tom has 37 apples.").result()
    assert off_main == data.encode_prompt(tok, "Tom has 37 apples.")
    signal.setitimer(signal.ITIMER_REAL, 1000)
    try:
        data.encode_prompt(tok, "Tom has 37 apples.")
        assert 990 < signal.getitimer(signal.ITIMER_REAL)[0] <= 1000
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_plain_prompt_without_chat_template(toy):
    plain = data.load_tokenizer(toy[1].model)
    plain.chat_template = None
    turns = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "again"}]
    ids = data.encode_prompt(plain, turns)
    assert plain.decode(ids, skip_special_tokens=True) == "Hello\n\nagain"


def test_load_tokenizer_needs_eos(toy, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((open(os.path.join(toy[1].model, name)).read()))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{tmp_path}: the tokenizer has no EOS"):
        data.load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------- prompt loaders


def test_load_prompts_formats(tok, tmp_path):
    path = write(tmp_path / "p.jsonl", dumps(
        {"prompt": "Hi"},
        {"messages": [{"role": "user", "content": "Yo"}]},
        {"question": "How many?", "answer": "2 + 2 = 4.\n#### 1,234"},
        {"prompt": "Sum?", "answer": 70}) + [""])  # a blank line is not a record
    items = data.load_prompts(path, tok, 64)
    prompts = [i["prompt"] for i in items]
    assert prompts == ["Hi", [{"role": "user", "content": "Yo"}], "How many?", "Sum?"]
    assert [i["answer"] for i in items] == [None, None, "1234", "70"]
    assert items[2]["prompt_ids"] == data.encode_prompt(tok, "How many?")
    array = tmp_path / "p.json"
    records = [{"prompt": "Hi"}, {"question": "Q", "answer": "#### -5"}]
    array.write_text(json.dumps(records, indent=2))
    assert [i["answer"] for i in data.load_prompts(str(array), tok, 64)] == [None, "-5"]
    # a JSON string may hold U+2028 (a line separator to str.splitlines, not to JSONL), and a
    # line may end in CRLF
    separated = tmp_path / "sep.jsonl"
    line = json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\r\n"
    separated.write_text(line, newline="")
    assert [i["prompt"] for i in data.load_prompts(str(separated), tok, 64)] == ["a\u2028b"]


@pytest.mark.parametrize("lines, error", [
    (['{"prompt": "ok"}', '{"prompt": "a", '], r"p.jsonl:2: bad JSON"),
    (['{"prompt": "ok"}', '{"text": "a"}'], r"p.jsonl:2: missing field 'prompt'"),
    (['{"prompt": 5}'], r"p.jsonl:1: field 'prompt' must be a string or a non-empty list"),
    (['{"messages": [{"role": "user"}]}'], r"p.jsonl:1: field 'messages' must be"),
    (['{"messages": []}'], r"p.jsonl:1: field 'messages' must be"),
    (['{"question": ["x"], "answer": "#### 1"}'],
     r"p.jsonl:1: field 'question' must be a string, got list"),
    (['{"question": "Q"}'], r"p.jsonl:1: missing field 'answer'"),
    (['{"question": "Q", "answer": "####"}'], r"p.jsonl:1: field 'answer' has no value"),
    (['{"prompt": "Q", "answer": [1]}'], r"p.jsonl:1: field 'answer' must be a string or a number"),
    (['["prompt"]'], r"p.jsonl:1: expected a JSON object, got a list"),
    ([], r"p.jsonl:1: empty file"),
    (["", "  "], r"p.jsonl:1: empty file"),
])
def test_load_prompts_errors_name_file_line_and_field(tok, tmp_path, lines, error):
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(ValueError, match=error):
        data.load_prompts(path, tok, 64)


@pytest.mark.parametrize("text, error", [
    ('[\n{"prompt": "a"},\n{"prompt": }\n]', r"p.json:3: bad JSON"),
    ('{"prompt": "a"}', r"p.json:1: expected a JSON array"),
    ('[{"prompt": "a"}, {"prompt": null}]', r"p.json\[1\]: field 'prompt' must be"),
    ("", r"p.json:1: empty file"),
    ("[]", r"p.json:1: empty file"),
])
def test_load_json_array_errors(tok, tmp_path, text, error):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(ValueError, match=error):
        data.load_prompts(str(tmp_path / "p.json"), tok, 64)


def test_long_prompts_dropped_with_count_or_an_error_if_none_is_left(tok, tmp_path, capsys):
    path = write(tmp_path / "p.jsonl",
                 dumps({"prompt": "short"}, {"prompt": "long " * 50}, {"prompt": "ok"}))
    items = data.load_prompts(path, tok, 20)
    assert [i["prompt"] for i in items] == ["short", "ok"]
    assert "dropped 1 of 3 records whose prompt is longer than 20 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every prompt is longer"):
        data.load_prompts(path, tok, 2)


# ---------------------------------------------------------------------------- preference loader


def test_load_preferences_trl_layouts(tok, tmp_path):
    user, system = {"role": "user", "content": "Q?"}, {"role": "system", "content": "S"}
    good, bad = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    path = write(tmp_path / "prefs.jsonl", dumps(
        {"prompt": "Q?", "chosen": "good", "rejected": "bad", "answer": "#### 3"},  # standard
        # conversational, explicit prompt
        {"prompt": [system, user], "chosen": [good], "rejected": [bad]},
        # implicit prompt: the shared prefix
        {"chosen": [system, user, good], "rejected": [system, user, bad]},
        {"prompt": "Q?", "chosen": [good], "rejected": [bad]}))  # a string prompt is one user turn
    items = load_preferences(path, tok, 64)
    assert items[0]["answer"] == "3" and items[1]["answer"] is None
    assert items[1]["prompt"] == items[2]["prompt"] == [system, user]
    assert items[1]["prompt_ids"] == items[2]["prompt_ids"]
    assert items[1]["prompt_ids"] == data.encode_prompt(tok, [system, user])
    assert items[3]["prompt_ids"] == items[0]["prompt_ids"] == data.encode_prompt(tok, "Q?")
    for item in items:
        assert (item["chosen"], item["rejected"]) == ("good", "bad")
        assert item["chosen_ids"] == encode_response(tok, "good")
        assert item["chosen_ids"][-1] == tok.eos_token_id
        assert data.decode(tok, item["rejected_ids"]) == "bad"


def turn(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("record, error", [
    ({"prompt": "Q", "chosen": "a"}, r"prefs.jsonl:1: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, r"prefs.jsonl:1: missing field 'prompt'"),
    ({"prompt": "Q", "chosen": "a", "rejected": 3}, r"prefs.jsonl:1: field 'rejected' must be"),
    ({"prompt": "Q", "chosen": "a", "rejected": [turn("assistant", "b")]},
     r"must both be strings or both message lists"),
    ({"chosen": [turn("user", "Q"), turn("assistant", "a")],
      "rejected": [turn("user", "R"), turn("assistant", "b")]}, r"differ before"),
    ({"prompt": "Q", "chosen": [turn("user", "a")], "rejected": [turn("user", "b")]},
     r"must end in an assistant turn"),
    ({"chosen": [turn("assistant", "a")], "rejected": [turn("assistant", "b")]},
     r"prefs.jsonl:1: missing field 'prompt'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_oracle": "gold", "chosen_score": 1},
     r"prefs.jsonl:1: fields 'chosen_score' and 'rejected_score' must be finite numbers"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_oracle": "gold", "chosen_score": 1,
      "rejected_score": True}, r"must be finite numbers beside 'score_oracle'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_oracle": "gold", "chosen_score": 1,
      "rejected_score": 10 ** 400}, r"prefs.jsonl:1: fields 'chosen_score' and 'rejected_score'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_oracle": 3, "chosen_score": 1,
      "rejected_score": 0}, r"prefs.jsonl:1: expected a string in field 'score_oracle'"),
])
def test_load_preferences_errors(tok, tmp_path, record, error):
    path = write(tmp_path / "prefs.jsonl", dumps(record))
    with pytest.raises(ValueError, match=error):
        load_preferences(path, tok, 64)


# ---------------------------------------------------------------------------- sharding and batching


@pytest.mark.parametrize("n, world", [(10, 2), (7, 2), (1, 2), (11, 3)])
def test_shards_are_disjoint_and_cover(n, world):
    items = list(range(n))
    shards = [data.shard(items, rank, world) for rank in range(world)]
    assert sorted(sum(shards, [])) == items  # covers, and with the count equal, disjoint
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_collate_layout():
    input_ids, attention_mask, response_mask = data.collate([[5, 6, 7], [8]], [[1], [2, 3, 4]],
                                                            pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert response_mask.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert attention_mask.dtype == response_mask.dtype == torch.bool
    assert input_ids.dtype == torch.long
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    assert positions[1, 2:].tolist() == [0, 1, 2, 3]  # a left-padded row starts at position 0


# ---------------------------------------------------------------------------- the preference store

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import data
    store = data.PreferenceStore({path!r}, "episode")
    for i in range(len(store), 10**6):
        store.append({{"episode": i, "prompt": "Q" * (i % 97), "chosen_ids": list(range(i % 50)),
                      "label": i % 2, "scores": [0.5, -1.25]}})
        print(i, flush=True)  # printed only once the append (flush + fsync) has returned
""")


def check_store(path, at_least):
    records = data.PreferenceStore(path, "episode").records
    assert len(records) >= at_least
    # in order, none lost, none garbled
    assert [r["episode"] for r in records] == list(range(len(records)))
    assert all(r["chosen_ids"] == list(range(r["episode"] % 50)) for r in records)
    return len(records)


def test_store_survives_kill_mid_run(tmp_path):
    (tmp_path / "store").mkdir()
    path = str(tmp_path / "store" / "prefs.jsonl")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = 0
    # kill, reopen and keep appending: each run resumes after the last completed record
    for run in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=root, path=path)],
                                 stdout=subprocess.PIPE, text=True)
        target = done + 30 + 17 * run
        for line in child.stdout:
            done = int(line) + 1
            if done >= target:
                break
        child.send_signal(signal.SIGKILL)  # anywhere: between writes or inside one
        child.wait()
        done = check_store(path, at_least=done)


def test_store_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    path = str(tmp_path / "prefs.jsonl")
    store = data.PreferenceStore(path, "episode")
    for i in range(3):
        store.append({"episode": i, "chosen_ids": list(range(i % 50))})
    store.close()
    with open(path, "ab") as f:
        f.write(b'{"episode": 3, "chosen_ids": [0, 1')  # killed mid-write
    with pytest.warns(UserWarning, match=r"prefs.jsonl:4: ignoring a torn last line"):
        store = data.PreferenceStore(path, "episode")
    assert len(store) == 3
    store.append({"episode": 3, "chosen_ids": [0, 1, 2]})
    store.close()
    with open(path, "ab") as f:
        # cut just before its newline
        f.write(json.dumps({"episode": 4, "chosen_ids": [0, 1, 2, 3]}).encode())
    # its episode is redone
    with pytest.warns(UserWarning, match=r"prefs.jsonl:5: ignoring a torn last line"):
        store = data.PreferenceStore(path, "episode")
    store.append({"episode": 4, "chosen_ids": [0, 1, 2, 3]})
    store.close()
    assert check_store(path, at_least=5) == 5


def test_store_corruption_inside_the_file_is_an_error(tmp_path):
    path = write(tmp_path / "prefs.jsonl", ['{"episode": 1}', '{"episode": ', '{"episode": 3}'])
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: bad JSON"):
        data.PreferenceStore(path, "episode")
    for line in ('{"prompt": "x"}', "[1, 2]", '{"episode": "2"}'):  # JSON, but not a record of ours
        path = write(tmp_path / "shape.jsonl", ['{"episode": 1}', line])
        expected = (r"shape.jsonl:2: expected a preference record "
                    r"\(a JSON object with an integer 'episode'\)")
        with pytest.raises(ValueError, match=expected):
            data.PreferenceStore(path, "episode")


def test_store_set_aside_keeps_every_pair_and_refuses_a_planted_link(tmp_path):
    path = str(tmp_path / "prefs.jsonl")
    store = data.PreferenceStore(path, "episode")
    for i in (1, 1, 2, 3):
        store.append({"episode": i})
    store.keep_before(2)
    store.append({"episode": 2, "again": True})  # into the new file, not the replaced one
    store.close()
    kept = data.PreferenceStore(path, "episode").records
    assert kept == [{"episode": 1}] * 2 + [{"episode": 2, "again": True}]
    dropped = data.PreferenceStore(str(tmp_path / "prefs.dropped.jsonl"), "episode").records
    assert dropped == [{"episode": 2}, {"episode": 3}]
    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's\n")
    os.symlink(outside, tmp_path / "link.jsonl")
    with pytest.raises(OSError, match="Too many levels of symbolic links: .*link.jsonl"):
        data.PreferenceStore(str(tmp_path / "link.jsonl"), "episode")
    assert outside.read_text() == "not the run's\n"


# ---------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, extracted, gold, correct", [
    ("37 + 48 = 85. 85 - 15 = 70.\n#### 70", "70", "70", True),
    ("####70", "70", "70", True),  # no space
    ("#### 1,234", "1234", "1234", True),  # thousands separator
    ("#### 1234", "1234", "1,234", True),  # ... in the gold answer
    ("#### 1,000,000", "1000000", "1,000,000", True),  # ... on both sides
    ("so the loss is\n#### -15", "-15", "-15", True),
    ("#### -5", "-5", "5", False),  # the sign counts
    ("#### 5", "5", "-5", False),
    ("#### 70.0", "70", "70", True),  # an integer written as a decimal
    ("#### -0.5", "-0.5", "-0.5", True),
    ("#### 3.50", "3.5", "3.5", True),  # trailing zeros
    ("#### $18", "18", "18", True),  # a currency sign before the number
    ("#### $1,000.", "1000", "1000", True),  # ... with a separator and a period
    ("#### 007", "7", "7", True),  # leading zeros
    ("so 7. #### 7.", "7", "7", True),  # a sentence-ending period
    ("#### 70.\nThat is all.", "70", "70", True),
    ("#### 5 apples", "5", "5", True),  # a unit after the number
    ("#### 3.5 kg", "3.5", "3.5", True),
    ("#### 70 apples", "70", 70, True),  # a gold answer given as a number
    ("#### 700", "700", "70", False),
    ("#### 12\n#### 13", "12", "13", False),  # the first '####' is the answer
    ("#### 70 apples, and then #### 12", "70", "70", True),
    ("The answer is 70", None, "70", False),  # no '####': no answer, even if the number is right
    ("####", None, "0", False),
    ("#### seventy", None, "70", False),
    ("", None, "0", False),
])
def test_answer_extraction_table(text, extracted, gold, correct):
    assert data.extract_answer(text) == extracted
    assert data.is_correct(text, gold) is correct

"""The bad-input table: what users, disks and other programs get wrong, and the one line each is
refused with. test_reliability.py::test_bad_inputs_give_one_clear_message runs every case, each
in a fork of the test process, and checks that it exits non-zero with `expect` in the last line
of its stderr, without a traceback, and that every path in `unchanged` is as it was.

    python -m pytest -q -s tests/test_reliability.py -k bad_inputs    # prints the table

A Case:
  name       what went wrong, as a user would say it
  command    the script and its flags, split at spaces
  expect     a fragment of the last line of stderr
  setup      steps that make the bad input (below); every case's run, in the table's order,
             after BASE_RUNS and before the first case runs
  unchanged  what the refusal must leave on disk as it was: a directory file by file (the
             lock's holder line apart), a file byte for byte, a path that did not exist still
             absent. {out_dir} is the command's run directory, its --out_dir or, for a training
             script without one, a fresh {tmp}/out/NAME, where a refused run may leave its lock
             and nothing else

Commands, steps and messages name paths through {tmp} (the test's folder), {model}, {train},
{heldout} and {prefs} (the toy task's SFT model, prompt files and preference file); {toy} stands
for its --model, --prompts and --heldout flags, {PBPO} and {SELM} for conftest.py's quick runs.
BASE_RUNS are finished runs that cases copy to resume.

A step is a tuple (what, path, ...):
  copy SRC DST              a file or a directory tree
  mkdir PATH
  write PATH TEXT           text or bytes
  set_json PATH KEY VALUE   one key of a JSON file (the file made if missing)
  remove PATH
  rename PATH NEW
  fifo PATH                 a FIFO: a file that never ends
  link PATH TARGET          a symbolic link in place of the file
  halve PATH                the file cut to half its size
  flip_bytes PATH           4 bytes inside a checkpoint's tensor data flipped
  random_bytes PATH         the file's bytes replaced by as many random ones
  weights DIR TENSOR HOW    one tensor of DIR/model.safetensors changed: nan, bool, int8 or grown
  vocab DIR N               config.json and the embedding cut to N tokens; the tokenizer has more
  swap_ids DIR              the tokenizer's last two tokens swap ids: the same text, other ids
  pickle PATH MARKER        a torch.save'd object whose unpickling creates MARKER
  document PATH JSON        a checkpoint with a valid checksum whose document is JSON
  keep_lines PATH N         the first N lines kept
  drop_last_line PATH
  append_line PATH TEXT
  insert_line PATH N TEXT   TEXT becomes line N
  flip_label PATH N         line N's pair labelled the other way (PbPO's label, SELM's chosen and
                            rejected swapped)
  no_answer PATH N          record N keeps its question, as its prompt, and nothing else
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    command: str
    expect: str
    setup: tuple = ()
    unchanged: tuple = ("{out_dir}",)


@dataclass(frozen=True)
class BaseRun:
    out_dir: str
    command: str
    setup: tuple = ()


SELM_OFFLINE = ("train_selm.py --model={model} --prefs={tmp}/prefs_copy.jsonl --heldout={heldout} "
                "{SELM} --max_pairs=8")
SELM_ONLINE = "train_selm.py --model={model} --prompts={train} {SELM} --online --online_prompts=8"
PBPO_RESUME = "train_pbpo.py {toy} {PBPO} --resume"
PBPO_FRESH = "train_pbpo.py --model={model} --prompts={train}"
LINK = ("write", "{tmp}/outside.txt", "not the run's\n")  # what a planted link points at
OUTSIDE = ("{out_dir}", "{tmp}/outside.txt")  # no write goes through a planted link

BASE_RUNS = [
    BaseRun("{tmp}/base_pbpo", "train_pbpo.py {toy} {PBPO}"),
    BaseRun("{tmp}/base_selm", SELM_OFFLINE,
            setup=(("copy", "{prefs}", "{tmp}/prefs_copy.jsonl"),)),
    BaseRun("{tmp}/base_online", SELM_ONLINE),
    # a run on copies of its inputs, which a case then changes at the same paths
    BaseRun("{tmp}/base_inputs",
            "train_pbpo.py --model={tmp}/inputs_model --prompts={tmp}/inputs.jsonl {PBPO} "
            "--episodes=1",
            setup=(("copy", "{model}", "{tmp}/inputs_model"),
                   ("copy", "{train}", "{tmp}/inputs.jsonl"))),
]


def model_copy(name, *edits):
    """The steps of a copy of the toy model at {tmp}/name, then `edits` (steps, or None)."""
    return (("copy", "{model}", "{tmp}/" + name), *[e for e in edits if e])


def run_copy(base, name, *edits):
    """The steps of a copy of a finished run at {tmp}/name, then `edits`."""
    return (("copy", "{tmp}/" + base, "{tmp}/" + name), *edits)


def prompt_file(name, text):
    return (("write", "{tmp}/" + name, text),)


CASES = [
    # ------------------------------------------------------------ models and prompt files
    Case("missing model dir", "train_pbpo.py --model=/no/such/model --prompts={train}",
         "/no/such/model: no such directory"),
    Case("model dir without files", "train_pbpo.py --model={tmp}/empty_model --prompts={train}",
         "no loadable tokenizer", setup=(("mkdir", "{tmp}/empty_model"),)),
    Case("unsupported architecture", "train_pbpo.py --model={tmp}/gpt2 --prompts={train}",
         "model_type 'gpt2' is not supported",
         setup=model_copy("gpt2", ("set_json", "{tmp}/gpt2/config.json", "model_type", "gpt2"))),
    Case("config.json not JSON", "train_pbpo.py --model={tmp}/badcfg --prompts={train}",
         "config.json", setup=model_copy("badcfg", ("write", "{tmp}/badcfg/config.json", "{"))),
    Case("weights missing", "train_pbpo.py --model={tmp}/noweights --prompts={train}",
         "neither model.safetensors nor model.safetensors.index.json",
         setup=model_copy("noweights", ("remove", "{tmp}/noweights/model.safetensors"))),
    Case("tokenizer without EOS", "train_pbpo.py --model={tmp}/noeos --prompts={train}",
         "the tokenizer has no EOS token",
         setup=model_copy("noeos",
                          ("set_json", "{tmp}/noeos/tokenizer_config.json", "eos_token", None))),
    Case("missing prompt file", "train_pbpo.py --model={model} --prompts=/no/such.jsonl",
         "/no/such.jsonl"),
    Case("empty prompt file", "train_pbpo.py --model={model} --prompts={tmp}/empty.jsonl",
         "empty.jsonl", setup=prompt_file("empty.jsonl", "")),
    Case("malformed JSONL", "train_pbpo.py --model={model} --prompts={tmp}/bad.jsonl",
         "bad.jsonl:2", setup=prompt_file("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
    Case("wrong field type", "train_pbpo.py --model={model} --prompts={tmp}/type.jsonl",
         "type.jsonl:1: field 'prompt'", setup=prompt_file("type.jsonl", '{"prompt": 5}\n')),
    Case("missing field", "train_pbpo.py --model={model} --prompts={tmp}/field.jsonl",
         "field.jsonl:1: missing field 'prompt'",
         setup=prompt_file("field.jsonl", '{"text": "hi"}\n')),
    Case("prompts longer than the context", PBPO_FRESH + " --max_prompt_len=3",
         "longer than max_prompt_len=3"),
    Case("no answer for the gold oracle",
         "train_pbpo.py --model={model} --prompts={tmp}/noanswer.jsonl",
         "--oracle=gold needs an 'answer' field",
         setup=prompt_file("noanswer.jsonl", '{"prompt": "hi"}\n')),
    # ------------------------------------------------------------ flags
    Case("max_new_tokens 0", PBPO_FRESH + " --max_new_tokens=0",
         "--max_new_tokens=0: expected a finite number >= 1"),
    Case("NaN learning rate", PBPO_FRESH + " --lr=nan", "--lr=nan: expected a finite number >= 0"),
    Case("negative KL weight", PBPO_FRESH + " --kl_coef=-1",
         "--kl_coef=-1.0: expected a finite number >= 0"),
    Case("infinite bound", PBPO_FRESH + " --bound=inf",
         "--bound=inf: expected a finite number >= 1e-08"),
    Case("group of one", PBPO_FRESH + " --group=1", "--group=1: expected a finite number >= 2"),
    Case("greedy leader", PBPO_FRESH + " --temperature=0",
         "--temperature=0.0: expected a finite number >= 1e-06 "
         "(T: of y⁰, π's samples and their log-probs)"),
    Case("not an integer", PBPO_FRESH + " --episodes=two", "--episodes: invalid int value"),
    Case("unknown level", PBPO_FRESH + " --level=word",
         "--level='word': expected one of seq, token"),
    Case("unknown oracle", PBPO_FRESH + " --oracle=magic",
         "--oracle='magic': expected gold, gsm8k or rm:PATH"),
    Case("missing reward model", PBPO_FRESH + " --oracle=rm:/no/rm",
         "expected a local HF reward model directory"),
    Case("--resume without a checkpoint", PBPO_FRESH + " --out_dir={tmp}/nothing --resume",
         "--resume: no checkpoint at"),
    Case("fresh run over a previous one", PBPO_FRESH + " --out_dir={tmp}/run",
         "holds a previous run",
         setup=(("mkdir", "{tmp}/run"), ("write", "{tmp}/run/checkpoint.pt", b""))),
    Case("pair without 'rejected'", "train_selm.py --model={model} --prefs={tmp}/pairs.jsonl",
         "pairs.jsonl:1: missing field 'rejected'",
         setup=prompt_file("pairs.jsonl", '{"prompt": "a", "chosen": "b"}\n')),
    Case("SELM with max_new_tokens 0",
         "train_selm.py --model={model} --prefs={prefs} --max_new_tokens=0",
         "expected a finite number >= 1"),
    Case("no follower steps", PBPO_FRESH + " --t_in=0", "--t_in=0: expected a finite number >= 1"),
    Case("max_new_tokens past the context", PBPO_FRESH + " --max_new_tokens=1000000",
         "--max_new_tokens=1000000 is more than the model's context, max_position_embeddings=256"),
    Case("nothing to evaluate", PBPO_FRESH + " --eval_max=0",
         "--eval_max=0: expected a finite number >= 1"),
    Case("SELM, nothing to evaluate", "train_selm.py --model={model} --prefs={prefs} --eval_max=0",
         "--eval_max=0: expected a finite number >= 1"),
    Case("a bool flag neither on nor off", PBPO_FRESH + " --normalize=maybe",
         "argument --normalize: invalid boolean value: 'maybe'"),
    # ------------------------------------------------------------ files
    Case("JSON nested too deep", "train_pbpo.py --model={model} --prompts={tmp}/deep.jsonl",
         "deep.jsonl:1: bad JSON (maximum recursion depth exceeded",
         setup=prompt_file("deep.jsonl", "[" * 100000 + "\n")),
    Case("a 5000-digit number", "train_pbpo.py --model={model} --prompts={tmp}/digits.jsonl",
         "digits.jsonl:1: bad JSON (Exceeds the limit (4300 digits)",
         setup=prompt_file("digits.jsonl", '{"prompt": "a", "answer": ' + "9" * 5000 + "}\n")),
    Case("text that is not Unicode",
         "train_pbpo.py --model={model} --prompts={tmp}/surrogate.jsonl",
         "surrogate.jsonl:1: bad JSON ('utf-8' codec can't encode character",
         setup=prompt_file("surrogate.jsonl", '{"prompt": "\\ud800"}\n')),
    Case("text that is not UTF-8", "train_pbpo.py --model={model} --prompts={tmp}/latin1.jsonl",
         "latin1.jsonl: not UTF-8 text (byte 15: invalid continuation byte)",
         setup=prompt_file("latin1.jsonl", b'{"prompt": "caf\xe9"}\n')),
    Case("prompt file that never ends (FIFO)",
         "train_pbpo.py --model={model} --prompts={tmp}/fifo.jsonl",
         "fifo.jsonl: not a regular file", setup=(("fifo", "{tmp}/fifo.jsonl"),)),
    Case("prompt file that never ends (/dev/zero)",
         "train_pbpo.py --model={model} --prompts=/dev/zero", "/dev/zero: not a regular file"),
    Case("model file that never ends (FIFO)",
         "train_pbpo.py --model={tmp}/fifo_model --prompts={train}",
         "generation_config.json: not a regular file",
         setup=model_copy("fifo_model", ("fifo", "{tmp}/fifo_model/generation_config.json"))),
    Case("truncated safetensors", "train_pbpo.py --model={tmp}/truncated --prompts={train}",
         "model.safetensors: not a readable safetensors file "
         "(Error while deserializing header: incomplete metadata",
         setup=model_copy("truncated", ("halve", "{tmp}/truncated/model.safetensors"))),
    Case("index without a weight map", "train_pbpo.py --model={tmp}/index --prompts={train}",
         "model.safetensors.index.json: expected a 'weight_map' of tensor names to files",
         setup=model_copy("index", ("remove", "{tmp}/index/model.safetensors"),
                          ("write", "{tmp}/index/model.safetensors.index.json",
                           '{"metadata": {}}'))),
    Case("config.json: a size that is no number",
         "train_pbpo.py --model={tmp}/strsize --prompts={train}",
         "Validation error for field 'hidden_size': "
         "TypeError: Field 'hidden_size' expected int, got str (value: '32')",
         setup=model_copy("strsize",
                          ("set_json", "{tmp}/strsize/config.json", "hidden_size", "32"))),
    Case("config.json: a negative size", "train_pbpo.py --model={tmp}/negsize --prompts={train}",
         "config.json: hidden_size must be a positive integer to build a llama model, got -32",
         setup=model_copy("negsize",
                          ("set_json", "{tmp}/negsize/config.json", "hidden_size", -32))),
    Case("config.json disagrees with the weights",
         "train_pbpo.py --model={tmp}/heads --prompts={train}", "config.json implies (32, 48)",
         setup=model_copy("heads",
                          ("set_json", "{tmp}/heads/config.json", "intermediate_size", 48))),
    Case("config.json disagrees with the tokenizer",
         "train_pbpo.py --model={tmp}/vocab --prompts={train}",
         "must be ids below the vocab_size=300",
         setup=model_copy("vocab", ("vocab", "{tmp}/vocab", 300))),
    Case("EOS id outside the vocabulary", "train_pbpo.py --model={tmp}/geneos --prompts={train}",
         "generation_config.json: eos_token_id [2, 100000] and the tokenizer",
         setup=model_copy("geneos", ("set_json", "{tmp}/geneos/generation_config.json",
                                     "eos_token_id", [2, 100000]))),
    Case("broken tokenizer.json", "train_pbpo.py --model={tmp}/badtok --prompts={train}",
         "no loadable tokenizer",
         setup=model_copy("badtok",
                          ("write", "{tmp}/badtok/tokenizer.json", '{"model": {"type": "BPE"}}'))),
    Case("reward backbone with another tokenizer", PBPO_FRESH + " --rm_backbone={tmp}/othertok",
         "its tokenizer is not", setup=model_copy("othertok", ("swap_ids", "{tmp}/othertok"))),
    # ------------------------------------------------------------ run directories: checkpoints,
    # flags, scripts
    Case("checkpoint with 4 bytes flipped", PBPO_RESUME + " --out_dir={tmp}/flipped",
         "checksum mismatch: the file is corrupt",
         setup=run_copy("base_pbpo", "flipped",
                        ("flip_bytes", "{tmp}/flipped/checkpoint.safetensors"))),
    Case("checkpoint truncated", PBPO_RESUME + " --out_dir={tmp}/truncated_ckpt",
         "not a readable checkpoint (Error while deserializing header",
         setup=run_copy("base_pbpo", "truncated_ckpt",
                        ("halve", "{tmp}/truncated_ckpt/checkpoint.safetensors"))),
    Case("checkpoint empty", PBPO_RESUME + " --out_dir={tmp}/empty_ckpt",
         "not a readable checkpoint (Error while deserializing header: header too small)",
         setup=run_copy("base_pbpo", "empty_ckpt",
                        ("write", "{tmp}/empty_ckpt/checkpoint.safetensors", b""))),
    Case("checkpoint of random bytes", PBPO_RESUME + " --out_dir={tmp}/random_ckpt",
         "not a readable checkpoint (Error while deserializing header",
         setup=run_copy("base_pbpo", "random_ckpt",
                        ("random_bytes", "{tmp}/random_ckpt/checkpoint.safetensors"))),
    Case("checkpoint crafted to run code", PBPO_RESUME + " --out_dir={tmp}/pickle",
         "not a readable checkpoint",
         setup=run_copy("base_pbpo", "pickle",
                        ("pickle", "{tmp}/pickle/checkpoint.safetensors", "{tmp}/MARKER")),
         unchanged=("{out_dir}", "{tmp}/MARKER")),  # the payload ran nothing
    Case("checkpoint lost", PBPO_RESUME + " --out_dir={tmp}/lost",
         "checkpoints.log shows the run had one: refusing to start it over",
         setup=run_copy("base_pbpo", "lost", ("remove", "{tmp}/lost/checkpoint.safetensors"))),
    Case("only a checkpoint of an older version", PBPO_RESUME + " --out_dir={tmp}/legacy",
         "checkpoint.pt shows the run had one: refusing to start it over",
         setup=run_copy("base_pbpo", "legacy",
                        ("rename", "{tmp}/legacy/checkpoint.safetensors",
                         "{tmp}/legacy/checkpoint.pt"),
                        ("remove", "{tmp}/legacy/checkpoints.log"))),
    Case("resume with another learning rate", PBPO_RESUME + " --out_dir={tmp}/lr --lr=0.5",
         "is a run with other flags (--lr 0.0001 -> 0.5); "
         "only episodes, micro_batch, on_nonfinite, dist_timeout may change",
         setup=run_copy("base_pbpo", "lr")),
    Case("resume with another G, level and seed",
         PBPO_RESUME + " --out_dir={tmp}/glevel --group=4 --level=token --seed=1",
         "(--group 2 -> 4; --level 'seq' -> 'token'; --seed 0 -> 1)",
         setup=run_copy("base_pbpo", "glevel")),
    Case("resume with another model",
         PBPO_RESUME + " --out_dir={tmp}/model --model={tmp}/same_arch",
         "(--model '{model}' -> '{tmp}/same_arch')",
         setup=(*run_copy("base_pbpo", "model"), *model_copy("same_arch"))),
    Case("resume with fewer episodes than done",
         PBPO_RESUME + " --out_dir={tmp}/fewer --episodes=1",
         "--episodes=1: the run is past episode 2 already", setup=run_copy("base_pbpo", "fewer")),
    Case("SELM resume with more iterations",
         SELM_OFFLINE + " --resume --out_dir={tmp}/iterations --iterations=2",
         "(--iterations 1 -> 2); only micro_batch, on_nonfinite, dist_timeout may change",
         setup=run_copy("base_selm", "iterations")),
    Case("PbPO resume in a SELM run", PBPO_RESUME + " --out_dir={tmp}/selm",
         "checkpoint.safetensors was written by train_selm.py, not train_pbpo.py",
         setup=run_copy("base_selm", "selm")),
    # ------------------------------------------------------------ eval.py
    Case("eval: negative limit",
         "eval.py generation --model={model} --prompts={heldout} --limit=-3",
         "--limit=-3: expected a finite number >= 0", unchanged=()),
    Case("eval: unknown device",
         "eval.py generation --model={model} --prompts={heldout} --device=gpu",
         "--device=gpu: expected cpu", unchanged=()),
    Case("eval: truncated safetensors",
         "eval.py generation --model={tmp}/eval_truncated --prompts={heldout}",
         "model.safetensors: not a readable safetensors file",
         setup=model_copy("eval_truncated", ("halve", "{tmp}/eval_truncated/model.safetensors")),
         unchanged=()),
    Case("eval: max_new_tokens past the context",
         "eval.py generation --model={model} --prompts={heldout} --max_new_tokens=1000000",
         "is more than the model's context", unchanged=()),
    Case("eval: reference with another tokenizer",
         "eval.py winrate --model={model} --ref={tmp}/eval_othertok --prompts={heldout}",
         "its tokenizer is not",
         setup=model_copy("eval_othertok", ("swap_ids", "{tmp}/eval_othertok")), unchanged=()),
    Case("eval: pass@k at temperature 0",
         "eval.py generation --model={model} --prompts={heldout} --k=2",
         "pass@2 needs k samples at a temperature > 0", unchanged=()),
    Case("eval: data file that never ends",
         "eval.py choice --model={model} --data={tmp}/fifo2.jsonl",
         "fifo2.jsonl: not a regular file", setup=(("fifo", "{tmp}/fifo2.jsonl"),), unchanged=()),
    # ------------------------------------------------------------ run directories that cannot
    # hurt: planted links, changed inputs, a store that is not the checkpoint's
    Case("a planted lock link", PBPO_FRESH + " --out_dir={tmp}/lock_link",
         "lock: not a regular file in the run directory (a symbolic link, a FIFO?)",
         setup=(LINK, ("mkdir", "{tmp}/lock_link"),
                ("link", "{tmp}/lock_link/lock", "{tmp}/outside.txt")),
         unchanged=OUTSIDE),
    Case("a planted metrics link on resume", PBPO_RESUME + " --out_dir={tmp}/metrics_link",
         "metrics.jsonl: not a regular file in the run directory",
         setup=(LINK, *run_copy("base_pbpo", "metrics_link",
                                ("link", "{tmp}/metrics_link/metrics.jsonl", "{tmp}/outside.txt"))),
         unchanged=OUTSIDE),
    Case("a planted link in the export", PBPO_RESUME + " --episodes=3 --out_dir={tmp}/final_link",
         "final/model.safetensors: not a regular file in the run directory",
         setup=(LINK, *run_copy("base_pbpo", "final_link",
                                ("link", "{tmp}/final_link/final/model.safetensors",
                                 "{tmp}/outside.txt"))),
         unchanged=OUTSIDE),
    Case("a FIFO for the preference store", PBPO_RESUME + " --out_dir={tmp}/store_fifo",
         "preferences.jsonl: not a regular file in the run directory (a symbolic link, a FIFO?)",
         setup=run_copy("base_pbpo", "store_fifo", ("remove", "{tmp}/store_fifo/preferences.jsonl"),
                        ("fifo", "{tmp}/store_fifo/preferences.jsonl"))),
    Case("a checkpoint whose document is a list", PBPO_RESUME + " --out_dir={tmp}/ckpt_list",
         "not a readable checkpoint",
         setup=run_copy("base_pbpo", "ckpt_list",
                        ("document", "{tmp}/ckpt_list/checkpoint.safetensors", "[]"))),
    Case("an empty --out_dir", PBPO_FRESH + " --out_dir=",
         "--out_dir='': expected the path of the run directory", unchanged=()),
    Case("resume on changed inputs at the same paths",
         "train_pbpo.py --model={tmp}/inputs_model --prompts={tmp}/inputs.jsonl {PBPO} --resume "
         "--out_dir={tmp}/inputs",
         "--resume: --model={tmp}/inputs_model, --prompts={tmp}/inputs.jsonl: "
         "other contents than the run in",
         setup=(*run_copy("base_inputs", "inputs"),
                ("weights", "{tmp}/inputs_model", "model.norm.weight", "grown"),
                ("keep_lines", "{tmp}/inputs.jsonl", 3))),
    Case("checkpoint lost with its log, pairs of episode 2 kept",
         PBPO_RESUME + " --out_dir={tmp}/lost_all",
         "yet preferences.jsonl (pairs of episode 2) shows the run had one: "
         "refusing to start it over",
         setup=run_copy("base_pbpo", "lost_all",
                        ("remove", "{tmp}/lost_all/checkpoint.safetensors"),
                        ("remove", "{tmp}/lost_all/checkpoints.log"))),
    Case("a store line that is no record", PBPO_RESUME + " --out_dir={tmp}/store_shape",
         "preferences.jsonl:17: expected a preference record "
         "(a JSON object with an integer 'episode')",
         setup=run_copy("base_pbpo", "store_shape",
                        ("append_line", "{tmp}/store_shape/preferences.jsonl",
                         '{"prompt": "x"}'))),
    Case("a store line that is a list", PBPO_RESUME + " --out_dir={tmp}/store_list",
         "preferences.jsonl:6: expected a preference record",
         setup=run_copy("base_pbpo", "store_list",
                        ("insert_line", "{tmp}/store_list/preferences.jsonl", 6, "[1, 2]"))),
    Case("a store one pair short", PBPO_RESUME + " --out_dir={tmp}/store_short",
         "preferences.jsonl: its 15 pairs up to episode 2 are not the 16 pairs",
         setup=run_copy("base_pbpo", "store_short",
                        ("drop_last_line", "{tmp}/store_short/preferences.jsonl"))),
    Case("a store with an edited label", PBPO_RESUME + " --out_dir={tmp}/store_label",
         "are not the 16 pairs",
         setup=run_copy("base_pbpo", "store_label",
                        ("flip_label", "{tmp}/store_label/preferences.jsonl", 4))),
    Case("SELM: a store with an edited label",
         SELM_ONLINE + " --resume --out_dir={tmp}/online_label", "are not the",
         setup=run_copy("base_online", "online_label",
                        ("flip_label", "{tmp}/online_label/preferences.jsonl", 4))),
    Case("SELM: a planted metrics link", SELM_OFFLINE + " --resume --out_dir={tmp}/selm_link",
         "metrics.jsonl: not a regular file in the run directory",
         setup=(LINK, *run_copy("base_selm", "selm_link",
                                ("link", "{tmp}/selm_link/metrics.jsonl", "{tmp}/outside.txt"))),
         unchanged=OUTSIDE),
    # the preference file every SELM case above resumes with changes: their flags, links and
    # store are checked first
    Case("SELM: resume on changed inputs", SELM_OFFLINE + " --resume --out_dir={tmp}/selm_inputs",
         "--resume: --prefs={tmp}/prefs_copy.jsonl: other contents",
         setup=(*run_copy("base_selm", "selm_inputs"),
                ("drop_last_line", "{tmp}/prefs_copy.jsonl"))),
    # ------------------------------------------------------------ remote code and chat
    # templates: a model directory is data, never code
    Case("auto_map in config.json", "train_pbpo.py --model={tmp}/automap --prompts={train}",
         "config.json: 'auto_map' names Python code to run; "
         "no code of a model directory is ever run",
         setup=model_copy("automap", ("set_json", "{tmp}/automap/config.json", "auto_map",
                                      {"AutoModel": "evil.Model"}),
                          ("write", "{tmp}/automap/evil.py", "open('{tmp}/EVIL', 'w')")),
         unchanged=("{out_dir}", "{tmp}/EVIL")),
    Case("auto_map in tokenizer_config.json",
         "train_pbpo.py --model={tmp}/automap_tok --prompts={train}",
         "tokenizer_config.json: 'auto_map' names Python code",
         setup=model_copy("automap_tok", ("set_json", "{tmp}/automap_tok/tokenizer_config.json",
                                          "auto_map", {"AutoTokenizer": ["evil.Tok", None]}))),
    Case("auto_map in a reward model", PBPO_FRESH + " --oracle=rm:{tmp}/automap_rm",
         "'auto_map' names Python code",
         setup=model_copy("automap_rm", ("set_json", "{tmp}/automap_rm/config.json", "auto_map",
                                         {"AutoModel": "evil.Model"}),
                          ("write", "{tmp}/automap_rm/evil.py", "open('{tmp}/EVIL_RM', 'w')")),
         unchanged=("{out_dir}", "{tmp}/EVIL_RM")),
    Case("a chat template that never ends",
         "train_pbpo.py --model={tmp}/slow_template --prompts={train}",
         "(TimeoutError: ran for more than 10 s)",
         setup=model_copy("slow_template", (
             "set_json", "{tmp}/slow_template/tokenizer_config.json", "chat_template",
             "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"))),
    Case("a chat template that raises",
         "train_pbpo.py --model={tmp}/raising_template --prompts={train}",
         "its chat template failed on",
         setup=model_copy("raising_template", (
             "set_json", "{tmp}/raising_template/tokenizer_config.json", "chat_template",
             "{{ raise_exception('no') }}"))),
    Case("a chat template that does not parse",
         "train_pbpo.py --model={tmp}/bad_template --prompts={train}",
         "its chat template failed on",
         setup=model_copy("bad_template", (
             "set_json", "{tmp}/bad_template/tokenizer_config.json", "chat_template",
             "{% for %}"))),
    # ------------------------------------------------------------ inputs checked before the
    # first oracle call
    Case("no answer in record 17", "train_pbpo.py --model={model} --prompts={tmp}/noanswer17.jsonl",
         "noanswer17.jsonl:17: --oracle=gold needs an 'answer' field",
         setup=(("copy", "{train}", "{tmp}/noanswer17.jsonl"),
                ("no_answer", "{tmp}/noanswer17.jsonl", 17))),
    Case("SELM online, no answer in record 17",
         "train_selm.py --model={model} --prompts={tmp}/noanswer17s.jsonl {SELM} --online",
         "noanswer17s.jsonl:17: --oracle=gold needs",
         setup=(("copy", "{train}", "{tmp}/noanswer17s.jsonl"),
                ("no_answer", "{tmp}/noanswer17s.jsonl", 17))),
    Case("NaN weights", "train_pbpo.py --model={tmp}/nan --prompts={train}",
         "tensor 'model.norm.weight' (torch.float32): "
         "expected finite floating-point weights, no NaN or inf",
         setup=model_copy("nan", ("weights", "{tmp}/nan", "model.norm.weight", "nan"))),
    Case("bool weights", "train_pbpo.py --model={tmp}/bool --prompts={train}",
         "tensor 'model.norm.weight' (torch.bool): expected finite floating-point weights",
         setup=model_copy("bool", ("weights", "{tmp}/bool", "model.norm.weight", "bool"))),
    Case("int8 weights", "train_pbpo.py --model={tmp}/int8 --prompts={train}",
         "(torch.int8): expected finite floating-point weights",
         setup=model_copy("int8", ("weights", "{tmp}/int8", "model.norm.weight", "int8"))),
    Case("eval: NaN weights", "eval.py generation --model={tmp}/eval_nan --prompts={heldout}",
         "no NaN or inf",
         setup=model_copy("eval_nan", ("weights", "{tmp}/eval_nan", "model.norm.weight", "nan")),
         unchanged=()),
    Case("an enhancer temperature of 1e-300", PBPO_FRESH + " --enh_temp=1e-300",
         "--enh_temp=1e-300: expected a finite number >= 1e-06"),
    Case("2e9 exploration prompts", PBPO_FRESH + " --explore_prompts=2000000000",
         "--explore_prompts=2000000000 × --enh_samples=4: 8000000000 rows a rank need at least"),
    Case("a group of 1e8", PBPO_FRESH + " --group=100000000",
         "--leader_prompts=16 × --group=100000000: 1600000000 rows a rank need"),
    Case("SELM online, 2e9 prompts",
         "train_selm.py --model={model} --prompts={train} --online --online_prompts=2000000000",
         "--online_prompts=2000000000: 4000000000 rows a rank need at least"),
]

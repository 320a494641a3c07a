"""
experiments/bench.py: model.py against `transformers` and against the plain log-prob path on real
model shapes with random weights, in one process (experiments/BENCHMARKS.md says what each number
means and holds the tables). Sections:
  sample    our KV-cache sampler vs transformers `generate` (dynamic and static cache): the greedy
            tokens checked equal, the decode step's time, the bandwidth floor
  logprobs  the fused chunked log-probs vs log_softmax + gather on the full logits: time, and peak
            memory above the inputs (GPU: the allocator's statistics; CPU: a subprocess's peak RSS)
  train     a policy-gradient step (fused log-probs, backward, AdamW), FSDP2 on one rank +
            torch.compile on GPU: MFU
  episode   a PbPO episode of train_pbpo.py in a subprocess: its seconds from its metrics.jsonl

  python -m experiments.bench --suite=gpu          # one H100/H200: BENCHMARKS.md's GPU table
  OMP_NUM_THREADS=1 python -m experiments.bench --suite=cpu     # its CPU table (11 min)
  python -m experiments.bench --shape=llama3-8b --sections=sample,logprobs   # one shape, any part
  python -m pytest -q tests/test_bench.py          # both suites' command path, tiny, on CPU
"""
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import model as M
import ranks
import run
from run import knob
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # config.json dicts of the real models; the weights are random
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=5e5,
                      tie_word_embeddings=False, max_position_embeddings=131072,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0,
                                        original_max_position_embeddings=8192)),
    "qwen2-20m": dict(model_type="qwen2", vocab_size=32000, hidden_size=512,  # 20.8M parameters
                      intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                      tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                 max_position_embeddings=4096),
    "tiny-llama": dict(model_type="llama", vocab_size=500, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=False,
                       max_position_embeddings=4096,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0,
                                         original_max_position_embeddings=64)),
}


@dataclass
class Config:
    suite: str = knob("", "cpu | gpu: the runs of SUITES[suite], their table written into --doc",
                      choices=("", "cpu", "gpu"))
    smoke: bool = knob(False, "with --suite: every run at tiny sizes (what tests/test_bench.py "
                              "runs)")
    doc: str = knob("", "the document the suite's table goes into (default: "
                        "experiments/BENCHMARKS.md)")
    shape: str = knob("qwen2.5-0.5b", "a key of SHAPES", choices=tuple(SHAPES))
    sections: str = knob("sample,logprobs,train,episode", "comma-separated, run in this order")
    batch: int = knob(64, "sampling: rows")
    prompt_len: int = knob(128, "sampling: prompt tokens per row")
    new_tokens: int = knob(256, "sampling: tokens generated per row (no early stop)", at_least=2)
    hf_caches: str = knob("dynamic,static", "sampling: the transformers caches timed against ours")
    greedy_rows: int = knob(8, "sampling: rows of the greedy check, ours vs transformers in fp32",
                            at_least=1)
    greedy_tokens: int = knob(32, "sampling: new tokens of the greedy check", at_least=1)
    lp_batch: int = knob(8, "log-prob and training-step batch: rows")
    lp_len: int = knob(2048, "log-prob and training-step batch: tokens per row")
    lp_plus_one: bool = knob(True, "log-probs: also time one token more (time must grow smoothly)")
    fit_cap: int = knob(0, "GPU: the log-prob doubling search for the longest sequence stops here")
    repeats: int = knob(5, "timed rounds per measurement, after one untimed round", at_least=1)
    compile: bool = knob(True,
        "train section on GPU: torch.compile each block (as torchtitan does)")
    checkpointing: bool = knob(False, "train section on GPU: activation checkpointing")
    episode_flags: str = knob("", "extra flags for train_pbpo.py in the episode section")
    budget_s: int = knob(0, "start no section after this many seconds (0: the suite's, else none)")
    seed: int = knob(0, "")
    out: str = knob("", "JSON results (default: out/bench_<suite or shape>.json)")



TINY_EPISODE = ("--explore_prompts=8 --enh_samples=2 --t_out=1 --t_in=2 --group=2 "
                "--leader_prompts=4 --max_new_tokens=16 --eval_max=8")
SUITES = {  # the runs of each suite, as changes to Config's defaults; on GPU the quick targets
    # first, then sampling (most of its time is compiling), then the episode
    "gpu": [dict(shape="qwen2.5-0.5b", sections="logprobs,train", repeats=3),
            dict(shape="llama3-8b", sections="logprobs", repeats=3),
            dict(shape="qwen2.5-0.5b", sections="sample", hf_caches="static", repeats=3),
            dict(shape="llama3-8b", sections="sample", hf_caches="static", repeats=3),
            dict(shape="qwen2.5-0.5b", sections="episode")],
    "cpu": [dict(shape="qwen2-20m", sections="sample,logprobs", batch=8, prompt_len=32,
                 new_tokens=64, lp_batch=1, lp_len=4096),
            dict(shape="qwen2.5-0.5b", sections="logprobs", lp_batch=1, lp_len=4096,
                 lp_plus_one=False, repeats=3)],
}
BUDGET_S = {"gpu": 420, "cpu": 0}  # a suite starts no section after this (the episode: 480)
SMOKE = dict(batch=4, prompt_len=8, new_tokens=8, greedy_rows=2, greedy_tokens=8, lp_batch=2,
             lp_len=64, repeats=2, episode_flags=TINY_EPISODE)  # --smoke: tiny sizes
SMOKE_SHAPE = {"qwen2.5-0.5b": "tiny", "qwen2-20m": "tiny", "llama3-8b": "tiny-llama"}
TARGETS = {  # suite -> (section, figure, comparison, bound): checked on the median of each run
    "gpu": [("sample", "greedy_rows_equal", ">=", 1), ("sample", "hf_static_over_ours", ">=", 4),
            ("sample", "ours_over_floor", "<=", 2.5),
            ("logprobs", "fused_over_naive_peak", "<=", 0.25),
            ("logprobs", "fused_over_naive_time", "<=", 1), ("train", "mfu", ">=", 0.4)],
    "cpu": [("sample", "greedy_rows_equal", ">=", 1),
            ("logprobs", "fused_over_naive_peak", "<=", 0.25),
            ("logprobs", "fused_over_naive_time", "<=", 1.3),
            ("logprobs", "fused_plus_one_over_n", "<=", 1.05)],
}
CUDA = torch.cuda.is_available()
# on CPU the process's CPU time: a machine shared with other jobs stretches wall time, less this
clock = time.perf_counter if CUDA else time.process_time


def sync():
    if CUDA:
        torch.cuda.synchronize()


def measure(fns, repeats, warmup=1):
    """{name: [seconds of each timed round]} of several callables run in rounds, one call of each a
    round, so that a slow spell of a shared machine hits all of them alike; the device is
    synchronised around every call, so queued kernels are counted where they ran."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def spread(values):
    """[min, median, max]: every timed figure is reported with its spread."""
    values = list(values)
    return [min(values), statistics.median(values), max(values)]


def ratio(a, b):
    """spread of a / b round by round: two series measured side by side."""
    return spread(x / y for x, y in zip(a, b))


def middle(value):
    return value[1] if isinstance(value, list) else value


def release():
    gc.collect()  # models with reference cycles, then the allocator's cache
    if CUDA:
        torch.cuda.empty_cache()


def copy_bandwidth(device):
    """Bytes per second a large device copy moves (read + write): the attainable bandwidth."""
    src = torch.empty(1 << (28 if CUDA else 22), device=device)  # 1 GiB of fp32 on GPU
    dst = torch.empty_like(src)
    return 2 * src.nbytes / statistics.median(measure({"copy": lambda: dst.copy_(src)}, 10)["copy"])


def matmul_rate(device, dtype):
    """FLOP/s of a large square matmul in `dtype`: the attainable rate MFU is measured against."""
    n = 8192 if CUDA else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / statistics.median(measure({"mm": lambda: a @ b}, 10)["mm"])


# ---------------------------------------------------------------------------- sample
def model_pair(shape, device, dtype, like=None):
    """Ours and transformers' model of one config with the same random weights (ours' own draw,
    or `like`'s cast to dtype). Neither stops at an EOS: every row decodes every token."""
    from transformers import AutoConfig, AutoModelForCausalLM  # here: rss_child needs none of it
    ours = M.build(M.model_config(shape), device, dtype).eval()
    if like is None:
        toy.init_weights(ours)
    else:
        ours.load_state_dict(like.state_dict())
    with torch.device(device):  # the same config and weights, transformers' own code
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape), dtype=dtype).eval()
    hf.load_state_dict(ours.state_dict())
    hf.generation_config.eos_token_id = None
    return ours, hf


def hf_generate(hf, ids, n, cache=None, sample=True):
    """transformers `generate`: n new tokens (B, n) at temperature 1 without truncation, or
    greedy; cache None = its default (dynamic) cache."""
    how = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else {
        "do_sample": False}
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, pad_token_id=0,
                      cache_implementation=cache, **how)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def bench_sample(cfg, shape, device, dtype):
    B, Lp, N = cfg.batch, cfg.prompt_len, cfg.new_tokens
    ids = torch.randint(shape["vocab_size"], (B, Lp),
                        generator=torch.Generator().manual_seed(cfg.seed)).to(device)  # (B, Lp)
    prompts = ids.tolist()
    # greedy tokens, ours and transformers', in fp32: in bf16 a near-tie of the top logits can
    # flip an argmax between two correct implementations
    ours, hf = model_pair(shape, device, torch.float32)
    rows, n = min(B, cfg.greedy_rows), min(N, cfg.greedy_tokens)
    mine = M.generate(ours, prompts[:rows], n, temperature=0, compile=False).tokens  # (rows, n)
    theirs = hf_generate(hf, ids[:rows], n, sample=False)  # (rows, n)
    differ = (mine != theirs).any(1)  # (rows,)
    res = {"greedy_rows_equal": 1 - differ.float().mean().item()}
    if differ.any():
        first = (mine != theirs).int().argmax(1)[differ].tolist()
        print(f"\n!!! GREEDY MISMATCH ({cfg.shape}): {int(differ.sum())} of {rows} rows differ "
              f"from transformers; first differing token of each: {first} !!!\n", flush=True)
    if dtype != torch.float32:
        del hf
        ours, hf = model_pair(shape, device, dtype, like=ours)
        release()

    # a decode step = (a call for N new tokens - a call for 1) / (N - 1): both calls pay the same
    # prefill and per-call overhead, so what is left is the N - 1 decode steps themselves
    calls = {"ours": lambda k: lambda: M.generate(ours, prompts, k, 1.0, seed=cfg.seed)}
    for cache in cfg.hf_caches.split(","):
        calls[f"hf_{cache}"] = lambda k, c=cache: lambda: hf_generate(
            hf, ids, k, None if c == "dynamic" else c)
    times = measure({(name, k): call(k) for name, call in calls.items() for k in (N, 1)},
                    cfg.repeats)
    steps = {}
    for name in calls:
        full, one = times[name, N], times[name, 1]
        steps[name] = [(a - b) / (N - 1) for a, b in zip(full, one)]
        res[f"{name}_ms_step"] = spread(1e3 * s for s in steps[name])
        res[f"{name}_tok_s"] = spread(B * N / a for a in full)
        res[f"{name}_first_token_ms"] = spread(1e3 * b for b in one)
    for name in calls:
        if name != "ours":
            res[f"{name}_over_ours"] = ratio(steps[name], steps["ours"])

    # the floor: every weight read once a step (the embedding only as a tied lm_head) + K and V
    # of the mean context; what else ours moves (all cache slots, the logits) is reported apart
    mc = ours.config
    weights = dict(ours.named_parameters())  # a tied lm_head appears once, as the embedding
    if not mc.tie_word_embeddings:
        weights.pop("model.embed_tokens.weight")  # a step gathers B rows of it
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    slot_bytes = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * dtype.itemsize
    slots = -(-(Lp + N) // 64) * 64  # our static cache's length, as model.generate rounds it
    kv_bytes = B * slot_bytes * (Lp + N / 2)
    bandwidth = copy_bandwidth(device)
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    res.update(weight_gb=weight_bytes / 1e9, kv_gb_per_step=kv_bytes / 1e9,
               kv_gb_all_slots=B * slot_bytes * slots / 1e9,
               logits_gb_per_pass=B * mc.vocab_size * 4 / 1e9, copy_gb_s=bandwidth / 1e9,
               floor_ms_step=1e3 * floor_s,
               ours_over_floor=spread(s / floor_s for s in steps["ours"]))
    return res


# ---------------------------------------------------------------------------- log-probs
def lp_inputs(w, n, seed=0):
    """Random hidden states (n, D), targets (n,) and a per-token weight (n,), like an advantage."""
    g = torch.Generator(w.device).manual_seed(seed)
    h = torch.randn(n, w.shape[1], generator=g, device=w.device).to(w.dtype).requires_grad_()
    tgt = torch.randint(w.shape[0], (n,), generator=g, device=w.device)
    return h, tgt, torch.randn(n, generator=g, device=w.device)


def lm_head(V, D, device, dtype, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return (0.02 * torch.randn(V, D, generator=g, device=device)).to(dtype).requires_grad_()


def logprob_pass(kind, w, h, tgt, weight):
    """One forward + backward of Σ weight·log π(tgt | h), gradients to h (N, D) and w (V, D):
    `fused` is model.fused_logprobs, `naive` log_softmax + gather on the full (N, V) logits."""
    if kind == "fused":
        logp = M.fused_logprobs(h, w, tgt)  # (N,)
    else:
        logp = F.linear(h, w).float().log_softmax(-1).gather(-1, tgt[:, None])[:, 0]  # (N,)
    return torch.autograd.grad(logp, (h, w), weight)


def rss_child(kind, N, D, V):
    """In a fresh process: print the peak RSS of one pass above what the process held before it
    (imports, libraries' first use, the inputs), in MiB. Linux: /proc/self."""
    def status(key):
        return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read())[1]) << 10

    small = lm_head(64, D, "cpu", torch.float32)
    logprob_pass(kind, small, *lp_inputs(small, 8))  # the libraries' first-use memory
    w = lm_head(V, D, "cpu", torch.float32)
    inputs = lp_inputs(w, N)
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current RSS
    logprob_pass(kind, w, *inputs)
    print(json.dumps((status("VmHWM") - base) / 2 ** 20))


def peak_mib(kind, w, N):
    """Peak memory of one pass above its inputs, MiB: the allocator's statistics on GPU, the peak
    RSS of a subprocess on CPU (in this process freed memory may stay mapped)."""
    if CUDA:
        inputs = lp_inputs(w, N)
        release()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logprob_pass(kind, w, *inputs)
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    code = f"import experiments.bench as b; b.rss_child({kind!r}, {N}, {w.shape[1]}, {w.shape[0]})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"peak RSS of {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def fits(fn):
    release()
    try:
        fn()
        sync()
        return True
    except torch.OutOfMemoryError:
        return False


def bench_logprobs(cfg, shape, device, dtype):
    V, D, N = shape["vocab_size"], shape["hidden_size"], cfg.lp_batch * cfg.lp_len
    w = lm_head(V, D, device, dtype)
    at_n, plus_one = lp_inputs(w, N), lp_inputs(w, N + 1)
    fns = {"naive": lambda: logprob_pass("naive", w, *at_n),
           "fused": lambda: logprob_pass("fused", w, *at_n)}
    if cfg.lp_plus_one:
        fns["fused_plus_one"] = lambda: logprob_pass("fused", w, *plus_one)
    times = measure(fns, cfg.repeats)
    res = {f"{kind}_s": spread(t) for kind, t in times.items()}
    res["fused_over_naive_time"] = ratio(times["fused"], times["naive"])
    if cfg.lp_plus_one:
        res["fused_plus_one_over_n"] = ratio(times["fused_plus_one"], times["fused"])
    del at_n, plus_one
    for kind in ("naive", "fused"):
        res[f"{kind}_peak_mib"] = peak_mib(kind, w, N)
    res["fused_over_naive_peak"] = res["fused_peak_mib"] / res["naive_peak_mib"]
    for kind in ("fused", "naive") if CUDA and cfg.fit_cap else ():
        best, L = 0, 256  # doubling search: the longest power-of-two length that fits
        while L <= cfg.fit_cap and fits(
                lambda: logprob_pass(kind, w, *lp_inputs(w, L * cfg.lp_batch))):
            best, L = L, 2 * L
        res[f"{kind}_max_len"] = best
    return res


# ---------------------------------------------------------------------------- train
def bench_train(cfg, shape, device, dtype):
    mc = M.model_config(shape)
    model = toy.init_weights(M.build(mc, device))  # fp32 master weights; bf16 compute: FSDP2
    if CUDA:
        for block in model.model.layers if cfg.compile else []:
            block.compile()  # per block, before sharding, as torchtitan does
        mesh = init_device_mesh("cuda", (1,))
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)  # as the trainers shard on GPU
        for block in model.model.layers:  # as the trainers shard, with checkpointing optional
            block.checkpoint = cfg.checkpointing
            fully_shard(block, mesh=mesh, mp_policy=bf16)
        fully_shard(model, mesh=mesh, mp_policy=bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)  # as train_pbpo.py builds it
    B, T, V = cfg.lp_batch, cfg.lp_len, mc.vocab_size
    ids, adv = torch.randint(V, (B, T), device=device), torch.randn(B, T, device=device)
    attn = torch.ones_like(ids, dtype=torch.bool)

    def step():  # the leader's update in train_pbpo.py, one micro-batch
        logp = M.token_logprobs(model, ids, attn)  # (B, T)
        (-(adv * logp).sum() / adv.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = measure({"step": step}, cfg.repeats, warmup=2)["step"]  # compile, optimizer state
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() / 1e9
    # model FLOPs a token (MFU counts no recomputation): 6 per matmul weight (fwd + bwd; the
    # lm_head, not the embedding lookup) + causal attention, QKᵀ and AV over T/2 keys on average
    D, I, H = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads
    K, hd, L = mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers
    matmul_params = L * (D * hd * (2 * H + 2 * K) + 3 * D * I) + V * D
    flops = (6 * matmul_params + 6 * L * T * H * hd) * B * T  # a step
    del model, opt
    release()
    rate = matmul_rate(device, torch.bfloat16 if CUDA else torch.float32)
    return {"step_s": spread(seconds), "tok_s": spread(B * T / s for s in seconds),
            "peak_gb": peak if CUDA else None,
            "model_tflop_s": spread(flops / s / 1e12 for s in seconds),
            "matmul_tflop_s": rate / 1e12, "mfu": spread(flops / s / rate for s in seconds)}


# ---------------------------------------------------------------------------- episode
def bench_episode(cfg, shape, device, dtype, timeout=None):  # train_pbpo.py picks its dtype
    with tempfile.TemporaryDirectory() as tmp:
        # the toy task's prompts and tokenizer: ids it lacks decode to nothing, the token work
        # is the real shape's
        paths, path, run_dir = toy.build(f"{tmp}/toy", quick=True), f"{tmp}/model", f"{tmp}/run"
        model = toy.init_weights(M.build(M.model_config(shape), dtype=torch.bfloat16))
        M.save_pretrained(model, path)  # loaded as fp32
        del model
        for f in os.listdir(paths.model):
            if f.startswith("tokenizer"):
                shutil.copy(os.path.join(paths.model, f), path)
        cmd = [sys.executable, os.path.join(ROOT, "train_pbpo.py"), f"--model={path}",
               f"--prompts={paths.train}", "--episodes=2", f"--out_dir={run_dir}",
               *cfg.episode_flags.split()]  # the second episode is timed: compiled already
        # init_distributed made a group in this process; the child must not think it runs under
        # torchrun
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"train_pbpo.py ran past the {timeout:.0f} s the suite had left"}
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            episode = [r for r in map(json.loads, f) if r["kind"] == "episode"][-1]
    return {"episode_s": episode["wall_s"], "process_wall_s": wall}


# ---------------------------------------------------------------------------- tables
SECTIONS = {"sample": bench_sample, "logprobs": bench_logprobs, "train": bench_train,
            "episode": bench_episode}


def fmt(value):
    if value is None or isinstance(value, str):
        return "n/a" if value is None else value
    if isinstance(value, list):
        return f"{value[1]:.4g} [{value[0]:.4g}, {value[2]:.4g}]"
    return format(value, ".4g")


def suite_table(suite, command, env, results, seconds):
    """The suite's block of BENCHMARKS.md: how it was made, the targets, every figure."""
    how = ("The machine is shared with other jobs: times are this process's CPU time. "
           if env["device"] == "cpu" else "")
    lines = [textwrap.fill(
        f"`{command}`: {env['device']} ({env['dtype']}, torch threads: {env['threads']}), torch "
        f"{env['torch']}, transformers {env['transformers']}, {env['date']}, {seconds:.0f} s in "
        f"all. {how}Figures: median [min, max] over rounds that alternate the variants.", 100,
        break_long_words=False, break_on_hyphens=False),
        "", "| shape | target | measured | met |", "|---|---|---|---|"]
    for shape, sections in results.items():
        for section, figure, op, bound in TARGETS[suite]:
            figures = sections.get(section, {})
            if figure in figures:
                value = middle(figures[figure])
                met = "yes" if (value >= bound if op == ">=" else value <= bound) else "**no**"
                lines.append(f"| {shape} | {figure} {op} {bound} | {fmt(figures[figure])} "
                             f"| {met} |")
            elif "skipped" in figures:
                lines.append(f"| {shape} | {figure} {op} {bound} | {figures['skipped']} | - |")
    lines += ["", "| shape | section | figure | median [min, max] |", "|---|---|---|---|"]
    for shape, sections in results.items():
        for section, figures in sections.items():
            lines += [f"| {shape} | {section} | {k} | {fmt(v)} |" for k, v in figures.items()]
    return "\n".join(lines)


def write_block(path, suite, text):
    """Replace the text between <!-- suite:NAME --> and <!-- /suite:NAME --> in path."""
    begin, end = f"<!-- suite:{suite} -->", f"<!-- /suite:{suite} -->"
    doc = open(path, encoding="utf-8").read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no {begin} ... {end} block to write the {suite} table into")
    head, rest = doc.split(begin, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(cfg):
    if cfg.smoke and not cfg.suite:
        raise SystemExit("--smoke shrinks a suite: give --suite too")
    runs = [replace(cfg, **r) for r in SUITES[cfg.suite]] if cfg.suite else [cfg]
    if cfg.smoke:
        runs = [replace(r, shape=SMOKE_SHAPE[r.shape], **SMOKE) for r in runs]
    for r in runs:
        if set(r.sections.split(",")) - SECTIONS.keys():
            raise SystemExit(f"--sections: expected names from {list(SECTIONS)}")
    name = cfg.suite or cfg.shape
    cfg.out = cfg.out or os.path.join(ROOT, "out", f"bench_{name}{'_smoke' * cfg.smoke}.json")
    cfg.doc = cfg.doc or os.path.join(ROOT, "experiments", "BENCHMARKS.md")
    _, _, device = ranks.init_distributed()  # a one-rank group on GPU, for FSDP2 (train section)
    dtype = torch.bfloat16 if CUDA else torch.float32
    from importlib.metadata import version
    env = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": str(dtype),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": version("transformers"), "date": time.strftime("%Y-%m-%d")}
    command = " ".join(["python -m experiments.bench", *sys.argv[1:]])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    print(json.dumps({"command": command, **env}, indent=1), flush=True)
    results, t_start = {}, time.perf_counter()
    budget = cfg.budget_s or BUDGET_S.get(cfg.suite, 0)
    for r in runs:
        torch.manual_seed(r.seed)
        for section in r.sections.split(","):
            t0 = time.perf_counter()
            left = budget - (t0 - t_start)
            if budget and left < 0:
                out = {"skipped": f"not run: the suite's {budget} s were spent"}
            elif budget and section == "episode":  # its subprocess may use a minute more
                out = bench_episode(r, SHAPES[r.shape], device, dtype, timeout=left + 60)
            else:
                out = SECTIONS[section](r, SHAPES[r.shape], device, dtype)
            results.setdefault(r.shape, {})[section] = out
            torch.compiler.reset()  # drop the section's compiled graphs and CUDA-graph pools
            release()
            print(f"{r.shape} {section}: done in {time.perf_counter() - t0:.1f}s", flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
            with open(cfg.out, "w") as f:  # after every section: a run cut short keeps the rest
                json.dump({"config": asdict(cfg), "env": env, "results": results}, f, indent=1)
            if cfg.suite:
                write_block(cfg.doc, cfg.suite, suite_table(cfg.suite, command, env, results,
                                                           time.perf_counter() - t_start))
    print(f"\n{'shape':<14}{'section':<10}{'figure':<28}median [min, max]")
    for shape, sections in results.items():
        for section, figures in sections.items():
            for key, value in figures.items():
                print(f"{shape:<14}{section:<10}{key:<28}{fmt(value)}")
    print(f"results written to {cfg.out}" + (f" and {cfg.doc}" if cfg.suite else ""))


if __name__ == "__main__":
    main(run.parse_flags(Config, __doc__))

"""
experiments/bench.py: model.py against `transformers` on real model shapes with random weights, in one process (experiments/BENCHMARKS.md
says what each number means and holds the results). Sections:
  sample    our KV-cache sampler vs transformers `generate` (dynamic and static cache), and the bandwidth floor
  logprobs  the fused chunked log-prob kernel vs log_softmax + gather on the full logits: time, peak memory, the
            longest sequence each fits (GPU only)
  train     a policy-gradient step (fused log-probs, backward, AdamW), FSDP2 on one rank + torch.compile on GPU: MFU
  episode   a PbPO episode of train_pbpo.py in a subprocess: gen_s / train_s from its metrics.jsonl

  python -m experiments.bench --shape=qwen2.5-0.5b --out=out/bench_h100_qwen2.5-0.5b.json      # one H100: every section
  python -m experiments.bench --shape=llama3-8b --sections=sample,logprobs                      # 8B: train/episode need > 1 GPU
  python -m experiments.bench --shape=tiny --batch=4 --prompt_len=8 --new_tokens=8 --lp_batch=2 --lp_len=64   # CPU, about 1 min
  python -m pytest -q tests/test_bench.py                                           # the CPU smoke test
"""
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import model as M
import run
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # config.json dicts of the real models; the weights are random
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=5e5, tie_word_embeddings=False, max_position_embeddings=131072,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192)),
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                 tie_word_embeddings=True, max_position_embeddings=4096),  # what CPU and CI run
}


@dataclass
class Config:
    shape: str = "qwen2.5-0.5b"  # qwen2.5-0.5b | llama3-8b | tiny
    sections: str = "sample,logprobs,train,episode"  # comma-separated, run in this order
    batch: int = 64  # sampling: rows
    prompt_len: int = 128  # sampling: prompt tokens per row
    new_tokens: int = 256  # sampling: tokens generated per row (no early stop)
    lp_batch: int = 8  # log-prob and training-step batch: rows
    lp_len: int = 2048  # log-prob and training-step batch: tokens per row
    fit_cap: int = 1 << 21  # longest sequence the log-prob doubling search tries (GPU only)
    repeats: int = 5  # timed runs per measurement (the median is reported), after one untimed warm-up
    compile: bool = True  # train section on GPU: torch.compile each block (as torchtitan does)
    checkpointing: bool = False  # train section on GPU: activation checkpointing
    episode_flags: str = ""  # extra flags for train_pbpo.py in the episode section, space-separated
    seed: int = 0
    out: str = ""  # JSON results (default: out/bench_<shape>.json)


CUDA = torch.cuda.is_available()


def timed(fn, repeats, warmup=1):
    """(median wall seconds of fn() over `repeats` runs after `warmup` untimed ones, fn's last output); the device
    is synchronised on both sides of every run, so queued kernels are counted where they ran."""
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        CUDA and torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        CUDA and torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_gb(fn):
    """Peak allocated device memory (GB) while fn() runs, what was allocated before included; None off CUDA."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def copy_bandwidth(device):
    """Bytes per second a large device copy moves (read + write): the attainable memory bandwidth."""
    src = torch.empty(1 << (28 if CUDA else 22), device=device)  # 1 GiB of fp32 on GPU
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), 10)[0]


def matmul_rate(device, dtype):
    """FLOP/s of a large square matmul in `dtype`: the attainable compute rate MFU is measured against."""
    n = 8192 if CUDA else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, 10)[0]


def release():
    gc.collect()  # models with reference cycles, then the allocator's cache
    if CUDA:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- sample
@torch.no_grad()
def bench_sample(cfg, shape, device, dtype):
    mc = M.ModelConfig.from_hf_dict(shape)
    ours = M.build(mc, device, dtype).eval()
    with torch.device(device):  # the same config and weights, transformers' own code
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape), dtype=dtype).eval()
    hf.load_state_dict(ours.state_dict())
    B, Lp, N = cfg.batch, cfg.prompt_len, cfg.new_tokens
    ids = torch.randint(mc.vocab_size, (B, Lp), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    prompts = ids.tolist()

    def hf_generate(cache):  # min_new_tokens masks the config's EOS: every row decodes all N tokens, as ours does
        return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                   top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0,
                                   cache_implementation=cache)

    runs = {"ours": lambda: M.generate(ours, prompts, N, 1.0, seed=cfg.seed).tokens,  # no eos_ids: no early stop
            "hf_dynamic": hf_generate(None), "hf_static": hf_generate("static")}
    # a decode step's time = (whole call - the prompt's forward) / (N - 1); the prefill is timed on its own
    prefill = {"ours": timed(lambda: ours.lm_head(ours(ids)[:, -1]), cfg.repeats)[0],
               "hf": timed(lambda: hf(ids, use_cache=False, logits_to_keep=1), cfg.repeats)[0]}
    res = {"prefill_ms_ours": 1e3 * prefill["ours"], "prefill_ms_hf": 1e3 * prefill["hf"]}
    for name, fn in runs.items():
        seconds, tokens = timed(fn, cfg.repeats)
        assert tokens.shape[-1] in (N, Lp + N), f"{name}: {tokens.shape[-1]} tokens, expected {N} new ones"
        res[f"{name}_tok_s"] = B * N / seconds
        res[f"{name}_ms_step"] = 1e3 * (seconds - prefill["ours" if name == "ours" else "hf"]) / max(N - 1, 1)
    # the floor: every weight read once per step (the embedding only as the tied lm_head) plus the K/V of the mean
    # context over the decode; our sampler's static cache spans ceil64(Lp + N) slots, a little more than that
    weights = dict(ours.named_parameters())  # a tied lm_head appears once, under the embedding's name
    if not mc.tie_word_embeddings:
        weights.pop("model.embed_tokens.weight")  # a step gathers B rows of it
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    kv_bytes = 2 * mc.num_hidden_layers * B * mc.num_key_value_heads * mc.head_dim * (Lp + N / 2) * dtype.itemsize
    bandwidth = copy_bandwidth(device)
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth
    res.update(weight_gb=weight_bytes / 1e9, kv_gb_per_step=kv_bytes / 1e9, copy_gb_s=bandwidth / 1e9,
               floor_ms_step=floor_ms, ours_over_floor=res["ours_ms_step"] / floor_ms,
               hf_static_over_ours=res["hf_static_ms_step"] / res["ours_ms_step"],
               hf_dynamic_over_ours=res["hf_dynamic_ms_step"] / res["ours_ms_step"])
    return res


# ---------------------------------------------------------------------------- log-probs
def logprob_pass(kind, w, B, T):
    """One forward + backward of log π(targets | hidden) over B·T random tokens, gradients to the hidden states and
    the lm_head weight w (V, D): `fused` is model.fused_logprobs, `naive` the full (N, V) logits in fp32."""
    V, D = w.shape
    h = torch.randn(B * T, D, device=w.device, dtype=w.dtype, requires_grad=True)  # (N, D)
    tgt = torch.randint(V, (B * T,), device=w.device)  # (N,)
    if kind == "fused":
        logp = M.fused_logprobs(h, w, tgt)  # (N,)
    else:
        logp = F.linear(h, w).float().log_softmax(-1).gather(-1, tgt[:, None])[:, 0]  # (N,) via (N, V)
    torch.autograd.grad(logp, (h, w), torch.randn_like(logp))  # a per-token weight, like an advantage


def fits(fn):
    release()
    try:
        fn()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False


def bench_logprobs(cfg, shape, device, dtype):
    w = (0.02 * torch.randn(shape["vocab_size"], shape["hidden_size"], device=device)).to(dtype).requires_grad_()
    B, T, res = cfg.lp_batch, cfg.lp_len, {}
    for kind in ("fused", "naive"):
        res[f"{kind}_s"] = timed(lambda: logprob_pass(kind, w, B, T), cfg.repeats)[0]
        res[f"{kind}_peak_gb"] = peak_gb(lambda: logprob_pass(kind, w, B, T))
        release()
    res["naive_over_fused_peak"] = res["naive_peak_gb"] / res["fused_peak_gb"] if CUDA else None
    res["fused_over_naive_time"] = res["fused_s"] / res["naive_s"]
    for kind in ("fused", "naive"):  # doubling search: the longest power-of-two length that fits at this batch
        best, L = 0, 256
        while CUDA and L <= cfg.fit_cap and fits(lambda: logprob_pass(kind, w, B, L)):
            best, L = L, 2 * L
        res[f"{kind}_max_len"] = best if CUDA else None
    return res


# ---------------------------------------------------------------------------- train
def bench_train(cfg, shape, device, dtype):
    mc = M.ModelConfig.from_hf_dict(shape)
    model = M.build(mc, device)  # fp32 master weights; bf16 compute comes from FSDP2's policy on GPU
    if CUDA:
        for block in model.model.layers if cfg.compile else []:
            block.compile()  # per block, before sharding, as torchtitan does
        run.shard_model(model, activation_checkpointing=cfg.checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)  # as train_pbpo.py builds it
    B, T, V = cfg.lp_batch, cfg.lp_len, mc.vocab_size
    ids, adv = torch.randint(V, (B, T), device=device), torch.randn(B, T, device=device)
    attn = torch.ones_like(ids, dtype=torch.bool)

    def step():  # the leader's update in train_pbpo.py, one micro-batch
        logp = M.token_logprobs(model, ids, attn)  # (B, T)
        (-(adv * logp).sum() / adv.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, cfg.repeats, warmup=2)[0]  # warm-up: compile, optimizer state
    peak = peak_gb(step)
    # model FLOPs a token (MFU, not counting recomputation): 6 per matmul weight (fwd + bwd; the lm_head, not the
    # embedding lookup) plus causal attention, QKᵀ and AV over T/2 keys on average: 6·T·H·hd a layer
    D, I, H, K, hd = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    matmul_params = mc.num_hidden_layers * (D * hd * (2 * H + 2 * K) + 3 * D * I) + V * D
    flops_per_token = 6 * matmul_params + 6 * mc.num_hidden_layers * T * H * hd
    del model, opt
    release()
    rate = matmul_rate(device, torch.bfloat16 if CUDA else torch.float32)
    return {"step_s": seconds, "tok_s": B * T / seconds, "peak_gb": peak, "model_tflop_s": flops_per_token * B * T
            / seconds / 1e12, "matmul_tflop_s": rate / 1e12, "mfu": flops_per_token * B * T / seconds / rate}


# ---------------------------------------------------------------------------- episode
def bench_episode(cfg, shape, device, dtype):  # train_pbpo.py picks its own
    with tempfile.TemporaryDirectory() as tmp:
        # the toy task's prompts and tokenizer: the ids it lacks decode to nothing, the token work is the real shape's
        paths, path, run_dir = toy.build(os.path.join(tmp, "toy"), quick=True), f"{tmp}/model", f"{tmp}/run"
        M.save_pretrained(M.build(M.ModelConfig.from_hf_dict(shape), dtype=torch.bfloat16), path)  # loaded as fp32
        for f in os.listdir(paths.model):
            if f.startswith("tokenizer"):
                shutil.copy(os.path.join(paths.model, f), path)
        cmd = [sys.executable, os.path.join(ROOT, "train_pbpo.py"), f"--model={path}", f"--prompts={paths.train}",
               "--episodes=2", f"--out_dir={run_dir}", *cfg.episode_flags.split()]  # the last: compiled already
        # init_distributed set RANK etc. in this process; the child must not think it runs under torchrun
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            episode = [r for r in map(json.loads, f) if r["kind"] == "episode"][-1]
    gen, train = episode["gen_s"], episode["train_s"]
    return {"gen_s": gen, "train_s": train, "gen_share": gen / (gen + train), "process_wall_s": wall}


# ---------------------------------------------------------------------------- main
SECTIONS = {"sample": bench_sample, "logprobs": bench_logprobs, "train": bench_train, "episode": bench_episode}

if __name__ == "__main__":
    cfg = run.parse_flags(Config, __doc__)
    sections = cfg.sections.split(",")
    if cfg.shape not in SHAPES or set(sections) - SECTIONS.keys() or cfg.new_tokens < 2:
        raise SystemExit(f"expected --shape in {list(SHAPES)}, --sections from {list(SECTIONS)}, --new_tokens >= 2")
    cfg.out = cfg.out or os.path.join(ROOT, "out", f"bench_{cfg.shape}.json")
    _, _, device = run.init_distributed()  # a one-rank group on GPU, for FSDP2 in the train section
    dtype = torch.bfloat16 if CUDA else torch.float32
    torch.manual_seed(cfg.seed)
    env = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": str(dtype), "torch": torch.__version__,
           "transformers": transformers.__version__}
    print(json.dumps({**asdict(cfg), **env}, indent=1))
    results = {"config": asdict(cfg), "env": env}
    for name in sections:
        t0 = time.perf_counter()
        results[name] = SECTIONS[name](cfg, SHAPES[cfg.shape], device, dtype)
        torch.compiler.reset()  # drop this section's compiled graphs and their CUDA-graph memory pools
        release()
        print(f"{name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"\n{cfg.shape} on {env['device']} ({env['dtype']}), torch {env['torch']}, "
          f"transformers {env['transformers']}")
    print(f"{'section':<10}{'metric':<24}{'value':>12}")
    for name in sections:
        for key, value in results[name].items():
            print(f"{name:<10}{key:<24}{'n/a' if value is None else format(value, '.4g'):>12}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results written to {cfg.out}")

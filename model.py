"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) with HF's names and checkpoint I/O, a
static-KV-cache sampler and the fused log-probs; batches: prompts left-, responses right-padded.
Tests: python -m pytest -q tests/test_model.py tests/test_fsdp.py"""
import functools
import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

import data
from checkpoint import full_state_dict

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


# ---------------------------------------------------------------- config
def model_config(d, where="config.json"):  # what the transformer reads of a config.json, checked
    mt = d.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED)})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if type(d.get(key)) is not int or d[key] < 1:
            raise ValueError(f"{where}: {key} must be a positive integer to build a {mt} "
                             f"model, got {d.get(key)!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    scaling = d.get("rope_scaling") or {}  # older configs; transformers>=5: `rope_parameters`
    rope = {"rope_theta": d.get("rope_theta", 10000.0),
            "rope_type": scaling.get("type", "default"),
            **scaling, **(d.get("rope_parameters") or {})}
    if rope["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"{where}: rope type {rope['rope_type']!r} is not supported (default, "
                         "llama3)")
    L, heads = d["num_hidden_layers"], d["num_attention_heads"]
    windows = [None] * L
    if mt == "mistral":
        windows = [d.get("sliding_window")] * L
    elif d.get("use_sliding_window"):  # Qwen: the layers marked sliding (HF's rule by default)
        first = d.get("max_window_layers", L)
        types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                         for i in range(L)]
        windows = [d["sliding_window"] if t == "sliding_attention" else None for t in types]
    bias = d.get("attention_bias", False)
    return SimpleNamespace(
        model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=L,
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope=rope,
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=mt == "qwen2" or bias, o_bias=mt != "qwen2" and bias,
        mlp_bias=d.get("mlp_bias", False),
        qk_norm=mt == "qwen3",  # an RMSNorm over each head of q and k, before RoPE
        windows=windows,  # per layer: sliding-window length, or None (full causal)
        raw=dict(d))  # config.json itself, written back on save


# ---------------------------------------------------------------- transformer
class RMSNorm(nn.RMSNorm):
    def forward(self, x):  # statistics in fp32, scaled in the compute dtype (as HF does)
        return self.weight * F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg):  # (head_dim/2,) fp32; llama3 stretches the low ones, blends the middle
    r, hd = cfg.rope, cfg.head_dim
    inv = 1.0 / r["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # (hd/2,)
    if r["rope_type"] == "llama3":
        lo, hi = r["low_freq_factor"], r["high_freq_factor"]
        ctx = r["original_max_position_embeddings"]
        smooth = ((ctx * inv / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelengths
        inv = (1 - smooth) * inv / r["factor"] + smooth * inv
    return inv


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (B, 1, T, hd/2) fp32; HF's rotate-half
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def attn_mask(key_valid, q_idx, window=None):  # (B, 1, T, S) bool: query i may see key j
    rel = q_idx[:, None] - torch.arange(key_valid.shape[1], device=key_valid.device)  # (T, S)
    ok = (rel >= 0) & (rel < (window or math.inf)) & key_valid[:, None, :]  # (B, T, S)
    return (ok | (rel == 0))[:, None]  # each query sees itself: no all-False row (NaN)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        # the sampler's static KV cache, (2, B, K, S, hd); a buffer: a CUDA graph sees one address
        self.register_buffer("kv_cache", None, persistent=False)

    def forward(self, x, cos, sin, mask, cache_index=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.hd))  # (B, T, H, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hd))  # (B, T, K, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, K, T, hd)
        if cache_index is not None:  # write these T steps into their slots, attend over the cache
            if self.kv_cache is None:
                self.kv_cache = k.new_zeros(2, B, self.n_kv, mask.shape[-1], self.hd)
            self.kv_cache.index_copy_(3, cache_index, torch.stack([k, v]))
            k, v = self.kv_cache  # (B, K, S, hd) each
        gqa = self.n_kv != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpoint = False  # recompute the activations in backward (experiments/bench.py)

    def forward(self, x, cos, sin, mask, cache_index=None):
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, mask, cache_index, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache_index)

    def _forward(self, x, cos, sin, mask, cache_index):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # HF's names: model.embed_tokens, model.layers.i.*, model.norm
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, input_ids, attention_mask=None, cache_index=None, logprobs=False,
                temperature=1.0):
        """input_ids (B, T) -> final-normed hidden states (B, T, D); attention_mask (B, S): real
        keys, S = T or, given cache_index (T,), the cache length. logprobs=True: token_logprobs'."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        q_idx = cache_index if cache_index is not None else torch.arange(T, device=input_ids.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, q_idx]  # (B, T)
        masks = {w: attn_mask(attention_mask, q_idx, w) for w in set(self.config.windows)}
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2) RoPE angles, fp32
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # (B, 1, T, hd/2)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for block, window in zip(self.model.layers, self.config.windows):
            x = block(x, cos, sin, masks[window], cache_index)
        x = self.model.norm(x)  # (B, T, D)
        if not logprobs:  # else the lm_head runs here, where FSDP2 has the root unsharded
            return x
        valid = attention_mask[:, 1:] & attention_mask[:, :-1]  # (B, T-1): token and context real
        logp = fused_logprobs(x[:, :-1][valid], self.lm_head.weight, input_ids[:, 1:][valid],
                              temperature)
        logp = torch.zeros(B, T - 1, device=x.device).masked_scatter(valid, logp)  # (B, T-1)
        return F.pad(logp, (1, 0))  # (B, T)


def build(cfg, device="cpu", dtype=torch.float32):
    with torch.device("meta"):  # no memory
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)  # uninitialised: the caller loads or draws them
    if cfg.tie_word_embeddings:  # tied after to_empty, whose fresh tensors would untie them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # a buffer made on meta holds nothing; fp32
    return model


# ---------------------------------------------------------------- checkpoint I/O
def stop_ids(path, tokenizer):  # the EOS ids, read as transformers does, all below vocab_size
    config, gen = os.path.join(path, "config.json"), os.path.join(path, "generation_config.json")
    where = gen if os.path.isfile(gen) else config
    eos = data.read_json(where).get("eos_token_id")
    vocab = data.read_json(config).get("vocab_size")
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    if not all(type(i) is int and 0 <= i < vocab for i in ids) or len(tokenizer) > vocab:
        raise ValueError(f"{where}: eos_token_id {eos!r} and the tokenizer ({len(tokenizer)} "
                         f"tokens, EOS {tokenizer.eos_token_id}) must be ids below the "
                         f"vocab_size={vocab} of {config}")
    return sorted(ids)


def from_pretrained(path, device="cpu", dtype=torch.float32):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a Hugging Face model directory "
                                "(config.json + model.safetensors or model.safetensors.index.json)")
    cfg = model_config(data.read_json(cfg_path), cfg_path)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        shards = data.read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise ValueError(f"{index}: expected a 'weight_map' of tensor names to files")
        files = [os.path.join(path, name) for name in sorted(set(map(str, shards.values())))]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                                "model.safetensors.index.json (only safetensors are read)")
    model = build(cfg, device, dtype)
    tied = cfg.tie_word_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    for file in files:
        try:  # truncated, or not safetensors: the header says so at once
            f = safe_open(file, "pt", device="cpu")  # read a tensor at a time, closed when dropped
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        for key in f.keys():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue  # recomputed / the embedding itself
            if key not in expected:
                raise ValueError(f"{file}: unexpected tensor {key!r} for a {cfg.model_type} "
                                 f"model as described by {cfg_path}")
            t = f.get_tensor(key)
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"{file}: tensor {key!r} ({t.dtype}): expected finite "
                                 "floating-point weights, no NaN or inf")
            if t.shape != expected[key].shape:
                raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"{cfg_path} implies {tuple(expected[key].shape)}")
            expected.pop(key).copy_(t)  # state_dict()'s tensors are detached: no autograd to mind
    missing = sorted(expected)  # what no file held
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensor(s) expected from {cfg_path} are missing "
                         f"from {', '.join(map(os.path.basename, files))}: "
                         f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return model


def save_pretrained(model, path):  # rank 0 writes; the tokenizer is the caller's
    state_dict = full_state_dict(model)  # sharded: all ranks gather; else rank 0 may call alone
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    cfg = model.config
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}  # HF re-ties it
    os.makedirs(path, exist_ok=True)
    raw = {k: v for k, v in cfg.raw.items() if k != "torch_dtype"}  # the pre-5.x name of "dtype"
    raw["dtype"] = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    try:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(raw, f, indent=2)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    except (OSError, SafetensorError) as e:
        raise OSError(f"{path}: writing the model failed ({e})") from None


# ---------------------------------------------------------------- fused log-probs
@functools.cache
def _compiled(fn, mode=None):
    return torch.compile(fn, mode=mode)


def _mm32(a, b):  # a @ b in fp32: a bf16 GEMM accumulates in fp32 and writes fp32 outputs on CUDA
    cuda_low = a.is_cuda and a.dtype != torch.float32
    return torch.mm(a, b, out_dtype=torch.float32) if cuda_low else a.float() @ b.float()


def _chunk_fwd(w, h, tgt, temperature):
    z = _mm32(h, w.t()).div_(temperature)  # (C, V) fp32; in place below: few (C, V) buffers
    z_tgt = z.gather(-1, tgt[:, None])[:, 0]  # (C,)
    m = z.amax(-1, keepdim=True)  # (C, 1)
    lse = (m + z.sub_(m).exp_().sum(-1, keepdim=True).log())[:, 0]  # (C,) log Σ exp z
    return z_tgt - lse, lse


def _chunk_grad(w, h, tgt, lse, g_logp, temperature):
    """∂(Σ g_logp·logp)/∂(h wᵀ) of one chunk, (C, V) in w's dtype: (onehot(y) − p) g_logp / T."""
    p = _mm32(h, w.t()).div_(temperature).sub_(lse[:, None]).exp_()  # (C, V)
    g_logp = g_logp[:, None] / temperature  # (C, 1)
    return p.mul_(-g_logp).scatter_add_(1, tgt[:, None], g_logp).to(w.dtype)


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, tgt, temperature, chunk, compile):
        chunk_fwd = _compiled(_chunk_fwd) if compile else _chunk_fwd
        logp, lse = [], []  # per chunk, (C,) each
        for h_c, tgt_c in zip(h.split(chunk), tgt.split(chunk)):  # unpadded: the last may be short
            logp_c, lse_c = chunk_fwd(w, h_c, tgt_c, temperature)
            logp.append(logp_c)
            lse.append(lse_c)
        ctx.save_for_backward(h, w, tgt, torch.cat(lse))
        ctx.args = temperature, chunk, compile
        return torch.cat(logp)  # (N,)

    @staticmethod
    def backward(ctx, g_logp):
        h, w, tgt, lse = ctx.saved_tensors
        temperature, chunk, compile = ctx.args
        chunk_grad = _compiled(_chunk_grad) if compile else _chunk_grad
        grad_h = []
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for h_c, tgt_c, lse_c, g_c in zip(*(t.split(chunk) for t in (h, tgt, lse, g_logp))):
            grad_z = chunk_grad(w, h_c, tgt_c, lse_c, g_c, temperature)  # (C, V)
            grad_h.append(grad_z @ w)  # (C, D)
            if h.dtype == torch.float32:  # in place: no (V, D) temporary a chunk
                grad_w.addmm_(grad_z.t(), h_c)
            else:  # each chunk's product in fp32, summed in fp32
                grad_w += _mm32(grad_z.t(), h_c)
        return torch.cat(grad_h), grad_w.to(w.dtype), None, None, None, None


def fused_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, compile=None):
    """log π(targets | hidden) at `temperature`, chunk by chunk (ALGORITHMS.md, "Log-probs").
    hidden (..., D), weight (V, D), targets (...) long -> logp (...)."""
    shape, (V, D) = targets.shape, weight.shape
    h, tgt = hidden.reshape(-1, D), targets.reshape(-1)
    if chunk_size is None:  # ≥ 8 chunks of 2^20 to 2^27 logits: a small share of naive's (N, V)
        chunk_size = max(1, min(max(h.shape[0] // 8, 2 ** 20 // V), 2 ** 27 // V))
    compile = h.is_cuda if compile is None else compile  # on CPU compiling costs more than it saves
    return _FusedLogprobs.apply(h, weight, tgt, float(temperature), chunk_size, compile).view(shape)


def token_logprobs(model, input_ids, attention_mask, temperature=1.0, micro_batch=None):
    """logp (B, T) fp32, logp[:, t] = log π(input_ids[:, t] | input_ids[:, :t]) at `temperature`,
    0 at t = 0 and where the token or the one before is padding."""
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if micro_batch:  # rows per forward, concatenated (no grad; with grad, backward each piece)
        parts = [token_logprobs(model, ids, attn, temperature) for ids, attn in
                 zip(input_ids.split(micro_batch), attention_mask.split(micro_batch))]
        return torch.cat(parts)
    return model(input_ids, attention_mask, logprobs=True, temperature=temperature)


# ---------------------------------------------------------------- sampler
@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) long, pad after each row's end
    logprobs: torch.Tensor  # (B, N) fp32: each sampled token's log-prob, as sampled
    mask: torch.Tensor  # (B, N) bool: True up to and including EOS


def _decode_step(model, ids, done, slots, key_valid, u, eos, pad_id, temperature):
    """Feed ids (B, T) into cache slots (T,), sample each row's next token (B, 1) (done rows: pad,
    log-prob 0). T = 1: static shapes, state on the device, no host sync: CUDA-graph safe."""
    h = model(ids, key_valid, cache_index=slots)  # (B, T, D)
    logits = _mm32(h[:, -1], model.lm_head.weight.t())  # (B, V) fp32
    logp_all = (logits / (temperature or 1.0)).log_softmax(-1)  # (B, V), as token_logprobs does
    if temperature == 0:  # greedy, with T = 1's log-prob
        tok = logits.argmax(-1, keepdim=True)  # (B, 1)
    else:  # inverse CDF at u (B, 1) in [0, 1); no top-k or top-p: the leader's gradient needs it
        cdf = logp_all.exp().cumsum(-1)  # (B, V)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=logits.shape[-1] - 1)
    logp = logp_all.gather(-1, tok)  # (B, 1)
    tok, logp = tok.masked_fill(done, pad_id), logp.masked_fill(done, 0.0)
    return tok, logp, done | torch.isin(tok, eos), slots[-1:] + 1


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, eos_ids=(), pad_id=0, seed=0,
             compile=None):
    """Sample up to max_new_tokens after each prompt (id lists): a prefill into a static KV cache,
    then a decode step a token (compile=None: CUDA graphs on CUDA). Row i: seed + i in any batch."""
    if not prompts or min(map(len, prompts)) == 0 or max_new_tokens < 1 or temperature < 0:
        raise ValueError("generate: needs non-empty prompts, max_new_tokens >= 1, temperature >= 0")
    device = model.inv_freq.device
    prompt_batch = data.collate(prompts, [[]] * len(prompts), pad_id)  # left-padded, no response
    ids, prompt_mask, _ = (t.to(device) for t in prompt_batch)  # (B, Lp) each
    B, Lp = ids.shape
    check_fits(model, B, Lp, max_new_tokens, "generate")
    S = -(-(Lp + max_new_tokens) // 64) * 64  # cache length, rounded: fewer shapes to compile
    key_valid = F.pad(prompt_mask, (0, S - Lp), value=True)  # (B, S): slots with real tokens
    slots = torch.arange(Lp, device=device)  # (Lp,) the same for every row
    done = torch.zeros(B, 1, dtype=torch.bool, device=device)  # (B, 1)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)  # -1 never matches
    streams = [torch.Generator().manual_seed(seed + i) for i in range(B)]  # one a row
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=g) for g in streams]).to(device)
    compiled = device.type == "cuda" if compile is None else compile
    decode = _compiled(_decode_step, "reduce-overhead") if compiled else _decode_step
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:  # the prefill all-gathers each block; later forwards find them gathered
        m.set_reshard_after_forward(False, recurse=False)
    out = []  # per step, (B, 1) each: the token, its log-prob, whether the row was still running
    try:
        for t in range(max_new_tokens):
            if t % 8 == 0 and done.all():  # the only host sync, every 8 steps
                break
            step = decode if t > 0 else _decode_step  # an eager prefill: its shape varies
            alive = ~done
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are cloned below
            new = step(model, ids, done, slots, key_valid, uniforms[:, t:t + 1], eos, pad_id,
                       temperature)
            ids, logp, done, slots = (x.clone() for x in new)  # a graph replay overwrites them
            out.append((ids, logp, alive))
    finally:
        for block in model.model.layers:
            block.self_attn.kv_cache = None
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root keeps its params
    tokens, logprobs, mask = (torch.cat(x, 1) for x in zip(*out))  # (B, n)
    if logprobs.isnan().any():  # NaN logits: the weights are no longer numbers
        raise FloatingPointError("generate: the model's log-probs are NaN (its weights diverged?)")
    n = int(mask.sum(1).max())
    return Generation(tokens[:, :n], logprobs[:, :n], mask[:, :n])


def check_fits(model, rows, prompt_len, max_new_tokens, what):
    """Refuse past the context, or where a KV cache and 3 (rows, V) fp32 buffers exceed memory."""
    context = model.config.raw.get("max_position_embeddings") or math.inf
    if max_new_tokens > context:  # the static cache would outgrow what the model attends to
        raise ValueError(f"--max_new_tokens={max_new_tokens} is more than the model's context, "
                         f"max_position_embeddings={context}")
    cfg = model.config
    device = model.inv_freq.device
    element = 2 if device.type == "cuda" else 4  # bf16 compute on GPU
    kv_cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element
    need = rows * ((prompt_len + max_new_tokens) * kv_cache + 3 * 4 * cfg.vocab_size)
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > total:
        raise ValueError(f"{what}: {rows} rows a rank need at least {need / 2**30:.1f} GiB, more "
                         f"than the {total / 2**30:.1f} GiB of {device.type} memory")


def sample(model, prompts, max_new_tokens, temperature=1.0, n=1, seed=0, batch_size=None,
           logprobs=False, **kwargs):  # n responses a prompt, prompt-major; row i: seed + i
    rows = [p for p in prompts for _ in range(n)]
    size = batch_size or len(rows)
    responses, token_logprobs = [], []  # built side by side
    for i in range(0, len(rows), size):
        gen = generate(model, rows[i:i + size], max_new_tokens, temperature, seed=seed + i,
                       **kwargs)
        responses += [t[m].tolist() for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
        token_logprobs += [lp[m].tolist() for lp, m in zip(gen.logprobs.cpu(), gen.mask.cpu())]
    return (responses, token_logprobs) if logprobs else responses

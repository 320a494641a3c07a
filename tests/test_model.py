"""model.py against plain references: `transformers`' own implementation, full-context decoding,
log_softmax + gather (values and gradients).

    python -m pytest -q tests/test_model.py
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import model as M

V = 97  # vocab: not a power of two, not a multiple of the chunk sizes used below
CONFIGS = {  # tiny random checkpoints, one per supported family and feature
    "llama": (LlamaConfig, {}),
    "llama3": (LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    # a window shorter than the test sequences, so that it matters
    "mistral": (MistralConfig, dict(sliding_window=5)),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),  # q/k/v bias, tied embeddings
    # q/k norm, head_dim != hidden / heads
    "qwen3": (Qwen3Config, dict(head_dim=24, attention_bias=True)),
}


def hf_checkpoint(name, path):
    """A transformers model with random weights (large enough that mistakes show), saved by
    transformers."""
    cls, extra = CONFIGS[name]
    cfg = cls(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {name: hf_checkpoint(name, tmp_path_factory.mktemp(name)) for name in CONFIGS}


def left_padded(B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.bool)
    attn[1, :4] = attn[2, :7] = False
    return ids.masked_fill(~attn, 0), attn


def hf_logits(hf, ids, attn):
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return hf(ids, attention_mask=attn.long(), position_ids=position_ids).logits


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_logits_match_transformers_and_save_roundtrip(ckpts, name, tmp_path):
    hf, path = ckpts[name]
    model = M.from_pretrained(path)
    names = {k for k, _ in hf.named_parameters()}
    assert {k for k, _ in model.named_parameters()} == names  # names map 1:1
    ids, attn = left_padded()
    ref = hf_logits(hf, ids, attn)  # (B, T, V)
    ours = model.lm_head(model(ids, attn))
    assert (ours - ref)[attn].abs().max() <= 1e-4
    assert not ours.isnan().any()  # padding rows stay finite
    full = torch.randint(0, V, (2, 10))
    # no mask: plain causal
    assert (model.lm_head(model(full)) - hf(full).logits).abs().max() <= 1e-4

    M.save_pretrained(model, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in saved) != (name == "qwen2")  # tied: once
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                attn_implementation="eager").float()
    assert (hf_logits(back, ids, attn) - ref)[attn].abs().max() <= 1e-5


@torch.no_grad()
def test_sharded_checkpoint_and_bf16(ckpts, tmp_path):
    hf, path = ckpts["llama"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = M.from_pretrained(tmp_path)
    ids, attn = left_padded()
    assert (model.lm_head(model(ids, attn)) - hf_logits(hf, ids, attn))[attn].abs().max() <= 1e-4
    bf16 = M.from_pretrained(path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and bf16.inv_freq.dtype == torch.float32
    error = bf16.lm_head(bf16(ids, attn)).float() - hf_logits(hf, ids, attn)
    assert error[attn].abs().max() < 0.3


def test_checkpoint_errors(ckpts, tmp_path):
    _, path = ckpts["qwen3"]
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        M.from_pretrained(tmp_path / "nowhere")
    cfg = json.load(open(os.path.join(path, "config.json")))
    bad = tmp_path / "bad"
    bad.mkdir()
    json.dump({**cfg, "model_type": "gpt2"}, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        M.from_pretrained(bad)
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        M.from_pretrained(bad)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_norm.weight"},
              bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from model.safetensors: "
                                         r"model.layers.1.self_attn.k_norm.weight"):
        M.from_pretrained(bad)
    json.dump({**cfg, "intermediate_size": 128}, open(bad / "config.json", "w"))
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor "
                                         r"'model.layers.0.mlp.down_proj.weight' has shape "
                                         r"\(64, 96\), .*config.json implies \(64, 128\)"):
        M.from_pretrained(bad)
    json.dump({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
              open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        M.from_pretrained(bad)


def test_old_style_rope_config():
    """Checkpoints from transformers<5 keep rope_theta and rope_scaling at the top level."""
    base = {"model_type": "llama", "vocab_size": V, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    new = M.model_config({**base, "rope_parameters": CONFIGS["llama3"][1]["rope_parameters"]})
    old = M.model_config(
        {**base, "rope_theta": 500000.0,
         "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    assert torch.equal(M.rope_inv_freq(new), M.rope_inv_freq(old))
    assert old.rope["rope_type"] == "llama3"


# ---------------------------------------------------------------------------------------- sampler
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def collate(prompts, gen):
    """Prompt left-padded, response right-padded (model.py's batch layout) -> ids,
    attention_mask, Lp."""
    Lp = max(map(len, prompts))
    ids = torch.tensor([[0] * (Lp - len(p)) + p for p in prompts])
    attn = torch.tensor([[False] * (Lp - len(p)) + [True] * len(p) for p in prompts])
    return torch.cat([ids, gen.tokens], 1), torch.cat([attn, gen.mask], 1), Lp


@torch.no_grad()
def full_context_greedy(model, prompts, n, eos):
    """Reference: no cache, the whole sequence re-run for every new token."""
    rows = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            seq.append(int(model.lm_head(model(torch.tensor([seq])))[0, -1].argmax()))
            if seq[-1] == eos:
                break
        rows.append(seq[len(p):])
    return rows


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_greedy_generate_matches_full_context_and_transformers(ckpts, name):
    hf, path = ckpts[name]
    model = M.from_pretrained(path)
    n = 10  # past mistral's 5-token window: the cache path must apply it too
    # an EOS the first row does produce
    eos = M.generate(model, PROMPTS, n, temperature=0).tokens[0, 3].item()
    gen = M.generate(model, PROMPTS, n, temperature=0, eos_ids=[eos], pad_id=0)
    responses = [t[m].tolist() for t, m in zip(gen.tokens, gen.mask)]  # each up to its end
    assert responses == full_context_greedy(model, PROMPTS, n, eos)
    assert responses[0][-1] == eos
    assert gen.mask.sum(1).tolist() == list(map(len, responses))
    assert (gen.tokens[~gen.mask] == 0).all() and (gen.logprobs[~gen.mask] == 0).all()

    ids, attn, Lp = collate(PROMPTS, gen)
    out = hf.generate(ids[:, :Lp], attention_mask=attn[:, :Lp].long(), max_new_tokens=n,
                      do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[:, Lp:], gen.tokens)
    # greedy log-probs are those of the model at temperature 1
    logp = M.token_logprobs(model, ids, attn)[:, Lp:]
    assert (logp - gen.logprobs)[gen.mask].abs().max() <= 1e-4


@torch.no_grad()
def test_sampled_logprobs_are_those_of_the_sampling_distribution(ckpts):
    model = M.from_pretrained(ckpts["llama3"][1])
    gen = M.generate(model, PROMPTS, 8, temperature=1.0, seed=1)
    ids, attn, Lp = collate(PROMPTS, gen)
    assert (M.token_logprobs(model, ids, attn)[:, Lp:] - gen.logprobs)[gen.mask].abs().max() <= 1e-4
    assert gen.mask.all()  # no EOS given: every row runs to max_new_tokens

    gen = M.generate(model, PROMPTS, 8, temperature=0.7, seed=2)  # at another temperature
    ids, attn, Lp = collate(PROMPTS, gen)
    scored = M.token_logprobs(model, ids, attn, 0.7)[:, Lp:]
    assert (scored - gen.logprobs)[gen.mask].abs().max() <= 1e-4


@torch.no_grad()
def test_seeded_sampling_is_reproducible(ckpts):
    model = M.from_pretrained(ckpts["qwen3"][1])
    a, b, c = (M.generate(model, PROMPTS, 8, temperature=1.0, seed=s)
               for s in (7, 7, 8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_a_rows_sample_does_not_depend_on_its_batch(ckpts):
    """Row i draws from the stream seed + i: the same responses whatever the batch size, and a
    block of rows sampled on its own (as one rank samples its share) with seed + its offset gets
    the same responses too."""
    model = M.from_pretrained(ckpts["llama"][1])
    whole, logps = M.sample(model, PROMPTS, 12, temperature=1.0, n=2, seed=11, logprobs=True)
    assert len(set(map(tuple, whole))) > 1  # rows differ
    for size in (1, 3):
        assert M.sample(model, PROMPTS, 12, temperature=1.0, n=2, seed=11, batch_size=size) == whole
    tail = M.sample(model, PROMPTS[1:], 12, temperature=1.0, n=2, seed=11 + 2)
    assert tail == whole[2:]
    gen = M.generate(model, [p for p in PROMPTS for _ in range(2)], 12, temperature=1.0, seed=11)
    assert [lp[m].tolist() for lp, m in zip(gen.logprobs, gen.mask)] == logps


def test_generate_refuses_what_cannot_fit(ckpts):
    model = M.from_pretrained(ckpts["llama"][1])  # max_position_embeddings=256
    assert M.generate(model, PROMPTS, 256, temperature=0).tokens.shape == (3, 256)  # at the limit
    with pytest.raises(ValueError, match="--max_new_tokens=257 is more than the model's context, "
                                         "max_position_embeddings=256"):
        M.generate(model, PROMPTS, 257)
    # a KV cache of 10^12 rows: more than any machine's memory
    with pytest.raises(ValueError, match=r"^generate: 1000000000000 rows a rank need at least "
                                         r"[0-9.]+ GiB, more than the [0-9.]+ GiB of cpu memory"):
        M.check_fits(model, 10 ** 12, 7, 8, "generate")


# -------------------------------------------------------------------------------- fused log-probs
def plain_logprobs(hidden, weight, targets, temperature):
    logp_all = (hidden @ weight.t() / temperature).log_softmax(-1)
    return logp_all.gather(-1, targets[..., None])[..., 0]


# 16 divides neither the 2 * 23 tokens nor the vocab
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_fused_logprobs_values_and_gradients(chunk_size):
    torch.manual_seed(0)
    vocab, temperature = 1000, 0.8
    hidden = torch.randn(2, 23, 32, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, 32)).requires_grad_()
    targets = torch.randint(0, vocab, (2, 23))
    mask = torch.rand(2, 23) > 0.3  # masked positions get no gradient
    w_logp = torch.randn(2, 23) * mask

    logp = M.fused_logprobs(hidden, weight, targets, temperature, chunk_size=chunk_size)
    grads = torch.autograd.grad((logp * w_logp).sum(), [hidden, weight])
    ref_logp = plain_logprobs(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad((ref_logp * w_logp).sum(), [hidden, weight], retain_graph=True)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    assert (grads[0][~mask] == 0).all()


def test_token_logprobs_matches_plain_path(ckpts):
    # tied: the lm_head gradient lands in the embedding too
    model = M.from_pretrained(ckpts["qwen2"][1])
    ids, attn = left_padded()
    attn[0, 9:] = False  # right padding after a response
    logp = M.token_logprobs(model, ids, attn, temperature=1.3)
    params = [model.lm_head.weight, model.model.norm.weight]
    grads = torch.autograd.grad(logp.sum(), params)

    logp_all = (model.lm_head(model(ids, attn)) / 1.3).log_softmax(-1)[:, :-1]  # (B, T-1, V)
    valid = attn[:, 1:] & attn[:, :-1]
    ref_logp = F.pad(logp_all.gather(-1, ids[:, 1:, None])[..., 0] * valid, (1, 0))
    ref_grads = torch.autograd.grad(ref_logp.sum(), params)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    # no context, no score
    assert (logp[:, 0] == 0).all() and (logp[~attn] == 0).all() and (logp[1, 4] == 0)


# ------------------------------------------------------------------- compiled paths (slow on CPU)
@pytest.mark.slow
def test_compiled_paths_match_eager(ckpts):
    """torch.compile of the chunk kernels (chunks of 16, 16 and 14 rows: the short last chunk is
    not padded) and of the decode step (CUDA graphs on GPU; inductor C++ here)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 23, 32, requires_grad=True)
    weight = (0.3 * torch.randn(1000, 32)).requires_grad_()
    targets = torch.randint(0, 1000, (2, 23))
    outs = [M.fused_logprobs(hidden, weight, targets, 0.8, chunk_size=16, compile=c)
            for c in (False, True)]
    grads = [torch.autograd.grad(lp.sum(), [hidden, weight]) for lp in outs]
    for a, b in zip([outs[0], *grads[0]], [outs[1], *grads[1]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fused kernels reorder fp32 sums

    model = M.from_pretrained(ckpts["mistral"][1])
    eager, compiled = (M.generate(model, PROMPTS, 10, temperature=0.7, seed=3, compile=c)
                       for c in (False, True))
    assert torch.equal(eager.tokens, compiled.tokens)
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=0, atol=1e-5)

"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node=2` (CPU, gloo): FSDP2 against the
unsharded model.

    # training, sampling, saving
    torchrun --nproc_per_node=2 tests/fsdp_worker.py CKPT_DIR OUT_DIR
    # the compiled decode step
    torchrun --nproc_per_node=2 tests/fsdp_worker.py CKPT_DIR OUT_DIR --compile
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import checkpoint
import model as M
import ranks


def loss_fn(model, ids, attn, resp):  # mean -logp over response tokens
    return -(M.token_logprobs(model, ids, attn) * resp).sum() / resp.sum()


ckpt, out = sys.argv[1], sys.argv[2]
FP32 = MixedPrecisionPolicy()  # as the trainers shard on CPU ranks


def shard(model, activation_checkpointing=False):  # as the trainers set FSDP2 up
    mesh = init_device_mesh("cpu", (2,))
    for block in model.model.layers:
        block.checkpoint = activation_checkpointing
        fully_shard(block, mesh=mesh, mp_policy=FP32)
    return fully_shard(model, mesh=mesh, mp_policy=FP32)


rank, world, device = ranks.init_distributed(timeout_s=120)
assert world == 2 and device.type == "cpu"
ref = M.from_pretrained(ckpt)
def finish():
    """Leave without interpreter finalisation: gloo's worker threads can abort it (SIGABRT,
    "terminate called without an active exception") after the checks above have all passed."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# PbPO's leader step: rank 0 holds 3 long responses, rank 1 two short ones
if "--leader" in sys.argv:
    from train_pbpo import leader_loss
    sharded = shard(M.from_pretrained(ckpt))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, ref.config.vocab_size, (5, 14), generator=g)
    attn = torch.ones(5, 14, dtype=torch.bool)
    attn[3:, 8:] = False  # rows 3, 4 (rank 1) end early
    resp = attn.clone()
    resp[:, :4] = False
    advantage = torch.randn(5, 1, generator=g) * resp  # (n, T)
    mine = slice(0, 3) if rank == 0 else slice(3, 5)
    logp = M.token_logprobs(sharded, ids[mine], attn[mine])
    (leader_loss(logp, advantage[mine], n_samples=5) * world).backward()  # FSDP averages over ranks
    leader_loss(M.token_logprobs(ref, ids, attn), advantage, n_samples=5).backward()
    for (name, p), q in zip(sharded.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
    print(f"rank {rank}: leader step OK with {int(resp[mine].sum())} response tokens")
    finish()
# torch.compile traces the step through FSDP2's hooks; nothing is gathered per token
if "--compile" in sys.argv:
    sharded = shard(M.from_pretrained(ckpt))
    prompts = [[3, 4, 5, 6, 7], [8, 9]] if rank == 0 else [[10, 11, 12], [13]]
    for _ in range(2):  # the second call reuses the compiled step
        gen = M.generate(sharded, prompts, 8, temperature=0.8, seed=rank, compile=True)
        gen_r = M.generate(ref, prompts, 8, temperature=0.8, seed=rank, compile=False)
        assert torch.equal(gen.tokens, gen_r.tokens), (gen.tokens, gen_r.tokens)
        torch.testing.assert_close(gen.logprobs, gen_r.logprobs, rtol=0, atol=1e-5)
    print(f"rank {rank}: FSDP compiled generate OK")
    finish()
sharded = shard(M.from_pretrained(ckpt), activation_checkpointing=True)
plain = shard(M.from_pretrained(ckpt))  # no activation checkpointing
assert isinstance(sharded.lm_head.weight, DTensor)

# one batch for all ranks, each rank takes its own half: prompts left-padded, responses right-padded
g = torch.Generator().manual_seed(0)
ids = torch.randint(1, ref.config.vocab_size, (4, 12), generator=g)
attn = torch.ones(4, 12, dtype=torch.bool)
attn[1, :3] = attn[3, :5] = attn[2, 10:] = False
resp = attn.clone()
resp[:, :6] = False
mine = slice(2 * rank, 2 * rank + 2)

# optimizers first: after a forward the root's registered parameters are its unsharded ones
opt_s = torch.optim.SGD(sharded.parameters(), lr=1.0)
opt_r = torch.optim.SGD(ref.parameters(), lr=1.0)
loss_s = loss_fn(sharded, ids[mine], attn[mine], resp[mine])
loss_p = loss_fn(plain, ids[mine], attn[mine], resp[mine])
loss_r = loss_fn(ref, ids[mine], attn[mine], resp[mine])
torch.testing.assert_close(loss_s, loss_r, rtol=0, atol=1e-5)
torch.testing.assert_close(loss_p, loss_r, rtol=0, atol=1e-5)

# one SGD step: FSDP averages gradients over ranks, so the reference steps on the mean of both
# ranks' losses
loss_s.backward()
opt_s.step()
halves = [slice(2 * r, 2 * r + 2) for r in range(world)]
sum(loss_fn(ref, ids[h], attn[h], resp[h]) for h in halves).div(world).backward()
opt_r.step()
full = checkpoint.full_state_dict(sharded)
if rank == 0:
    start = M.from_pretrained(ckpt).state_dict()
    assert set(full) == set(ref.state_dict()), (sorted(full), sorted(ref.state_dict()))
    moved = max((ref.state_dict()[k] - start[k]).abs().max().item() for k in full)
    assert moved > 1e-3, moved  # the step did something
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
else:
    assert full == {}

# generate on the sharded model: unshard once, sample, reshard; same greedy tokens as the unsharded
# model
prompts = [[3, 4, 5, 6, 7], [8, 9]] if rank == 0 else [[10, 11, 12], [13]]
gen_s = M.generate(sharded, prompts, 6, temperature=0)
gen_r = M.generate(ref, prompts, 6, temperature=0)
assert torch.equal(gen_s.tokens, gen_r.tokens), (gen_s.tokens, gen_r.tokens)
torch.testing.assert_close(gen_s.logprobs, gen_r.logprobs, rtol=0, atol=1e-5)
samp_s = M.generate(sharded, prompts, 6, temperature=1.0, seed=rank)
samp_r = M.generate(ref, prompts, 6, temperature=1.0, seed=rank)
assert torch.equal(samp_s.tokens, samp_r.tokens)
assert isinstance(sharded.lm_head.weight, DTensor) and all(  # resharded afterwards
    isinstance(p, DTensor) for p in sharded.parameters())
# training still works after generate
torch.testing.assert_close(loss_fn(sharded, ids[mine], attn[mine], resp[mine]),
                           loss_fn(ref, ids[mine], attn[mine], resp[mine]), rtol=0, atol=1e-5)

M.save_pretrained(sharded, out)
dist.barrier()
back = M.from_pretrained(out)
for k, v in ref.state_dict().items():
    torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=1e-5)
dist.barrier()
print(f"rank {rank}: FSDP OK")
finish()

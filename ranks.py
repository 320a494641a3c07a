"""The process group, sums and gathers across ranks, and the seeding rule: a draw or sampled row is
keyed by its purpose, never its rank, so N ranks run the run of one. Tests: tests/test_ranks.py"""
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

import model as M


def init_distributed(timeout_s=1800):
    """-> (rank, world_size, device). torchrun: nccl (GPU) or gloo (CPU), timed out so a dead rank
    fails the others; plain python: rank 0 of 1, on GPU a one-rank group (FSDP2's bf16 needs it)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if device.type == "cpu" and "RANK" not in os.environ:
        return rank, world, device
    store = None if "RANK" in os.environ else dist.HashStore()  # plain python on GPU: in memory
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def all_sum(values, device):  # each number of the list summed over ranks (each has its share)
    totals = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces device tensors
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def mean_all(values):  # the mean of a tensor's values over all ranks' tensors
    total, count = all_sum([float(values.sum()), values.numel()], values.device)
    return total / max(count, 1)


def gather(items):  # every rank's list, in rank order (a tensor view goes with all its storage)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def block(count, rank, world):  # this rank's contiguous share of `count` things, as a slice
    return slice(count * rank // world, count * (rank + 1) // world)


def seed_of(*keys):  # keyed by (seed, purpose, episode...): all ranks alike, no RNG state to save
    return int(hashlib.sha256(repr(keys).encode()).hexdigest()[:16], 16) % 2**62


def generator(*keys):  # a torch.Generator seeded by the rule
    return torch.Generator().manual_seed(seed_of(*keys))


def draw(items, count, rank, world, *keys):  # `count` items drawn with replacement for `keys`
    picked = torch.randint(len(items), (count,), generator=generator(*keys)).tolist()
    share = block(count, rank, world)  # this rank's: any world size draws the same items
    return [items[i] for i in picked[share]], share.start  # and its offset in the whole draw


@dataclass
class Samples:  # n responses to each of a rank's prompts, prompt-major
    prompt_ids: list  # each row's prompt token ids
    responses: list  # each row's response token ids
    logp: list  # each row's sampled tokens' log-probs, at the sampling temperature


def sample(model, items, n, temperature, offset, keys, max_new_tokens, eos_ids, pad_id):
    """n responses to each of this rank's prompts (its block of a draw, at `offset`). Row j of the
    whole draw, all ranks', is seeded seed_of(*keys) + j: any world size samples the same rows."""
    prompt_ids = [p["prompt_ids"] for p in items]
    responses, logp = M.sample(model, prompt_ids, max_new_tokens, temperature, n=n, logprobs=True,
                               seed=seed_of(*keys) + offset * n, eos_ids=eos_ids, pad_id=pad_id)
    return Samples([p for p in prompt_ids for _ in range(n)], responses, logp)

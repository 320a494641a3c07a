"""Checkpoints as safetensors with a JSON header (never pickle), written atomically; the digests a
resume checks; an FSDP2 model's full state dict. Tests: tests/test_reliability.py"""
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

import data

CHECKPOINT = "checkpoint.safetensors"  # in out_dir
HISTORY = "checkpoints.log"  # one line per checkpoint written: evidence that the run had one
LOADED = (".json", ".safetensors", ".model", ".jinja", ".txt", ".tiktoken")  # what loaders read
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # all of it, on rank 0's CPU


def sha256_of(path):  # of a file; past 256 MiB (weights), of its size and 64 MiB spread over it
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    chunk = size if size <= 2**28 else 2**20  # the whole file, or 1 MiB at each of 64 offsets
    with open(path, "rb") as f:
        for offset in range(0, size, max(chunk, size // 64 + 1)):
            f.seek(offset)
            h.update(f.read(chunk))
    return h.hexdigest()


def input_digests(cfg):  # {flag: {file: SHA-256}} of the files (or directories) cfg.INPUTS name
    digests = {}
    for flag in cfg.INPUTS:
        path = getattr(cfg, flag)
        if flag == "oracle":  # gold and gsm8k are names; rm:PATH is a directory
            path = path.removeprefix("rm:") if path.startswith("rm:") else ""
        files = [path]
        if os.path.isdir(path):  # what its loaders read, not a README added later
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(LOADED))
        digests[flag] = {os.path.basename(f): sha256_of(f) for f in filter(os.path.isfile, files)}
    return digests


def full_state_dict(model):  # rank 0's on CPU ({} elsewhere), for save_pretrained; collective
    return get_model_state_dict(model, options=FULL_ON_CPU)


def _checksum(doc, tensors):  # SHA-256 of the document and each tensor's name, dtype, shape, bytes
    h = hashlib.sha256(doc.encode())
    for name, t in sorted(tensors.items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save(path, modules, **extra):  # modules {name: (model, optimizer)}; extra: JSON, tensors too
    state = dict(extra, script=os.path.basename(sys.argv[0]), threads=torch.get_num_threads(),
                 torch=torch.__version__)  # a resume checks them: the same script, the same bits
    for name, (m, opt) in modules.items():  # collective: every rank gathers, rank 0 writes
        state[name], state[name + "_opt"] = get_state_dict(m, opt, options=FULL_ON_CPU)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tensors = {}
        storages = set()  # safetensors refuses two tensors on one storage (tied weights)

        def put(t):  # json.dumps' call for each tensor: into `tensors`, a storage each
            t = t.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[f"t{len(tensors)}"] = t
            return {"__tensor__": f"t{len(tensors) - 1}"}

        doc = json.dumps(state, default=put)  # the header: all but the tensors, as JSON (no pickle)
        checksum = _checksum(doc, tensors)  # of both, checked on read
        tmp = f"{path}.tmp"  # written aside, then renamed over path: atomic
        try:
            if os.path.lexists(tmp):  # left by a kill, or planted: never written through
                os.remove(tmp)
            save_file(tensors, tmp, metadata={"state": doc, "sha256": checksum})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, SafetensorError) as e:
            raise OSError(f"writing checkpoint {path} failed ({e}); the previous checkpoint "
                          "is intact") from e
        finally:  # also when stopped by SIGTERM or Ctrl-C
            if os.path.lexists(tmp):
                os.remove(tmp)
        with data.open_own(os.path.join(os.path.dirname(path), HISTORY), "a") as f:
            f.write(f"{path} sha256 {checksum}\n")
    if dist.is_initialized():
        dist.barrier()


def read_checkpoint(path, tensors=True):  # what save wrote, checksum verified; else refused
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            found = {k: f.get_tensor(k) for k in f.keys() if tensors}  # or none: the document alone
        if tensors and meta.get("sha256") != _checksum(meta.get("state", ""), found):
            raise ValueError("checksum mismatch: the file is corrupt")
        doc = json.loads(meta.get("state", ""), object_hook=lambda d: found.get(
            d["__tensor__"], d) if d.keys() == {"__tensor__"} else d)
        return data.expect(doc, dict, "its document", "a JSON object")
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        problem = f"{path}: not a readable checkpoint ({e}); refusing to resume from it"
        raise ValueError(problem) from None


def load(path, modules):  # save's file into modules {name: (model, optimizer)} -> the extra state
    state = read_checkpoint(path)
    options = StateDictOptions(full_state_dict=True)
    for name, (m, opt) in modules.items():
        set_state_dict(m, opt, model_state_dict=state.pop(name),
                       optim_state_dict=state.pop(name + "_opt"), options=options)
    return state

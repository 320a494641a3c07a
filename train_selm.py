"""
SELM: self-exploring language models, with iterative DPO as its α = 0 case (ALGORITHMS.md, "SELM").
The preference set is split into I equal parts D_1..D_I; iteration t trains π_θ from π^{t-1}:

  for iteration t = 1..I:
    y_ref ~ π_ref(·|x) for each prompt of D_t (greedy by default)
    the oracle ranks {y_ref, chosen, rejected}: chosen ← the best (argmax), rejected ← the worst
      (scores the pair file carries from the same --oracle are used, not paid for again)
    minimise over θ, on D_t, as a fresh run (a new AdamW; warm-up, then linear decay to 0):
      L = −log σ(β [(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])
          + α β (log π_θ(y_ref) − log π_ref(y_ref))

Online (--online): no preference file; iteration t labels its own pairs instead of ranking D_t:
    x_1..x_M drawn from the prompt file (M = --online_prompts); y¹, y² ~ π_ref(·|x) at temperature 1
    the oracle scores both (2 calls a prompt); ties are dropped, the better is y_w, the other y_l

Draws are keyed by the seed, the iteration and the pair, never the rank: N ranks run 1 rank's run.

  python train_selm.py                      # SELM on the built-in toy preference file, CPU
  python train_selm.py --alpha=0            # iterative DPO, the baseline
  python train_selm.py --online --alpha=0   # online iterative DPO on the toy train prompts
  python train_selm.py --model=PATH --prefs=FILE --oracle=rm:RM_PATH        # one GPU
  torchrun --nproc_per_node=8 train_selm.py --model=PATH --prefs=FILE --oracle=rm:RM_PATH
  python train_selm.py --resume             # continue out_dir's run
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import checkpoint
import data
import model as M
import ranks
import run
from reward import make_oracle
from run import knob


@dataclass
class Config:
    # SELM's symbols (ALGORITHMS.md)
    iterations: int = knob(3, "I, iterations, each on its own part D_t of the preference set",
                           at_least=1)
    beta: float = knob(0.01, "β, DPO temperature")
    alpha: float = knob(0.001, "α, optimism weight; 0 = iterative DPO")
    lr: float = knob(1e-4, "peak AdamW lr, warm-up then linear decay to 0 (SELM: 5e-7 at 7B)")
    lr_decay_per_iter: float = knob(1.0, "γ: iteration t peaks at lr · γ^(t−1) (1: all at --lr)")
    schedule: str = knob("per_iteration", "per_iteration: a fresh AdamW and lr schedule an "
                         "iteration; global: one over all", choices=("per_iteration", "global"))
    warmup_ratio: float = knob(0.1, "share of an iteration's steps (global: all) warming up")
    epochs: int = knob(1, "passes over each part D_t", at_least=1)
    # model, data and oracle
    model: str = knob("", "π⁰, an HF checkpoint dir (default: the toy SFT model, built once)")
    prefs: str = knob("", "preference pairs, TRL prompt/chosen/rejected (no --model: the toy's)")
    heldout: str = knob("", "held-out prompts for the gold evaluation (no --model: the toy's)")
    oracle: str = knob("gold", "gold | gsm8k | rm:PATH, ranks {y_ref, chosen, rejected}")
    max_pairs: int = knob(0, "use at most this many pairs of the file (0 = all)")
    # online: pairs sampled from π_ref and labelled each iteration (no --prefs file)
    online: bool = knob(False, "each iteration labels two temperature-1 samples of π_ref a prompt")
    online_prompts: int = knob(128, "M, prompts an iteration (all ranks)", at_least=1)
    prompts: str = knob("", "the prompt file --online draws from (no --model: the toy train split)")
    # sampling and batching
    sample_ref: bool = knob(False, "sample y_ref at temperature 1 instead of greedily")
    max_new_tokens: int = knob(48, "the longest response", at_least=1)
    max_prompt_len: int = knob(256, "longer prompts are left out, with a count", at_least=1)
    batch_size: int = knob(16, "pairs per optimizer step (all ranks)", at_least=1)
    micro_batch: int = knob(16, "pairs per forward / backward", at_least=1)
    # the run
    out_dir: str = knob("out/selm", "the run directory")
    seed: int = knob(0, "every draw and sample is keyed by it")
    resume: bool = knob(False, "continue the run in out_dir from its checkpoint")
    eval_max: int = knob(256, "held-out prompts evaluated at the start and the end", at_least=1)
    on_nonfinite: str = knob("skip", "on NaN/inf or diverged weights", choices=("skip", "stop"))
    dist_timeout: int = knob(1800, "seconds a collective waits (e.g. for a dead rank)")

    RESUME_MAY_CHANGE = ("micro_batch", "on_nonfinite", "dist_timeout")  # README, "Runs that stop"
    UNIT = "iteration"  # what the preference store's records are stamped with
    INPUTS = ("model", "prefs", "prompts", "heldout", "oracle")  # a resume reads the same


# ---------------------------------------------------------------- the pairs and the objective
def encode_response(tokenizer, text):  # response ids, ending in EOS as a finished sample does
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


REUSABLE_SCORES = ("gold", "gsm8k")  # oracles named by what they compute, not by a path to weights


def finite(value):  # a JSON number that is a finite float (a huge integer is not)
    try:
        return type(value) in (int, float) and math.isfinite(float(value))
    except OverflowError:
        return False


def file_scores(where, record):
    """The scores a pair record carries from when it was labelled -> (the --oracle that gave them,
    [chosen's, rejected's]), or None: fields 'score_oracle', 'chosen_score', 'rejected_score'. Only
    REUSABLE_SCORES are ever used: an rm:PATH names a directory, not the weights that were in it."""
    if "score_oracle" not in record:
        return None
    spec = data.expect(record["score_oracle"], str, where, "a string in field 'score_oracle'")
    scores = [record.get("chosen_score"), record.get("rejected_score")]
    if not all(map(finite, scores)):
        raise ValueError(f"{where}: fields 'chosen_score' and 'rejected_score' must be finite "
                         f"numbers beside 'score_oracle', got {scores}")
    return spec, [float(s) for s in scores]


def load_preferences(path, tokenizer, max_prompt_len):
    """[{"prompt", "prompt_ids", "chosen", "rejected", "chosen_ids", "rejected_ids", "answer",
    "file_scores"}] from TRL pairs. Strings: prompt + completion. Message lists: the shared prefix
    of chosen and rejected (after an explicit prompt, if any) is the prompt, their final assistant
    turns the responses. file_scores: see file_scores; every record's are checked, kept or not."""
    rows = data.records(path)
    items = []
    for where, rec in rows:
        chosen, rejected = data.field(where, rec, "chosen"), data.field(where, rec, "rejected")
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise ValueError(f"{where}: fields 'chosen' and 'rejected' must both be strings or "
                             "both message lists")
        explicit = "prompt" in rec or isinstance(chosen, str)
        prompt = data.field(where, rec, "prompt") if explicit else []
        if isinstance(chosen, list):
            if chosen[:-1] != rejected[:-1]:
                raise ValueError(f"{where}: fields 'chosen' and 'rejected' differ before their "
                                 "final turn")
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise ValueError(f"{where}: fields 'chosen' and 'rejected' must end in an "
                                 "assistant turn")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = prompt + chosen[:-1]
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
            if not prompt:
                raise ValueError(f"{where}: missing field 'prompt' (and 'chosen' has no turns "
                                 "before its last)")
        ids = data.encode_prompt(tokenizer, prompt)
        scores = file_scores(where, rec)
        if data.fits(where, ids, max_prompt_len):
            items.append({"prompt": prompt, "prompt_ids": ids, "chosen": chosen,
                          "rejected": rejected,
                          "chosen_ids": encode_response(tokenizer, chosen),
                          "rejected_ids": encode_response(tokenizer, rejected),
                          "answer": data.answer_of(where, rec), "where": where,
                          "file_scores": scores})
    data.report_dropped(path, len(items), len(rows), max_prompt_len)
    return items


def selm_loss(logp, logp_ref, beta, alpha):
    """DPO on (chosen, rejected) plus α β (log π_θ(y_ref) − log π_ref(y_ref)). logp, logp_ref: dicts
    of summed response log-probs (B,), keyed chosen / rejected / ref. Returns (loss, DPO margin,
    optimism term)."""
    drift = {k: logp[k] - logp_ref[k] for k in logp}  # (B,) each
    margin = beta * (drift["chosen"] - drift["rejected"])  # (B,)
    optimism = alpha * beta * drift["ref"]  # (B,)
    return (-F.logsigmoid(margin) + optimism).mean(), margin.detach(), optimism.detach()


def best_and_worst(scores):
    """scores (n, 3) of [y_ref, chosen, rejected] -> column indices (n,) of the best and the worst:
    argmax and argmin, each the first of tied columns, so a tie goes to y_ref. Where all three tie
    the oracle prefers nothing, and best = worst would leave the DPO term no gradient: the pair
    keeps the file's label (chosen, rejected)."""
    best, worst = scores.argmax(1), scores.argmin(1)
    all_tie = best == worst
    return best.masked_fill(all_tie, 1), worst.masked_fill(all_tie, 2)


def main(cfg):
    rank, world, device = ranks.init_distributed(cfg.dist_timeout)
    master = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of the world size "
                         f"{world}: each rank takes an equal share of a step's pairs")
    if cfg.online and cfg.online_prompts % world:
        raise ValueError(f"--online_prompts={cfg.online_prompts} must be a multiple of the world "
                         f"size {world}")
    if not cfg.model:  # the built-in task: its SFT policy and data files, built on first use
        import toy
        toy.fill_defaults(cfg, rank, world)
    mode, inputs = run.start(cfg, rank, world)  # mode: 'fresh', 'resume' or 'restart'

    # ---------------------------------------------------------------- setup
    tok = data.load_tokenizer(cfg.model)
    if cfg.online and not cfg.prompts:
        raise ValueError("--online draws its prompts from --prompts: give a prompt file")
    pairs = []  # online: none from a file, each iteration samples and labels its own
    if cfg.online:
        prompts = data.load_prompts(cfg.prompts, tok, cfg.max_prompt_len)
    else:
        pairs = load_preferences(cfg.prefs, tok, cfg.max_prompt_len)
        pairs = pairs[:cfg.max_pairs] if cfg.max_pairs else pairs
    heldout = data.load_prompts(cfg.heldout, tok, cfg.max_prompt_len) if cfg.heldout else []
    if not cfg.online and len(pairs) < cfg.iterations * world:  # every rank samples y_ref of one
        raise ValueError(f"{cfg.prefs}: {len(pairs)} pairs cannot be split into {cfg.iterations} "
                         f"parts over {world} ranks")
    oracle = make_oracle(cfg.oracle, 0.0, device)
    sampled = prompts if cfg.online else pairs  # the records whose responses are sampled
    oracle.check(sampled + heldout[:cfg.eval_max])  # every record before the first oracle call
    heldout = data.shard(heldout[:cfg.eval_max], rank, world)
    policy = M.from_pretrained(cfg.model, device)
    stop = M.stop_ids(cfg.model, tok)  # a response ends on any of them
    longest = max(len(p["prompt_ids"]) for p in sampled)
    part = len(pairs) // cfg.iterations  # |D_t|
    if cfg.online:  # y¹ and y² of every prompt at once
        what = f"--online_prompts={cfg.online_prompts}"
        M.check_fits(policy, 2 * cfg.online_prompts // world, longest, cfg.max_new_tokens, what)
    else:  # y_ref of a rank's block of D_t at once
        rows = math.ceil(part / world)
        M.check_fits(policy, rows, longest, cfg.max_new_tokens, f"--prefs={cfg.prefs}")
    if world > 1 or device.type == "cuda":  # FSDP2; one CPU process runs plain fp32
        mesh = init_device_mesh(device.type, (world,))
        precision = MixedPrecisionPolicy()  # CPU ranks: fp32 throughout
        if device.type == "cuda":  # bf16 compute on fp32 weights; RoPE's cos/sin stay fp32
            precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                             reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in policy.model.layers:  # a unit each: its weights gathered just for its forward
            fully_shard(block, mesh=mesh, mp_policy=precision)
        fully_shard(policy, mesh=mesh, mp_policy=precision)  # the root: embedding, norm, lm_head
    local_batch = cfg.batch_size // world
    # the steps of |D_t| pairs (online: of M pairs, as if no prompt tied; ties are made up by
    # cycling through the kept pairs), known before any sample and the same on every rank
    pairs_per_iter = cfg.online_prompts if cfg.online else part
    steps_per_iter = math.ceil(cfg.epochs * pairs_per_iter / cfg.batch_size)
    log = run.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master, oracle)
    store = None
    if cfg.online and master:  # the online pairs, in TRL's layout
        store = data.PreferenceStore(os.path.join(cfg.out_dir, "preferences.jsonl"), "iteration")
    ckpt_path = os.path.join(cfg.out_dir, checkpoint.CHECKPOINT)
    guard = run.Guard(log, cfg.on_nonfinite, ckpt_path, policy)
    start = 1
    sft_eval = None

    def optimizer_and_schedule(it):
        """A new AdamW and its lr schedule, from iteration it on: per_iteration, over that
        iteration's steps alone (as SELM's code, each iteration a fresh run); global, over the
        steps of all T iterations. Warm-up over warmup_ratio of them, then linear decay towards 0
        (the last step at 1/(steps − warm-up steps) of the peak); iteration t peaks at
        lr · γ^(t−1)."""
        per_iteration = cfg.schedule == "per_iteration"
        steps = steps_per_iter if per_iteration else cfg.iterations * steps_per_iter
        warmup = max(1, int(cfg.warmup_ratio * steps))
        peak = cfg.lr * cfg.lr_decay_per_iter ** (it - 1)
        opt = torch.optim.AdamW(policy.parameters(), lr=peak, weight_decay=0.0)

        def share_of_peak(s):  # step s of the schedule; global: γ once an iteration is done
            ramp = min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
            return ramp * cfg.lr_decay_per_iter ** (s // steps_per_iter)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, share_of_peak)

    def response_logprobs(prompt_ids, responses, rows):
        """{chosen, rejected, ref: summed log-probs (len(rows),) under the policy} of the rows."""
        logp = {}
        for k, ys in responses.items():
            batch = data.collate([prompt_ids[j] for j in rows], [ys[j] for j in rows],
                                 tok.pad_token_id)
            ids, attn, resp = (t.to(device) for t in batch)
            logp[k] = (M.token_logprobs(policy, ids, attn) * resp).sum(-1)  # (len(rows),)
        return logp

    def micro_batches(step):  # this rank's rows of a step, as indices into its lists
        rows = list(range(step * local_batch, (step + 1) * local_batch))
        return [rows[i:i + cfg.micro_batch] for i in range(0, local_batch, cfg.micro_batch)]

    def ranked_pairs(it):
        """Iteration it's part D_t, ranked again: y_ref ~ π_ref for each pair, the oracle scores
        [y_ref, chosen, rejected] (3 calls a pair; 1 where the file holds chosen's and rejected's
        scores by this --oracle), the best becomes chosen, the worst rejected.
        Each rank samples and scores its block of D_t, pair j's y_ref seeded seed_of(seed,
        "y_ref", it) + j, and every rank keeps all of them: any world size ranks the same pairs.
        -> (the pairs of D_t, share of pairs whose best is y_ref)."""
        d_t = pairs[(it - 1) * part: it * part]
        mine = ranks.block(part, rank, world)
        block = d_t[mine]
        temperature = 1.0 if cfg.sample_ref else 0.0
        y_ref = ranks.sample(policy, block, 1, temperature, mine.start, (cfg.seed, "y_ref", it),
                             cfg.max_new_tokens, stop, tok.pad_token_id).responses
        texts = {"ref": [data.decode(tok, y) for y in y_ref],
                 "chosen": [p["chosen"] for p in block],
                 "rejected": [p["rejected"] for p in block]}
        scores = torch.zeros(len(block), 3)  # (block, 3) of [y_ref, chosen, rejected]
        scores[:, 0] = oracle.score(block, texts["ref"])
        fresh = []  # the pairs whose file holds no scores by this oracle
        reusable = cfg.oracle in REUSABLE_SCORES  # the same numbers a second call gives
        for i, p in enumerate(block):
            if reusable and p["file_scores"] and p["file_scores"][0] == cfg.oracle:
                scores[i, 1:] = torch.tensor(p["file_scores"][1])
            else:
                fresh.append(i)
        for column, name in ((1, "chosen"), (2, "rejected")):  # every rank calls: a collective
            scores[fresh, column] = oracle.score([block[i] for i in fresh],
                                                 [texts[name][i] for i in fresh])
        y_ref = ranks.gather(y_ref)  # all of D_t's, in order
        best, worst = best_and_worst(torch.tensor(ranks.gather(scores.tolist())))  # (|D_t|,)
        ranked = []
        for p, ref, b, w in zip(d_t, y_ref, best.tolist(), worst.tolist()):
            candidates = (ref, p["chosen_ids"], p["rejected_ids"])  # the columns, in order
            ranked.append({"item": p, "ref": ref, "chosen": candidates[b],
                           "rejected": candidates[w]})
        return ranked, (best == 0).float().mean().item()

    def online_pairs(it):
        """Iteration it's pairs, labelled online: M prompts drawn from the prompt file, two
        temperature-1 samples of π_ref each, both scored by the oracle; a tie is dropped (its two
        calls count all the same), else the better sample is y_w. The draw and every sampled row
        are keyed by (seed, purpose, it), never the rank, as in train_pbpo.py: any world size
        labels the same pairs, and every rank keeps all of them. -> (kept pairs, ties, mean score
        of all samples)."""
        items, offset = ranks.draw(prompts, cfg.online_prompts, rank, world, cfg.seed, "online",
                                   it)
        two = ranks.sample(policy, items, 2, 1.0, offset, (cfg.seed, "pair", it),
                           cfg.max_new_tokens, stop, tok.pad_token_id).responses
        temperature = 1.0 if cfg.sample_ref else 0.0
        y_ref = ranks.sample(policy, items, 1, temperature, offset, (cfg.seed, "y_ref", it),
                             cfg.max_new_tokens, stop, tok.pad_token_id).responses
        texts = [data.decode(tok, y) for y in two]
        scores = oracle.score([p for p in items for _ in range(2)], texts).view(-1, 2)  # (m, 2)
        labelled = ranks.gather([{"item": p, "ref": y_ref[i], "ids": two[2 * i:2 * i + 2],
                                "texts": texts[2 * i:2 * i + 2], "scores": scores[i].tolist()}
                               for i, p in enumerate(items)])
        kept = []
        ties = 0
        for drawn in labelled:
            score = drawn["scores"]
            if score[0] == score[1]:
                ties += 1
                continue
            won = 0 if score[0] > score[1] else 1  # the better sample's index
            lost = 1 - won
            kept.append({"item": drawn["item"], "ref": drawn["ref"], "chosen": drawn["ids"][won],
                         "rejected": drawn["ids"][lost], "chosen_text": drawn["texts"][won],
                         "rejected_text": drawn["texts"][lost], "chosen_score": score[won],
                         "rejected_score": score[lost]})
        mean_score = sum(sum(drawn["scores"]) for drawn in labelled) / (2 * len(labelled))
        return kept, ties, mean_score

    def this_ranks_rows(n, it):
        """Indices into iteration it's n pairs that this rank trains on, step after step. The
        steps_per_iter · B rows fixed in advance cycle through the n pairs, a fresh permutation a
        pass, keyed by (seed, "order", it); step s takes rows [s·B, (s+1)·B) of the cycle and
        this rank its block of them: N ranks split the step that one rank takes."""
        key = ranks.generator(cfg.seed, "order", it)
        need = steps_per_iter * cfg.batch_size
        cycle = torch.cat([torch.randperm(n, generator=key) for _ in range(math.ceil(need / n))])
        return cycle[:need].view(steps_per_iter, world, local_batch)[:, rank].flatten().tolist()

    def train(it, train_pairs, opt, sched):
        """π_θ from π_ref on iteration it's pairs: steps_per_iter AdamW steps on selm_loss, each
        on B pairs of all ranks, this rank's rows micro_batch at a time."""
        mine = this_ranks_rows(len(train_pairs), it)
        prompt_ids = [train_pairs[j]["item"]["prompt_ids"] for j in mine]
        responses = {k: [train_pairs[j][k] for j in mine] for k in ("chosen", "rejected", "ref")}
        # log π_ref of every response, once (π_ref = π_θ right now), in the steps' micro-batches:
        # the shapes of step 0's forward, whose drift from π_ref is then exactly 0
        with torch.no_grad():
            ref_by_mb = [response_logprobs(prompt_ids, responses, mb)
                         for step in range(steps_per_iter) for mb in micro_batches(step)]
        logp_ref = {k: torch.cat([logp_mb[k] for logp_mb in ref_by_mb]) for k in responses}
        bar = tqdm(range(steps_per_iter), desc=f"iteration {it}", disable=not master)
        for step in bar:
            lr = sched.get_last_lr()[0]  # the lr this step takes
            sums = dict.fromkeys(("loss", "dpo_margin", "dpo_acc", "optimism", "drift_chosen",
                                  "drift_rejected", "drift_ref"), 0.0)  # over this rank's rows
            for mb in micro_batches(step):
                logp = response_logprobs(prompt_ids, responses, mb)
                ref_mb = {k: v[mb] for k, v in logp_ref.items()}
                loss, margin, optimism = selm_loss(logp, ref_mb, cfg.beta, cfg.alpha)
                # the mean over this rank's rows; FSDP averages the ranks' equal shares
                (loss * len(mb) / local_batch).backward()
                sums["loss"] += loss.item() * len(mb)
                sums["dpo_margin"] += margin.sum().item()
                sums["dpo_acc"] += (margin > 0).sum().item()
                sums["optimism"] += optimism.sum().item()
                for k in ("chosen", "rejected", "ref"):
                    sums[f"drift_{k}"] += (logp[k] - ref_mb[k]).sum().item()
            totals = ranks.all_sum(list(sums.values()), device)  # over all ranks' rows of the step
            means = {k: total / cfg.batch_size for k, total in zip(sums, totals)}
            grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0))
            where = f"iteration {it}, step {step}"
            if guard.finite(grad_norm, "policy gradient", where, iteration=it, step=step):
                opt.step()
                guard.check_weights(policy, where, iteration=it, step=step)
            sched.step()
            opt.zero_grad(set_to_none=True)
            log.write("step", iteration=it, step=step, lr=lr, **means)
            bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['dpo_acc']:.2f}")

    opt, sched = optimizer_and_schedule(1)  # a resume loads the checkpoint's state into them
    if mode == "restart":  # killed before its first checkpoint: its pairs are labelled again
        log.cut(0)
        if store is not None and store.records:  # online runs, on rank 0
            store.keep_before(1)
            print(f"{ckpt_path} does not exist yet: starting over; the pairs labelled before are "
                  f"kept in {store.dropped_path} and labelled again")
    if mode == "resume":
        state = checkpoint.load(ckpt_path, {"policy": (policy, opt)})
        start = state["iteration"] + 1
        sched.load_state_dict(state["sched"])
        log.cut(state["log_size"])
        oracle.calls = state["oracle_calls"]
        sft_eval = state["sft_eval"]
        guard.diverged = state.get("diverged")
        if store is not None:  # online: pairs labelled after the checkpoint are set aside, redone
            store.keep_before(start)
    if sft_eval is None and heldout:
        sft_eval = oracle.evaluate(policy, tok, heldout, cfg.max_new_tokens, eos_ids=stop)
        log.write("sft_eval", **sft_eval)

    # ---------------------------------------------------------------- iterations
    for it in range(start, cfg.iterations + 1):
        if cfg.schedule == "per_iteration" and it > 1:  # no AdamW moments carried across
            opt, sched = optimizer_and_schedule(it)
        started = time.time()
        if cfg.online:
            train_pairs, ties, mean_score = online_pairs(it)
            if not train_pairs:
                raise ValueError(f"iteration {it}: all {ties} online pairs are ties (the oracle "
                                 "scored both samples the same), nothing to train on; raise "
                                 "--online_prompts or --max_new_tokens, or use a finer --oracle")
            if master:
                for p in train_pairs:
                    record = {"iteration": it, "prompt": p["item"]["prompt"],
                              "chosen": p["chosen_text"], "rejected": p["rejected_text"],
                              "chosen_score": p["chosen_score"],
                              "rejected_score": p["rejected_score"]}
                    if p["item"]["answer"] is not None:
                        record["answer"] = p["item"]["answer"]
                    store.append(record)
            n_kept = len(train_pairs)
            details = {"pairs": n_kept, "ties": ties, "oracle_score": mean_score,
                       "score_chosen": sum(p["chosen_score"] for p in train_pairs) / n_kept,
                       "score_rejected": sum(p["rejected_score"] for p in train_pairs) / n_kept}
        else:
            train_pairs, ref_best = ranked_pairs(it)
            details = {"ref_best": ref_best}
        train(it, train_pairs, opt, sched)
        # over the pairs of the iteration (all ranks), each once
        lengths = {f"len_{k}": sum(len(p[k]) for p in train_pairs) / len(train_pairs)
                   for k in ("chosen", "rejected", "ref")}
        log.write("iteration", iteration=it, wall_s=time.time() - started, **details, **lengths)
        # π_ref ← π_θ: the next iteration starts from here
        checkpoint.save(ckpt_path, {"policy": (policy, opt)}, config=asdict(cfg), iteration=it,
                        sched=sched.state_dict(), oracle_calls=oracle.calls, sft_eval=sft_eval,
                        log_size=log.size(), store_pairs=None if store is None else len(store),
                        store_sha256=None if store is None else data.digest(store.records),
                        inputs=inputs, diverged=guard.diverged)

    run.finish(cfg, policy, tok, oracle, heldout, stop, log, sft_eval,
               "SELM" if cfg.alpha else "iterative DPO")
    guard.fail_if_diverged()


if __name__ == "__main__":
    config = run.parse_flags(Config, __doc__)
    with run.friendly_errors("train_selm.py", config.out_dir):
        main(config)

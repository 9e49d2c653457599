"""GRPO: reinforcement learning from verifiable rewards (the Moxin-Reasoning recipe).

One ``training_step`` is one rollout batch (manual optimisation): generate ``group_size`` completions per prompt
with moxin's own engine from the weights being trained, score them with a verifier in worker processes, take
group-relative advantages, then ``ppo_epochs`` x ``num_minibatches`` clipped policy-gradient steps. The loss is not
a progress signal: watch ``grpo/reward_mean``. Details (each step's choices and sources, FSDP and LoRA):
docs/modules.md, "stages/grpo.py".
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from moxin.config import Aggregation, DecodePath, GRPOConfig, OptimConfig, TrainerConfig
from moxin.config.grpo import ShardedRollout
from moxin.constants import IGNORE_INDEX
from moxin.data.packing import first_fit, pack_sequences, row_width_grid, unpack
from moxin.devices import to_device
from moxin.distributed import all_reduce_values, is_sharded, reshard
from moxin.losses import (LabelRows, completion_mask, group_advantages, kl_penalty, policy_loss, token_logprobs,
                          token_logprobs_and_entropy, zero_std_groups)
from moxin.model import Transformer
from moxin.model import lora as lora_lib
from moxin.model.attention import DocBounds
from moxin.model.generate import generate
from moxin.stages.base import MoxinStage
from moxin.tensor_parallel import (data_parallel_group, data_rank_and_world, gather_rows, row_share,
                                   tensor_parallel_group)

__all__ = ["GRPOStage", "Rollout"]


@dataclass
class _HostRows:
    """What a forward of the update and its loss head would read from the device, found on the host: the rows'
    document bounds, their labels' positions (`LabelRows`) and the completion mask's flat positions (the
    entropy's). None: found on the device."""

    labels: LabelRows | None = None
    bounds: DocBounds | None = None
    entropy: torch.Tensor | None = None


@dataclass
class _Micro:
    """One forward (and backward) of the update: the kept sequences `seqs` (device indices; None: a zero-weight
    pass on a row of no kept sequence) as the rows the model reads (ids, pos, lab and the loss mask in those rows,
    on the device; `rows` found on the host), and where each sequence's tokens lie in them: `index` (`unpack`;
    None when every row is one sequence, right-padded). `width`: columns of the sequences' layout the loss reads;
    `weight`: 0.0 for a pass that only keeps the ranks' collectives in step; `n_tokens`: masked tokens (host)."""

    seqs: torch.Tensor | None
    ids: torch.Tensor
    pos: torch.Tensor
    lab: torch.Tensor
    mask: torch.Tensor
    rows: _HostRows
    width: int
    index: torch.Tensor | None = None
    weight: float = 1.0
    n_tokens: float = 0.0

    def to_seqs(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values of the rows (B, T) in the sequences' layout (n, width)."""
        return values if self.index is None else unpack(values, self.index)


@dataclass
class Rollout:
    """One rollout batch as tensors of the training layout (S = prompts x G sequences, rows right-padded)."""

    input_ids: torch.Tensor  # (S, L) prompt + completion
    labels: torch.Tensor  # (S, L) completion tokens shifted, -100 elsewhere
    positions: torch.Tensor  # (S, L)
    mask: torch.Tensor  # (S, L) float: 1 where the token counts in the loss
    rewards: torch.Tensor  # (S,)
    advantages: torch.Tensor  # (S,)
    keep: torch.Tensor  # (S,) bool: in a group that is updated on
    zero_std: torch.Tensor  # (N,) bool
    truncated: torch.Tensor  # (S,) bool
    lengths: torch.Tensor  # (S,) completion tokens
    completions: list[str]
    stats: dict = field(default_factory=dict)
    seq_lengths: torch.Tensor | None = None  # (S,) prompt + completion tokens (None: every row is all tokens)


class GRPOStage(MoxinStage):
    """See the module docstring. Batches are lists of prompt records from
    :class:`moxin.data.grpo_data.PromptDataModule`."""

    def __init__(self, model, optim: OptimConfig | None = None, grpo: GRPOConfig | None = None,
                 tokenizer=None, seed: int = 0, parallel=None, init_from: str | None = None,
                 loss_chunk_size: int = 1024, total_steps: int | None = None, lora=None,
                 max_nonfinite_steps: int = TrainerConfig.max_nonfinite_steps):
        super().__init__(model=model, optim=optim, parallel=parallel, init_from=init_from,
                         loss_chunk_size=loss_chunk_size, total_steps=total_steps, tokenizer=tokenizer, lora=lora,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.automatic_optimization = False
        self.cfg = grpo or GRPOConfig()
        self.seed = int(seed)
        self.ref_model = None
        self.batches_seen = 0
        self.last_refresh_s = 0.0  # seconds of the last rollout copy's refresh (decoding_model)
        self.history: list[dict] = []  # per rollout step: the logged grpo/* metrics (also read by tests / summary)

    # ---- setup --------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None and self.cfg.kl_coef != 0.0 and self.ref_model is None and not self.lora_cfg.enabled:
            # the KL reference: the starting weights, frozen; kept out of state_dict and the optimizer (not a
            # submodule) and sharded like the policy by the base's configure_model
            object.__setattr__(self, "ref_model", self.frozen_start_copy())
        super().configure_model()

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        dm = getattr(self.trainer, "datamodule", None)
        need = getattr(dm, "max_prompt_tokens", 0) or 0
        if need + self.cfg.max_new_tokens > self.model_cfg.max_seq_len:
            raise ValueError(
                f"data.max_prompt_tokens ({need}) + stage.grpo.max_new_tokens ({self.cfg.max_new_tokens}) exceeds "
                f"model.max_seq_len ({self.model_cfg.max_seq_len}): the update runs prompt + completion through the "
                "model in one row; lower one of them")

    def optimizer_steps_per_rollout(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.num_minibatches

    def total_steps(self) -> int:
        if self.total_steps_override:
            return self.total_steps_override
        dm = getattr(self.trainer, "datamodule", None)
        rollouts = int(dm.total_steps) if dm is not None and getattr(dm, "total_steps", None) else 1
        return rollouts * self.optimizer_steps_per_rollout()

    # ---- helpers ------------------------------------------------------------------------------------------------
    def row_sums(self, values: list) -> list[float]:
        """Per-row counts summed over the data-parallel ranks: one reduction over the data-parallel process group
        (`tensor_parallel.data_parallel_group`: the mesh's data dimension, HSDP's replicate x shard ranks), so a
        tensor group's rows, held by its T ranks alike, count once."""
        return all_reduce_values(values, self.device, group=data_parallel_group(getattr(self._trainer, "strategy",
                                                                                        None)))

    def generator_for(self, step: int, rank: int | None = None, block: int = 0) -> torch.Generator:
        """The sampling generator of rollout `step`'s row block `block` (stage.grpo.gen_batch_size rows; one block
        without it) on data-parallel `rank` (None: this process's, `data_rank_and_world`). The ranks of a
        tensor-parallel group share it: they split the block's rows and each samples its rows' share of the
        block's draws (`rollout`). A generator per block makes a block's draws independent of how many rows
        another block ran for."""
        rank = data_rank_and_world(self.model)[0] if rank is None else rank
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + step * 10_007 + rank * 101 + block * 1_000_000_007 + 17) % (2**63 - 1))
        return g

    # ---- rollout ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: list[dict], step: int) -> Rollout:
        """Generate, score and build the tensors of one rollout batch (no optimisation).

        The rows (prompts x group_size, a prompt's completions contiguous) are decoded in blocks of
        stage.grpo.gen_batch_size (one block without it), block k sampled from `generator_for(step, block=k)`.
        Under tensor parallelism with the gathered copy (not in lockstep), the T ranks of a tensor group split
        each block (`row_share`: contiguous shares differing by a row at most; a rank may get none), each decodes
        and scores its share alone (no collective per token), and one all-gather within the group (`gather_rows`)
        gives every rank the whole rollout, in row order, for the collective update.

        Determinism: a share samples with its rows' part of the whole block's draws (`generate`'s rows_of), so each
        row gets the tokens the block decoded whole in one process gives it, from the same weights and generator:
        the rollout is the same for any T, split or in lockstep, wherever the forward's numbers do not depend on
        the batch's size (on the CPU; a GPU's kernels may round a row differently at another batch size, as a
        change of gen_batch_size may, which can flip a near-tie)."""
        c = self.cfg
        G = c.group_size
        tok = self.tokenizer
        model = self.model
        was_training = model.training
        model.eval()
        prompts = [r["prompt_ids"] for r in batch for _ in range(G)]  # the G completions of a prompt are contiguous
        answers = [r["answer"] for r in batch for _ in range(G)]
        from moxin.rewards import get_verifier, score_batch

        verifier = get_verifier(c.verifier, **c.verifier_kwargs)
        completions: list[str | None] = [None] * len(prompts)
        results: list = [None] * len(prompts)
        busy = [0.0]

        def score(rows: list[int], toks: list[list[int]]) -> dict:
            """Decode and score finished rows (in the scoring thread, while generation goes on)."""
            t = time.perf_counter()
            texts = [tok.decode(x) for x in toks]
            res, st = score_batch(verifier, texts, [answers[i] for i in rows], timeout_s=c.verifier_timeout_s,
                                  max_workers=c.verifier_workers)
            for i, text, r in zip(rows, texts, res):
                completions[i], results[i] = text, r
            busy[0] += time.perf_counter() - t
            return st

        tokens, finished, jobs = [], [], []
        own: list[int] = []  # the rows this rank decoded (all of them unless a tensor group splits them)
        t_rank, T, t_group = tensor_parallel_group(getattr(self._trainer, "strategy", None))
        bs = c.gen_batch_size or len(prompts)
        overlap = c.score_during_generation
        if overlap is None:
            overlap = self.device.type == "cuda"
        # with overlap, rows are scored one batch at a time in one thread (the verifier pool is not shared between
        # threads) as generate reports them finished; without, all at once after generation
        with ThreadPoolExecutor(1, thread_name_prefix="grpo-score") as scorer:
            # the rows of one generate call from the copy: a tensor group's rank decodes its share of a block
            call_rows = -(-min(bs, len(prompts)) // T)
            with self.decoding_model(call_rows, max(map(len, prompts))) as (gen_model, lockstep):
                refresh_s = self.last_refresh_s
                t0 = time.perf_counter()
                decode = c.decode
                if lockstep:
                    decode = DecodePath.EAGER
                elif decode == DecodePath.AUTO:
                    decode = DecodePath.COMPILED if self.device.type == "cuda" else DecodePath.EAGER
                split = T > 1 and not lockstep  # in lockstep the group's forwards are collective: the same rows
                for k, s in enumerate(range(0, len(prompts), bs)):
                    n = min(bs, len(prompts) - s)
                    a, b = row_share(n, t_rank, T) if split else (0, n)
                    if a == b:
                        continue

                    def on_finished(rows, toks, first=s + a):
                        jobs.append(scorer.submit(score, [first + r for r in rows], toks))

                    out = generate(gen_model, prompts[s + a:s + b], c.max_new_tokens, temperature=c.temperature,
                                   top_k=c.top_k, top_p=c.top_p, stop_tokens=(tok.eos_id,), pad_side="left",
                                   prefill_chunk=c.prefill_chunk, generator=self.generator_for(step, block=k),
                                   pad_id=tok.pad_id if tok.pad_id is not None else 0, lockstep=lockstep,
                                   decode=decode, on_finished=on_finished if overlap else None,
                                   rows_of=(a, n) if split else None)
                    own += range(s + a, s + b)
                    tokens += out.tokens
                    finished += out.finished
                gen_s = time.perf_counter() - t0
            model.train(was_training)
            if not overlap and own:
                jobs.append(scorer.submit(score, own, tokens))
            stats = [j.result() for j in jobs]  # re-raises a scoring thread's exception here
        vstats = {k: sum(st[k] for st in stats) for k in ("errors", "timeouts", "no_answer")}
        if split:  # the tensor group split the rows: every rank gets all of them
            cols, vstats = gather_rows(own, {"tokens": tokens, "finished": finished,
                                             "completions": [completions[i] for i in own],
                                             "results": [results[i] for i in own]}, len(prompts), t_group, vstats)
            tokens, finished, completions, results = (cols[k] for k in ("tokens", "finished", "completions",
                                                                        "results"))
        score_s = time.perf_counter() - t0 - gen_s
        n_gen = sum(len(t) for t in tokens)
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
        ro = self.build_rollout(prompts, tokens, finished, rewards)
        ro.completions = completions
        # score_s: scoring left after the last token (the rest ran during generation); score_busy_s: all of it
        # decoded_rows: this rank's own (under a tensor group's split, its share)
        ro.stats.update({"gen_tokens": n_gen, "gen_s": gen_s, "refresh_s": refresh_s, "score_s": score_s,
                         "decoded_rows": len(own),
                         "score_busy_s": busy[0],
                         "verifier_errors": vstats["errors"],
                         "verifier_timeouts": vstats["timeouts"], "no_answer": vstats["no_answer"]})
        if c.log_completions and self.trainer_is_zero() and step % max(1, c.log_every) == 0:
            for i in range(min(c.log_completions, len(batch))):
                k = i * G
                print(f"[grpo step {step}] {batch[i]['messages'][-1]['content']!r} -> {completions[k]!r} "
                      f"(answer {answers[k]!r}, reward {float(rewards[k]):g}, {results[k].reason})", flush=True)
        return ro

    def copy_dtype(self, sharded: bool) -> torch.dtype:
        """The rollout copy's dtype: autocast's; without autocast, FSDP2's param dtype when sharded, else bf16 on
        one device (a copy in the policy's own dtype saves nothing) and the parameters' dtype under FSDP2."""
        dev = self.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        if not sharded:
            return torch.bfloat16
        if self.parallel_cfg.fsdp_param_dtype:
            return getattr(torch, self.parallel_cfg.fsdp_param_dtype)
        return next(self.model.parameters()).dtype

    def keeps_rollout_copy(self, sharded: bool) -> bool:
        """stage.grpo.rollout_copy_keep, None: keep the copy's memory on one device, free it under FSDP2."""
        keep = self.cfg.rollout_copy_keep
        return not sharded if keep is None else bool(keep)

    def sharded_rollout_mode(self, batch: int, prompt_len: int) -> ShardedRollout:
        """gather or lockstep (stage.grpo.sharded_rollout); auto: gather when, on every rank, the copy (unless
        kept) and the cache of one generate call of `batch` rows fit 90 % of the free device memory (the
        caching allocator's unused blocks included); always on a CPU. The ranks agree (one collective)."""
        mode = self.cfg.sharded_rollout
        if mode != ShardedRollout.AUTO:
            return mode
        fits = 1.0
        if self.device.type == "cuda":
            copy = self.__dict__.get("_rollout_copy")
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            fits = float(gather_fits(self.model_cfg, self.copy_dtype(True), batch,
                                     prompt_len + self.cfg.max_new_tokens, free,
                                     copy_held=copy is not None and copy_allocated(copy)))
        fits = all_reduce_values([fits], self.device, "min")[0]
        return ShardedRollout.GATHER if fits else ShardedRollout.LOCKSTEP

    @contextmanager
    def decoding_model(self, rows: int, prompt_len: int):
        """Yields (the model to decode with, whether to decode in lockstep) for generations of up to `rows` rows
        a call of prompts up to `prompt_len` tokens (rollouts; held-out and validation rewards): under FSDP2 as
        `sharded_rollout_mode` says (the sharded policy in lockstep, or the gathered copy), else `rollout_model`.
        Autocast is off while a copy decodes; the copy's memory is freed on the way out unless
        `keeps_rollout_copy`. `last_refresh_s`: the seconds the gather / copy took."""
        sharded = self._trainer is not None and is_sharded(self.trainer.strategy)
        lockstep = sharded and self.sharded_rollout_mode(rows, prompt_len) == ShardedRollout.LOCKSTEP
        t0 = time.perf_counter()
        model, no_autocast = (self.model, False) if lockstep else self.rollout_model(sharded)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_refresh_s = time.perf_counter() - t0
        try:
            with torch.autocast(self.device.type, enabled=False) if no_autocast else nullcontext():
                yield model, lockstep
        finally:
            if model is not self.model and not self.keeps_rollout_copy(sharded):
                free_storage(model)

    @torch.no_grad()
    def rollout_model(self, sharded: bool) -> tuple[torch.nn.Module, bool]:
        """(the model rollouts decode with, whether to turn autocast off for them): the policy under the run's
        autocast, or (`rollout_copy`; always under FSDP2, where this is the gather path) its copy in
        `copy_dtype`, refreshed from the policy now, without autocast. Under FSDP2 every rank gathers each
        parameter whole (cast to the copy's dtype first, so 16 bits travel) in the same order: a collective per
        tensor, none per decoded token. The copy is kept between steps outside the module tree (no checkpoint,
        no device moves); its memory is freed after a rollout unless `keeps_rollout_copy`."""
        dev = self.device.type
        use = self.cfg.rollout_copy
        if use is None:
            use = dev == "cuda" and torch.is_autocast_enabled(dev) and \
                torch.get_autocast_dtype(dev) in (torch.bfloat16, torch.float16)
        if not use and not sharded:
            return self.model, False
        dtype = self.copy_dtype(sharded)
        copy = self.__dict__.get("_rollout_copy")
        if copy is None or next(copy.parameters()).dtype != dtype:
            with torch.device("meta"):
                copy = Transformer(self.model_cfg)
            copy = copy.to(dtype).to_empty(device=self.device).eval().requires_grad_(False)
            if self.model_cfg.tie_embeddings:
                copy.output.weight = copy.tok_embeddings.weight
            copy.fuse_projections()  # one q/k/v and one gate/up product a block; refreshed in place below
            self.__dict__["_rollout_copy"] = copy  # a plain attribute: not a submodule
        else:
            allocate_storage(copy)
        params = dict(copy.named_parameters())
        if self.lora_cfg.enabled:  # the adapters merged into the copy's weights, one tensor at a time
            items = lora_lib.merged_items(self.model, dtype=dtype)
        else:
            reshard(self.model)  # a forward without backward (held-out) may have left FSDP2's root gathered
            items = ((lora_lib.plain_name(n), p) for n, p in self.model.named_parameters())
        filled = set()
        for name, t in items:
            if hasattr(t, "full_tensor"):  # a DTensor shard: cast it, then all-gather
                t = t.to(dtype).full_tensor()
            if name in params:
                params[name].copy_(t)
                filled.add(name)
        if len(filled) != len(params):  # an unfilled tensor would hold whatever its memory held
            raise RuntimeError(f"the rollout copy found no policy weight for {sorted(set(params) - filled)}: the "
                               "policy's parameter names no longer match the model's (a new wrapper prefix? see "
                               "lora.plain_name)")
        return copy, True

    def trainer_is_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    def build_rollout(self, prompts: list[list[int]], tokens: list[list[int]], finished: list[bool],
                      rewards: torch.Tensor) -> Rollout:
        """Tensors of the update from prompts, completion tokens, stop flags and rewards (pure: testable alone)."""
        c = self.cfg
        G = c.group_size
        S = len(prompts)
        plen = torch.tensor([len(p) for p in prompts])
        clen = torch.tensor([len(t) for t in tokens])
        truncated = ~torch.tensor(finished, dtype=torch.bool)
        L = int((plen + clen).max())
        input_ids = torch.zeros(S, L, dtype=torch.long)
        labels = torch.full((S, L), IGNORE_INDEX, dtype=torch.long)
        positions = torch.empty(S, L, dtype=torch.long)
        for s, (p, t) in enumerate(zip(prompts, tokens)):
            full = list(p) + list(t)
            input_ids[s, :len(full)] = torch.tensor(full)
            positions[s] = torch.arange(L)  # right padding continues the document: never attended by real tokens
            if t:
                labels[s, len(p) - 1:len(full) - 1] = torch.tensor(t)
        Cmax = max(1, int(clen.max()))
        cmask = completion_mask(clen, truncated, Cmax, c.mask_truncated)  # (S, Cmax) completion-aligned
        wide = torch.zeros(S, int(plen.max()) + Cmax)
        idx = (plen - 1)[:, None] + torch.arange(Cmax)[None, :]
        wide.scatter_(1, idx, cmask)
        mask = wide[:, :L].contiguous()
        adv = group_advantages(rewards, G, scale_by_std=c.scale_by_std)
        zs = zero_std_groups(rewards, G)
        keep = ~zero_std_groups(rewards, G, expand=True) if c.filter_zero_std else torch.ones(S, dtype=torch.bool)
        mask = mask * keep[:, None].float()
        return Rollout(input_ids=input_ids, labels=labels, positions=positions, mask=mask, rewards=rewards,
                       advantages=adv, keep=keep, zero_std=zs, truncated=truncated, lengths=clen, completions=[],
                       seq_lengths=plen + clen)

    # ---- update -------------------------------------------------------------------------------------------------
    def _logp(self, model, ids, pos, labels, mask=None, with_entropy=False, rows: _HostRows | None = None):
        """Per-token log-probs (and with_entropy, the masked entropy's sum and count, plus, with an entropy bonus in
        grad mode, its (B, T) per-token values with their gradient) of a forward. `rows`: the
        rows' bounds and label and mask positions found on the host (`_HostRows`), so nothing is read from the
        device; without them the forward and the head find them on the device. The entropy comes from the
        log-probs' own chunks of logits (`token_logprobs_and_entropy`, one product a chunk for both): the
        completion mask lies within the labelled positions (`build_rollout`, `_plan`)."""
        rows = rows or _HostRows()

        def head(hidden, W):  # runs inside the model's forward, where FSDP2 has gathered the output weight
            t, chunk = self.cfg.temperature, self.loss_chunk_size
            if not with_entropy:
                return token_logprobs(hidden, W, labels, chunk, temperature=t, label_rows=rows.labels), None
            bonus = self.cfg.entropy_coef != 0.0 and torch.is_grad_enabled()
            logp, tok = token_logprobs_and_entropy(hidden, W, labels, chunk, temperature=t, label_rows=rows.labels,
                                                   entropy_grad=bonus)
            m = mask.bool()
            tok = tok * m  # the completion's tokens only (with the bonus, its gradient too)
            # the count: from the host's mask positions when found there (nothing read), else on the device
            n = torch.tensor(rows.entropy.numel()) if rows.entropy is not None else m.sum()
            return logp, (tok.detach().sum(), n, tok) if bonus else (tok.sum(), n)

        return model(ids, pos, head=head, doc_bounds=rows.bounds, varying_shapes=True)

    def _host_rows(self, labels: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> _HostRows:
        """`_HostRows` of host tensors (a micro-batch's labels, positions and, for the entropy, completion mask),
        moved to the stage's device without blocking."""
        dev = self.device
        ent = None
        if mask is not None:
            ent = to_device(mask.reshape(-1).nonzero().squeeze(1), dev)
        return _HostRows(labels=LabelRows.from_labels(labels).to(dev, non_blocking=True),
                         bounds=DocBounds.from_positions(positions).to(dev, non_blocking=True), entropy=ent)

    def _minibatches(self, n_kept_local: int, step: int, epoch: int) -> list[torch.Tensor]:
        """The kept sequences (indices) of each of num_minibatches minibatches, in a seeded random order."""
        c = self.cfg
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 31 + epoch)
        perm = torch.randperm(n_kept_local, generator=g) if n_kept_local else torch.zeros(0, dtype=torch.long)
        return list(torch.tensor_split(perm, c.num_minibatches))

    def _plan(self, seqs: torch.Tensor, host: dict, dev: dict, bucket: bool | None = None) -> list[_Micro]:
        """The micro-batches of the kept sequences `seqs` (host indices): micro_batch_size right-padded rows each,
        or with `pack`, the sequences whole in rows of at most `pack_tokens` (first-fit, longest first), as many
        rows a micro-batch as fit micro_batch_size x the longest sequence's tokens (the padded budget). `bucket`:
        pad rows to a few lengths (below); None: on a GPU."""
        c = self.cfg
        if not c.pack:
            return [self._padded_micro(m, host, dev) for m in seqs.split(c.micro_batch_size)]
        if len(seqs) == 0:
            return []
        lengths = host["len"][seqs]
        L = int(host["ids"].shape[1])
        budget = c.micro_batch_size * L
        cap = max(min(c.pack_tokens or self.model_cfg.max_seq_len, budget), int(lengths.max()))
        # on a GPU every row is as wide as its capacity rounded up on a coarse grid (row_width_grid), so that the
        # blocks' compiled FlexAttention (static in the row length) sees one row shape a run instead of a new one
        # with every micro-batch (a recompile inside a timed step: 5.7 s against 1.0 s, one H100)
        if bucket is None:
            bucket = self.device.type == "cuda"
        if bucket:
            cap = max(min(row_width_grid(cap), self.model_cfg.max_seq_len), cap)
        per = max(1, budget // cap)  # rows a micro-batch
        bins = first_fit(lengths.tolist(), cap)
        used = [int(lengths[b].sum()) for b in bins]
        out = []
        for g in range(0, len(bins), per):
            group = bins[g:g + per]
            width = cap if bucket else max(used[g:g + per])
            sub = seqs[[i for b in group for i in b]]
            local, k = [], 0
            for b in group:
                local.append(list(range(k, k + len(b))))
                k += len(b)
            p = pack_sequences({"ids": host["ids"][sub], "lab": host["lab"][sub], "mask": host["mask"][sub]},
                               host["len"][sub], local, pad={"ids": 0, "lab": IGNORE_INDEX, "mask": 0.0},
                               width=width)
            r = p.rows
            d = self.device
            out.append(_Micro(seqs=to_device(sub, d), ids=to_device(r["ids"], d), pos=to_device(r["positions"], d),
                              lab=to_device(r["lab"], d), mask=to_device(r["mask"], d),
                              rows=self._host_rows(r["lab"], r["positions"], r["mask"]),
                              width=int(p.index.shape[1]), index=to_device(p.index, d),
                              n_tokens=float(r["mask"].sum())))
        return out

    def _padded_micro(self, h_mi: torch.Tensor, host: dict, dev: dict, weight: float = 1.0) -> _Micro:
        """A micro-batch of one right-padded row per sequence (`weight` 0.0: a pass whose loss counts nothing)."""
        mi = to_device(h_mi, self.device)
        h_m = host["mask"][h_mi] * weight
        return _Micro(seqs=mi, ids=dev["ids"][mi], pos=dev["pos"][mi], lab=dev["lab"][mi],
                      mask=dev["mask"][mi] * weight, rows=self._host_rows(host["lab"][h_mi], host["pos"][h_mi], h_m),
                      width=int(host["ids"].shape[1]), weight=weight, n_tokens=float(h_m.sum()))

    def _update(self, ro: Rollout, step: int) -> dict:
        """The policy update on one rollout: ppo_epochs x num_minibatches optimizer steps. Nothing in a micro-batch
        reads the device: the rows' bounds, label and mask positions and token counts come from the rollout's host
        tensors, and each micro-batch's statistics stay on the device until its minibatch's optimizer step is
        queued (one read a minibatch, beside the clipping's). With `pack`, the forwards read packed rows and
        their log-probs are gathered back to the sequences' layout, so the loss is the padded update's."""
        c = self.cfg
        opt = self.optimizers()
        sched = self.lr_schedulers()
        world = data_rank_and_world(self.model)[1]  # the data-parallel ranks
        kept = ro.keep.nonzero().squeeze(1)
        dev = self.device
        # the host's rows (the rollout is built on the host), and the device's, sent once without blocking
        seq_len = ro.seq_lengths if ro.seq_lengths is not None else torch.full_like(ro.lengths, ro.input_ids.shape[1])
        host = {"ids": ro.input_ids[kept], "lab": ro.labels[kept], "pos": ro.positions[kept], "mask": ro.mask[kept],
                "adv": ro.advantages[kept], "len": seq_len[kept]}
        d = {k: to_device(host[k], dev) for k in ("ids", "lab", "pos", "mask", "adv")}
        mask, adv = d["mask"], d["adv"]
        on_policy = c.ppo_epochs == 1 and c.num_minibatches == 1
        if all_reduce_values([float(len(kept))], self.device)[0] == 0:
            # every group on every rank was filtered (all rewards equal): nothing to learn, no optimizer step
            self.last_step_tokens_processed = 0
            return {"train/loss": 0.0, "grpo/pg_loss": 0.0, "grpo/clip_frac": 0.0, "grpo/kl": 0.0,
                    "grpo/ratio_max": 0.0, "grpo/loss_tokens": 0.0,
                    "grpo/skipped_update": 1.0}
        dummy = None  # a pass that must happen with nothing of this rank's to compute (see below)

        def empty_micro() -> _Micro:
            nonlocal dummy
            if len(kept):  # the first kept sequence, weighted 0
                return self._padded_micro(torch.zeros(1, dtype=torch.long), host, d, weight=0.0)
            if dummy is None:  # nothing at all on this rank: a row of the rollout, weighted 0
                d_ids, d_pos, d_lab = (to_device(t[:1], dev) for t in (ro.input_ids, ro.positions, ro.labels))
                rows = self._host_rows(ro.labels[:1], ro.positions[:1])
                rows = _HostRows(rows.labels, rows.bounds, torch.zeros(0, dtype=torch.long, device=dev))
                dummy = _Micro(seqs=None, ids=d_ids, pos=d_pos, lab=d_lab,
                               mask=torch.zeros_like(d_ids, dtype=mask.dtype),
                               rows=rows, width=int(ro.input_ids.shape[1]), weight=0.0)
            return dummy

        old = None
        if not on_policy:
            # Under FSDP2 every forward is collective: a rank with fewer micro-batches than another runs forwards
            # on a dummy row until every rank is done, or the others would wait for it forever.
            micros = self._plan(torch.arange(len(kept)), host, d)
            n_fwd = len(micros)
            if self._trainer is not None and is_sharded(self.trainer.strategy) and world > 1:
                n_fwd = int(all_reduce_values([float(n_fwd)], self.device, "max")[0])
            old = torch.zeros(mask.shape, device=dev)
            with torch.no_grad():
                for i in range(n_fwd):
                    mc = micros[i] if i < len(micros) else empty_micro()
                    lp = self._logp(self.model, mc.ids, mc.pos, mc.lab, rows=mc.rows)[0]
                    if i < len(micros):
                        old[mc.seqs, :mc.width] = mc.to_seqs(lp)
        acc = {"loss": 0.0, "pg_loss": 0.0, "clip": 0.0, "kl": 0.0, "ent": 0.0, "ent_n": 0.0, "tok": 0.0,
               "ratio_max": 0.0, "n_mb": 0}
        processed = 0
        zero = torch.zeros((), device=dev)
        for epoch in range(c.ppo_epochs):
            mbs = self._minibatches(len(kept), step, epoch)
            plans = [self._plan(mb, host, d) for mb in mbs]
            # every rank runs as many micro-batches a minibatch (some empty) so DDP's backward calls line up
            n_micro = all_reduce_values([float(len(p)) for p in plans], self.device, "max")
            for mb, plan, n in zip(mbs, plans, n_micro):
                plan = plan + [empty_micro() for _ in range(max(1, int(n)) - len(plan))]
                m_all = host["mask"][mb]
                local_tok = float(m_all.sum())
                local_seq = float((m_all.sum(1) > 0).sum())
                tot_tok, tot_seq, tot_n = self.row_sums([local_tok, local_seq, float(len(mb))])
                opt.zero_grad(set_to_none=True)
                pending = []  # per micro-batch: its statistics on the device, and its host numbers
                for j, mc in enumerate(plan):
                    logp, ent = self._logp(self.model, mc.ids, mc.pos, mc.lab, mc.mask, rows=mc.rows,
                                           with_entropy=epoch == 0 or c.entropy_coef != 0.0)
                    logp = mc.to_seqs(logp)
                    if mc.seqs is None:
                        m_m, a_m = torch.zeros_like(logp), torch.zeros(1, device=dev)
                    else:
                        m_m, a_m = mask[mc.seqs, :mc.width] * mc.weight, adv[mc.seqs]
                    ent_tok = mc.to_seqs(ent[2]) if ent is not None and len(ent) > 2 else None  # the bonus's
                    old_m = logp.detach() if on_policy or old is None or mc.weight == 0.0 else \
                        old[mc.seqs, :mc.width]
                    kl = None
                    if c.kl_coef != 0.0 and self.lora_cfg.enabled:  # the reference: the base, adapters off
                        with torch.no_grad(), lora_lib.adapters_disabled(self.model):
                            ref_logp, _ = self._logp(self.model, mc.ids, mc.pos, mc.lab, rows=mc.rows)
                        kl = kl_penalty(logp, mc.to_seqs(ref_logp), c.kl_estimator)
                    elif c.kl_coef != 0.0 and self.ref_model is not None:
                        with torch.no_grad():
                            ref_logp, _ = self._logp(self.ref_model, mc.ids, mc.pos, mc.lab, rows=mc.rows)
                            reshard(self.ref_model)
                        kl = kl_penalty(logp, mc.to_seqs(ref_logp), c.kl_estimator)
                    # normalise by the whole minibatch on all ranks: each micro-batch returns its exact share
                    norm = {Aggregation.TOKEN: tot_tok, Aggregation.SEQUENCE: tot_seq,
                            Aggregation.CONSTANT: c.constant_norm or c.max_new_tokens * tot_n}[c.aggregation]
                    loss, st = policy_loss(logp, old_m, a_m, m_m, c.clip_low, c.clip_high, c.aggregation,
                                           normaliser=max(norm, 1.0), kl=kl, kl_coef=c.kl_coef,
                                           entropy=ent_tok, entropy_coef=c.entropy_coef)
                    # FSDP2's collectives: HSDP's all-reduce (by default) on the minibatch's last micro-batch only
                    self.gradient_sync(last=j == len(plan) - 1)
                    # DDP averages gradients over ranks; the loss is already a global mean, so undo the average
                    self.manual_backward(loss * world)
                    # grpo/entropy: the first epoch's (the policy that sampled), as without a bonus
                    ent_sum, ent_n = (ent[0], float(ent[1])) if ent is not None and epoch == 0 else (zero, None)
                    pending.append((torch.stack([loss.detach(), st["pg_loss"],
                                                 st["clip_frac_low"] + st["clip_frac_high"], st["kl_mean"],
                                                 st["ratio_max"], ent_sum]).float(), mc.n_tokens, ent_n))
                    processed += mc.ids.numel()
                # the loss is already normalised (above): clip, and skip a NaN/Inf step (stop after N)
                self._last_grad_norm = self.optim_step.clip(self.model.parameters(), self._global_step())
                opt.step()
                sched.step()
                # the minibatch's statistics, read once its optimizer step is queued
                vals = torch.stack([p[0] for p in pending]).tolist() if pending else []
                mb_loss = mb_pg = mb_clip = mb_kl = 0.0
                for (loss_v, pg_v, clip_v, kl_v, rmax_v, ent_v), (_, n_tok, ent_n) in zip(vals, pending):
                    mb_loss += loss_v
                    mb_pg += pg_v
                    mb_clip += clip_v * n_tok
                    mb_kl += kl_v * n_tok
                    acc["ratio_max"] = max(acc["ratio_max"], rmax_v)
                    if ent_n is not None:
                        acc["ent"] += ent_v
                        acc["ent_n"] += ent_n
                # each micro-batch's loss is its share of the minibatch's (normalised by the counts of all ranks):
                # their sum over ranks is the minibatch's loss
                r = self.row_sums([mb_loss, mb_pg, mb_clip, mb_kl])
                acc["loss"] += r[0]
                acc["pg_loss"] += r[1]
                acc["clip"] += r[2] / max(tot_tok, 1.0)
                acc["kl"] += r[3] / max(tot_tok, 1.0)
                acc["tok"] += tot_tok
                acc["n_mb"] += 1
        # the gradients are set again by the next minibatch: their memory goes to the next rollout (copy, cache)
        opt.zero_grad(set_to_none=True)
        n_mb = max(acc["n_mb"], 1)
        ent_sum, ent_n = self.row_sums([acc["ent"], acc["ent_n"]])
        self.last_step_tokens_processed = processed
        return {"train/loss": acc["loss"] / n_mb, "grpo/pg_loss": acc["pg_loss"] / n_mb,
                "grpo/clip_frac": acc["clip"] / n_mb, "grpo/kl": acc["kl"] / n_mb,
                "grpo/entropy": ent_sum / max(ent_n, 1.0), "grpo/ratio_max": acc["ratio_max"],
                "grpo/loss_tokens": acc["tok"] / n_mb, "grpo/skipped_update": 0.0}

    # ---- the step -----------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        rl_step = self.batches_seen
        self.batches_seen += 1
        from moxin.eval.heldout import maybe_heldout, maybe_validate

        # held-out reward (greedy) every heldout_every steps; validation (stage.grpo.val_*) as the recipe's
        held = maybe_heldout(self, rl_step, after_update=False) | maybe_validate(self, rl_step, after_update=False)
        t0 = time.perf_counter()
        ro = self.rollout(batch, rl_step)
        t_update = time.perf_counter()
        logs = self._update(ro, rl_step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        update_s = time.perf_counter() - t_update
        c = self.cfg
        S = len(ro.rewards)
        tot = self.row_sums([float(ro.rewards.sum()), float((ro.rewards ** 2).sum()), float(S),
                                 float(ro.zero_std.sum()), float(len(ro.zero_std)), float(ro.lengths.sum()),
                                 float(ro.truncated.sum()), float(ro.stats["gen_tokens"]),
                                 float(ro.stats["verifier_errors"]), float(ro.stats["verifier_timeouts"]),
                                 float(ro.stats["no_answer"])])
        rs, rs2, n, zs, ng, ln, tr, gt, ve, vt, na = tot
        if (ve + vt) > self.cfg.max_verifier_failure_fraction * n:
            raise RuntimeError(
                f"GRPO step {rl_step}: the verifier failed on {int(ve + vt)} of {int(n)} completions "
                f"({int(ve)} errors, "
                f"{int(vt)} timeouts), more than stage.grpo.max_verifier_failure_fraction="
                f"{self.cfg.max_verifier_failure_fraction}; their rewards would be silent zeros. Check the verifier "
                f"(stage.grpo.verifier={self.cfg.verifier!r}) or raise stage.grpo.verifier_timeout_s "
                f"(now {self.cfg.verifier_timeout_s})")
        mean = rs / n
        gen_s, refresh_s = all_reduce_values([ro.stats["gen_s"], ro.stats.get("refresh_s", 0.0)], self.device, "max")
        logs.update({
            "grpo/reward_mean": mean,
            "grpo/reward_std": math.sqrt(max(rs2 / n - mean * mean, 0.0)),
            "grpo/frac_zero_std": zs / ng,
            "grpo/completion_len_mean": ln / n,
            "grpo/truncated_frac": tr / n,
            "grpo/gen_tokens_per_s": gt / max(gen_s, 1e-9),
            "grpo/verifier_errors": ve,
            "grpo/verifier_timeouts": vt,
            "grpo/no_answer_frac": na / n,
            "grpo/step_s": time.perf_counter() - t0,
            # where the step's time goes (rank 0's clock; generation is the slowest rank's)
            "grpo/gen_s": gen_s, "grpo/score_s": ro.stats["score_s"], "grpo/update_s": update_s,
            # seconds to gather / copy the policy into the rollout copy (0: decoding with the policy itself)
            "grpo/refresh_s": refresh_s,
            "grpo/score_busy_s": ro.stats["score_busy_s"],
            "train/lr": self.optimizers().param_groups[0]["lr"],
        })
        if getattr(self, "_last_grad_norm", None) is not None:
            logs["train/grad_norm"] = self._last_grad_norm
        logs.update(held | maybe_heldout(self, rl_step, after_update=True)
                    | maybe_validate(self, rl_step, after_update=True))
        self.tokens_seen += int(ln)
        self.history.append({"step": rl_step, **logs})
        if c.log_every and rl_step % c.log_every == 0 and self.trainer_is_zero() and c.log_completions:
            ent = logs.get("grpo/entropy")  # absent when every group was filtered: no token was trained on
            print(f"[grpo step {rl_step}] reward {mean:.3f} zero-std groups {zs / ng:.2f} "
                  f"len {ln / n:.1f} truncated {tr / n:.2f} entropy {'-' if ent is None else f'{ent:.3f}'} "
                  f"clip {logs['grpo/clip_frac']:.3f} kl {logs['grpo/kl']:.4f} "
                  f"gen {logs['grpo/gen_tokens_per_s']:.0f} tok/s | time refresh {refresh_s:.2f} s gen {gen_s:.2f} s "
                  f"score {ro.stats['score_s']:.2f} s update {update_s:.2f} s", flush=True)
        self.log_dict(logs, on_step=True, on_epoch=False, rank_zero_only=True)
        self.log("reward", mean, prog_bar=True, on_step=True, on_epoch=False, logger=False, rank_zero_only=True)
        return None

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["moxin"]["grpo_batches_seen"] = self.batches_seen

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        st = checkpoint.get("moxin") or {}
        self.batches_seen = int(st.get("grpo_batches_seen", 0))
        # the KL reference is rebuilt from init_from in configure_model: the policy RL started from (after an SFT
        # warm-up, init_from is the warm-up's final checkpoint)


def rollout_copy_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of a whole copy of the model of `cfg` in `dtype` (counted on the meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * size


def kv_cache_bytes(cfg, batch: int, length: int, size: int) -> int:
    """Bytes of the rolling cache generate makes for `batch` rows of up to `length` tokens (`size` bytes an
    element): k and v, every layer, the window's slots at most."""
    slots = length if cfg.sliding_window is None else min(cfg.sliding_window, length)
    return 2 * cfg.n_layers * batch * cfg.n_kv_heads * slots * cfg.head_dim * size


def gather_fits(cfg, dtype: torch.dtype, batch: int, length: int, free_bytes: int, copy_held: bool = False) -> bool:
    """Whether a whole copy of the model of `cfg` in `dtype` (unless `copy_held`: its memory is allocated already)
    and generate's cache of `batch` rows of up to `length` tokens fit 90 % of `free_bytes` (the rest: the decode's
    workspaces, the logits, the allocator's fragmentation)."""
    size = torch.empty((), dtype=dtype).element_size()
    need = (0 if copy_held else rollout_copy_bytes(cfg, dtype)) + kv_cache_bytes(cfg, batch, length, size)
    return need <= 0.9 * free_bytes


def _storages(model: torch.nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(a tensor of each distinct storage among the parameters, the storage's bytes): fused projections and tied
    weights share one."""
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen.setdefault(st.data_ptr(), (p, st.nbytes()))
    return list(seen.values())


@torch.no_grad()
def free_storage(model: torch.nn.Module) -> None:
    """Free the memory of `model`'s parameters, keeping the module and its tensors (shapes, views, fusion) so
    `allocate_storage` brings them back and compiled code made for them still applies. The values are lost."""
    model.__dict__["_freed_storages"] = _storages(model)
    for p, _ in model.__dict__["_freed_storages"]:
        p.untyped_storage().resize_(0)


@torch.no_grad()
def allocate_storage(model: torch.nn.Module) -> None:
    """Give the parameters freed by `free_storage` their memory again (values undefined until written)."""
    for p, nbytes in model.__dict__.pop("_freed_storages", ()):
        p.untyped_storage().resize_(nbytes)


def copy_allocated(model: torch.nn.Module) -> bool:
    """False after `free_storage` until `allocate_storage`."""
    return "_freed_storages" not in model.__dict__

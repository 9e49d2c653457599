"""Show what the model writes: at the end of every phase (epoch), greedy continuations of a few prompts
through the rolling-cache generator, printed on rank zero and kept in `self.history`."""

from __future__ import annotations

import lightning as L
import torch

from moxin.distributed import is_sharded
from moxin.model.generate import generate
from moxin.tokenizer import Tokenizer


class SampleGenerations(L.Callback):
    def __init__(self, prompts: list[str] | None, max_new_tokens: int, tokenizer: Tokenizer,
                 every_n_epochs: int = 1):
        self.prompts = prompts or []
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer  # the run's tokenizer (moxin/assemble.py)
        self.every = every_n_epochs
        self.history: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.prompts or (trainer.current_epoch + 1) % self.every:
            return
        # Under FSDP2 the weights are sharded and every forward is collective: all ranks generate the same
        # prompts in lockstep (eager decode, as GRPO's rollouts do) and rank zero prints. Otherwise only rank zero
        # generates (the other ranks hold full copies and have nothing to add).
        sharded = is_sharded(trainer.strategy) and trainer.world_size > 1
        if not (sharded or trainer.is_global_zero):
            return
        tok = self.tokenizer
        model = pl_module.model
        was_training = model.training
        model.eval()
        ids = [tok.encode(p, bos=True) for p in self.prompts]
        with torch.no_grad():
            out = generate(model, ids, self.max_new_tokens, temperature=0.0, stop_tokens=(tok.eos_id,),
                           lockstep=sharded, decode="eager" if sharded else "auto")
        model.train(was_training)
        if not trainer.is_global_zero:
            return
        for p, toks in zip(self.prompts, out.tokens):
            text = tok.decode(toks)
            self.history.append({"epoch": trainer.current_epoch, "prompt": p, "completion": text})
            print(f"[sample, phase {trainer.current_epoch}] {p!r} -> {text!r}", flush=True)

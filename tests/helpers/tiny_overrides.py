"""Hydra overrides that shrink an experiment to seconds on a CPU (the model keeps the real 32000-entry vocabulary
and tokenizer). Plain lists without imports, so the helper scripts that run against another moxin tree
(checkpoint_failure_cases.py, kill_loop.py) use them as well as the tests."""


def tiny_model(n_layers: int = 2, sliding_window: int | None = 32) -> list[str]:
    """dim 64, 4 query / 2 key-value heads of 16, MLP 128, `n_layers` blocks; `sliding_window=None` keeps the
    experiment's window."""
    out = ["model.dim=64", f"model.n_layers={n_layers}", "model.hidden_dim=128", "model.n_heads=4",
           "model.n_kv_heads=2", "model.head_dim=16"]
    return out + ([f"model.sliding_window={sliding_window}"] if sliding_window is not None else [])


TINY_MODEL = tiny_model()

#: the tiny model pretraining in two phases (64 then 128 tokens a row, 3072 tokens each): 12 optimizer steps of
#: 512 tokens, validation and a checkpoint every 3 steps, no samples, no HF export
TINY_PRETRAIN = TINY_MODEL + [
    "schedule.tokens_per_step=512", "schedule.micro_batch_tokens=256",
    "schedule.phases=[{name: a, seq_len: 64, tokens: 3072, mixture: {prose: 1, code: 1, cjk: 1}},"
    " {name: b, seq_len: 128, tokens: 3072, mixture: {prose: 2, code: 1, cjk: 1}}]",
    "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=3", "samples.prompts=[]",
    "trainer.progress_bar=none", "export_hf=false", "data.val_tokens=1024",
]

# a tiny LoRA SFT run (rank 4) on the CPU, no validation or samples: tests/test_lora.py, the notebook's LoRA run
LORA_RUN = TINY_MODEL + ["trainer.val_every_n_steps=null", "samples.prompts=[]", "trainer.progress_bar=none",
                         "hardware.num_workers=0", "trainer.checkpoint_every_n_steps=100", "stage.lora.rank=4",
                         "stage.lora.alpha=8"]
LORA_COMMON = LORA_RUN + ["data.batch_size=8", "data.micro_batch_size=4"]
LORA_SFT = ["+experiment=sft", "data.max_length=128", "stage.optim.lr=1e-2"]


def replaced(overrides: list[str], *changes: str) -> list[str]:
    """`overrides` with each `key=value` of `changes` in place of the entry for the same key (appended when the key
    is not there)."""
    new = {c.split("=", 1)[0]: c for c in changes}
    out = [new.pop(o.split("=", 1)[0], o) for o in overrides]
    return out + list(new.values())

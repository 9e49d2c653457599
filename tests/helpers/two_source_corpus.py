"""A two-source pretraining corpus (prose with duplicates and a bad line, code) and the byte-tokenizer data modules
over it: tests/test_datamodule.py and tests/test_reshard_resume.py."""

import json

from moxin.data.pretrain_data import PretrainDataModule


class ByteTok:
    """Picklable stand-in for moxin.tokenizer.Tokenizer: bytes + 3, bos 1, eos 2."""

    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode()] + [2] * eos


def write_corpus(folder) -> list[dict]:
    """prose.jsonl (300 documents, 20 exact duplicates, a case/whitespace variant, a bad line) and code.jsonl
    (200 documents under `content`) in `folder`; returns their source configs."""
    prose = [f"prose document {i} " + "word " * (i % 13) for i in range(300)]
    prose += prose[:20]  # exact duplicates
    prose += ["PROSE   document 5 " + "word " * 5]  # case/whitespace variant of doc 5
    code = [f"def f{i}():\n    return {i}" + " " * (i % 5) for i in range(200)]
    (folder / "prose.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in prose) + "{bad line\n")
    (folder / "code.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in code))
    return [
        {"name": "prose", "path": str(folder / "prose.jsonl")},
        {"name": "code", "path": str(folder / "code.jsonl"), "text_field": "content"},
    ]


PHASES = [
    {"name": "short", "seq_len": 32, "tokens": 6 * 256, "mixture": {"prose": 3, "code": 1}},
    {"name": "long", "seq_len": 64, "tokens": 4 * 256, "mixture": {"prose": 1, "code": 1}},
]


def make(corpus, workers=0, **kw):
    """A PretrainDataModule over `corpus` with the byte tokenizer, 256 tokens a step in micro-batches of 64."""
    args = dict(tokenizer=ByteTok(), tokens_per_step=256, micro_batch_tokens=64, max_seq_len=128,
                num_workers=workers, seed=7, val_percent=10, val_tokens=128, world_size=1)
    args.update(kw)
    return PretrainDataModule(corpus, PHASES, **args)

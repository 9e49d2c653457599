"""What a resume test compares: two checkpoints' whole state, tensor by tensor, and a pretraining corpus whose
duplicates come after the resume point.

`state_diff(a, b)` walks two checkpoint dicts (model weights, optimizer state, LR schedulers, Lightning's loop
counters and loader state, the data module's reader states with their dedup sets, moxin's counters and RNG
states) and lists every leaf that differs, so a resumed run that lost any piece of state (the dedup set, the
token count, an optimizer moment) fails with the path of what it lost. Tensors must be bitwise equal: the
uninterrupted and the resumed run do the same arithmetic in the same order.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

__all__ = ["state_diff", "load_checkpoint", "write_corpus_with_late_duplicates", "sources_override"]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as one dict: a Lightning checkpoint file as saved (moxin writes only tensors and plain Python
    values in it); a distributed-checkpoint folder (FSDP2) as its tensors gathered into one state
    (`dcp_to_torch_save`, no process group needed) under "dcp", and its meta.pt under "meta"."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=True)
    return {"dcp": state, "meta": torch.load(path / "meta.pt", map_location="cpu", weights_only=True)}


def state_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Every leaf path where `a` and `b` differ (keys, lengths, types, shapes, dtypes or values); [] when equal."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'the second' if k not in a else 'the first'}")
            else:
                out += state_diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += state_diff(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{path}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a, b):
            what = f"max difference {float((a.double() - b.double()).abs().max()):.3g}" if a.is_floating_point() \
                else f"{int((a != b).sum())} of {a.numel()} entries differ"
            out.append(f"{path}: {what}")
    elif type(a) is not type(b) or a != b:
        out.append(f"{path}: {str(a)[:60]!r} vs {str(b)[:60]!r}")
    return out


WORDS = ("river stone light paper window garden silver morning quiet number engine forest letter market winter "
         "yellow bridge candle harbor pencil rocket violin meadow thunder cotton mirror planet saddle").split()


def write_corpus_with_late_duplicates(folder: Path, names=("prose", "code", "cjk"), unique: int = 34,
                                      words: int = 24, seed: int = 0) -> list[dict]:
    """One jsonl file per source name: `unique` documents of `words` random words, then the same documents again
    in the same order (every other copy upper-cased with doubled spaces: equal after dedup's normalisation).

    `unique` is even, so a copy has its original's parity and lands in the same reader shard with 2 readers (or
    1): the copies are exact duplicates that the reader meets only after it has read every original, i.e. late in
    a run whose first checkpoint falls inside the originals. Returns the `data.sources` entries."""
    assert unique % 2 == 0, "copies must keep their original's reader shard"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = []
    for name in names:
        docs = [f"{name} {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(unique)]
        copies = [d if i % 2 == 0 else "  ".join(d.upper().split()) for i, d in enumerate(docs)]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + copies))
        sources.append({"name": name, "path": str(path), "text_field": "text"})
    return sources


def sources_override(entries: list[dict]) -> str:
    """The `data.sources=[...]` command-line override of `write_corpus_with_late_duplicates`'s entries."""
    return "data.sources=[" + ", ".join(f"{{name: {e['name']}, path: '{e['path']}', text_field: {e['text_field']}}}"
                                        for e in entries) + "]"

"""Extend a pretrained model's vocabulary for the moxin-cjk tokenizer (or any composed expert tokenizer).

    python scripts/extend_vocab.py path/to/hf-model  out/hf-model-cjk           # HF MistralForCausalLM folder
    python scripts/extend_vocab.py runs/x/checkpoints/last.ckpt out/x-cjk.safetensors
    python scripts/extend_vocab.py model.safetensors out.safetensors --tokenizer path/to/composed/ --base mistral

Rows ``0 .. base_vocab-1`` of ``tok_embeddings.weight`` and ``output.weight`` are kept; every new row (one per
expert id) is the mean of the base rows of that token's text as the base tokenizer splits it
(``moxin.tokenizer.cjk.extend_embeddings``), so the model starts out treating ``"中国"`` as it treated ``"中"`` +
``"国"``. ``--pad-to 64`` rounds the new row count up (spare rows copy the mean of all base rows; nothing ever
produces their ids).

A Hugging Face folder in gives a Hugging Face folder out (config.json with the new vocab_size, safetensors, and the
tokenizer's files, so ``transformers`` loads the same tokenizer). A moxin ``.ckpt`` or ``.safetensors`` of moxin names
gives a ``.safetensors`` of moxin names; train from it with ``init_from=<out> tokenizer=moxin-cjk
model.vocab_size=<printed size>`` (the same shape as the model config, e.g. model=tiny-cjk for the default run).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moxin.tokenizer import load_tokenizer  # noqa: E402
from moxin.tokenizer.cjk import export_files, extend_embeddings  # noqa: E402

NAMES = ("tok_embeddings.weight", "output.weight")


def padded(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def grow(state: dict, tok, base, rows: int) -> dict:
    """extend_embeddings, then spare rows up to ``rows`` (each the mean of the base rows)."""
    out = extend_embeddings(state, tok, base, NAMES)
    for name in NAMES:
        if name in out and out[name].shape[0] < rows:
            w = out[name]
            spare = w[: base.vocab_size].float().mean(0, keepdim=True).to(w.dtype).expand(rows - w.shape[0], -1)
            out[name] = torch.cat([w, spare])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="HF MistralForCausalLM folder, moxin .ckpt, or .safetensors of moxin names")
    ap.add_argument("out", help="output folder (HF input) or .safetensors file (moxin input)")
    ap.add_argument("--tokenizer", default="moxin-cjk", help="the extended tokenizer (default moxin-cjk)")
    ap.add_argument("--base", default="mistral", help="the tokenizer the model was trained with (default mistral)")
    ap.add_argument("--pad-to", type=int, default=1, help="round the vocabulary up to a multiple of this")
    args = ap.parse_args(argv)

    tok, base = load_tokenizer(args.tokenizer), load_tokenizer(args.base)
    rows = padded(tok.vocab_size, args.pad_to)
    src = Path(args.src)
    if not src.exists():
        sys.exit(f"{src}: no such file or folder; give a Hugging Face model folder, a moxin .ckpt or a .safetensors")
    if src.is_dir():
        from moxin.model import Transformer
        from moxin.model.hf import load_hf, save_hf

        model = load_hf(src)
        old = model.cfg.vocab_size
        state = grow(model.state_dict(), tok, base, rows)
        if model.cfg.tie_embeddings:
            state.pop("output.weight", None)
        new = Transformer(model.cfg.replace(vocab_size=rows))
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not (model.cfg.tie_embeddings and m == "output.weight")]:
            sys.exit(f"{src}: tensors do not fit the extended model: missing {missing}, unexpected {unexpected}")
        save_hf(new, args.out, tokenizer_files=export_files(args.tokenizer))
    else:
        from safetensors.torch import load_file, save_file

        if src.suffix == ".safetensors":
            state = load_file(str(src))
        else:
            ckpt = torch.load(str(src), map_location="cpu", weights_only=True)
            sd = ckpt.get("state_dict", ckpt)
            state = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")} or sd
        if "tok_embeddings.weight" not in state:
            sys.exit(f"{src}: no tok_embeddings.weight (moxin parameter names expected); for a Hugging Face "
                     "model pass its folder")
        old = state["tok_embeddings.weight"].shape[0]
        state = grow(state, tok, base, rows)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    print(f"{src} -> {args.out}: vocabulary {old} -> {rows} rows ({tok.vocab_size} tokenizer ids); train or load "
          f"it with tokenizer={args.tokenizer} model.vocab_size={rows}")


if __name__ == "__main__":
    main()

"""Writes notebooks/inspect_checkpoint.ipynb (kept as code so its cells stay reviewable in diffs).

    python scripts/make_notebook.py
"""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# Inspect a moxin checkpoint\n\n"
        "Point `RUN` at a run folder (`runs/<run_name>`, printed at the end of every run). The notebook reads its "
        "config, its metrics and its last checkpoint, rebuilds the model, and shows what it learned: the loss "
        "curve, the phases, next-token predictions and greedy continuations through the rolling-cache generator."),
    nbf.v4.new_code_cell(
        "import os, csv, json\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from omegaconf import OmegaConf\n"
        "from hydra.utils import instantiate\n"
        "from moxin.model import Transformer, generate\n"
        "from moxin.tokenizer import load_tokenizer\n"
        "\n"
        "RUN = Path(os.environ.get('MOXIN_RUN', 'runs/latest'))\n"
        "cfg = OmegaConf.load(RUN / '.hydra' / 'config.yaml')\n"
        "print(OmegaConf.to_yaml(cfg.model))"),
    nbf.v4.new_markdown_cell("## The run's summary and loss curve"),
    nbf.v4.new_code_cell(
        "summary = json.loads((RUN / 'summary.json').read_text())\n"
        "print({k: summary[k] for k in ('optimizer_steps', 'target_tokens', 'seconds', 'tokens_per_s')})\n"
        "rows = [r for f in sorted(RUN.glob('logs/version_*/metrics.csv')) for r in csv.DictReader(open(f))]\n"
        "train = [(int(r['step']), float(r['train/loss'])) for r in rows if r.get('train/loss')]\n"
        "val = [(int(r['step']), float(r['val/loss'])) for r in rows if r.get('val/loss')]\n"
        "print('train loss: first', train[0], 'last', train[-1])\n"
        "print('val loss:', val)\n"
        "try:\n"
        "    import matplotlib.pyplot as plt\n"
        "    plt.plot(*zip(*train), label='train'); plt.plot(*zip(*val), 'o-', label='val') if val else None\n"
        "    plt.xlabel('optimizer step'); plt.ylabel('loss'); plt.legend(); plt.show()\n"
        "except ImportError:\n"
        "    print('(pip install matplotlib for the plot)')"),
    nbf.v4.new_markdown_cell("## Rebuild the model from the last checkpoint (weights only, `weights_only=True`)"),
    nbf.v4.new_code_cell(
        "ckpt = torch.load(RUN / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)\n"
        "model_cfg = instantiate(cfg.model)\n"
        "model = Transformer(model_cfg)\n"
        "model.load_state_dict({k[len('model.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('model.')})\n"
        "model.eval()\n"
        "print(f\"step {ckpt['global_step']}, epoch (phase) {ckpt['epoch']}, {model_cfg.num_params():,} parameters\")\n"
        "for name, p in list(model.named_parameters())[:6]:\n"
        "    print(f'{name:40s} {tuple(p.shape)}  std {p.std():.4f}')"),
    nbf.v4.new_markdown_cell("## What does it predict?"),
    nbf.v4.new_code_cell(
        "tok = load_tokenizer(cfg.tokenizer)\n"
        "prompt = 'The history of the'\n"
        "ids = torch.tensor([tok.encode(prompt, bos=True)])\n"
        "with torch.no_grad():\n"
        "    probs = model(ids)[0, -1].softmax(-1)\n"
        "top = probs.topk(8)\n"
        "for p, i in zip(top.values, top.indices):\n"
        "    print(f'{tok.decode([int(i)])!r:>16}  {float(p):.3f}')"),
    nbf.v4.new_code_cell(
        "prompts = ['The history of the', 'def fibonacci(n):', '人工智能']\n"
        "out = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new_tokens=20, temperature=0.0,\n"
        "               stop_tokens=(tok.eos_id,))\n"
        "for p, t in zip(prompts, out.tokens):\n"
        "    print(repr(p), '->', repr(tok.decode(t)))"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
out = Path(__file__).resolve().parent.parent / "notebooks" / "inspect_checkpoint.ipynb"
nbf.write(nb, out)
print(f"wrote {out}")

"""Writes notebooks/inspect_checkpoint.ipynb (kept as code so its cells stay reviewable in diffs).

    python scripts/make_notebook.py
"""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# Inspect a moxin checkpoint\n\n"
        "Point `MOXIN_RUN` at a run folder (`runs/<run_name>`, relative to the folder you started Jupyter in, or the "
        "absolute path printed at the end of every run); unset, the newest run under that folder's `runs/` or "
        "`multirun/` is used. The notebook reads its "
        "config, its metrics and its last checkpoint, rebuilds the model, and shows what it learned: the loss "
        "curve, the phases, next-token predictions and greedy continuations through the rolling-cache generator."),
    nbf.v4.new_code_cell(
        "import os, csv, json\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from omegaconf import OmegaConf\n"
        "from moxin.config import ModelConfig\n"
        "from moxin.model import Transformer, generate\n"
        "from moxin.tokenizer import load_tokenizer\n"
        "\n"
        "# Where runs are looked for: the folder the notebook command was run in ($PWD: Jupyter hands its environment\n"
        "# to the kernel, whose own working directory is the notebook's folder), then the kernel's folder and its parent\n"
        "BASES = list(dict.fromkeys(Path(p).resolve() for p in (os.environ.get('PWD') or '.', '.', '..')))\n"
        "\n"
        "def find_run(name):\n"
        "    p = Path(name).expanduser()\n"
        "    for base in ([Path('/')] if p.is_absolute() else BASES):\n"
        "        if (base / p).is_dir():\n"
        "            return base / p\n"
        "    raise FileNotFoundError(f'MOXIN_RUN={name}: no such folder (looked in {\", \".join(map(str, BASES))}); '\n"
        "                            'give the run folder printed at the end of the run')\n"
        "\n"
        "def newest_run():\n"
        "    # the run folder (runs/<name> or multirun/<time>/<job>) whose summary.json or last.ckpt is newest\n"
        "    marks = [p for b in BASES for base in (b / 'runs', b / 'multirun') if base.exists()\n"
        "             for pat in ('*/summary.json', '*/checkpoints/last.ckpt', '*/*/summary.json')\n"
        "             for p in base.glob(pat)]\n"
        "    if not marks:\n"
        "        raise FileNotFoundError(f'no run folders under {\" or \".join(str(b / \"runs\") for b in BASES)} (or multirun/); '\n"
        "                                'set MOXIN_RUN=<run folder>')\n"
        "    p = max(marks, key=lambda p: p.stat().st_mtime)\n"
        "    return p.parent.parent if p.name == 'last.ckpt' else p.parent\n"
        "\n"
        "RUN = find_run(os.environ['MOXIN_RUN']) if os.environ.get('MOXIN_RUN') else newest_run()\n"
        "print('run folder:', RUN.resolve())\n"
        "cfg = OmegaConf.load(RUN / '.hydra' / 'config.yaml')\n"
        "print(OmegaConf.to_yaml(cfg.model))"),
    nbf.v4.new_markdown_cell("## The run's summary and loss curve\n\n"
                             "From the CSV log (always written), else the TensorBoard event files."),
    nbf.v4.new_code_cell(
        "summary = json.loads((RUN / 'summary.json').read_text()) if (RUN / 'summary.json').exists() else {}\n"
        "print({k: summary.get(k) for k in ('optimizer_steps', 'target_tokens', 'seconds', 'tokens_per_s')})\n"
        "\n"
        "def series_from_csv(run):\n"
        "    rows = [r for f in sorted(run.glob('logs/version_*/metrics.csv')) for r in csv.DictReader(open(f))]\n"
        "    out = {}\n"
        "    for r in rows:\n"
        "        for k, v in r.items():\n"
        "            if k not in ('step', 'epoch') and v not in (None, ''):\n"
        "                out.setdefault(k, []).append((int(r['step']), float(v)))\n"
        "    return out\n"
        "\n"
        "def series_from_tensorboard(run):\n"
        "    try:\n"
        "        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
        "    except ImportError:\n"
        "        return {}\n"
        "    out = {}\n"
        "    for d in sorted({p.parent for p in run.glob('tb/version_*/events.*')}):\n"
        "        acc = EventAccumulator(str(d)); acc.Reload()\n"
        "        for tag in acc.Tags()['scalars']:\n"
        "            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))\n"
        "    return out\n"
        "\n"
        "series = series_from_csv(RUN) or series_from_tensorboard(RUN)\n"
        "train, val = series.get('train/loss', []), series.get('val/loss', [])\n"
        "if train:\n"
        "    print('train loss: first', train[0], 'last', train[-1])\n"
        "else:\n"
        "    print('no train/loss logged in', RUN, '(metrics:', sorted(series), ')')\n"
        "print('val loss:', val)\n"
        "try:\n"
        "    import matplotlib\n"
        "    import matplotlib.pyplot as plt\n"
        "except ImportError:\n"
        "    plt = None\n"
        "    print('(no plot: pip install matplotlib)')\n"
        "if plt is not None and (train or val):\n"
        "    fig, ax = plt.subplots(figsize=(7, 4))\n"
        "    if train: ax.plot(*zip(*train), label='train')\n"
        "    if val: ax.plot(*zip(*val), 'o-', label='val')\n"
        "    ax.set_xlabel('optimizer step'); ax.set_ylabel('loss'); ax.legend()\n"
        "    fig.savefig(RUN / 'loss.png', dpi=80)\n"
        "    print('plotted', len(train), 'train and', len(val), 'val points (also', RUN / 'loss.png', ')')\n"
        "    plt.show()"),
    nbf.v4.new_markdown_cell(
        "## Rebuild the model from the last checkpoint\n\n"
        "`load_model_weights` reads a one-process run's `.ckpt` file (`torch.load(weights_only=True)`) and an FSDP "
        "run's distributed-checkpoint folder alike, and returns the model's tensors only."),
    nbf.v4.new_code_cell(
        "from moxin.checkpoint.files import read_info\n"
        "from moxin.checkpoint.weights import load_model_weights\n"
        "last = RUN / 'checkpoints' / 'last.ckpt'\n"
        "state, _, source = load_model_weights(last)\n"
        "info = read_info(last)\n"
        "# the run's model keys; its _target_ names where ModelConfig lived when the run was made\n"
        "model_cfg = ModelConfig(**{k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != '_target_'})\n"
        "model = Transformer(model_cfg)\n"
        "model.load_state_dict(state)\n"
        "model.eval()\n"
        "print(f\"{source}: epoch (phase) {info.epoch}, {model_cfg.num_params():,} parameters\")\n"
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

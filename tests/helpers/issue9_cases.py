"""Issue #9's numbered cases as a before/after reproducer: run them against a moxin tree.

    git -C . archive 6e773b2 | tar -x -C /tmp/before        # the code before the fix
    python tests/helpers/issue9_cases.py /tmp/before 1 6 3 4 7 8
    python tests/helpers/issue9_cases.py "$PWD" 1 6 3 4 7 8

Prints one CASE line per measurement (tiny model, real tokenizer, CPU). The kill loops are
tests/helpers/kill_loop.py (--code for another tree).
"""
import json, os, subprocess, sys, tempfile
from pathlib import Path
root = sys.argv[1]; which = sys.argv[2:] or ["1", "3", "4", "6", "7", "8"]
sys.path.insert(0, root)
os.chdir(root)
import torch
TINY = ["model.dim=64", "model.n_layers=2", "model.hidden_dim=128", "model.n_heads=4", "model.n_kv_heads=2",
        "model.head_dim=16", "model.sliding_window=32", "schedule.tokens_per_step=512", "schedule.micro_batch_tokens=256",
        "schedule.phases=[{name: a, seq_len: 64, tokens: 3072, mixture: {prose: 1, code: 1, cjk: 1}}, {name: b, seq_len: 128, tokens: 3072, mixture: {prose: 2, code: 1, cjk: 1}}]",
        "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=5", "samples.prompts=[]", "trainer.progress_bar=none",
        "data.val_tokens=1024", "hardware.num_workers=0"]
env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
def run(args):
    r = subprocess.run([sys.executable, "-m", "moxin.run"] + args, env=env, capture_output=True, text=True, timeout=900)
    lines = r.stderr.strip().splitlines() or [""]
    key = [l for l in lines if "Error" in l or "nothing left" in l or "resume=auto" in l]
    return r.returncode, (key[-1] if key else lines[-1])[:400]
tmp = Path(tempfile.mkdtemp())
def step_of(p):
    p = Path(p)
    if p.is_dir(): return torch.load(p / "meta.pt", weights_only=True)["global_step"]
    return torch.load(p, weights_only=True, mmap=True)["global_step"]
if "1" in which:
    rc, _ = run(TINY + [f"out_dir={tmp/'r1'}", "run_name=r1"])
    ck = tmp / "r1" / "checkpoints"
    files = sorted(p.name for p in ck.iterdir())
    from safetensors.torch import load_file
    hf = load_file(str(tmp / "r1" / "hf" / "model.safetensors"))
    last = torch.load(ck / "last.ckpt", weights_only=True)["state_dict"]
    same = torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], last["model.layers.0.attention.wq.weight"])
    print("CASE1 finished 12-step run, ckpt every 5: rc", rc, "files", files, "last.ckpt step", step_of(ck / "last.ckpt"), "last.ckpt == hf:", same)
    if "6" in which:
        rc6, msg = run(TINY + [f"out_dir={tmp/'r1'}", "run_name=r1", "resume=auto"])
        print("CASE6 continue the finished run: rc", rc6, "|", msg)
        print("      logs versions after:", sorted(p.name for p in (tmp / "r1" / "logs").iterdir()))
if "3" in which:
    rc, msg = run(TINY + [f"out_dir={tmp/'r3'}", "run_name=r3", "stage.optim.lr=inf", "trainer.max_steps=2"])
    print("CASE3 lr=inf: rc", rc, "|", msg)
    rc, msg = run(TINY + [f"out_dir={tmp/'r3b'}", "run_name=r3b", "stage.optim.lr=1e3", "stage.optim.warmup_fraction=0"])
    import math
    hfp = tmp / "r3b" / "hf" / "model.safetensors"
    nan = None
    if hfp.exists():
        from safetensors.torch import load_file
        nan = any(not torch.isfinite(v).all() for v in load_file(str(hfp)).values())
    print("CASE3 lr=1e3: rc", rc, "| hf export non-finite:", nan, "|", msg)
if "4" in which:
    for g in ("0", "-1"):
        rc, msg = run(TINY + [f"out_dir={tmp/('r4'+g)}", f"run_name=r4{g}", f"stage.optim.grad_clip={g}", "trainer.max_steps=1"])
        print(f"CASE4 grad_clip={g}: rc", rc, "|", msg)
if "7" in which:
    from moxin.model import Transformer, save_hf
    from moxin.presets import load_preset
    from moxin.stages.base import load_init_weights
    base = load_preset("tiny")
    save_hf(Transformer(base.replace(rope_theta=1e6, norm_eps=1e-6, sliding_window=4096)), tmp / "hf7")
    try:
        load_init_weights(Transformer(base), str(tmp / "hf7")); print("CASE7 init_from HF with rope 1e6/eps 1e-6/window 4096 into 1e4/1e-5/", base.sliding_window, ": loaded silently")
    except Exception as e:
        print("CASE7 refused:", str(e)[:300])
if "8" in which:
    from moxin.config import SourceConfig
    from moxin.data.bad_records import RecordStats
    from moxin.data.documents import iter_records
    f = tmp / "u.jsonl"
    f.write_bytes(b'{"text": "ok one"}\n{"text": "caf\xe9 latin-1"}\n{"text": "ok two"}\n')
    st = RecordStats(); out = [t for _, t in iter_records(SourceConfig(name="u", path=str(f), max_bad_fraction=1.0), stats=st)]
    print("CASE8 invalid UTF-8: texts", out, "bad counted", st.bad)
    from moxin.data.extract import conversation_problem
    print("CASE8 chat roles assistant-first:", conversation_problem([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]))
    ck = tmp / "r1" / "checkpoints"
    if ck.exists():
        print("CASE8 checkpoint file modes:", {p.name: oct(p.stat().st_mode & 0o777) for p in ck.iterdir() if not p.is_symlink()})

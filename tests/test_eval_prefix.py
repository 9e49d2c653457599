"""moxin/eval/loglik.py, shared prefixes: inputs packed as prefix trees (one forward per shared context across its
options, few-shot prefixes and bos shared too) give the log-likelihoods and greedy flags of one padded row per
input, whatever the rows, batches and window; the packing and its mask, checked against their definition."""

import random

import numpy as np
import pytest
import torch

from moxin.config import EvalConfig, EvalConfigError
from moxin.data.sample import sample_path
from moxin.eval import evaluate
from moxin.eval.loglik import _pack_row, _tree_rows, loglikelihoods
from moxin.model import Transformer, masks
from moxin.model.cache import RollingKVCache
from moxin.presets import load_preset
from tests.helpers.forward_shapes import forward_shapes


@pytest.fixture(scope="module", params=[None, 8], ids=["full", "window8"])
def model(request):
    """Unit-size model; window 8 is shorter than most inputs, so the position-based window is exercised."""
    torch.manual_seed(0)
    return Transformer(load_preset("tiny", attn_backend="sdpa", sliding_window=request.param)).eval()


def _items(seed: int) -> list[tuple[list[int], list[int]]]:
    """Random multiple-choice requests: 2-5 options of 1-6 tokens (some single-token options share an input),
    half of the contexts after one long few-shot prefix, contexts that are prefixes of other contexts, an option
    that continues another's context, and repeated requests."""
    rng = random.Random(seed)
    fewshot = [1] + [rng.randrange(3, 500) for _ in range(30)]
    reqs = []
    for q in range(24):
        ctx = (fewshot if q % 2 else [1]) + [rng.randrange(3, 60) for _ in range(rng.randint(1, 20))]
        for _ in range(rng.randint(2, 5)):
            reqs.append((ctx, [rng.randrange(3, 60) for _ in range(rng.choice([1, 1, 2, 4, 6]))]))
        reqs.append((ctx[:-3] if len(ctx) > 4 else ctx, [7, 8]))  # a context that is a prefix of another
        reqs.append((ctx + reqs[-2][1][:1], [9]))  # a context that runs into an option of the question
    return reqs + reqs[:5]


def _assert_same(a, b, tol=1e-5):
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) <= tol
    assert [x.is_greedy for x in a] == [y.is_greedy for y in b]
    assert [x.n_tokens for x in a] == [y.n_tokens for y in b]


@pytest.mark.parametrize("row_tokens,batch_tokens,max_batch", [(1024, 16384, 64), (48, 96, 2), (1, 1, 1)],
                         ids=["one-forward", "rows-cut-mid-item", "one-input-a-row"])
def test_prefix_trees_equal_one_row_per_input(model, row_tokens, batch_tokens, max_batch):
    """Short rows cut the sorted inputs mid-question (an option's input starts a new row and writes its context
    again); every request still gets the numbers of its own padded row."""
    reqs = _items(0)
    plain = loglikelihoods(model, reqs, share_prefixes=False)
    packed = loglikelihoods(model, reqs, share_prefixes=True, row_tokens=row_tokens, batch_tokens=batch_tokens,
                            max_batch=max_batch)
    _assert_same(plain, packed)


def test_prefix_trees_with_left_truncation(model):
    """Inputs truncated to max_len from the left lose their shared start: packed, they equal the plain path."""
    reqs = _items(1)
    _assert_same(loglikelihoods(model, reqs, max_len=24, share_prefixes=False),
                 loglikelihoods(model, reqs, max_len=24, share_prefixes=True, row_tokens=64))


def test_a_shared_context_goes_through_the_model_once(model):
    """Four options of one 40-token context: one forward of 40 + the options' tokens (less each last one), where
    padded rows need 4 x 40; the few-shot prefix of two questions is written once as well. Rows are padded to a
    multiple of 16 (`ROW_MULTIPLE`)."""
    ctx = list(range(3, 43))
    opts = [[50, 51, 52], [53], [54, 55], [56, 57, 58, 59]]
    with forward_shapes(model) as shapes:
        loglikelihoods(model, [(ctx, o) for o in opts])
        loglikelihoods(model, [(ctx + [60], [61]), (ctx + [62, 63], [64])])  # a 40-token shared few-shot prefix
    assert shapes == [(1, 48), (1, 48)]  # 40 + 2 + 1 + 3 and 40 + 1 + 2 tokens, padded to a multiple of 16


def test_packed_rows_are_a_depth_first_trie():
    """Positions are depths, every input's columns read back its tokens, and the mask lets a token see exactly the
    tokens of its own input's prefix (its ancestors in the trie), nothing of a sibling option or another tree."""
    rng = random.Random(2)
    inputs = []
    for _ in range(12):
        base = [1] + [rng.randrange(3, 6) for _ in range(rng.randint(0, 4))]
        inputs += [np.array(base + [rng.randrange(3, 6) for _ in range(rng.randint(1, 4))]) for _ in range(3)]
    inputs = list({tuple(x): x for x in inputs}.values())
    rows = _tree_rows(inputs, row_len=24)
    assert sorted(u for row in rows for u, _ in row) == list(range(len(inputs)))
    T, packed_total = 24, 0
    for r, row in enumerate(rows):
        tokens, positions, last = np.zeros(T, dtype=np.int64), np.zeros(T, dtype=np.int64), np.arange(T)
        place = {}
        _pack_row(row, inputs, tokens, positions, last, place, r)
        used = sum(len(inputs[u]) - shared for u, shared in row)
        assert used <= T
        packed_total += used
        visible = masks.dense_mask(masks.subtree(torch.from_numpy(last)[None]), 1, T, T, "cpu")[0, 0].numpy()
        for u, _ in row:
            _, cols = place[u]
            assert tokens[cols].tolist() == inputs[u].tolist()
            assert positions[cols].tolist() == list(range(len(inputs[u])))
            for d, q in enumerate(cols):  # the token at depth d of input u sees u's first d + 1 tokens, no others
                assert np.flatnonzero(visible[q]).tolist() == sorted(cols[:d + 1].tolist())
        for q in range(used, T):  # padding sees itself only
            assert np.flatnonzero(visible[q]).tolist() == [q]
    assert packed_total < sum(len(x) for x in inputs) / 2  # bos and the shared bases written once a row


def test_attn_mask_is_not_taken_with_a_cache(model):
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
              cache=RollingKVCache(model.cfg, 1, 8), attn_mask=object())


@pytest.mark.parametrize("sampler", ["default", "first_n"])
def test_few_shot_task_scores_equal_with_and_without_shared_prefixes(tok, sampler):
    """The sample task 3-shot through evaluate(): with lm-eval's random draw (few-shot examples differ per item) and
    first_n (one few-shot prefix for every item, shared across questions), packed and padded give the same
    log-likelihoods, predictions and greedy flags."""
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa", max_seq_len=512,
                                    sliding_window=64)).eval()
    task = {"name": "mc", "path": str(sample_path("eval_mc")), "text": "Question: {question}\nAnswer:",
            "num_fewshot": 3, "fewshot_sampler": sampler, "limit": 8}
    runs = [evaluate(model, tok, {"tasks": [task], "verifier_workers": 0, "share_prefixes": share})["tasks"]["mc"]
            for share in (True, False)]
    for a, b in zip(*(r["items"] for r in runs)):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5)
        assert (a["pred"], a["pred_norm"], a["is_greedy"]) == (b["pred"], b["pred_norm"], b["is_greedy"])


def test_row_tokens_below_one_is_refused():
    with pytest.raises(EvalConfigError, match="eval.row_tokens"):
        EvalConfig(tasks=[{"name": "mc", "path": str(sample_path("eval_mc"))}], row_tokens=0)

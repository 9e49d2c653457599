"""Stop strings in decode (lm-eval's ``until``): the decode-side checker fires exactly where a full decode of the row
first holds a stop string, on random token streams checked every 1, 3 or 16 tokens; generate() with stop strings
ends rows early and the text cut at the first stop string is the text of the full-length generation cut there."""

import math
import random

import pytest
import torch

from moxin.eval.scoring import truncate_at
from moxin.model import generate
from moxin.model.generate import StopStrings
from tests.conftest import tiny_model

STOPS = ("\n\n", "Question:", "Q", "</s>", "é!")


def _pieces(tok) -> list[int]:
    """Token ids whose text makes the stop strings likely: newlines, Q/uestion/colon pieces, multi-byte characters
    as byte-fallback tokens, plus random ids."""
    ids = set()
    for text in ("\n", "\n\n", "Question", "Q", ":", "uestion", " Q", "é", "!", " a", "b", "é!", "Questions"):
        ids.update(tok.encode(text))
    ids.update(tok.encode("é".encode().decode("latin-1")))  # byte pieces
    rnd = random.Random(0)
    ids.update(rnd.randrange(3, 32000) for _ in range(40))
    return sorted(ids)


def _first_stop(tok, tokens: list[int]) -> int | None:
    """Reference: the smallest t with a stop string in decode(tokens[:t]), or None."""
    for t in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:t])
        if any(s in text for s in STOPS):
            return t
    return None


@pytest.mark.parametrize("every", [1, 3, 16])
def test_stop_strings_fire_where_a_full_decode_first_holds_one(tok, every):
    pool = _pieces(tok)
    rnd = random.Random(every)
    fired_somewhere = 0
    for trial in range(60):
        tokens = [rnd.choice(pool) for _ in range(rnd.randrange(1, 40))]
        ref = _first_stop(tok, tokens)
        checker = StopStrings(STOPS, tok.decode, batch=1)
        got = None
        for s in range(0, len(tokens), every):
            if checker.feed(0, tokens[s:s + every]):
                got = min(s + every, len(tokens))
                break
        want = None if ref is None else min(math.ceil(ref / every) * every, len(tokens))
        assert got == want, (trial, tokens, tok.decode(tokens))
        fired_somewhere += got is not None
    assert 10 < fired_somewhere < 60  # the streams exercise both outcomes


def test_stop_strings_need_a_tokenizer_and_a_string(tok):
    model = tiny_model(vocab_size=32000)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        generate(model, [[1, 5]], 4, temperature=0.0, stop_strings=("\n",))
    with pytest.raises(ValueError, match="at least one non-empty"):
        StopStrings(("",), tok.decode, 1)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generate_stops_at_strings_and_the_cut_text_matches_the_full_run(tok, decode):
    model = tiny_model(vocab_size=32000)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 32000, (n,), generator=g).tolist() for n in (5, 9, 3)]
    full = generate(model, prompts, 24, temperature=0.0, decode=decode)
    texts = [tok.decode(t) for t in full.tokens]
    row0 = texts[0]
    assert len(row0) > 12
    stop = row0[len(row0) // 3: len(row0) // 3 + 3]  # a string the first row's full text holds part way in
    cut = generate(model, prompts, 24, temperature=0.0, decode=decode, stop_strings=(stop,), tokenizer=tok,
                   sync_every=4)
    assert cut.finished[0] and len(cut.tokens[0]) < len(full.tokens[0])
    for f, c in zip(full.tokens, cut.tokens):
        assert f[:len(c)] == c  # greedy: the same tokens, fewer of them
        assert truncate_at(tok.decode(c), (stop,)) == truncate_at(tok.decode(f), (stop,))
    for f, c, fin in zip(full.tokens, cut.tokens, cut.finished):
        assert fin == (stop in tok.decode(f))


def test_generate_all_by_length_batches_longest_first_and_returns_prompt_order(tok):
    """The same greedy completions in prompt order whether batched as given or longest first; the stop strings
    reach every batch."""
    from moxin.eval.generation import generate_all

    model = tiny_model(vocab_size=32000)
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 32000, (n,), generator=g).tolist() for n in (2, 11, 5, 8, 3)]
    kw = dict(max_new_tokens=10, temperature=0.0, stop_tokens=(tok.eos_id,), pad_id=0, batch_size=2)
    plain = generate_all(model, prompts, **kw)
    ref = [generate(model, [p], 10, temperature=0.0, stop_tokens=(tok.eos_id,)).tokens[0] for p in prompts]
    assert [r.tokens for r in plain] == ref
    sorted_ = generate_all(model, prompts, by_length=True, **kw)
    assert [r.tokens for r in sorted_] == ref
    stop = tok.decode(ref[3])[4:6]
    cut = generate_all(model, prompts, by_length=True, stop_strings=(stop,), tokenizer=tok, **kw)
    assert cut[3].finished and len(cut[3].tokens) < len(ref[3])
    assert [truncate_at(tok.decode(c.tokens), (stop,)) for c in cut] == [truncate_at(tok.decode(r), (stop,))
                                                                          for r in ref]

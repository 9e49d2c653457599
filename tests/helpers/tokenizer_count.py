"""Count the tokenizers a run constructs: the run's one object is built once by moxin/assemble.py (or by
moxin.run.train for a run with a warm-up) and handed everywhere. Used by tests/test_run.py and tests/test_warmup.py."""

from moxin.tokenizer import tokenizer as T


def count_tokenizers(monkeypatch) -> list:
    """The names of every Tokenizer constructed from now on (the list grows as they are made)."""
    built = []
    init = T.Tokenizer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs.get("name"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(T.Tokenizer, "__init__", counting_init)
    return built

"""Conventions every layer shares, in a module that imports nothing: the data layer writes them into batches,
the losses and stages read them."""

#: The label of a position that gets no loss (prompt tokens, padding, the first token of a packed document):
#: PyTorch's cross-entropy default, which Hugging Face uses too.
IGNORE_INDEX = -100

"""moxin: a Lightning-based modular trainer for the Moxin LLM recipe.

Pretraining, SFT, DPO and GRPO share one plain-PyTorch Mistral-style model core (`moxin.model`).
"""

__version__ = "0.1.0"

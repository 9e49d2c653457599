"""The Tülu 3 chat template: one piece of code for SFT data, DPO data, generation prompts and GRPO prompts.

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>\\n ... <|assistant|>\\n

The role headers are plain text; ``</s>`` is the eos id, never the text. Segments are encoded one by one, so
the loss mask is exact: True on each assistant turn's content and its eos, False elsewhere. The template in full
and why segment-wise encoding equals whole-text encoding: docs/modules.md, "tokenizer/chat.py".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from moxin.config import MoxinUserError

#: Roles the template knows, and the header text of each.
ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
#: Text appended by ``add_generation_prompt=True``: the model continues from here.
GENERATION_PROMPT = ROLE_HEADERS["assistant"]


class ChatValidationError(MoxinUserError, ValueError):
    """A conversation that does not fit the template; the message names the conversation / message index."""


@dataclass
class ChatTokens:
    """A rendered conversation.

    ``input_ids[i]`` is a token; ``loss_mask[i]`` says whether token ``i`` is a training target (an assistant
    content token or the eos closing an assistant turn). Both lists have the same length.
    """

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def shifted_labels(self, ignore_index: int = -100) -> list[int]:
        """Labels in the batch contract's layout: ``labels[t]`` is the target for the logits at ``t``.

        ``labels[t] = input_ids[t + 1]`` where ``loss_mask[t + 1]`` else ``ignore_index``; the last is
        ``ignore_index``.
        """
        ids, m = self.input_ids, self.loss_mask
        return [ids[t + 1] if m[t + 1] else ignore_index for t in range(len(ids) - 1)] + [ignore_index] * bool(ids)

    @property
    def num_target_tokens(self) -> int:
        """Number of tokens with ``loss_mask`` True."""
        return sum(self.loss_mask)


def _where(conversation_index: int | None, message_index: int | None = None) -> str:
    parts = []
    if conversation_index is not None:
        parts.append(f"conversation {conversation_index}")
    if message_index is not None:
        parts.append(f"message {message_index}")
    return ", ".join(parts) if parts else "conversation"


def validate_conversation(messages: Any, conversation_index: int | None = None) -> str | None:
    """Return a description of what is wrong with ``messages``, or None when it renders.

    A conversation is a non-empty list of dicts, each with ``"role"`` in ``system``/``user``/``assistant`` and a
    string ``"content"``. Other keys are ignored. Data code calls this to count bad records instead of crashing.
    """
    w = _where(conversation_index)
    if not isinstance(messages, (list, tuple)):
        return f"{w}: messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
    if len(messages) == 0:
        return f"{w}: messages is empty (need at least one message)"
    for j, msg in enumerate(messages):
        wj = _where(conversation_index, j)
        if not isinstance(msg, dict):
            return f"{wj}: expected a dict with 'role' and 'content', got {type(msg).__name__}"
        role = msg.get("role")
        if role not in ROLE_HEADERS:
            return f"{wj}: unknown role {role!r}; expected one of {sorted(ROLE_HEADERS)}"
        if "content" not in msg:
            return f"{wj}: missing 'content'"
        content = msg["content"]
        if not isinstance(content, str):
            return f"{wj}: content must be a string, got {type(content).__name__} (role {role!r})"
    return None


def _check(messages: Any, conversation_index: int | None) -> None:
    problem = validate_conversation(messages, conversation_index)
    if problem is not None:
        raise ChatValidationError(problem)


def _segments(messages: Sequence[dict], add_generation_prompt: bool) -> Iterator[tuple[str | None, bool]]:
    """The template as a stream of ``(text, is_target)``; ``text=None`` stands for the eos id.

    The single definition of the format: :func:`render_chat` tokenizes it, :func:`format_prompt` joins it.
    """
    last = len(messages) - 1
    for j, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if role == "assistant":
            yield ROLE_HEADERS["assistant"], False
            yield content, True
            yield None, True  # eos closes every assistant turn and is trained
            if j != last:
                yield "\n", False
        else:
            yield ROLE_HEADERS[role] + content + "\n", False
    if add_generation_prompt:
        yield GENERATION_PROMPT, False


def format_prompt(messages: Sequence[dict], add_generation_prompt: bool = True, eos_token: str = "</s>") -> str:
    """Text form of the template (for generation prompts, logs and GRPO).

    Args:
        messages: the conversation (validated; raises :class:`ChatValidationError`).
        add_generation_prompt: end with ``<|assistant|>\\n`` so a model continues as the assistant. Default True
            because the text form is for prompting; pass False to render a finished conversation.
        eos_token: the text written where the eos id goes (Mistral: ``"</s>"``). Note that encoding this text
            does *not* give the eos id (text is always text); use :func:`render_chat` to get token ids.
    """
    _check(messages, None)
    return "".join(eos_token if t is None else t for t, _ in _segments(messages, add_generation_prompt))


def render_chat(
    messages: Sequence[dict],
    tokenizer,
    add_generation_prompt: bool = False,
    bos: bool = True,
    *,
    conversation_index: int | None = None,
) -> ChatTokens:
    """Tokenize a conversation with the Tülu template and an exact assistant loss mask.

    Args:
        messages: list of ``{"role": "system"|"user"|"assistant", "content": str}``.
        tokenizer: a :class:`moxin.tokenizer.Tokenizer`.
        add_generation_prompt: append ``<|assistant|>\\n`` (mask False) for generation / GRPO prompts.
        bos: start with ``tokenizer.bos_id`` (as the Mistral/Llama tokenizer does).
        conversation_index: only used in error messages, to name the bad record.

    Raises:
        ChatValidationError: empty conversation, unknown role, non-string content; the message names the
            conversation and message index.
    """
    _check(messages, conversation_index)
    ids: list[int] = [tokenizer.bos_id] if bos else []
    mask: list[bool] = [False] * len(ids)
    first = True  # the first text segment gets the dummy prefix, like encoding the whole string would
    for text, target in _merge(_segments(messages, add_generation_prompt)):
        if text is None:
            piece = [tokenizer.eos_id]
        elif text == "":
            continue
        else:
            piece = tokenizer.encode(text, continuation=not first)
            first = False
        ids.extend(piece)
        mask.extend([target] * len(piece))
    return ChatTokens(input_ids=ids, loss_mask=mask)


def _merge(segments: Iterator[tuple[str | None, bool]]) -> Iterator[tuple[str | None, bool]]:
    """Join neighbouring text segments with the same mask, so non-target text is encoded in one call."""
    buf: str | None = None
    buf_target = False
    for text, target in segments:
        if text is not None and buf is not None and target == buf_target:
            buf += text
            continue
        if buf is not None:
            yield buf, buf_target
            buf = None
        if text is None:
            yield None, target
        else:
            buf, buf_target = text, target
    if buf is not None:
        yield buf, buf_target

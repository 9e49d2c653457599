"""Tülu 3 chat template: exact text, exact loss mask, validation messages."""

import pytest

from moxin.tokenizer import (
    ChatValidationError,
    format_prompt,
    render_chat,
    validate_conversation,
)

CONVO = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
    {"role": "assistant", "content": "Tokyo (東京).\n  Indented line."},
]


def test_text_matches_tulu_template():
    expected = (
        "<|system|>\nYou are a concise assistant.\n"
        "<|user|>\nWhat is the capital of France?\n"
        "<|assistant|>\nParis.</s>\n"
        "<|user|>\nAnd of Japan? 日本\n"
        "<|assistant|>\nTokyo (東京).\n  Indented line.</s>"
    )
    assert format_prompt(CONVO, add_generation_prompt=False) == expected
    assert format_prompt(CONVO[:2]) == "<|system|>\nYou are a concise assistant.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n"


def test_mask_covers_exactly_assistant_content_and_eos(tok):
    ct = render_chat(CONVO, tok)
    assert len(ct.input_ids) == len(ct.loss_mask)
    assert ct.input_ids[0] == tok.bos_id and not ct.loss_mask[0]
    # the masked tokens, split at eos, decode to the assistant contents
    turns, cur = [], []
    for i, m in zip(ct.input_ids, ct.loss_mask):
        if m:
            cur.append(i)
            if i == tok.eos_id:
                turns.append(cur)
                cur = []
    assert cur == []
    assert [tok.decode(t) for t in turns] == ["Paris.", "Tokyo (東京).\n  Indented line."]
    assert all(t[-1] == tok.eos_id for t in turns)
    # and nothing else: the unmasked tokens decode to the template without assistant content
    unmasked = tok.decode([i for i, m in zip(ct.input_ids, ct.loss_mask) if not m])
    assert unmasked == (
        "<|system|>\nYou are a concise assistant.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
        "\n<|user|>\nAnd of Japan? 日本\n<|assistant|>\n"
    )
    assert ct.num_target_tokens == sum(len(t) for t in turns)


def test_segmentwise_tokens_equal_whole_text_encoding(tok):
    ct = render_chat(CONVO, tok)
    text = format_prompt(CONVO, add_generation_prompt=False)
    parts = text.split("</s>")
    expected = [tok.bos_id] + tok.encode(parts[0])
    for p in parts[1:]:
        expected += [tok.eos_id] + tok.encode(p, continuation=True)
    assert ct.input_ids == expected


def test_generation_prompt_and_no_bos(tok):
    ct = render_chat(CONVO[:4], tok, add_generation_prompt=True, bos=False)
    assert ct.input_ids[0] != tok.bos_id
    assert tok.decode(ct.input_ids).endswith("<|user|>\nAnd of Japan? 日本\n<|assistant|>\n")
    assert ct.input_ids[-len(tok.encode("\n<|assistant|>\n", continuation=True)):] == tok.encode(
        "\n<|assistant|>\n", continuation=True
    )
    # only the one finished assistant turn is a target
    assert tok.decode([i for i, m in zip(ct.input_ids, ct.loss_mask) if m], skip_special=False) == "Paris.</s>"


def test_shifted_labels(tok):
    ct = render_chat(CONVO[1:3], tok)
    labels = ct.shifted_labels()
    assert len(labels) == len(ct.input_ids) and labels[-1] == -100
    targets = [lab for lab in labels if lab != -100]
    assert targets == [i for i, m in zip(ct.input_ids, ct.loss_mask) if m]
    assert targets[-1] == tok.eos_id


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "messages is empty"),
        ("hello", "must be a list"),
        ([{"role": "robot", "content": "x"}], "message 0: unknown role 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "message 1: content must be a string"),
        ([{"role": "user"}], "message 0: missing 'content'"),
        (["just text"], "message 0: expected a dict"),
    ],
)
def test_malformed_conversations_are_refused_naming_message_and_conversation(tok, messages, fragment):
    problem = validate_conversation(messages, conversation_index=7)
    assert problem is not None and fragment in problem and "conversation 7" in problem
    with pytest.raises(ChatValidationError, match="conversation 12"):
        render_chat(messages, tok, conversation_index=12)


def test_valid_conversation_has_no_problem():
    assert validate_conversation(CONVO) is None
    assert validate_conversation([{"role": "user", "content": "", "extra": 1}]) is None


def test_sample_chat_and_preference_files_render(tok):
    """The built-in chat / preference samples are valid, render, and have assistant targets."""
    import json

    from moxin.data.sample import sample_path

    def rows(name):
        return [json.loads(line) for line in sample_path(name).read_text(encoding="utf-8").splitlines()]

    chat, chat_held = rows("chat"), rows("chat_heldout")
    assert len(chat) + len(chat_held) >= 190 and len(chat_held) >= 30
    for k, r in enumerate(chat + chat_held):
        assert validate_conversation(r["messages"], k) is None
        assert render_chat(r["messages"], tok).num_target_tokens > 0
    assert any(r["messages"][0]["role"] == "system" for r in chat)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in chat)
    prefs, held = rows("preferences"), rows("preferences_heldout")
    assert len(prefs) >= 120 and len(held) == 30
    for r in prefs + held:
        assert r["chosen"][:-1] == r["rejected"][:-1] and r["chosen"][-1] != r["rejected"][-1]
        assert validate_conversation(r["chosen"]) is None and validate_conversation(r["rejected"]) is None
    train_prompts = {r["chosen"][-2]["content"] for r in prefs}
    assert sum(r["chosen"][-2]["content"] in train_prompts for r in held) <= 3


def test_sample_text_files():
    import json

    import pytest as _pytest

    from moxin.data.sample import sample_path

    for name in ("prose", "code", "cjk"):
        docs = [json.loads(line)["text"] for line in sample_path(name).read_text(encoding="utf-8").splitlines()]
        assert len(docs) >= 80 and all(isinstance(d, str) and len(d) > 20 for d in docs)
    with _pytest.raises(FileNotFoundError, match="known: prose"):
        sample_path("nope")

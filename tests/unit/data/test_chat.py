"""Chat and instruction data: the assistant-token mask against transformers' own, and against a rendering of the
conversation prefix by prefix, on SmolLM2's real template; ShareGPT rows; instruction rows; bad conversations."""

import json

import pytest

from dsee_dist.data import dataset as data
from dsee_dist.data.chat import IGNORE_INDEX, normalize_messages, render_conversation
from dsee_dist.errors import DSEEError

CONVERSATIONS = [
    [
        {"role": "user", "content": "name[The Eagle], food[Thai]"},
        {"role": "assistant", "content": "The Eagle is Thai."},
    ],
    [
        {"role": "system", "content": "You describe restaurants."},
        {"role": "user", "content": "name[Aromi]"},
        {"role": "assistant", "content": "Aromi is a pub."},
        {"role": "user", "content": "And its food?"},
        {"role": "assistant", "content": "It serves English food,\nat low prices."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def with_generation_markers(tokenizer):
    """A copy of SmolLM2's tokenizer whose template marks each assistant turn's content and end-of-turn tokens
    with {% generation %} (what transformers' assistant mask reads); otherwise the same rendering."""
    import copy

    marked = copy.deepcopy(tokenizer)
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in tokenizer.chat_template
    marked.chat_template = tokenizer.chat_template.replace(
        plain,
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}" + plain + "{% endif %}",
    )
    return marked


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "system-multi-turn"])
def test_the_mask_equals_transformers_assistant_mask_and_the_prefix_rendering(tokenizer, conversation):
    # SmolLM2's own template has no generation markers: its mask comes from the prefix-by-prefix spans
    ids, labels = render_conversation(tokenizer, conversation, "all_assistant")

    # 1. transformers' mask on the same template with generation markers around each assistant turn
    marked = with_generation_markers(tokenizer)
    enc = marked.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(enc["input_ids"]) == ids
    assert [int(lab != IGNORE_INDEX) for lab in labels] == list(enc["assistant_masks"])
    assert sum(enc["assistant_masks"]) > 0
    # and our marker path (a template with markers) gives the same labels
    assert render_conversation(marked, conversation, "all_assistant") == (ids, labels)

    # 2. token for token against the conversation rendered prefix by prefix: assistant turn i is what rendering
    # messages[: i + 1] adds to messages[:i] with the generation prompt
    expected = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(conversation[:i], add_generation_prompt=True, tokenize=True)
            through = tokenizer.apply_chat_template(conversation[: i + 1], tokenize=True)
            before, through = list(before["input_ids"]), list(through["input_ids"])
            assert ids[: len(through)] == through and through[: len(before)] == before
            expected[len(before) : len(through)] = through[len(before) :]
    assert labels == expected
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]).endswith("<|im_end|>\n")


def test_train_on_chooses_the_labelled_turns(tokenizer):
    conversation = CONVERSATIONS[1]
    ids, every = render_conversation(tokenizer, conversation, "all_assistant")
    _, last = render_conversation(tokenizer, conversation, "last_assistant")
    _, everything = render_conversation(tokenizer, conversation, "all")
    decode = lambda labels: tokenizer.decode([t for t in labels if t != IGNORE_INDEX])  # noqa: E731
    assert "Aromi is a pub." in decode(every) and "English food" in decode(every)
    assert (
        "Aromi is a pub." not in decode(last) and decode(last) == "It serves English food,\nat low prices.<|im_end|>\n"
    )
    assert everything == ids


def test_a_template_that_cannot_be_split_into_turns_is_refused(tokenizer):
    import copy

    counting = copy.deepcopy(tokenizer)  # the turn count first: a shorter conversation is no prefix of a longer one
    counting.chat_template = "{{ messages|length }}" + tokenizer.chat_template
    with pytest.raises(DSEEError, match="chat template of '.*smollm2.*' cannot be split into turns"):
        render_conversation(counting, CONVERSATIONS[1], "all_assistant")


def test_sharegpt_rows_and_role_names(tokenizer):
    sharegpt = [{"from": "human", "value": "name[The Eagle]"}, {"from": "gpt", "value": "The Eagle."}]
    assert normalize_messages(sharegpt, "row 1") == [
        {"role": "user", "content": "name[The Eagle]"},
        {"role": "assistant", "content": "The Eagle."},
    ]
    custom = [{"role": "customer", "content": "hi"}, {"role": "agent", "content": "hello"}]
    assert [m["role"] for m in normalize_messages(custom, "r", roles={"customer": "user", "agent": "assistant"})] == [
        "user",
        "assistant",
    ]
    with_system = normalize_messages(sharegpt, "r", system_prompt="Be brief.")
    assert with_system[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "messages,message",
    [
        ([{"role": "customer", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'customer'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "the assistant turn is empty"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "user", "text": "hi"}], "needs 'role' and 'content'"),
        ("hello", "must be a list"),
    ],
)
def test_bad_conversations_name_the_row(messages, message):
    with pytest.raises(DSEEError, match=f"chats.jsonl, row 7.*{message}"):
        normalize_messages(messages, "chats.jsonl, row 7")


def _chat_cfg(tmp_path, path, *overrides):
    from dsee_dist.config import load_config
    from tests.conftest import REPO

    return load_config(
        REPO / "configs/quickstart.yaml",
        ["data.format=chat", f"data.train_path={path}", f"output.dir={tmp_path / 'out'}", *overrides],
    )


def test_chat_and_sharegpt_files_train_on_the_same_tokens(tokenizer, tmp_path):
    rows = [CONVERSATIONS[i % 2] for i in range(20)]
    chat, sharegpt = tmp_path / "chat.jsonl", tmp_path / "sharegpt.jsonl"
    chat.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt.write_text(
        "".join(
            json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r]}) + "\n"
            for r in rows
        )
    )
    a, _ = data.load_splits(_chat_cfg(tmp_path, chat, "data.block_size=256"), tokenizer, tmp_path / "o1")
    b, _ = data.load_splits(_chat_cfg(tmp_path, sharegpt, "data.block_size=256"), tokenizer, tmp_path / "o2")
    assert len(a) == 19 and [x.tolist() for x in a.labels] == [x.tolist() for x in b.labels]
    assert a.labels[1].tolist() == render_conversation(tokenizer, CONVERSATIONS[1], "all_assistant")[1]


@pytest.mark.parametrize(
    "row,overrides,message",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, [], r"chats\.jsonl, row 3, turn 0: unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, [], "row 3, turn 1"),
        (
            {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "ok"}]},
            ["data.block_size=128"],
            r"row 3: no labelled token is left within data.block_size=128",
        ),
    ],
)
def test_a_bad_row_in_a_chat_file_is_one_line_naming_file_and_row(tokenizer, tmp_path, row, overrides, message):
    path = tmp_path / "chats.jsonl"
    good = {"messages": CONVERSATIONS[0]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, good, row, good]))
    with pytest.raises(DSEEError, match=message):
        data.load_splits(_chat_cfg(tmp_path, path, *overrides), tokenizer, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else True


def test_a_model_without_chat_template_is_refused_for_chat_data(tmp_path):
    from dsee_dist.data.synthetic_e2e import generate_examples
    from dsee_dist.models.tokenizer import train_bpe_tokenizer

    plain = train_bpe_tokenizer([mr + " " + ref for mr, ref in generate_examples(50, 0)], 300)
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    with pytest.raises(DSEEError, match="has no chat template, which data.format=chat needs"):
        data.load_splits(_chat_cfg(tmp_path, path), plain, tmp_path / "out")


def test_instruction_rows_through_the_chat_template_and_the_plain_template(tokenizer, tmp_path):
    from dsee_dist.data.encoding import plain_instruction_prompt
    from dsee_dist.data.synthetic_e2e import generate_examples
    from dsee_dist.models.tokenizer import train_bpe_tokenizer

    rows = [
        {"instruction": "Describe the restaurant.", "input": f"name[Pub {i}]", "output": f"Pub {i}."} for i in range(20)
    ]
    rows[0]["input"] = ""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    train, _ = data.load_splits(
        _chat_cfg(tmp_path, path, "data.format=instruction", "data.block_size=256"), tokenizer, tmp_path / "o1"
    )
    conversation = [
        {"role": "user", "content": "Describe the restaurant.\n\nname[Pub 1]"},
        {"role": "assistant", "content": "Pub 1."},
    ]
    assert train.labels[1].tolist() == render_conversation(tokenizer, conversation, "all_assistant")[1]
    assert tokenizer.decode([t for t in train.labels[0].tolist() if t != IGNORE_INDEX]) == "Pub 0.<|im_end|>\n"

    plain = train_bpe_tokenizer([mr + " " + ref for mr, ref in generate_examples(50, 0)], 300)
    train, _ = data.load_splits(
        _chat_cfg(tmp_path, path, "data.format=instruction", "data.block_size=256"), plain, tmp_path / "o2"
    )
    prompt = plain_instruction_prompt("Describe the restaurant.", "name[Pub 1]")
    assert "### Input:\nname[Pub 1]\n\n### Response:\n" in prompt and "### Input" not in plain_instruction_prompt(
        "a", ""
    )
    n_prompt = len(plain(prompt, add_special_tokens=False)["input_ids"])
    labels = train.labels[1].tolist()
    assert all(t == IGNORE_INDEX for t in labels[:n_prompt]) and labels[-1] == plain.eos_token_id
    assert plain.decode(labels[n_prompt:-1]) == "Pub 1."

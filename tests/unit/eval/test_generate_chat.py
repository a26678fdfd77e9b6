"""`dsee-dist generate --chat`: inputs rendered with the model's own chat template and generation prompt (checked
against transformers' rendering and a plain greedy `generate`), a chat JSONL's final assistant turn kept as the
reference and scored as free text."""

import json

from dsee_dist.recipes import generate

CHATS = [
    [
        {"role": "user", "content": "name[The Eagle], food[Thai]"},
        {"role": "assistant", "content": "The Eagle is Thai."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "name[Aromi]"},
        {"role": "assistant", "content": "Aromi is a pub."},
        {"role": "user", "content": "Its food?"},
        {"role": "assistant", "content": "English."},
    ],
]


def test_chat_inputs_keep_the_last_assistant_turn_as_reference(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [
        {"messages": CHATS[0]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conversations, references = generate.read_chat_inputs(path, system_prompt="Be kind.")
    assert references == ["The Eagle is Thai.", "yo"]
    assert conversations[0] == [{"role": "system", "content": "Be kind."}, CHATS[0][0]]
    (tmp_path / "p.txt").write_text("first\nsecond\n")
    assert generate.read_chat_inputs(tmp_path / "p.txt") == (
        [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]],
        None,
    )


def test_generate_chat_renders_the_template_and_scores_free_text(chat_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    out = tmp_path / "out.txt"
    args = [str(chat_model), "--input", str(path), "--output", str(out), "--chat", "--score"]
    code = generate.main([*args, "--greedy", "--max-new-tokens", "6", "--no-stop-at-newline"])
    assert code == 0, capsys.readouterr().err

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    expected = []
    for conversation in CHATS:
        prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)[
            0, ids.shape[1] :
        ]
        cut = (new == tokenizer.eos_token_id).nonzero()
        new = new[: int(cut[0]) + 1] if len(cut) else new
        expected.append(" ".join(tokenizer.decode(new, skip_special_tokens=True).split()))
    assert out.read_text().splitlines() == expected
    scores = json.loads((tmp_path / "out.scores.json").read_text())
    assert set(scores["scores"]) == {"BLEU", "chrF", "ROUGE_L", "exact_match"} and scores["num_mrs"] == 2


def test_chat_needs_a_chat_template(tmp_path, capsys):
    from dsee_dist.data.synthetic_e2e import generate_examples
    from dsee_dist.models.tokenizer import train_bpe_tokenizer
    from tests.conftest import tiny_gpt2

    model_dir = tmp_path / "plain"
    tiny_gpt2(vocab=300).save_pretrained(model_dir)
    train_bpe_tokenizer([mr for mr, _ in generate_examples(50, 0)], 300).save_pretrained(model_dir)
    (tmp_path / "p.txt").write_text("hello\n")
    code = generate.main(
        [str(model_dir), "--input", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.txt"), "--chat"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "has no chat template" in err[-1] and not (tmp_path / "o.txt").exists()

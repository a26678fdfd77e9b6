"""Data: global-batch schedule, loss masks, formats and their errors."""

import pytest

from dsee_dist.data import dataset as data
from dsee_dist.data.synthetic_e2e import generate_examples, write_csv
from dsee_dist.errors import DSEEError
from dsee_dist.models.tokenizer import train_bpe_tokenizer
from tests.conftest import SHARED_DATA


def test_global_batch_is_the_same_at_any_world_size():
    single = data.GlobalBatchSchedule(100, micro_batch_size=4, grad_accum_steps=2, rank=0, world_size=1, seed=3)
    pair = [
        data.GlobalBatchSchedule(100, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2, seed=3)
        for r in range(2)
    ]
    for step in range(30):  # crosses epoch boundaries (12 steps per epoch)
        one = sorted(i for mb in single.micro_batches(step) for i in mb)
        two = sorted(i for s in pair for mb in s.micro_batches(step) for i in mb)
        assert one == two and len(one) == 8


def test_epochs_use_different_orders_and_each_epoch_covers_distinct_examples():
    s = data.GlobalBatchSchedule(20, micro_batch_size=5, grad_accum_steps=1, rank=0, world_size=1, seed=0)
    epoch0 = [i for step in range(4) for mb in s.micro_batches(step) for i in mb]
    epoch1 = [i for step in range(4, 8) for mb in s.micro_batches(step) for i in mb]
    assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20)) and epoch0 != epoch1


def test_too_little_data_for_one_global_batch_is_an_error():
    with pytest.raises(DSEEError, match="fewer than one global batch"):
        data.GlobalBatchSchedule(3, micro_batch_size=2, grad_accum_steps=1, rank=0, world_size=2, seed=0)


def test_eval_batches_cover_every_example_once_with_equal_counts_per_rank():
    split = data.TokenizedSplit([None] * 11, [None] * 11)
    shares = [data.eval_batches(split, 2, r, 3) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    assert sorted(i for s in shares for b in s for i in b) == list(range(11))


@pytest.fixture(scope="module")
def tokenizer():
    rows = generate_examples(200, seed=0)
    return train_bpe_tokenizer([mr + " " + ref for mr, ref in rows], 400)


def _cfg(tmp_path, *overrides):
    from dsee_dist.config import load_config
    from tests.conftest import REPO

    return load_config(REPO / "configs/quickstart.yaml", [f"output.dir={tmp_path / 'out'}", *overrides])


def _tokens(split) -> list[tuple[list[int], list[int]]]:
    return [(ids.tolist(), lab.tolist()) for ids, lab in zip(split.input_ids, split.labels)]


def test_e2e_loss_only_on_the_reference(tokenizer, tmp_path):
    rows = generate_examples(5, seed=1)
    write_csv(rows, tmp_path / "e2e.csv")
    write_csv(rows, tmp_path / "eval.csv")
    cfg = _cfg(
        tmp_path,
        "data.format=e2e",
        f"data.train_path={tmp_path / 'e2e.csv'}",
        f"data.eval_path={tmp_path / 'eval.csv'}",
        "data.block_size=256",
    )
    split, _ = data.load_splits(cfg, tokenizer, tmp_path / "out")
    assert len(split) == 5
    for (mr, ref), ids, labels in zip(rows, split.input_ids, split.labels):
        n_prompt = len(tokenizer(data.e2e_prompt(mr), add_special_tokens=False)["input_ids"])
        assert (labels[:n_prompt] == data.IGNORE_INDEX).all()
        assert labels[n_prompt:].tolist() == ids[n_prompt:].tolist()
        assert tokenizer.decode(ids[n_prompt:-1]).strip() == ref
        assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("fmt", ["e2e", "e2e-eval", "jsonl", "text", "text-eval"])
def test_the_arrow_path_gives_the_list_paths_tokens(tokenizer, tmp_path, fmt):
    """Every format the list-based path read gives the same examples, in the same order, with the same labels (so
    the same losses) through datasets, held-out split included; truncated-away completions are still dropped."""
    import json

    from tests.unit.data import list_reference

    kind, with_eval = fmt.split("-")[0], fmt.endswith("-eval")
    rows = generate_examples(120, seed=2)
    paths = [tmp_path / f"train.{kind}", tmp_path / f"eval.{kind}"]
    for path, part in zip(paths, (rows[:100], rows[100:])):
        if kind == "e2e":
            write_csv(part, path)
        elif kind == "jsonl":
            path.write_text("".join(json.dumps({"prompt": mr, "completion": " " + ref}) + "\n" for mr, ref in part))
        else:
            path.write_text("\n".join(mr + " " + ref for mr, ref in part))
    block = 48  # short enough that some completions are truncated away, and others cut short
    overrides = [f"data.format={kind}", f"data.train_path={paths[0]}", f"data.block_size={block}"]
    cfg = _cfg(tmp_path, *overrides, *([f"data.eval_path={paths[1]}"] if with_eval else []))
    train, evals = data.load_splits(cfg, tokenizer, tmp_path / "out")
    ref_train, ref_eval = list_reference.splits(kind, tokenizer, block, paths[0], paths[1] if with_eval else None)
    assert _tokens(train) == [(list(i), list(lab)) for i, lab in ref_train] and len(train) > 10
    assert _tokens(evals) == [(list(i), list(lab)) for i, lab in ref_eval] and len(evals) >= 1
    assert train.shifted_label_counts().tolist() == [sum(x != -100 for x in lab[1:]) for _, lab in ref_train]
    assert train.lengths().tolist() == [len(i) for i, _ in ref_train]


@pytest.mark.skipif(not (SHARED_DATA / "e2e" / "devset.csv").is_file(), reason="needs ../shared/data")
def test_real_e2e_csv_reads(tokenizer, tmp_path):
    from dsee_dist.data.sources import load_source

    rows = load_source(str(SHARED_DATA / "e2e" / "devset.csv"), split="train", cache_dir=tmp_path)
    assert len(rows) == 4672 and rows[0]["mr"].startswith("name[")


def test_every_file_kind_and_a_saved_dataset_give_the_same_examples(tokenizer, tmp_path):
    import datasets

    rows = {"prompt": [f"Q{i}: name[The Eagle]?" for i in range(30)], "completion": [f" answer {i}" for i in range(30)]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_json(tmp_path / "d.jsonl")
    ds.to_parquet(tmp_path / "d.parquet")
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.save_to_disk(tmp_path / "saved")
    (tmp_path / "dir").mkdir()
    ds.select(range(15)).to_json(tmp_path / "dir" / "a.jsonl")
    ds.select(range(15, 30)).to_json(tmp_path / "dir" / "b.jsonl")
    seen = []
    for source in ("d.jsonl", "d.parquet", "d.csv", "saved", "dir"):
        train, evals = data.load_splits(
            _cfg(tmp_path, "data.format=jsonl", f"data.train_path={tmp_path / source}"), tokenizer, tmp_path / "out"
        )
        seen.append((_tokens(train), _tokens(evals)))
    assert all(s == seen[0] for s in seen) and len(seen[0][0]) == 28


def test_the_tokenised_cache_is_reused_and_keyed_by_what_changes_the_tokens(tokenizer, tmp_path, caplog):
    import json
    import logging

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f" a {i}"}) + "\n" for i in range(40)))
    cfg = _cfg(tmp_path, "data.format=jsonl", f"data.train_path={path}")
    out = tmp_path / "out"
    first = _tokens(data.load_splits(cfg, tokenizer, out)[0])
    with caplog.at_level(logging.INFO, logger="dsee_dist.data.dataset"):
        second = _tokens(data.load_splits(cfg, tokenizer, out)[0])
    assert first == second and "using cached tokenisation" in caplog.text
    assert len(list((out / "cache").glob("tokenized-*"))) == 1 and not list((out / "cache").glob("*.tmp-*"))
    data.load_splits(
        _cfg(tmp_path, "data.format=jsonl", f"data.train_path={path}", "data.block_size=64"), tokenizer, out
    )
    path.write_text(path.read_text() + json.dumps({"prompt": "Q new", "completion": " a"}) + "\n")
    data.load_splits(cfg, tokenizer, out)
    assert len(list((out / "cache").glob("tokenized-*"))) == 3


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"d\.jsonl, row 2: 'completion' is empty"),
        ('{"question": "a", "answer": "b"}\n', r"d\.jsonl: has no column 'prompt' .*data\.fields\.prompt="),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"d\.jsonl: cannot be read as json"),
        ("", r"d\.jsonl: the file is empty"),
        (b'{"prompt": "caf\xe9", "completion": "b"}\n', r"d\.jsonl:1: not UTF-8 text \(byte 0xe9\)"),
    ],
)
def test_bad_data_is_one_line_naming_the_file_and_row(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DSEEError, match=message) as info:
        data.load_splits(_cfg(tmp_path, "data.format=jsonl", f"data.train_path={path}"), tokenizer, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_e2e_csv_without_mr_ref_columns_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DSEEError, match=r"x\.csv: has no column 'mr' for data.format=e2e \(its columns: a, b\)"):
        data.load_splits(_cfg(tmp_path, "data.format=e2e", f"data.train_path={path}"), tokenizer, tmp_path / "out")


def test_data_fields_map_other_column_names(tokenizer, tmp_path):
    import json

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f" a {i}"}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"q": f"Q{i}", "ans": f" a {i}"}) + "\n" for i in range(20)))
    plain = data.load_splits(_cfg(tmp_path, "data.format=jsonl", f"data.train_path={a}"), tokenizer, tmp_path / "o1")
    mapped = data.load_splits(
        _cfg(tmp_path, "data.format=jsonl", f"data.train_path={b}", "data.fields={prompt: q, completion: ans}"),
        tokenizer,
        tmp_path / "o2",
    )
    assert _tokens(plain[0]) == _tokens(mapped[0])


def test_collate_pads_and_masks(tokenizer):
    import torch

    ids = torch.tensor(tokenizer("abc def " * 40, add_special_tokens=False)["input_ids"][:8])
    split = data.TokenizedSplit([ids, ids[:3]], [ids.clone(), ids[:3].clone()])
    batch = data.collate(split, [0, 1], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (batch["labels"][1, 3:] == data.IGNORE_INDEX).all()


def test_e2e_without_eval_path_holds_out_whole_mrs(tokenizer, tmp_path):
    from dsee_dist.config import load_config
    from tests.conftest import REPO

    # 9 MRs of 4 references each, Pub 8 with a fifth one earlier in the file (among Pub 7's): 5 % of the 37 pairs
    # is 1.85, so the last MR is held out with all 5 of its references, not the last 2 rows of the file
    rows = [
        (f"name[Pub {m}], food[Thai]", f"Pub {m} serves Thai food, version {r}.") for m in range(9) for r in range(4)
    ]
    rows.insert(30, ("name[Pub 8], food[Thai]", "A late reference of Pub 8."))
    csv_path = tmp_path / "train.csv"
    write_csv(rows, csv_path)
    cfg = load_config(REPO / "configs/quickstart.yaml", ["data.format=e2e", f"data.train_path={csv_path}"])
    train, evals = data.load_splits(cfg, tokenizer, tmp_path / "out")
    assert len(train) == 32 and len(evals) == 5
    decoded = [tokenizer.decode(ids) for ids in evals.input_ids]
    assert all(text.startswith("name[Pub 8]") for text in decoded)
    assert not any(tokenizer.decode(ids).startswith("name[Pub 8]") for ids in train.input_ids)
    with pytest.raises(DSEEError, match="only 1 distinct MRs; too few to hold out"):
        data.hold_out_mrs([mr for mr, _ in rows[:4]], 0.05)


def test_jsonl_and_text_formats_load_through_the_cache(tokenizer, tmp_path):
    import json

    from dsee_dist.config import load_config
    from tests.conftest import REPO

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}: name[The Eagle]?", "completion": f" answer {i}"}) + "\n" for i in range(40)
        )
    )
    cfg = load_config(REPO / "configs/quickstart.yaml", ["data.format=jsonl", f"data.train_path={jsonl}"])
    train, evals = data.load_splits(cfg, tokenizer, tmp_path / "out")
    assert len(train) == 38 and len(evals) == 2  # 5 % held out
    n_prompt = len(tokenizer("Q0: name[The Eagle]?", add_special_tokens=False)["input_ids"])
    assert (train.labels[0][:n_prompt] == data.IGNORE_INDEX).all() and (
        train.labels[0][n_prompt:] != data.IGNORE_INDEX
    ).all()

    text = tmp_path / "train.txt"
    text.write_text("There is a pub called The Eagle near the river. " * 200)
    cfg = load_config(
        REPO / "configs/quickstart.yaml", ["data.format=text", f"data.train_path={text}", "data.block_size=32"]
    )
    train, evals = data.load_splits(cfg, tokenizer, tmp_path / "out")
    assert all(len(x) == 32 for x in train.input_ids) and len(evals) >= 1
    assert len(list((tmp_path / "out" / "cache").glob("tokenized-*"))) == 2

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


def test_e2e_loss_only_on_the_reference(tokenizer, tmp_path):
    rows = generate_examples(5, seed=1)
    write_csv(rows, tmp_path / "e2e.csv")
    split = data.tokenize_pairs(data.pairs_to_texts(data.read_e2e(str(tmp_path / "e2e.csv")), "e2e"), tokenizer, 256)
    for (mr, ref), ids, labels in zip(rows, split.input_ids, split.labels):
        n_prompt = len(tokenizer(data.e2e_prompt(mr), add_special_tokens=False)["input_ids"])
        assert (labels[:n_prompt] == data.IGNORE_INDEX).all()
        assert labels[n_prompt:].tolist() == ids[n_prompt:].tolist()
        assert tokenizer.decode(ids[n_prompt:-1]).strip() == ref
        assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.skipif(not (SHARED_DATA / "e2e" / "devset.csv").is_file(), reason="needs ../shared/data")
def test_real_e2e_csv_reads(tokenizer):
    rows = data.read_e2e(str(SHARED_DATA / "e2e" / "devset.csv"))
    assert len(rows) == 4672 and rows[0][0].startswith("name[")


def test_text_is_packed_into_full_blocks(tokenizer):
    split = data.pack_text("name[The Eagle] is a pub. " * 50, tokenizer, 16)
    assert all(len(b) == 16 for b in split.input_ids) and len(split) >= 2


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DSEEError, match=r"d\.jsonl:2: .*'prompt' and 'completion'"):
        data.read_jsonl(path)


def test_e2e_csv_without_mr_ref_columns_is_an_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DSEEError, match="columns mr,ref"):
        data.read_e2e(str(path))


def test_collate_pads_and_masks(tokenizer):
    split = data.TokenizedSplit(*zip(*[(t, t) for t in data.pack_text("abc def " * 40, tokenizer, 8).input_ids[:1]]))
    split = data.TokenizedSplit(
        list(split.input_ids) + [split.input_ids[0][:3]], list(split.labels) + [split.labels[0][:3]]
    )
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
        data.hold_out_mrs(rows[:4], 0.05)


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
    assert len(list((tmp_path / "out" / "cache").glob("tokenized-*.pt"))) == 2

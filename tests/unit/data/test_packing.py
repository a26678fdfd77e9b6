"""Packing: packed rows give the unpacked examples' loss exactly (each example attends only to itself, labels
never cross examples, the labelled-token count is unchanged) in every model family, and through load_splits."""

import json

import pytest
import torch

from dsee_dist.data import dataset as data
from dsee_dist.data.chat import IGNORE_INDEX
from dsee_dist.data.packing import Packer
from dsee_dist.recipes.loss import token_loss_sum
from tests.unit.models.family_models import FAMILY_CONFIGS, VOCAB, tiny_model


def _examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        cut = length // 2 if i % 3 else 0  # every third example labelled everywhere (text-like): its first
        out.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))  # label would cross into the previous example
    return out


def test_rows_hold_whole_examples_with_restarting_positions_and_no_crossing_labels():
    examples = _examples(20)
    packed = Packer(block_size=32)({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
    assert all(n <= 32 for n in packed["length"]) and len(packed["input_ids"]) < len(examples)
    flat = [t for row in packed["input_ids"] for t in row]
    assert flat == [t for ids, _ in examples for t in ids]  # every example once, in order, whole
    unpacked_count = sum(sum(x != IGNORE_INDEX for x in lab[1:]) for _, lab in examples)
    assert sum(packed["n_labels"]) == unpacked_count
    for labels, positions in zip(packed["labels"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert starts[0] == 0 and all(labels[s] == IGNORE_INDEX for s in starts[1:])


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_the_packed_loss_equals_the_unpacked_loss(family):
    """Exact where the family supports packing; OPT, which does not, is shown to cross examples (so refused)."""
    from dsee_dist.models.families import family_of

    model = tiny_model(family).eval()
    examples = _examples(12, seed=1)
    unpacked = data.TokenizedSplit([torch.tensor(i) for i, _ in examples], [torch.tensor(lab) for _, lab in examples])
    rows = Packer(block_size=40)({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
    packed = data.TokenizedSplit(
        *([torch.tensor(x) for x in rows[key]] for key in ("input_ids", "labels", "position_ids"))
    )
    with torch.no_grad():
        loss_u, n_u = token_loss_sum(model, data.collate(unpacked, list(range(len(unpacked))), 0), "cpu")
        batch = data.collate(packed, list(range(len(packed))), 0)
        assert "position_ids" in batch and len(packed) < len(unpacked)
        loss_p, n_p = token_loss_sum(model, batch, "cpu")
    assert int(n_p) == int(n_u)
    if family_of(model.config).packing:
        assert float(loss_p) == pytest.approx(float(loss_u), rel=1e-5)
    else:
        assert float(loss_p) != pytest.approx(float(loss_u), rel=1e-4)


def test_load_splits_packs_the_training_data_only(tmp_path):
    from dsee_dist.config import load_config
    from dsee_dist.data.synthetic_e2e import generate_examples
    from dsee_dist.models.tokenizer import train_bpe_tokenizer
    from tests.conftest import REPO

    rows = generate_examples(60, seed=3)
    tokenizer = train_bpe_tokenizer([mr + " " + ref for mr, ref in rows], 400)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": mr + " ||", "completion": " " + ref}) + "\n" for mr, ref in rows))
    base = ["data.format=jsonl", f"data.train_path={path}", "data.block_size=256", f"output.dir={tmp_path}"]
    cfg = load_config(REPO / "configs/quickstart.yaml", base)
    plain_train, plain_eval = data.load_splits(cfg, tokenizer, tmp_path / "a")
    cfg = load_config(REPO / "configs/quickstart.yaml", [*base, "data.packing=true"])
    train, evals = data.load_splits(cfg, tokenizer, tmp_path / "b")
    assert train.packed and not evals.packed and len(train) < len(plain_train)
    assert int(train.shifted_label_counts().sum()) == int(plain_train.shifted_label_counts().sum())
    assert [t for i in range(len(train)) for t in train.input_ids[i].tolist()] == [
        t for i in range(len(plain_train)) for t in plain_train.input_ids[i].tolist()
    ]
    assert [x.tolist() for x in evals.input_ids] == [x.tolist() for x in plain_eval.input_ids]

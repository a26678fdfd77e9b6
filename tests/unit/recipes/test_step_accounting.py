"""The trainer's per-step bookkeeping without collectives: every rank computes the global batch's labelled-token
count from the host copy of the data, and it equals the count summed over the ranks' own micro-batches."""

from __future__ import annotations

import torch

from dsee_dist.data.dataset import IGNORE_INDEX, GlobalBatchSchedule, TokenizedSplit, collate


def split_of_varied_lengths(n: int = 40) -> TokenizedSplit:
    g = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for i in range(n):
        length = 5 + i % 11
        seq = torch.randint(1, 50, (length,), generator=g)
        lab = seq.clone()
        lab[: 1 + i % 3] = IGNORE_INDEX  # a prompt without loss
        ids.append(seq)
        labels.append(lab)
    return TokenizedSplit(ids, labels)


def test_global_indices_are_the_union_of_every_ranks_micro_batches():
    world, micro, accum = 4, 2, 3
    for step in (0, 5, 6, 13):  # within the first epoch, and in later ones
        per_rank = [GlobalBatchSchedule(40, micro, accum, r, world, seed=3).micro_batches(step) for r in range(world)]
        union = sorted(i for batches in per_rank for batch in batches for i in batch)
        assert sorted(GlobalBatchSchedule(40, micro, accum, 1, world, seed=3).global_indices(step)) == union


def test_host_label_count_equals_the_sum_over_ranks_of_collated_labels():
    split = split_of_varied_lengths()
    counts = split.shifted_label_counts()
    world = 2
    for step in range(4):
        summed = 0
        for rank in range(world):
            schedule = GlobalBatchSchedule(len(split), 3, 2, rank, world, seed=1)
            for idx in schedule.micro_batches(step):
                summed += int((collate(split, idx, pad_id=0)["labels"][:, 1:] != IGNORE_INDEX).sum())
        assert sum(counts[i] for i in schedule.global_indices(step)) == summed


def padding_fraction(split: TokenizedSplit, schedules: list[GlobalBatchSchedule], steps: int) -> float:
    padded = real = 0
    for step in range(steps):
        for schedule in schedules:
            for idx in schedule.micro_batches(step):
                mask = collate(split, idx, pad_id=0)["attention_mask"]
                padded, real = padded + mask.numel(), real + int(mask.sum())
    return 1 - real / padded


def test_length_grouping_lowers_padding_and_stays_a_deterministic_permutation():
    split = split_of_varied_lengths(400)
    lengths = [len(ids) for ids in split.input_ids]
    world = 2

    def schedules(grouped: bool) -> list[GlobalBatchSchedule]:
        return [
            GlobalBatchSchedule(400, 4, 2, r, world, seed=5, lengths=lengths if grouped else None) for r in range(world)
        ]

    steps = schedules(True)[0].steps_per_epoch  # one epoch: 25 steps of 16 examples
    plain, grouped = padding_fraction(split, schedules(False), steps), padding_fraction(split, schedules(True), steps)
    assert plain > 0.2 and grouped < plain / 4, (plain, grouped)
    ranks = schedules(True)
    epoch = [i for step in range(steps) for i in ranks[0].global_indices(step)]
    assert sorted(epoch) == list(range(400))  # every example once per epoch
    for step in (0, 7, steps + 3):  # every rank agrees on the global batch; a fresh schedule (resume) gives the same
        union = sorted(i for r in ranks for batch in r.micro_batches(step) for i in batch)
        assert union == sorted(ranks[1].global_indices(step))
        assert schedules(True)[1].micro_batches(step) == ranks[1].micro_batches(step)
    assert [ranks[0].global_indices(s) for s in range(3)] != [ranks[0].global_indices(s + steps) for s in range(3)]


def test_prefetched_batches_are_the_steps_own_and_used_once():
    from types import SimpleNamespace

    from dsee_dist.recipes.finetune import collate_step, step_batches

    split = split_of_varied_lengths()
    stage = SimpleNamespace(
        ctx=SimpleNamespace(train_split=split),
        schedule=GlobalBatchSchedule(len(split), 3, 2, 0, 1, seed=1),
        pad_id=0,
        device=torch.device("cpu"),
        prefetched=None,
    )

    def same(a, b):
        return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))

    direct = [[collate(split, idx, 0) for idx in stage.schedule.micro_batches(step)] for step in range(3)]
    assert same(step_batches(stage, 0), direct[0])
    stage.prefetched = (1, collate_step(stage, 1))
    prefetched = stage.prefetched[1]
    assert step_batches(stage, 1) is prefetched and same(prefetched, direct[1]) and stage.prefetched is None
    stage.prefetched = (5, collate_step(stage, 5))  # a stale prefetch (another step) is never used
    assert same(step_batches(stage, 2), direct[2]) and stage.prefetched is None

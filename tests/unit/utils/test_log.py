"""Rank-aware logging: `[dsee rankN] message`; info from rank 0 only, warnings from every rank."""

import logging

import pytest

from dsee_dist.utils.log import setup_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger("dsee_dist")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = handlers, level, propagate


@pytest.mark.parametrize(
    "rank,expected",
    [
        (0, "[dsee rank0] progress\n[dsee rank0] trouble\n"),
        (1, "[dsee rank1] trouble\n"),
    ],
)
def test_info_comes_from_rank_zero_and_warnings_from_every_rank(rank, expected, capsys, restore_logging):
    setup_logging(rank)
    setup_logging(rank)  # idempotent: still one handler
    logger = logging.getLogger("dsee_dist.recipes.finetune")
    logger.info("progress")
    logger.warning("trouble")
    assert capsys.readouterr().out == expected

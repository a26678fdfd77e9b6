"""`dsee-dist evaluate` reproduces the official E2E scorer's figures (tuetschek/e2e-metrics, `measure_scores.py`)
on both checks shipped in ../shared/data/e2e/metrics-example/, whose README holds the official figures."""

import json
import re
import shutil

import pytest

from dsee_dist.eval.metrics import METRICS, E2EScorer, compute_bleu, compute_nist
from dsee_dist.eval.references import read_hypotheses, read_references
from dsee_dist.recipes import evaluate
from tests.conftest import SHARED_DATA

EXAMPLE = SHARED_DATA / "e2e" / "metrics-example"
TOLERANCE = {"BLEU": 0.002, "NIST": 0.02, "METEOR": 0.002, "ROUGE_L": 0.002, "CIDEr": 0.01}  # the targets
needs_example = pytest.mark.skipif(
    not (EXAMPLE / "README.md").is_file(),
    reason="needs ../shared/data/e2e/metrics-example (the official scorer's example)",
)
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java (apt-get install default-jre-headless)"
)


def official_figures() -> dict[tuple[str, str], dict[str, float]]:
    """{(refs file, outputs file): {metric: official figure}} from the README's table rows
    (`| refs + outputs | what | BLEU | NIST | METEOR | ROUGE_L | CIDEr |`)."""
    table = {}
    for line in (EXAMPLE / "README.md").read_text().splitlines():
        m = re.match(r"\|\s*(\S+)\s*\+\s*(\S+)\s*\|[^|]*\|" + r"\s*([0-9.]+)\s*\|" * 5, line)
        if m:
            table[(m.group(1), m.group(2))] = dict(zip(METRICS, map(float, m.groups()[2:])))
    return table


@pytest.fixture(scope="module")
def official_and_ours():
    """Both checks scored with one scorer (one METEOR JVM for both)."""
    figures = official_figures()
    assert len(figures) == 2, f"expected the two checks in the README's table, found {list(figures)}"
    ours = {}
    with E2EScorer() as scorer:
        for refs_name, hyp_name in figures:
            refs = read_references(EXAMPLE / refs_name)
            hyps = read_hypotheses(EXAMPLE / hyp_name, len(refs.groups))
            ours[(refs_name, hyp_name)] = scorer.score(hyps, refs.groups)
    return figures, ours


@needs_example
@needs_java
@pytest.mark.parametrize("check", ["devel-conc.txt", "dev-loo-refs.txt"])
def test_figures_match_the_official_scorer(official_and_ours, check):
    figures, ours = official_and_ours
    key = next(k for k in figures if k[0] == check)
    for metric, official in figures[key].items():
        assert abs(ours[key][metric] - official) <= TOLERANCE[metric], (check, metric, ours[key][metric], official)


@needs_example
def test_without_java_meteor_is_unavailable_and_the_other_four_are_computed(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    for (refs_name, hyp_name), official in official_figures().items():
        out = tmp_path / f"{refs_name}.json"
        assert (
            evaluate.main(["--refs", str(EXAMPLE / refs_name), "--hyp", str(EXAMPLE / hyp_name), "--out", str(out)])
            == 0
        )
        captured = capsys.readouterr()
        assert "METEOR" in captured.err and "apt-get install default-jre-headless" in captured.err
        assert re.search(r"^METEOR\s+n/a$", captured.out, re.M)
        ours = json.loads(captured.out.strip().splitlines()[-1])
        assert ours["METEOR"] is None and json.loads(out.read_text())["scores"] == {k: ours[k] for k in official}
        for metric in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):  # the Python PTB stand-in stays within the targets
            assert abs(ours[metric] - official[metric]) <= TOLERANCE[metric], (refs_name, metric, ours[metric])


def test_nist_uses_every_reference_of_an_mr():
    """mteval's NIST clips matches by the largest count in any reference: a second reference that holds the
    output's other words raises the score (NLTK's single-best-reference NIST would not change)."""
    hyp = ["the red cat sat on the mat"]
    one = compute_nist(
        hyp,
        [
            [
                "the red cat",
            ]
        ],
    )
    two = compute_nist(hyp, [["the red cat", "sat on the mat"]])
    assert two > one > 0
    assert compute_bleu(["the red cat sat on the mat"], [["The red cat sat on the mat."]]) > 0.6  # lowercased

"""`dsee-dist evaluate`: references grouped by MR, the table + JSON line + scores file, and one clear line
(exit 2, nothing written) for each kind of bad input."""

import csv
import itertools
import json
import subprocess
import sys

import pytest

from dsee_dist.eval.metrics import compute_bleu, compute_nist
from dsee_dist.eval.references import group_by_mr, read_hypotheses, read_references
from dsee_dist.recipes import evaluate
from tests.conftest import REPO, SHARED_DATA

EXAMPLE = SHARED_DATA / "e2e" / "metrics-example"
TESTSET = SHARED_DATA / "e2e" / "testset_w_refs.csv"
FAST = "BLEU,NIST"  # no JVM: these tests are about files, not metrics


def _write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


def test_references_are_grouped_by_mr_in_order_of_first_appearance(tmp_path):
    rows = [("b", "b1"), ("a", "a1"), ("b", "b2"), ("c", "c1"), ("a", "a2"), ("b", "b3")]
    assert group_by_mr(rows) == (["b", "a", "c"], [["b1", "b2", "b3"], ["a1", "a2"], ["c1"]])
    _write_csv(tmp_path / "refs.csv", rows)
    refs = read_references(tmp_path / "refs.csv")
    assert refs.mrs == ["b", "a", "c"] and refs.groups == [["b1", "b2", "b3"], ["a1", "a2"], ["c1"]]
    (tmp_path / "refs.txt").write_text("b1\nb2\nb3\n\na1\na2\n\nc1\n")
    assert read_references(tmp_path / "refs.txt").groups == refs.groups
    (tmp_path / "single.txt").write_text("x\ny\n")  # no blank line: one reference per MR
    assert read_references(tmp_path / "single.txt").groups == [["x"], ["y"]]


@pytest.mark.skipif(not (EXAMPLE / "devel-conc.txt").is_file(), reason="needs ../shared/data/e2e/metrics-example")
def test_csv_and_text_references_give_the_same_scores(tmp_path):
    """The scorer's text example, rewritten as an E2E CSV with the MRs' rows interleaved, scores the same."""
    groups = read_references(EXAMPLE / "devel-conc.txt").groups
    hyps = read_hypotheses(EXAMPLE / "baseline-output.txt", len(groups))
    depth = max(len(g) for g in groups)
    rows = [(f"name[mr {i}]", g[j]) for j in range(depth) for i, g in enumerate(groups) if j < len(g)]
    _write_csv(tmp_path / "refs.csv", rows)
    from_csv = read_references(tmp_path / "refs.csv")
    assert from_csv.groups == groups
    assert compute_bleu(hyps, from_csv.groups) == compute_bleu(hyps, groups)
    assert compute_nist(hyps, from_csv.groups) == compute_nist(hyps, groups)


@pytest.mark.skipif(not TESTSET.is_file(), reason="needs ../shared/data/e2e/testset_w_refs.csv")
def test_the_e2e_test_set_groups_as_the_official_scorer_groups_it():
    """630 MRs, 4,693 references; equal to the official scorer's grouping of consecutive identical MRs."""
    refs = read_references(TESTSET)
    assert len(refs.groups) == 630 and refs.num_references == 4693 and max(map(len, refs.groups)) > 1
    with TESTSET.open(newline="", encoding="utf-8") as f:
        consecutive = itertools.groupby(csv.DictReader(f), lambda row: row["mr"])
        runs = [(mr, [row["ref"] for row in rows]) for mr, rows in consecutive]
    assert refs.mrs == [mr for mr, _ in runs] and refs.groups == [g for _, g in runs]


def test_cli_prints_a_table_and_a_json_line_and_writes_scores_beside_the_outputs(tmp_path):
    _write_csv(
        tmp_path / "refs.csv",
        [("m1", "the cat sat on the mat"), ("m2", "a dog ran in the park"), ("m1", "there is a cat on the mat")],
    )
    (tmp_path / "outputs.txt").write_text("the cat sat on the mat\na dog ran in a park\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsee_dist",
            "evaluate",
            "--refs",
            str(tmp_path / "refs.csv"),
            "--hyp",
            str(tmp_path / "outputs.txt"),
            "--metrics",
            FAST,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["metric", "score"] and lines[2].startswith("BLEU") and lines[3].startswith("NIST")
    line = json.loads(lines[-1])
    saved = json.loads((tmp_path / "outputs.scores.json").read_text())
    assert saved["scores"]["BLEU"] == line["BLEU"] > 0.5 and saved["num_mrs"] == 2 and saved["num_references"] == 3
    assert not list(tmp_path.glob("*.tmp*"))


def _bad(tmp_path, capsys, refs, hyp, *extra):
    out = tmp_path / "scores.json"
    metrics = [] if "--metrics" in extra else ["--metrics", FAST]
    code = evaluate.main(["--refs", str(refs), "--hyp", str(hyp), "--out", str(out), *metrics, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("dsee-dist evaluate: error: "), err
    assert not out.exists()
    return err


@pytest.fixture
def files(tmp_path):
    _write_csv(tmp_path / "refs.csv", [("m1", "one ref"), ("m2", "two ref"), ("m1", "one more")])
    (tmp_path / "out.txt").write_text("one\ntwo\n")
    return tmp_path / "refs.csv", tmp_path / "out.txt"


def test_missing_files_are_named(tmp_path, capsys, files):
    refs, hyp = files
    assert "references file" in _bad(tmp_path, capsys, tmp_path / "nope.csv", hyp) and "does not exist" in _bad(
        tmp_path, capsys, tmp_path / "nope.csv", hyp
    )
    assert "outputs file" in _bad(tmp_path, capsys, refs, tmp_path / "nope.txt")


def test_output_count_must_match_the_number_of_mrs(tmp_path, capsys, files):
    refs, hyp = files
    hyp.write_text("one\ntwo\nthree\n")
    err = _bad(tmp_path, capsys, refs, hyp)
    assert "has 3 lines but there are 2 inputs" in err and "one output line per input" in err


def test_an_empty_output_is_scored_as_empty_and_counted(tmp_path, files):
    """A weak model's empty answer is a valid, bad output: the file is scored, not refused."""
    refs, hyp = files
    hyp.write_text("one ref\n\n")
    result = evaluate.evaluate_files(refs, hyp, ("BLEU",))
    assert result["empty_outputs"] == 1
    assert result["scores"]["BLEU"] == compute_bleu(["one ref", ""], read_references(refs).groups)


def test_free_text_references_score_with_sacrebleu_rouge_and_exact_match(tmp_path):
    import sacrebleu
    from pycocoevalcap.rouge.rouge import Rouge

    rows = [
        {"references": ["The cat sat on the mat.", "A cat was on the mat."]},
        {"reference": "Paris is the capital of France."},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"instruction": "x", "output": "Blue."},
    ]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hyps = ["The cat sat on a mat.", "Paris is in France.", "4", ""]
    (tmp_path / "out.txt").write_text("".join(h + "\n" for h in hyps))
    result = evaluate.evaluate_files(tmp_path / "refs.jsonl", tmp_path / "out.txt")
    streams = [
        ["The cat sat on the mat.", "Paris is the capital of France.", "4", "Blue."],
        ["A cat was on the mat.", None, None, None],
    ]
    scores = result["scores"]
    assert scores["BLEU"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert scores["chrF"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
    groups = [[r for r in refs if r] for refs in zip(*streams)]
    rouge = [Rouge().calc_score([h.lower()], [r.lower() for r in g]) for h, g in zip(hyps, groups)]
    assert scores["ROUGE_L"] == pytest.approx(sum(rouge) / 4) and 0 < scores["ROUGE_L"] < 1
    assert scores["exact_match"] == 0.25 and result["empty_outputs"] == 1 and result["num_references"] == 5


def test_free_text_reference_errors_name_the_line(tmp_path, capsys):
    (tmp_path / "out.txt").write_text("a\n")
    (tmp_path / "refs.jsonl").write_text('{"text": "no reference key"}\n')
    assert f"{tmp_path / 'refs.jsonl'}:1: no reference" in _bad(
        tmp_path, capsys, tmp_path / "refs.jsonl", tmp_path / "out.txt", "--metrics", "bleu"
    )


def test_a_csv_without_mr_and_ref_columns_is_refused(tmp_path, capsys, files):
    _, hyp = files
    (tmp_path / "bad.csv").write_text("name,text\na,b\n")
    assert "one MR column and one reference column" in _bad(tmp_path, capsys, tmp_path / "bad.csv", hyp)


def test_an_unknown_metric_is_refused(tmp_path, capsys, files):
    refs, hyp = files
    assert "unknown metric 'bleurt'" in _bad(tmp_path, capsys, refs, hyp, "--metrics", "bleu,bleurt")

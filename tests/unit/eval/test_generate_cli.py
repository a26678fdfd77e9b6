"""`dsee-dist generate` refuses bad requests with one line and exit 2 before any model is loaded, and reads
its inputs (distinct MRs of an E2E CSV in order of first appearance, or one prompt per line)."""

from pathlib import Path

import pytest

from dsee_dist.recipes import generate


def _bad(capsys, *args):
    code = generate.main(list(map(str, args)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("dsee-dist generate: error: "), err
    return err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "in.csv").write_text('mr,ref\n"name[A]",a one\n"name[B]",b one\n"name[A]",a two\n')
    (tmp_path / "model").mkdir()
    return tmp_path


def test_inputs_are_the_distinct_mrs_in_training_prompt_format(files):
    inputs, prompts = generate.read_prompts(files / "in.csv")
    assert inputs == ["name[A]", "name[B]"] and prompts == ["name[A] ||", "name[B] ||"]
    (files / "mrs.csv").write_text("mr\nname[C]\nname[C]\nname[D]\n")  # an MR-only CSV (no references)
    assert generate.read_prompts(files / "mrs.csv")[0] == ["name[C]", "name[D]"]
    (files / "p.txt").write_text("first prompt\nsecond prompt\n")
    assert generate.read_prompts(files / "p.txt") == (["first prompt", "second prompt"],) * 2
    assert generate.read_prompts(files / "p.txt", "e2e")[1] == ["first prompt ||", "second prompt ||"]


def test_missing_model_and_input_are_named(files, capsys):
    out = files / "out.txt"
    assert "model '" in _bad(capsys, files / "nope", "--input", files / "in.csv", "--output", out)
    assert "input file" in _bad(capsys, files / "model", "--input", files / "nope.csv", "--output", out)
    assert not out.exists()


def test_an_empty_prompt_line_is_named(files, capsys):
    (files / "p.txt").write_text("one\n\nthree\n")
    err = _bad(capsys, files / "model", "--input", files / "p.txt", "--output", files / "out.txt")
    assert f"{files / 'p.txt'}:2: empty input line" in err


def test_score_needs_references_and_settings_are_checked(files, capsys):
    (files / "p.txt").write_text("one\n")
    assert "--score needs an E2E CSV" in _bad(
        capsys, files / "model", "--input", files / "p.txt", "--output", files / "o.txt", "--score"
    )
    assert "generate.num_beams must be at least 1" in _bad(
        capsys, files / "model", "--input", files / "in.csv", "--output", files / "o.txt", "--num-beams", "0"
    )
    assert "is a directory" in _bad(capsys, files / "model", "--input", files / "in.csv", "--output", files)
    assert not Path(files / "o.txt").exists()

"""`sstoken inspect`: literal tokens shown in plain text with their marks and numbers; bad input refused in one line."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.views.token_view import score_view
from tests.pipeline.views.test_stats import literal_folders
from tests.score_factories import write_synthetic_run


def test_plain_view_marks_kept_dropped_and_context():
    text = score_view(["<s>", "Hi", " there", "!"], [False, True, True, True], [False, True, False, True],
                      [float("nan"), 0.9, 0.1, 0.5], (0.1, 0.9), plain=True)
    assert text.plain == "<s>[Hi]~ there~[!]"


def test_terminal_view_colours_targets_by_score():
    text = score_view(["a", "b", "c"], [False, True, True], [False, True, False], [float("nan"), 0.9, 0.1], (0.1, 0.9))
    styles = [str(span.style) for span in text.spans]
    assert styles[0] == "dim" and "bold" in styles[1] and "#e8590c" in styles[1] and "strike" in styles[2]


def test_inspect_prints_the_sample_and_its_numbers(tmp_path, capsys):
    _, scores = literal_folders(tmp_path)
    assert main(["inspect", str(scores), "--sample", "a"]) == 0
    out = capsys.readouterr().out
    assert "sample a · src-a · asked for · 3 targets, 2 kept" in out
    assert "⟨10⟩⟨11⟩[⟨12⟩]~⟨13⟩~[⟨14⟩]" in out  # no tokenizer folder: ids; targets marked
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("2 ", "3 ", "4 "))]
    assert rows == [["2", "⟨12⟩", "kept", "1", "2", "1", "0.25", "0.9"], ["3", "⟨13⟩", "dropped", "1", "2", "-1", "0.25", "0.1"],
                    ["4", "⟨14⟩", "kept", "1", "2", "0", "0.25", "0.5"]]
    assert "no tokenizer folder found" in out


def test_top_bottom_and_a_run_round(tmp_path, capsys, tokenizer_dir):
    run = write_synthetic_run(tmp_path / "run", tokenizer_dir, samples=8, rounds=2)
    assert main(["inspect", str(run), "--top", "2", "--bottom", "1", "--round", "0", "--no-numbers"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert [h.split(" · ")[0] for h in headers] == ["== round 0"] * 3
    assert [h.split(" · ")[3] for h in headers] == ["highest score", "highest score", "lowest score"]


@pytest.mark.parametrize("arguments, message", [
    (["--sample", "zzz"], "sample id 'zzz' is not among the 2 samples"),
    (["--top", "0"], "top: Input should be greater than or equal to 1"),
    (["--random", "-1"], "random: Input should be greater than or equal to 1"),
    ([], "say which samples to show"),
    (["--top", "1", "--round", "3"], "round 3 is not in"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, arguments, message):
    _, scores = literal_folders(tmp_path)
    assert main(["inspect", str(scores), *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--top", "1"]) == 2
    assert "is not an sstoken artifact folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing"), "--top", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err

"""The sanitizer scripts' --cases selection (scripts/sanitizer_cases.py) (CPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from sanitizer_cases import parse_case_indices, selected_cases  # noqa: E402


def test_single_indices_and_ranges_are_sorted_without_repeats() -> None:
    assert parse_case_indices("5,0,3-4,4", 8) == [0, 3, 4, 5]
    assert parse_case_indices("0-7", 8) == list(range(8))
    assert parse_case_indices(" 2 ", 3) == [2]


@pytest.mark.parametrize("text", ["8", "3-8", "-1", "4-2", "", "a", "1,", "1-2-3"])
def test_indices_outside_the_cases_or_malformed_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--cases"):
        parse_case_indices(text, 8)


def test_the_command_line_selects_or_defaults_to_every_case() -> None:
    assert selected_cases("probe", 8, []) is None
    assert selected_cases("probe", 8, ["--cases", "1,6-7"]) == [1, 6, 7]


def test_a_bad_selection_exits_with_the_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        selected_cases("probe", 8, ["--cases", "9"])
    assert exit_info.value.code == 2
    assert "--cases: '9' is not inside 0-7" in capsys.readouterr().err

"""Which cases a sanitizer script runs (scripts/memcheck_forward.py, scripts/memcheck_backward.py).

Under compute-sanitizer's racecheck a full build's cases run for minutes, longer than one device
call allows (the backward's 30 cases did not finish in 120 s on an H100), so `--cases 0,3-5`
runs a part of them, and a few calls cover the rest. Without it every case runs, the extra
fixed-length ones too.
"""

from __future__ import annotations

import argparse


def parse_case_indices(text: str, count: int) -> list[int]:
    """The indices `text` lists ("0,3-5": single indices and inclusive ranges), each in
    [0, count), sorted and without repeats. Raises ValueError naming the item at fault."""
    indices: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"--cases: {item.strip()!r} is not an index or a range") from None
        if not 0 <= low <= high < count:
            raise ValueError(f"--cases: {item.strip()!r} is not inside 0-{count - 1}")
        indices.update(range(low, high + 1))
    return sorted(indices)


def selected_cases(description: str, count: int, argv: list[str] | None = None) -> list[int] | None:
    """The case indices of the command line's --cases, or None when it has none (every case)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--cases", help=f"comma list of case indices and ranges in 0-{count - 1} (default: all)"
    )
    args = parser.parse_args(argv)
    if args.cases is None:
        return None
    try:
        return parse_case_indices(args.cases, count)
    except ValueError as error:
        parser.error(str(error))

"""``python -m flash_varlen``: print what this installation was built with and, on a GPU, check
that it computes attention correctly (flash_varlen.info has the logic)."""

from flash_varlen.info import main

raise SystemExit(main())

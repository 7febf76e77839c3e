"""`python -m oodflow ...`, the same as the `oodflow` console script."""

from oodflow.cli import main

raise SystemExit(main())

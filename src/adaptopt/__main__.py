"""`python -m adaptopt` is the `adaptopt` command."""

from .experiments.cli import main

raise SystemExit(main())

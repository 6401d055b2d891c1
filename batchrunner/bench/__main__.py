"""``python -m batchrunner.bench``."""

from batchrunner.bench.cli import main

raise SystemExit(main())

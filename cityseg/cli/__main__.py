"""`python -m cityseg.cli ...` (what the tests' subprocesses run)."""

import sys

from cityseg.cli import main

sys.exit(main())

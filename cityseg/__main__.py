"""`python -m cityseg ...` (what torchrun runs: `torchrun ... -m cityseg run EXP`)."""

import sys

from cityseg.cli import main

sys.exit(main())

"""`python -m catdog ...`: the `catdog` command, also as `torchrun ... -m catdog train ...` (one process per GPU)."""

import sys

from catdog.cli import main

sys.exit(main())

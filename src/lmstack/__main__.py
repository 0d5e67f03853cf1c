"""`python -m lmstack` (and `torchrun --module lmstack ...`) runs the command line."""

import sys

from lmstack.cli import main

sys.exit(main())

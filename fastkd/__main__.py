"""``python -m fastkd``: the fastkd command line (see fastkd/cli.py)."""

import sys

from .cli import main

sys.exit(main())

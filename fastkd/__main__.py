"""``python -m fastkd``: the fastkd command line (see fastkd/cli/)."""

import sys

from .cli import main

sys.exit(main())

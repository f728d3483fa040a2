"""``python -m sfx`` is the same as ``sfx``."""

import sys

from sfx.cli import main

sys.exit(main())

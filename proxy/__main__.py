"""``python -m proxy`` is ``mailproxy``."""

import sys

from .cli import main

sys.exit(main())

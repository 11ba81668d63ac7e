"""``python -m proxy`` is ``mailproxy``."""

import sys

from .launch import main

sys.exit(main())

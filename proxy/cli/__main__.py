"""``python -m proxy.cli`` is ``mailproxy`` too (as ``python -m proxy``)."""

import sys

from ..launch import main

sys.exit(main())

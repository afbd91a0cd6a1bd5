"""``python -m maskdiffusion`` = the ``maskdiffusion`` command."""

import sys

from .cli import main

sys.exit(main())

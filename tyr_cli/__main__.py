"""``python -m tyr_cli``: the ``tyr`` command."""

import sys

from .main import main

sys.exit(main())

"""``python -m ghostify.cli``: the same as the ``ghostify`` command."""

import sys

from . import main

sys.exit(main())

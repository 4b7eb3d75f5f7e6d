"""``python -m quantoracle``: the same command line as the ``quantoracle`` script."""

import sys

from quantoracle.cli import main

sys.exit(main())

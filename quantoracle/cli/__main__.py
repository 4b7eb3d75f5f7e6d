"""``python -m quantoracle.cli``: the same as ``python -m quantoracle``."""

import sys

from quantoracle.cli import main

sys.exit(main())

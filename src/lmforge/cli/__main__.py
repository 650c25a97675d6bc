"""`python -m lmforge.cli`: the `lmforge` command."""

import sys

from lmforge.cli.main import main

sys.exit(main())

"""`python -m dermsight.cli`: the `dermsight` command, for environments where the script is not on PATH."""

import sys

from dermsight.cli import main

sys.exit(main())

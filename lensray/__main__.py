"""``python -m lensray``: the ``lensray`` command, for environments without its script on PATH."""

import sys

from lensray.cli import main

if __name__ == "__main__":
    sys.exit(main())

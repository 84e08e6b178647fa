"""``python -m slimmoe.cli ...`` is the ``slimmoe`` command."""

import sys

from slimmoe.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

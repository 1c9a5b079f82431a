"""``python -m blockpull``: the command line, as the ``blockpull`` script runs it."""
import sys

from blockpull.cli import main

if __name__ == "__main__":
    sys.exit(main())

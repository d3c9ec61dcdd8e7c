"""``python -m facekd``: the same command line as ``facekd``."""
import sys

from facekd.cli import main

sys.exit(main())

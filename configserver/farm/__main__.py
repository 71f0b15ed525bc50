"""``python -m configserver.farm up|status|down``."""

import sys

from configserver.farm.cli import main

sys.exit(main(sys.argv[1:]))

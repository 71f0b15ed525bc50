"""``python -m nodeagent``: the same as the ``nodeagent`` command."""

import sys

from nodeagent.cli import main

sys.exit(main())

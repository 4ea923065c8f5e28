"""``python -m pipeline``: the featurefleet command line."""

import sys

from pipeline.client.cli import main

sys.exit(main())

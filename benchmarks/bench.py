"""Run the featurefleet benchmark: ``python benchmarks/bench.py [--model ...]``.

Same as ``featurefleet bench``; see ``benchmarks/harness.py`` for what each row measures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import main

if __name__ == "__main__":
    sys.exit(main())

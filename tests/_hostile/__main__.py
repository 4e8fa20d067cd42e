"""``python tests/_hostile TALLY.json``: count the verdicts a run wrote (see __init__.py)."""

import collections
import json
import sys
from pathlib import Path

verdicts = json.loads(Path(sys.argv[1]).read_text())
counts = collections.Counter(verdicts.values())
print(f"{len(verdicts)} rows: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))

"""Run the time model again for finished benches, e.g. after deleting the cached block costs so that they are
measured anew on a quiet machine (a cost measured while other work ran stays in the cache):

    rm ~/.cache/ringada/costs/*.json        # or $RINGADA_CACHE/costs
    .venv/bin/python scripts/repredict.py out/bench-ring out/bench-star

Rewrites each DIR/bench.json (predicted_step_s, measured_over_predicted, simulator_mean_abs_error) and
DIR/bench.md; the measurements are left as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ringada.bench import repredict  # noqa: E402


def main(dirs: list[str]) -> int:
    if not dirs:
        print(__doc__, file=sys.stderr)
        return 2
    for d in dirs:
        bench = repredict(Path(d))
        print(f"{d}: simulator mean |measured / predicted - 1| {bench['simulator_mean_abs_error']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

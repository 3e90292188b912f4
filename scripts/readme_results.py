"""Write a bench run into README.md's results section (between the bench markers), so the numbers there always
come from a real `ringada bench` run, with its command and machine.

    .venv/bin/python scripts/readme_results.py out/bench-ring/bench.json "ringada bench --suite ring --repeats 2"
    .venv/bin/python scripts/readme_results.py out/bench-star/bench.json "ringada bench --suite star" bench-star
    .venv/bin/python scripts/readme_results.py out/bench-emu/bench.json "ringada bench --profile ..." bench-emulated
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ringada.bench import markdown_table, star_figures_table  # noqa: E402

def main(bench_path: str, command: str, section: str = "bench") -> int:
    START, END = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    bench = json.loads(Path(bench_path).read_text())
    machine = bench["machine"]
    who = (f"a server and {bench['world_size']} devices" if bench["suite"] == "star"
           else f"{bench['world_size']} ranks")
    if bench.get("profile"):
        who += f" emulating `{bench['profile']}`" + (" (capacity partition)" if bench["suite"] == "ring" else "")
    body = (f"Command: `{command}` ({bench['repeats']} round(s), median), {who}, "
            f"settings {json.dumps(bench['settings'])}. Machine: {machine['cpus']} CPU cores "
            f"({platform.processor() or platform.machine()}), Python {machine['python']}, no GPU; "
            + ("a core per rank" if bench["suite"] != "star" and bench["world_size"] <= machine["cpus"]
               else "all ranks share those cores") + ", one thread each.\n\n" + markdown_table(bench)
            + ("\n" + star_figures_table(bench) if bench.get("star_figures") else ""))
    readme = REPO / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{body}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))

"""Fresh-process runs for the benchmarks: each measurement in its own process, so no compile cache, allocator state
or other framework's threads carry over between them, in ABBA order, so a drift in this shared machine's speed
(10-20% within half an hour) weighs on every side alike."""
from __future__ import annotations

import json
import subprocess
import sys


def abba(items: list, rounds: int) -> list:
    """items in order, then reversed, alternately, over `rounds` rounds: A B, B A, A B, ..."""
    return [x for r in range(rounds) for x in (items if r % 2 == 0 else items[::-1])]


def run_json(script: str, *args: str) -> dict:
    """`python script *args` in a fresh process: the JSON object printed on its last line of stdout. Raises
    subprocess.CalledProcessError (stderr attached) when the run fails."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

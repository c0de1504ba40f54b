"""Long fuzz campaign: the property of tests/test_fuzz.py over a million inputs.

CI runs 200 examples; this runs rounds of hypothesis examples, each example a
batch of client inputs sharing one ``trio.run`` (each input on its own proxy
connection), until ``--inputs`` inputs have run or ``--max-minutes`` pass.
One process, niced, so it uses at most one core. Progress and every failure
(hypothesis' shrunk falsifying example) go to stdout.

Usage::

    nohup python scripts/fuzz.py --inputs 1000000 --max-minutes 45 > fuzz.log 2>&1 &
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_fuzz import cheap_pieces, check_property


def run_round(round_seed: int, examples: int, batch: int, counter: list[int]) -> None:
    """One hypothesis run of ``examples`` examples of ``batch`` inputs each."""

    @seed(round_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(cheap_pieces, min_size=batch, max_size=batch))
    def campaign(inputs: list[list[bytes]]) -> None:
        counter[0] += len(inputs)
        check_property(*inputs)

    campaign()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--max-minutes", type=float, default=45.0)
    parser.add_argument("--batch", type=int, default=8, help="inputs per hypothesis example")
    parser.add_argument("--examples-per-round", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    os.nice(10)
    start = time.monotonic()
    counter = [0]
    failures: list[str] = []
    round_number = 0
    print(f"seed {args.seed}, target {args.inputs} inputs, {args.max_minutes} min", flush=True)
    while counter[0] < args.inputs and time.monotonic() - start < args.max_minutes * 60:
        round_seed = args.seed + round_number
        try:
            run_round(round_seed, args.examples_per_round, args.batch, counter)
        except Exception as exc:
            summary = f"round seed {round_seed}: {type(exc).__name__}: {str(exc)[:2000]}"
            failures.append(summary)
            print("FAILURE", summary, flush=True)
            traceback.print_exc()
        round_number += 1
        elapsed = time.monotonic() - start
        print(
            f"round {round_number}: {counter[0]} inputs in {elapsed:.0f} s "
            f"({counter[0] / elapsed:.0f}/s), {len(failures)} failures",
            flush=True,
        )
    print(f"DONE: {counter[0]} inputs (shrinking included), {len(failures)} failing rounds")
    for failure in failures:
        print("  ", failure)


if __name__ == "__main__":
    main()

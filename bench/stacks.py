"""Summarise py-spy ``--format raw`` (collapsed) stacks: top self and inclusive frames per thread.

py-spy record --threads --idle -f raw -o out.txt -- python ...
python bench/stacks.py out.txt [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    per_thread: dict[str, int] = collections.Counter()
    self_time: dict[tuple[str, str], int] = collections.Counter()
    inclusive: dict[tuple[str, str], int] = collections.Counter()
    total = 0
    with open(args.path) as f:
        for row in f:
            stack, _, count_text = row.rstrip("\n").rpartition(" ")
            count = int(count_text)
            frames = stack.split(";")
            thread = re.sub(r"\s*\(\d+\):?", "", frames[0]).strip()
            frames = frames[1:]
            names = [re.sub(r" \((.*?)(:\d+)?\)$", lambda m: f" ({m.group(1).split('/')[-1]})", f) for f in frames]
            total += count
            per_thread[thread] += count
            if names:
                self_time[(thread, names[-1])] += count
            for name in set(names):
                inclusive[(thread, name)] += count
    print(f"{total} samples")
    for thread, n in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        print(f"\n== {thread}: {n} samples ({100 * n / total:.1f}%)")
        print("  self:")
        rows = sorted(((c, name) for (t, name), c in self_time.items() if t == thread), reverse=True)
        for c, name in rows[: args.top]:
            print(f"    {100 * c / n:5.1f}%  {name}")
        print("  inclusive:")
        rows = sorted(((c, name) for (t, name), c in inclusive.items() if t == thread), reverse=True)
        for c, name in rows[: args.top]:
            print(f"    {100 * c / n:5.1f}%  {name}")


if __name__ == "__main__":
    main()

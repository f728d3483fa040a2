"""A detector replaying a finished run frame by frame into a growing (SWMR) file, optionally pausing mid-run.

    python -m tests.faults.replay SOURCE OUT --rate HZ [--pause-after N --pause-seconds S]

The frames are read from SOURCE, so the live run holds exactly the same data as the reference run (the MTZ of a
disturbed live run can be compared with an undisturbed one). The file says it is complete when the writer closes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from libs.science.formats import open_run, open_run_writer


def replay(source: Path, out: Path, rate: float, pause_after: int | None, pause_seconds: float) -> None:
    with open_run([source]) as reader:
        writer = open_run_writer(out, "nxmx", detector=reader.detector, beam=reader.beam, mask=reader.mask, live=True)
        try:
            for index in range(reader.frame_count):
                if pause_after is not None and index == pause_after:
                    time.sleep(pause_seconds)  # the detector stops writing without closing the run
                writer.append(reader.read_frame(index))
                time.sleep(1.0 / rate)
        finally:
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--pause-after", type=int, default=None)
    parser.add_argument("--pause-seconds", type=float, default=0.0)
    arguments = parser.parse_args()
    replay(arguments.source, arguments.out, arguments.rate, arguments.pause_after, arguments.pause_seconds)


if __name__ == "__main__":
    main()

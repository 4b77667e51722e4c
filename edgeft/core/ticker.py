"""The heartbeat's child process (`edgeft.core.progress.step`): prints `LABEL ... N s` while the
parent is busy, even inside a call that holds Python's GIL (the TFLite converter does), which a
thread of the parent could not. Run by path with `python -S` (no package import, ~20 ms):

    python -S ticker.py STATE_FILE FD INTERVAL TTY REPEAT

STATE_FILE (rewritten atomically by the parent): `outer_start<TAB>last_line<TAB>step_start<TAB>label`,
wall-clock seconds. Each tick it reads the file; off a terminal it writes a line to FD when
nothing was printed for INTERVAL seconds since the outermost step began (REPEAT seconds once it has
written a line itself); on a terminal it updates
one line in place. It ends when its stdin (a pipe from the parent) closes, so it never outlives it.
"""
import os
import select
import sys
import time


def main(argv):
    path, fd, interval, tty = argv[0], int(argv[1]), float(argv[2]), argv[3] == "1"
    repeat = float(argv[4]) if len(argv) > 4 else interval
    tick = min(1.0, interval / 2) if tty else min(0.5, interval / 4)
    mine, shown = 0.0, False
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], tick)
        if ready and not os.read(sys.stdin.fileno(), 1):
            break
        try:
            with open(path) as f:
                outer, last, start, label = f.read().split("\t", 3)
            outer, last, start = float(outer), float(last), float(start)
        except (OSError, ValueError):
            continue
        now = time.time()
        elapsed = now - start
        if tty:
            if elapsed >= min(1.0, interval):
                os.write(fd, f"\r{label} ... {elapsed:.0f} s\033[K".encode())
                shown = True
        elif now - max(outer, last, mine) >= (repeat if mine else interval) - tick:   # ticks being TICK apart
            os.write(fd, f"{label} ... {elapsed:.0f} s\n".encode())
            mine = now
    if shown:
        os.write(fd, b"\r\033[K")


if __name__ == "__main__":
    main(sys.argv[1:])

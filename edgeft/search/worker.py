"""A search worker: `python -m edgeft.search.worker DIR` claims the search's waiting trials and
runs them until none waits. `edgeft search --workers N` starts N of these; on other machines,
start them by hand against the same --storage database and a DIR on a shared file system."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from edgeft.core.errors import UserError
    from edgeft.search.runner import storage_spec
    from edgeft.search.trials import Trials
    from edgeft.search.work import SETTINGS, settings, worker_loop

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / SETTINGS).is_file():
        print(f"usage: python -m edgeft.search.worker DIR  (DIR: an edgeft search directory, with {SETTINGS})",
              file=sys.stderr)
        return 2
    from edgeft.core import logs

    out = Path(argv[0])
    s = settings(out)
    restore = logs.console(quiet=os.environ.get("EDGEFT_QUIET", "") not in ("", "0"))   # its own entry point
    try:
        n = worker_loop(out, Trials(storage_spec(out, s), s["study"], [c["id"] for c in s["candidates"]]))
    except UserError as e:
        print(f"edgeft search worker: error: {e}", file=sys.stderr)
        return 2
    finally:
        restore()
    print(f"search worker: {n} trial(s) run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a Python script under cProfile in every thread (fallback profiler for
``bench/run.py --profile-tool cprofile``).

    python cprofile_node.py OUT.pstats script.py [args...]

cProfile only sees the thread that enabled it, so each thread gets its own
profiler (threading.Thread.run is wrapped); at exit the main thread's and the
finished threads' stats are merged into OUT.  Threads still running at exit
(daemon loops) are merged too, best effort.  Python <= 3.11 only: from 3.12
cProfile is one per interpreter.
"""

import cProfile
import os
import pstats
import runpy
import sys
import threading


def main():
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))   # as if run directly
    profiles = []
    lock = threading.Lock()
    orig_run = threading.Thread.run

    def run(self):
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        prof.enable()
        try:
            orig_run(self)
        finally:
            prof.disable()

    threading.Thread.run = run
    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit:
        pass
    finally:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        with lock:
            others = list(profiles)
        for prof in others:
            try:
                stats.add(prof)
            except (TypeError, ValueError):
                pass
        stats.dump_stats(out)


if __name__ == '__main__':
    main()

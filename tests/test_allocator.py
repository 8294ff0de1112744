"""The parsing process's malloc settings (dicom_node.allocator), in fresh processes of their own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Two threads, alive at once, each fill and free a 40 MB block (a thread arena's heap holds up
# to 64 MB), one after the other: the growth of the process's resident peak, MiB.
_SCRIPT = textwrap.dedent("""
    import sys, threading
    import numpy as np
    from dicom_node.allocator import PARSING, Thresholds, keep_freed_memory, peak_resident_gib
    arenas = int(sys.argv[1])
    assert keep_freed_memory(Thresholds(PARSING.mmap_bytes, PARSING.trim_bytes, arenas))
    base = peak_resident_gib()
    first_done, second_done = threading.Event(), threading.Event()

    def fill(wait_for, done):
        if wait_for is not None:
            wait_for.wait()
        block = np.ones(40 << 20, dtype=np.uint8)
        del block
        done.set()
        second_done.wait()  # stay alive: a thread's arena is handed on only when it exits

    threads = [threading.Thread(target=fill, args=(None, first_done)),
               threading.Thread(target=fill, args=(first_done, second_done))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print((peak_resident_gib() - base) * 1024)
""")


def _growth_mib(arenas: int) -> float:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(arenas)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_one_arena_lets_a_thread_reuse_what_another_freed() -> None:
    """The exact postprocess's workers allocate window-sized blocks in threads of their own; with
    one arena (PARSING) the second thread reuses the first's freed block, with glibc's default
    each thread keeps its own (nothing is trimmed in a parsing process)."""
    one, default = _growth_mib(1), _growth_mib(0)
    assert one < 60, one
    assert default > 70, default

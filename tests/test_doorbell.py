"""Doorbells: ringing never blocks, not even after a waiting process was killed, and an idle
stage never sleeps through work (queue/doorbell.py)."""

from __future__ import annotations

import multiprocessing
import threading
import time

from dicom_node.queue.doorbell import Doorbell, IdleWait, new_doorbells


def _wait_long(bell: Doorbell) -> None:
    bell.wait(60)


def test_a_waiter_killed_mid_wait_never_blocks_the_ringer() -> None:
    bell = new_doorbells().photo_received
    waiter = multiprocessing.get_context("spawn").Process(target=_wait_long, args=(bell,))
    waiter.start()
    time.sleep(1.5)  # spawned and waiting
    waiter.kill()  # what the supervisor's restart test does to an idle worker
    waiter.join(10)
    ringer = threading.Thread(target=bell.ring, daemon=True)
    ringer.start()
    ringer.join(5)
    assert not ringer.is_alive(), "ring() blocked on a dead waiter (a multiprocessing.Event's set() does)"
    assert bell.wait(1), "the ring is still there for the next waiter"


def test_idle_wait_looks_again_after_draining_then_waits_for_a_ring() -> None:
    bell = new_doorbells().results_ready
    idle = IdleWait(bell, poll_s=30)
    bell.ring(3)  # rings for work someone already took
    started = time.monotonic()
    idle.nothing_to_do()  # drains, returns at once: the caller looks at the store once more
    assert time.monotonic() - started < 1 and not bell.wait(0)
    threading.Timer(0.3, bell.ring).start()  # new work after the drain
    idle.nothing_to_do()
    assert time.monotonic() - started < 5, "woke on the ring, not after the 30 s poll"

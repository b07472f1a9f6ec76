"""Taking over a dead run's lock is atomic: two live processes released together by a barrier
never both hold the workdir."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket

from apo_jax.train import workdir as workdir_lib

TRIALS = 300


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _contend(wd, barrier, results):
    """One contender: every trial, waits for the start, tries the lock, reports, keeps it."""
    for _ in range(TRIALS):
        barrier.wait()
        lock = workdir_lib.Lock(wd)
        try:
            lock.acquire()
            results.put(1)
        except workdir_lib.WorkdirError:
            results.put(0)
        lock.held = False  # the parent resets the file for the next trial
        barrier.wait()


def test_two_processes_never_both_take_over_a_dead_lock(tmp_path):
    wd = str(tmp_path)
    path = os.path.join(wd, workdir_lib.LOCK_FILE)
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "start": "2026-01-01T00:00:00+00:00"}
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.SimpleQueue()
    procs = [ctx.Process(target=_contend, args=(wd, barrier, results)) for _ in range(2)]

    def reset():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dead, f)

    reset()
    for p in procs:
        p.start()
    winners = []
    try:
        for _ in range(TRIALS):
            barrier.wait(timeout=30)  # both start together
            winners.append(results.get() + results.get())
            barrier.wait(timeout=30)  # both done: reset the dead lock
            reset()
    finally:
        for p in procs:
            p.join(timeout=30)
    assert winners.count(1) == TRIALS, f"both held the lock in {winners.count(2)} of {TRIALS}"

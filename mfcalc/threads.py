"""How many intra-op threads a force call runs with, so that a busy machine does not collapse it.

torch runs every op with ``torch.get_num_threads()`` OpenMP threads, one per core by default. For a
small molecule each op is a few microseconds of work and the threads spend their time meeting at
barriers; when other processes hold the cores, a thread that has to wait for its turn holds every
other thread at the next barrier, and a step that takes 2.5 ms alone takes 500 ms (ethanol, 2 cores,
two other busy processes, measured). One thread loses almost nothing for small systems on a quiet
machine and never collapses.

``ThreadPolicy`` decides per call and sets the thread count only for the duration of the force
call (``with policy.limit(n_atoms): ...``), restoring the caller's setting afterwards, so the
user's own torch code is untouched:

- ``threads="auto"`` (default): systems of fewer than ``SINGLE_THREAD_BELOW`` (24) atoms get one
  thread (the measured crossover, see benchmarks/threads.py); larger ones get the caller's thread
  count, lowered to the number of cores other processes leave free (measured from /proc/stat at
  most every ``LoadMonitor.interval`` seconds; Linux only, elsewhere the caller's count).
- ``threads=N``: N threads for every call.
- ``threads=None``: leave torch's setting as it is (torch's own default: one thread per core).
"""

import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch

# atoms below which a force call always runs on one thread: a second thread gains <= 1.12x there
# on a quiet 2-core machine and costs 3-4x beside busy processes (benchmarks/threads.py: ethanol
# 2.54 vs 2.42 ms/step quiet, 2.77 vs 9.08 with one busy process; aspirin force call 1.12x;
# 24-atom periodic water 1.36x)
SINGLE_THREAD_BELOW = 24


def parse_threads(threads: Union[None, int, str]) -> Union[None, int, str]:
    """Check a ``threads=`` argument: "auto", None or a positive integer."""
    if threads is None or threads == "auto":
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"threads must be 'auto', None (torch's own setting) or a positive integer, got {threads!r}"
        )
    return threads


class LoadMonitor:
    """Cores that other processes leave free, from /proc/stat, refreshed at most every
    ``interval`` seconds. This process's own CPU time is not counted as load."""

    def __init__(self, interval: float = 1.0, stale: float = 3.0):
        """``interval``: seconds between /proc/stat reads; ``stale``: after this many seconds
        without a read, the next one starts a fresh window instead of averaging the old one."""
        self.interval = interval
        self.stale = stale
        self.cores = os.cpu_count() or 1
        try:
            self.cores = len(os.sched_getaffinity(0))
        except AttributeError:
            pass
        self._last = self._sample()
        self._touched = float("-inf")  # when the last force call that asked ended (touch)
        # until a first window has been measured, assume one free core: a second thread beside
        # busy processes costs 1.5-5x, one thread on a quiet machine at most ~1.8x, for <= 1 s
        self._free: float = 1.0 if self._last is not None else float(self.cores)

    @staticmethod
    def _sample() -> Optional[tuple]:
        try:
            with open("/proc/stat") as handle:
                fields = handle.readline().split()[1:]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal (guest time is inside user already).
        # Niced processes ('nice') are not counted as load: at nice > 0 they yield the cores to
        # a force call (a background labelling job under `nice -n 19` costs it almost nothing)
        ticks = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
        busy = ticks[0] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        all_cores = os.cpu_count() or 1
        return time.monotonic(), busy / tick, time.process_time(), all_cores

    def touch(self) -> None:
        """A force call that asked for the free cores has just ended."""
        self._touched = time.monotonic()

    def free_cores(self) -> float:
        """Cores not busy with other processes over the last interval (the last value until a
        new interval has passed; all cores where /proc/stat cannot be read)."""
        if self._last is None:
            return float(self.cores)
        now = time.monotonic()
        if now - self._last[0] < self.interval:
            return self._free
        sample = self._sample()
        if sample is None:
            return float(self.cores)
        if now - max(self._last[0], self._touched) > max(self.stale, self.interval):
            # no large-system call for a while (the last sample is old and no call has ended
            # since): its average says little about now. Start a fresh window, on one core until
            # it has passed. A window that one long call (a 2 s step of a big box) filled is
            # not stale: its average is over the call itself, this process's own CPU taken out
            self._free = 1.0
        else:
            self._free = free_between(self._last, sample, self.cores)
        self._last = sample
        return self._free


def free_between(before: tuple, after: tuple, cores: int) -> float:
    """Cores of ``cores`` (this process's share of the machine) that other processes left free
    between two samples (monotonic time, machine-wide busy CPU seconds, this process's CPU
    seconds, cores of the machine)."""
    elapsed = after[0] - before[0]
    if elapsed <= 0:
        return float(cores)
    busy_all = (after[1] - before[1]) / elapsed  # cores busy machine-wide
    busy_own = (after[2] - before[2]) / elapsed  # of which this process
    others = max(0.0, busy_all - busy_own) * cores / after[3]
    return max(0.0, cores - others)


class ThreadPolicy:
    """The intra-op thread count of each force call (see the module docstring)."""

    def __init__(self, threads: Union[None, int, str] = "auto", single_thread_below: int = SINGLE_THREAD_BELOW):
        self.threads = parse_threads(threads)
        self.single_thread_below = single_thread_below
        self.monitor = LoadMonitor() if threads == "auto" else None

    def count(self, n_atoms: int, wanted: Optional[int] = None) -> Optional[int]:
        """Threads for a call on ``n_atoms`` atoms; None = leave torch's setting.
        ``wanted`` is the caller's current setting (default: torch.get_num_threads())."""
        if self.threads is None:
            return None
        if isinstance(self.threads, int):
            return self.threads
        if n_atoms < self.single_thread_below:
            return 1
        wanted = torch.get_num_threads() if wanted is None else wanted
        free = self.monitor.free_cores() if self.monitor is not None else float(wanted)
        return max(1, min(wanted, int(free + 0.5)))

    @contextmanager
    def limit(self, n_atoms: int) -> Iterator[None]:
        """Run the body with this policy's thread count for ``n_atoms``; restore afterwards."""
        before = torch.get_num_threads()
        count = self.count(n_atoms, before)
        try:
            if count is None or count == before:
                yield
            else:
                torch.set_num_threads(count)
                try:
                    yield
                finally:
                    torch.set_num_threads(before)
        finally:
            if self.monitor is not None and self.threads == "auto" and n_atoms >= self.single_thread_below:
                self.monitor.touch()

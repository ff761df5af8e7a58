"""The thread policy of force calls: one thread for small systems, the caller's setting restored,
fewer threads when other processes hold the cores."""

import subprocess
import sys
import time

import pytest
import torch

from mfcalc.threads import SINGLE_THREAD_BELOW, LoadMonitor, ThreadPolicy, free_between, parse_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_systems_get_one_thread_and_the_setting_is_restored(two_threads):
    policy = ThreadPolicy("auto")
    seen = []
    with policy.limit(9):
        seen.append(torch.get_num_threads())
    assert seen == [1]
    assert torch.get_num_threads() == 2


def test_restored_after_an_exception(two_threads):
    with pytest.raises(RuntimeError):
        with ThreadPolicy(1).limit(1000):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_large_systems_keep_the_callers_threads_on_a_quiet_machine(two_threads):
    policy = ThreadPolicy("auto")
    policy.monitor._free = 2.0
    policy.monitor._last = (time.monotonic(),) + policy.monitor._last[1:]  # fresh sample: no re-read
    assert policy.count(SINGLE_THREAD_BELOW) == 2
    assert policy.count(SINGLE_THREAD_BELOW - 1) == 1


def test_large_systems_get_fewer_threads_when_cores_are_busy(two_threads):
    policy = ThreadPolicy("auto")
    policy.monitor._free = 1.0
    policy.monitor._last = (time.monotonic(),) + policy.monitor._last[1:]
    assert policy.count(5000) == 1
    policy.monitor._free = 0.0  # never zero threads
    assert policy.count(5000) == 1


def test_fixed_and_untouched_settings(two_threads):
    assert ThreadPolicy(3).count(5) == 3
    assert ThreadPolicy(None).count(5) is None
    with ThreadPolicy(None).limit(5):
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be 'auto', None .* or a positive integer"):
        parse_threads(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_the_load_monitor_sees_another_busy_process():
    monitor = LoadMonitor(interval=0.0)
    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        monitor.free_cores()  # start a fresh interval while the spinner runs
        time.sleep(1.0)
        free = monitor.free_cores()
    finally:
        spin.kill()
        spin.wait()
    assert free <= monitor.cores - 0.5, (free, monitor.cores)


def test_this_processs_own_work_is_not_load():
    # 2 s apart: 3.5 CPU-s busy machine-wide, 2 of them this process's -> 0.75 cores held by others
    assert free_between((0.0, 10.0, 1.0, 4), (2.0, 13.5, 3.0, 4), cores=4) == pytest.approx(3.25)
    # a 2-core share of an 8-core machine where others hold 4 cores: 1 of "our" 2 is free
    assert free_between((0.0, 0.0, 0.0, 8), (1.0, 4.0, 0.0, 8), cores=2) == pytest.approx(1.0)
    assert free_between((0.0, 0.0, 0.0, 2), (1.0, 9.0, 0.0, 2), cores=2) == 0.0


class _Recording:
    """Stands in for the model module: records the thread count inside each force call."""

    def __init__(self, module):
        self.module, self.seen = module, []

    def __getattr__(self, name):
        return getattr(self.module, name)

    def compute(self, *args):
        self.seen.append(torch.get_num_threads())
        return self.module.compute(*args)


@pytest.mark.parametrize("threads, inside", [("auto", 1), (2, 2), (None, 2)])
def test_the_calculator_runs_its_force_call_under_the_policy(tiny_model, ethanol, two_threads, threads, inside):
    from mfcalc import MFCalculator

    calc = MFCalculator(tiny_model, device="cpu", threads=threads)
    calc.module = _Recording(calc.module)
    ethanol.calc = calc
    ethanol.get_forces()
    assert calc.module.seen == [inside]
    assert torch.get_num_threads() == 2  # the caller's setting, untouched


def test_the_cli_takes_threads():
    from mfcalc.cli import build_parser

    args = build_parser().parse_args(["md", "CH3CH2OH", "--threads", "1"])
    assert args.threads == 1
    assert build_parser().parse_args(["md", "CH3CH2OH"]).threads == "auto"


def test_a_stale_window_is_not_trusted():
    """After a long pause (e.g. a small-system phase that never asks), the next large call must
    not inherit the average of a window that covered other processes' old load."""
    monitor = LoadMonitor(interval=0.5, stale=3.0)
    monitor._free = 0.0
    monitor._last = (time.monotonic() - 10.0, 0.0, 0.0, monitor._last[3] if monitor._last else 2)
    assert monitor.free_cores() == 1.0  # one core until a fresh window is measured
    assert LoadMonitor()._free == 1.0  # and the same before the first window


def test_calls_longer_than_the_stale_time_keep_their_measured_window():
    """A big box whose steps take longer than ``stale`` must not be put on one core at every
    call (it was, until 0.3: the 576-atom water box ran on one thread): a window that ends with
    a call of this process is not stale."""
    monitor = LoadMonitor(interval=0.5, stale=3.0)
    sample = monitor._sample()
    if sample is None:
        pytest.skip("no /proc/stat here")
    monitor._free = 0.0
    # the window began 10 s ago (one long call) and nothing else ran in it
    monitor._last = (sample[0] - 10.0, sample[1], sample[2], sample[3])
    monitor.touch()
    assert monitor.free_cores() > 1.0 or monitor.cores == 1


def test_the_policy_marks_the_end_of_each_large_call():
    policy = ThreadPolicy("auto")
    assert policy.monitor._touched == float("-inf")
    with policy.limit(10):  # small: one thread, the monitor is not asked
        pass
    assert policy.monitor._touched == float("-inf")
    with policy.limit(500):
        pass
    assert policy.monitor._touched > 0

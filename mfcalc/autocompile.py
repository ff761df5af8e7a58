"""``compile="auto"`` (the default): run the TorchScript file now, compile in the background, switch
when the compiled graph is ready and has been checked.

``compile=True`` makes small-molecule MD about 4x faster on a CPU (ethanol, chno-mf: 4.9 -> 1.3 ms
per force call) but its first call compiles for 30-40 s (5-6 s when inductor's disk cache already
holds the graph), so nobody would leave it on for a relaxation of 50 steps. Here the calls run
the TorchScript path from the first step (no wait at all), and once one system has spent
``COMPILE_AFTER_S`` seconds in force calls (a run long enough for the compilation to pay back)
a daemon thread builds the compiled graph on a copy of that call's inputs. The thread checks
that the compiled energies and forces equal the TorchScript ones (to ``TOLERANCE`` of the
dtype) and only then marks the variant ready; the next force call of the same shape uses it.
During the compilation the force calls go on (TorchScript releases the GIL while it runs;
measured, ethanol on 2 threads: median step 4.7 ms during a cold compile, 4.9 quiet, with a few
steps of up to 0.8 s while the compiler holds the interpreter).

A process that ends while a compilation runs waits for it (with a line on stderr saying so):
the C++ runtime would abort if the interpreter went away under the compiler. The compilation
threads compile with the thread count of the force call (``threads``): inductor writes the count
it sees into the kernels, and each thread has its own OpenMP count.

Which calls: non-periodic structures of 2..``DENSE_GRAPH_MAX_ATOMS`` atoms through the dense
graph (``mfcalc.compiled``), energy and forces, on a CPU. Everything else (periodic cells, larger
structures, stress, replicas, CUDA, where the compiled path has not been measured) runs the
TorchScript file, as with ``compile=False``. One compilation per atom count (the dense graph
specialises on it: a second count of ethanol's fragments took 78 s cold while the first count's
calls went on compiled).

If the compilation fails (no C++ compiler, an unsupported platform) or its numbers disagree
with the TorchScript file, one RuntimeWarning says so and the calls stay on TorchScript.
``MFCALC_COMPILE=0`` in the environment makes ``compile=False`` the default (the test suite
uses it: a background compiler beside the tests would only slow them), ``MFCALC_COMPILE=1``
makes it ``True``.
"""

import atexit
import contextlib
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .compiled import DENSE_GRAPH_MAX_ATOMS, CompiledForceField

# seconds of force calls on one system before its compilation starts: a relaxation of a small
# molecule (~0.5 s) never compiles, MD does after ~600 ethanol steps. A cold compilation costs
# 30-40 s of one core and saves ~3.6 ms per ethanol step: it pays back after ~10^4 steps.
COMPILE_AFTER_S = 3.0
# compiled vs TorchScript, largest differences allowed: forces relative to 1 + the largest force,
# atom energies relative to 1 + the largest |atom energy| (which holds the ~10^3 eV references)
TOLERANCE = {torch.float32: (1e-3, 1e-5), torch.float64: (1e-7, 1e-10)}
COMPILE_VALUES = (False, True, "auto")


# the words MFCALC_COMPILE and `mfcalc md --compile` take
COMPILE_WORDS = {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True, "auto": "auto"}


def compile_word(text: str) -> Optional[Union[bool, str]]:
    """"auto", True or False for one of COMPILE_WORDS (any case); None for anything else."""
    return COMPILE_WORDS.get(text.strip().lower())


def default_compile() -> Union[bool, str]:
    """The ``compile`` argument's default: "auto", or what ``MFCALC_COMPILE`` says (0/1/auto)."""
    value = compile_word(os.environ.get("MFCALC_COMPILE", "auto"))
    if value is None:
        raise ValueError(f"MFCALC_COMPILE must be 0, 1 or auto, got {os.environ['MFCALC_COMPILE']!r}")
    return value


def parse_compile(compile: Any) -> Union[bool, str]:
    """Check a ``compile=`` argument: True, False or "auto" (None: the default)."""
    if compile is None:
        return default_compile()
    if compile in COMPILE_VALUES and not (isinstance(compile, int) and not isinstance(compile, bool)):
        return compile
    raise ValueError(f"compile must be True, False or 'auto' (None: the default, set by MFCALC_COMPILE), "
                     f"got {compile!r}")


_RUNNING: "set[threading.Thread]" = set()
_EXITING = threading.Event()  # set once the interpreter is shutting down


@atexit.register
def _finish_before_exit() -> None:
    """A process must not end while a compilation thread is inside torch (the C++ runtime aborts
    with 'terminate called without an active exception'): wait for it, and say why."""
    _EXITING.set()
    alive = [thread for thread in list(_RUNNING) if thread.is_alive()]
    if not alive:
        return
    sys.stderr.write("mfcalc: the faster force path is still compiling in the background (compile='auto'); "
                     "waiting for it to finish before exiting (seconds to a minute; compile=False or "
                     "MFCALC_COMPILE=0 skips the compilation for short runs)\n")
    sys.stderr.flush()
    for thread in alive:
        thread.join()


class Variant:
    """One compiled shape: its state (``waiting``, ``compiling``, ``ready``, ``failed``), the force
    call seconds spent on it so far and, when it finished, how long the compilation took."""

    def __init__(self):
        self.state = "waiting"
        self.seconds = 0.0
        self.compile_seconds: Optional[float] = None
        self.reason: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"state": self.state, "force_call_seconds": round(self.seconds, 3)}
        if self.compile_seconds is not None:
            out["compile_seconds"] = round(self.compile_seconds, 2)
        if self.reason:
            out["reason"] = self.reason
        return out


class AutoCompiler:
    """The background compilation of one ``Potential`` (see the module docstring).

    ``module_for(n_atoms, ...)`` says which module the next force call runs; ``record(...)``
    adds a finished call's seconds and starts the compilation when a system has earned it."""

    def __init__(self, build: Callable[[], CompiledForceField], scripted, device: torch.device,
                 dtype: torch.dtype, threads: Callable[[int], Any] = lambda n_atoms: contextlib.nullcontext()):
        self._build = build  # makes the eager copy of the weights (only when needed)
        self.scripted = scripted
        # the thread count of a force call on n atoms (ThreadPolicy.limit): inductor writes the
        # count it sees while compiling into the kernels, and a thread's OpenMP count is its own
        self._threads_for = threads
        self.enabled = device.type == "cpu"
        self.dtype = dtype
        self.compiled: Optional[CompiledForceField] = None
        self.variants: Dict[int, Variant] = {}
        self._lock = threading.Lock()
        self._threads: Dict[int, threading.Thread] = {}
        self._warned = False

    @staticmethod
    def eligible(n_atoms: int, periodic: bool, backend: str, stress: bool) -> bool:
        """Whether a call of this kind can ever run compiled under ``compile="auto"``."""
        return (not periodic and not stress and backend in ("auto", "dense")
                and 1 < n_atoms <= DENSE_GRAPH_MAX_ATOMS)

    def ready(self, n_atoms: int) -> bool:
        variant = self.variants.get(n_atoms)
        return variant is not None and variant.state == "ready"

    def module_for(self, n_atoms: int):
        """The compiled force field when this atom count's graph is ready, else the TorchScript one."""
        return self.compiled if self.ready(n_atoms) else self.scripted

    def record(self, n_atoms: int, seconds: float, inputs: Tuple[torch.Tensor, ...]) -> None:
        """A TorchScript force call on ``n_atoms`` atoms took ``seconds``; ``inputs`` =
        (positions, numbers, cell, pbc, fidelity) of that call (copied if a compilation starts)."""
        if not self.enabled:
            return
        with self._lock:
            variant = self.variants.setdefault(n_atoms, Variant())
            variant.seconds += seconds
            if variant.state != "waiting" or variant.seconds < COMPILE_AFTER_S:
                return
            variant.state = "compiling"
        copies = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        thread = threading.Thread(target=self._compile, args=(n_atoms, variant, copies),
                                  name=f"mfcalc-compile-{n_atoms}", daemon=True)
        self._threads[n_atoms] = thread
        _RUNNING.add(thread)
        thread.start()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until every compilation started so far has finished (ready or failed)."""
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def status(self) -> Dict[int, Dict[str, Any]]:
        """Atom count -> what the background compilation did for it."""
        return {n: variant.as_dict() for n, variant in sorted(self.variants.items())}

    # ---------------------------------------------------------------- the thread
    def _compile(self, n_atoms: int, variant: Variant, inputs: Tuple[Any, ...]) -> None:
        start = time.perf_counter()
        try:
            if self.compiled is None:  # built outside the lock: a fork meanwhile must not inherit it held
                compiled = self._build()
                with self._lock:
                    if self.compiled is None:
                        self.compiled = compiled
            positions, numbers, cell, pbc, fidelity = inputs
            with self._threads_for(n_atoms):
                fast = self.compiled.compute(positions, numbers, cell, pbc, fidelity)
                reference = self.scripted.compute(positions, numbers, cell, pbc, fidelity, False, "dense", None)
            problem = self._disagreement(fast, reference)
        except Exception as error:  # noqa: BLE001 - any failure leaves the TorchScript path in place
            problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        variant.compile_seconds = time.perf_counter() - start
        _RUNNING.discard(threading.current_thread())
        if problem is None:
            variant.state = "ready"
            return
        variant.state, variant.reason = "failed", problem
        if not self._warned and not _EXITING.is_set():  # at exit nobody needs to hear it
            self._warned = True
            warnings.warn(
                f"mfcalc compile='auto': the background compilation for {n_atoms} atoms did not give a "
                f"usable force path ({problem}); the force calls stay on the TorchScript file (correct, "
                "about 4x slower for small molecules). Pass compile=False to skip the attempt, or "
                "compile=True to see the error where it happens.", RuntimeWarning, stacklevel=2)

    def _disagreement(self, fast: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Optional[str]:
        tol_forces, tol_energies = TOLERANCE.get(self.dtype, TOLERANCE[torch.float32])
        f_ref, f_fast = reference["forces"].detach(), fast["forces"].detach()
        scale = 1.0 + float(f_ref.abs().max())
        df = float((f_fast - f_ref).abs().max())
        e_ref, e_fast = reference["energies"].detach(), fast["energies"].detach()
        de = float((e_fast - e_ref).abs().max())
        e_scale = 1.0 + float(e_ref.abs().max())
        if not (df <= tol_forces * scale and de <= tol_energies * e_scale):
            return (f"compiled and TorchScript results differ: forces by {df:.3g} eV/Å, "
                    f"atom energies by {de:.3g} eV")
        return None

"""How long a new process waits for its first MD step, and when the default path gets fast.

    python benchmarks/first_step.py [--model chno-mf] [--system ethanol] [--seconds 60] [--out first_step]

Each row is a fresh Python process running Velocity-Verlet MD through ASE on one thread-policy
default calculator: seconds from process start to the end of the first MD step (import, model
load, first force call), then ms/step in 1000-step windows, and when the background compilation
of ``compile="auto"`` (the default) switched the force calls over. Two cache states: cold (an
empty ``TORCHINDUCTOR_CACHE_DIR``, as on a new machine or after a torch upgrade) and warm (the
same directory again, as every later run on that machine). ``compile=True`` rows for contrast:
its first step waits for the compilation. Writes a markdown table to benchmarks/results/.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_results

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from ase import units
from ase.md.verlet import VelocityVerlet
sys.path.insert(0, {bench!r})
from common import aspirin, ethanol
from mfcalc import MFCalculator
from mfcalc.workflows import thermalize
compile_ = {compile!r}
atoms = {{"ethanol": ethanol, "aspirin": aspirin}}[{system!r}]()
atoms.calc = MFCalculator({model!r}, dtype="float32", compile=compile_)
thermalize(atoms, 300, np.random.default_rng(0))
dyn = VelocityVerlet(atoms, 0.5 * units.fs)
dyn.run(1)
first = time.perf_counter() - t0
windows, switched = [], None
start = time.perf_counter()
while time.perf_counter() - start < {seconds}:
    s = time.perf_counter()
    dyn.run(1000)
    windows.append(round((time.perf_counter() - s), 4))
    status = atoms.calc.potential.compile_status().get(len(atoms), {{}})
    if switched is None and status.get("state") in ("ready", "failed"):
        switched = round(time.perf_counter() - t0, 1)
print(json.dumps({{"first_step_s": round(first, 2), "ms_per_step_windows": windows,
                  "switched_at_s": switched, "status": atoms.calc.potential.compile_status()}}))
'''


def run(model, system, compile_, seconds, cache):
    code = CHILD.format(bench=str(Path(__file__).parent), compile=compile_, system=system, model=model,
                        seconds=seconds)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("MFCALC_COMPILE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chno-mf")
    parser.add_argument("--system", default="ethanol", choices=["ethanol", "aspirin"])
    parser.add_argument("--seconds", type=float, default=60.0, help="MD wall time per process after the first step")
    parser.add_argument("--out", default="first_step")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="mfcalc-inductor-")
    rows = []
    for label, compile_ in (("default, cold cache", "auto"), ("default, warm cache", "auto"),
                            ("compile=True, warm cache", True), ("compile=False", False)):
        result = run(args.model, args.system, compile_, args.seconds, cache)
        windows = result["ms_per_step_windows"]
        rows.append((label, result))
        print(label, json.dumps(result), flush=True)
    lines = [f"# First MD step of a new process and the default path's switch ({args.system}, {args.model})", "",
             f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; float32, "
             "thread policy auto (one thread below 24 atoms); ms/step = mean of each 1000-step window "
             f"(`python benchmarks/first_step.py --system {args.system} --seconds {args.seconds:g}`).", "",
             "| process | first MD step after start (s) | switched to compiled at (s) | ms/step first window "
             "| ms/step last window | compilation (s) |", "|---|---|---|---|---|---|"]
    for label, result in rows:
        windows = result["ms_per_step_windows"]
        status = next(iter(result["status"].values()), {})
        lines.append(f"| {label} | {result['first_step_s']:.2f} | {result['switched_at_s'] or '-'} | "
                     f"{windows[0]:.2f} | {windows[-1]:.2f} | {status.get('compile_seconds', '-')} |")
    write_results(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()

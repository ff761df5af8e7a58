"""Pick configurations worth labelling: MD at a cheap fidelity, then a diverse subset.

The few-points story (``mfcalc sample`` -> ``mfcalc label`` -> ``mfcalc finetune``) needs the few
points to cover what MD will visit. Consecutive MD frames are nearly the same structure, so a
pool of frames from a Langevin run is thinned by farthest-point sampling on a structural
descriptor ("fps"), optionally weighted by how much the model's fidelities disagree on each
frame ("spread": where the levels of theory differ most is where a high-level label teaches most)
or by how much a committee of models disagrees on it ("committee": active learning, the frames
where the models are least sure; ``model`` is then a committee folder, see mfcalc.committee, and
the MD runs with its first member).
"""

import sys
from typing import List, Optional

import numpy as np
from ase import Atoms

from .modelfile import DEFAULT_MODEL

SELECTIONS = ("fps", "spread", "committee")
STDOUT = "stdout"  # log default: the sys.stdout of the moment of the call (None: no progress)


def descriptor(atoms: Atoms, cutoff: float = 5.0, bins: int = 24, width: float = 0.15) -> np.ndarray:
    """A vector describing one structure for distances between structures.

    Molecules (no periodic direction): inverse interatomic distances of all pairs, atom order as
    given (frames of one trajectory share it). Periodic cells: Gaussian-smeared radial
    distribution per element pair within ``cutoff`` Å, normalised per atom (permutation and
    cell-size invariant)."""
    if not atoms.pbc.any():
        d = atoms.get_all_distances()
        iu = np.triu_indices(len(atoms), 1)
        return 1.0 / d[iu]
    from ase.neighborlist import neighbor_list

    i, j, r = neighbor_list("ijd", atoms, cutoff)
    z = atoms.numbers
    kinds = sorted(set(z.tolist()))
    pairs = [(a, b) for n, a in enumerate(kinds) for b in kinds[n:]]
    grid = np.linspace(0.5, cutoff, bins)
    out = np.zeros((len(pairs), bins))
    for k, (a, b) in enumerate(pairs):
        mask = ((z[i] == a) & (z[j] == b)) | ((z[i] == b) & (z[j] == a))
        if mask.any():
            out[k] = np.exp(-0.5 * ((r[mask, None] - grid) / width) ** 2).sum(axis=0)
    return out.ravel() / len(atoms)


def farthest_point(features: np.ndarray, n: int, weights: Optional[np.ndarray] = None) -> List[int]:
    """Indices of ``n`` rows picked greedily, each the farthest (times its weight) from those
    already picked; starts from the row farthest from the mean."""
    x = np.asarray(features, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    n = min(n, len(x))
    first = int(np.argmax(w * np.linalg.norm(x - x.mean(axis=0), axis=1)))
    picked = [first]
    nearest = np.linalg.norm(x - x[first], axis=1)
    while len(picked) < n:
        score = w * nearest
        score[picked] = -np.inf
        k = int(np.argmax(score))
        picked.append(k)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[k], axis=1))
    return picked


def sample(
    structure: Atoms, model: str = DEFAULT_MODEL, fidelity: Optional[str] = None, n: int = 50,
    temperature: float = 500.0, steps: Optional[int] = None, timestep: float = 0.5,
    interval: int = 10, select: str = "fps", friction: float = 0.01, seed: int = 0,
    dtype: Optional[str] = None, device: str = "auto", log=STDOUT, threads="auto",
) -> List[Atoms]:
    """Run Langevin MD of ``structure`` with ``model`` at ``fidelity`` and return ``n`` diverse
    frames (copies without a calculator, ready for ``mfcalc label``).

    A frame is kept every ``interval`` steps after the first 10 % of the run (equilibration);
    ``steps`` defaults to a pool of 10 n frames. ``select``: "fps" (farthest-point sampling on
    :func:`descriptor`), "spread" (the same, each frame weighted by the spread of the model's
    fidelities on it, :meth:`MFCalculator.predict_all_fidelities`) or "committee" (each frame
    weighted by the largest force deviation of the committee ``model`` names,
    :class:`mfcalc.MFCommittee`, recorded as ``committee_max_force_deviation_eV_per_A``). Every frame's ``info`` records
    the model, fidelity, temperature, MD step, and the cross-fidelity spreads (eV, eV/Å). A run
    that goes unphysical (see :mod:`mfcalc.mdguard`) raises ``MDInstabilityError``."""
    from .calculator import MFCalculator
    from .mdguard import MDGuard
    from .workflows import langevin, thermalize

    log = sys.stdout if log == STDOUT else log

    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 K, got {temperature}")
    if not timestep > 0:
        raise ValueError(f"timestep must be > 0 fs, got {timestep}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    steps = int(steps if steps is not None else np.ceil(10 * n * interval / 0.9))
    first_kept = steps // 10
    if (steps - first_kept) // interval < n:
        raise ValueError(
            f"{steps} steps keep only {(steps - first_kept) // interval} frames every {interval} "
            f"steps after equilibration, fewer than the {n} asked for; raise steps to at least "
            f"{int(np.ceil(n * interval / 0.9))}"
        )
    committee = None
    if select == "committee":  # loaded before the MD: a model that is not a committee says so now
        from .committee import MFCommittee

        committee = MFCommittee(model, fidelity=fidelity, dtype=dtype, device=device, threads=threads)
        calc = committee.members[0]  # the MD runs with the first member
    else:
        calc = MFCalculator(model, fidelity=fidelity, dtype=dtype, device=device, threads=threads)
    atoms = structure.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    dyn = langevin(atoms, timestep, temperature, friction, rng)
    # a run that goes unphysical stops with a reason (MDInstabilityError): its frames are not worth labelling
    dyn.attach(MDGuard(atoms, temperature=temperature, timestep=timestep, step=lambda: dyn.nsteps), interval=1)
    pool: List[Atoms] = []

    def keep():
        if dyn.nsteps >= first_kept:
            frame = Atoms(atoms.numbers, atoms.positions.copy(), cell=atoms.cell.array.copy(), pbc=atoms.pbc.copy())
            frame.info.update(md_step=int(dyn.nsteps))
            pool.append(frame)

    def progress():
        log.write(f"\rsampling MD {dyn.nsteps:7d}/{steps} steps  T {atoms.get_temperature():7.1f} K  "
                  f"pool {len(pool)} frames")
        log.flush()

    dyn.attach(keep, interval=interval)
    if log is not None:
        dyn.attach(progress, interval=max(1, steps // 50))
    dyn.run(steps)
    if log is not None:
        log.write("\n")
    features = np.array([descriptor(f, cutoff=calc.cutoff) for f in pool])
    features /= max(float(features.std(axis=0).mean()), 1e-12)
    several = len(calc.fidelities) > 1
    if select == "spread" and not several:
        raise ValueError("select='spread' needs a model with more than one fidelity; use 'fps'")
    # the cross-fidelity spread of every pool frame is needed to weight the choice ("spread"),
    # otherwise only for the frames picked (recorded in their info)
    spreads = {k: calc.predict_all_fidelities(f) for k, f in enumerate(pool)} if select == "spread" else {}
    weights = None
    if spreads:
        force_spread = np.array([spreads[k]["forces_spread"].mean() for k in range(len(pool))])
        weights = force_spread / force_spread.mean()
    deviation = None
    if committee is not None:
        deviation = np.empty(len(pool))
        for k, frame in enumerate(pool):
            committee.get_forces(frame)
            deviation[k] = committee.results["max_force_deviation"]
        weights = deviation / max(float(deviation.mean()), 1e-12)
    picked = farthest_point(features, n, weights)
    out = []
    for k in picked:
        frame = pool[k]
        frame.info.update(
            sampled_with=str(calc.metadata.get("path", model)), sampled_fidelity=calc.fidelity,
            sampled_temperature_K=float(temperature), selection=select,
        )
        if deviation is not None:
            frame.info["committee_max_force_deviation_eV_per_A"] = float(deviation[k])
        if several:
            spread = spreads[k] if k in spreads else calc.predict_all_fidelities(frame)
            frame.info.update(fidelity_energy_spread_eV=spread["energy_spread"],
                              fidelity_forces_spread_eV_per_A=float(spread["forces_spread"].mean()))
        out.append(frame)
    return out

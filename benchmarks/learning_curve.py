"""Learning curve: forces MAE against the number of training frames N, from scratch and fine-tuned
from a shipped base, on one rMD17 molecule. Each point is one `benchmarks/rmd17.py` row, so the
protocol is exactly that script's (fixed permutation of the train split, full test split).

    python benchmarks/learning_curve.py run --molecule naphthalene --n 10 25 50 100 200 --base chno-mf
    python benchmarks/learning_curve.py run --molecule naphthalene --n 10 25 50 --scratch-only ...
    python benchmarks/learning_curve.py plot --molecule naphthalene --base chno-mf runs/chno-mf+rmd17-no-naphthalene

Several bases give one fine-tuned curve each (tag `curve-ft-<name>`, the name being the model name or
the directory's name); scratch always uses the first base's network.

`run` trains what is missing (tags `curve-scratch` and `curve-ft-<base>`; scratch uses the fine-tuning
protocol's own step budget and learning-rate schedule from `mfcalc.finetune.finetune_settings`, on the
same network as the base, so the two differ only in the starting weights) and appends to
benchmarks/results/rmd17/rmd17.json; `plot` writes benchmarks/results/learning_curve_<molecule>.{md,png}.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rmd17 import PUBLISHED

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "benchmarks" / "results" / "rmd17" / "rmd17.json"
RESULTS = ROOT / "benchmarks" / "results"
MACE_N50 = {m: table[50]["MACE"][1] for m, table in PUBLISHED.items()}  # forces MAE, meV/Å


def rows_for(molecule: str, tag: str) -> dict:
    rows = json.loads(STORE.read_text()) if STORE.exists() else []
    return {r["n_train"]: r for r in rows if r["molecule"] == molecule and r["tag"] == tag}


def label(base: str) -> str:
    """A base's short name in tags and legends: a shipped model's name, or a path's last part."""
    return Path(base).name


def scratch_options(base: str) -> dict:
    """The base's network options, so scratch and fine-tuned rows share an architecture."""
    from mfcalc.modelfile import read_metadata, resolve_model_path

    config = read_metadata(resolve_model_path(base))["config"]
    # every network option; not the data's elements and fidelities, nor the short-range core that
    # models/tools/ship.py sets when a model is shipped
    return {k: v for k, v in config.items() if k not in ("elements", "fidelities") and not k.startswith("core_")}


def run(args) -> None:
    from mfcalc.finetune import finetune_settings

    script = str(ROOT / "benchmarks" / "rmd17.py")
    options = json.loads(args.scratch_options) if args.scratch_options else None
    for n in args.n:
        for base in [] if args.scratch_only else args.base:
            if n not in rows_for(args.molecule, f"curve-ft-{label(base)}"):
                subprocess.run([sys.executable, script, "--molecules", args.molecule, "--n", str(n), "--base", base,
                                "--tag", f"curve-ft-{label(base)}"], check=True)
        if n not in rows_for(args.molecule, "curve-scratch"):
            s = finetune_settings(n, "full")  # rmd17.py's epoch = n // batch steps: match the step budget
            epochs = max(1, (s.epochs * s.steps_per_epoch) // max(1, n // s.batch_size))
            subprocess.run([sys.executable, script, "--molecules", args.molecule, "--n", str(n),
                            "--model-options", json.dumps(options or scratch_options(args.base[0])), "--epochs", str(epochs),
                            "--batch-size", str(s.batch_size), "--lr", str(s.lr),
                            "--energy-weight", str(s.energy_weight), "--tag", "curve-scratch"], check=True)


def plot(args) -> None:
    names = {"curve-scratch": "from scratch"}
    names.update({f"curve-ft-{label(b)}": f"fine-tuned from {label(b)}" for b in args.base})
    curves = {tag: rows_for(args.molecule, tag) for tag in names}
    ns = sorted({n for c in curves.values() for n in c})
    bases = ", ".join(f"`{label(b)}`" for b in args.base)
    lines = [f"# Learning curve, rMD17 {args.molecule} (`python benchmarks/learning_curve.py`)", "",
             "Forces MAE meV/Å (energy MAE meV) on the full test split, training minutes after the slash; scratch "
             "and fine-tuned share the network and the step budget of `mfcalc finetune`'s protocol; fine-tuned "
             f"from {bases} with no flags. MACE from scratch at N = 50 (published): "
             f"{MACE_N50.get(args.molecule, '-')} meV/Å.", "",
             "| N | " + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names)]
    for n in ns:
        cells = []
        for c in curves.values():
            r = c.get(n)
            cells.append(f"{r['forces_mae_meV_A']:.1f} ({r['energy_mae_meV']:.2f}) / {r['train_minutes']:.1f}" if r else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"learning_curve_{args.molecule}.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for tag, c in curves.items():
        xs = sorted(c)
        ax.plot(xs, [c[n]["forces_mae_meV_A"] for n in xs], "o-", label=names[tag])
    if args.molecule in MACE_N50:
        ax.plot([50], [MACE_N50[args.molecule]], "k*", ms=10, label="MACE N=50 (published)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training frames N")
    ax.set_ylabel("forces MAE (meV/Å)")
    ax.set_title(f"rMD17 {args.molecule}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(RESULTS / f"learning_curve_{args.molecule}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "plot"])
    parser.add_argument("--molecule", default="naphthalene")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    parser.add_argument("--base", nargs="+", default=["chno-mf"], help="one or more bases (names or paths)")
    parser.add_argument("--scratch-only", action="store_true", help="only the from-scratch rows")
    parser.add_argument("--scratch-options", help="JSON network options for scratch (default: the base's)")
    args = parser.parse_args()
    if args.action == "run":
        run(args)
    plot(args)


if __name__ == "__main__":
    main()

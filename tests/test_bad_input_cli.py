"""The bad-input catalogue of the command line, data loss and model cards (issue #17, section 3).

Every case runs ``mfcalc.cli.main`` in-process (a subprocess where the exit path itself is the
point) and asserts the exit code, that the error is one line naming the problem, and, for
commands that write, that nothing was overwritten. Numbers on model cards are checked against
the card files they come from, never typed in here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import molecule
from ase.io import read, write

from mfcalc import cli
from mfcalc.modelfile import MODELS_DIR, ModelFileError, export_model, resolve_model_path

CHNO_CARD = MODELS_DIR / "chno-mf" / "card.json"


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``mfcalc ARGV``."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def model(tiny_model):
    return str(tiny_model)


# ----------------------------------------------------------------- numbers that make no sense
@pytest.mark.parametrize("argv, flag, problem", [
    (["md", "CH3CH2OH", "--steps", "-5"], "--steps", "must be a positive integer, got -5"),
    (["md", "CH3CH2OH", "--temperature", "-100"], "--temperature", "must be >= 0, got -100"),
    (["md", "CH3CH2OH", "--temperature", "nan"], "--temperature", "expected a finite number"),
    (["md", "CH3CH2OH", "--timestep", "0"], "--timestep", "must be a positive number, got 0"),
    (["md", "CH3CH2OH", "--interval", "0"], "--interval", "must be a positive integer, got 0"),
    (["md", "CH3CH2OH", "--steps", "ten"], "--steps", "expected a positive integer, got 'ten'"),
    (["sample", "CH3CH2OH", "-n", "0", "--out", "x.xyz"], "-n", "must be a positive integer, got 0"),
    (["sample", "CH3CH2OH", "--timestep", "-1", "--out", "x.xyz"], "--timestep", "must be a positive number"),
    (["relax", "CH3CH2OH", "--fmax", "-0.001"], "--fmax", "must be a positive number"),
    (["relax", "CH3CH2OH", "--steps", "0"], "--steps", "must be a positive integer"),
    (["vib", "CH3CH2OH", "--fmax", "0"], "--fmax", "must be a positive number"),
    (["label", "x.xyz", "--method", "HF/sto-3g", "--out", "o.xyz", "--workers", "0"], "--workers", "positive integer"),
    (["label", "x.xyz", "--method", "HF/sto-3g", "--out", "o.xyz", "--spin", "-1"], "--spin", "must be an integer >= 0"),
    (["finetune", "b", "d", "--fidelity", "f", "-o", "o", "--replay-fraction", "1.5"], "--replay-fraction", "[0, 1)"),
    (["finetune", "b", "d", "--fidelity", "f", "-o", "o", "--lr", "0"], "--lr", "must be a positive number"),
    (["train", "r.yaml", "--epochs", "-1"], "--epochs", "must be a positive integer"),
])
def test_nonsense_numbers_are_refused_in_one_line(capsys, argv, flag, problem):
    code, out, err = run(capsys, *argv)
    line = one_error_line(err)
    assert code == 1 and out == ""
    assert line.startswith(f"mfcalc {argv[0]}: error: argument {flag}")
    assert problem in line and f"see 'mfcalc {argv[0]} --help'" in line


def test_the_python_api_refuses_the_same_numbers(model, tmp_path):
    from mfcalc.workflows import run_md

    for kwargs, problem in [({"steps": -5}, "steps must be >= 0"), ({"temperature": -100.0}, "temperature must be >= 0 K"),
                            ({"timestep": 0.0}, "timestep must be > 0 fs"), ({"interval": 0}, "interval must be at least 1")]:
        with pytest.raises(ValueError, match=problem):
            run_md("CH3CH2OH", model=model, out=str(tmp_path / "x.xyz"), **kwargs)
    assert not (tmp_path / "x.xyz").exists()


# ----------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, typed, meant", [
    (["md", "CH3CH2OH", "--step", "5"], "--step", "--steps"),
    (["md", "CH3CH2OH", "--temp", "300"], "--temp", "--temperature"),
    (["relax", "CH3CH2OH", "--opt", "FIRE"], "--opt", "--optimizer"),
    (["sample", "CH3CH2OH", "--out", "x.xyz", "--sel", "spread"], "--sel", "--select"),
    (["info", "chno-mf", "--jsn"], "--jsn", "--json"),
])
def test_abbreviated_or_misspelt_flags_are_refused_with_the_right_one(capsys, argv, typed, meant):
    code, _, err = run(capsys, *argv)
    line = one_error_line(err)
    assert code == 1
    assert line.startswith(f"mfcalc {argv[0]}: error: unrecognized arguments: {typed}")
    assert f"did you mean {meant}?" in line


def test_every_command_takes_the_model_with_dash_dash_model(capsys, model, tmp_path):
    code, out, _ = run(capsys, "info", "--model", model)
    assert code == 0 and f"model        {model}" in out
    code, out, _ = run(capsys, "info", model)  # the subject of info may also stand alone
    assert code == 0 and f"model        {model}" in out
    code, _, err = run(capsys, "info", model, "--model", "chno-mf")
    assert code == 1 and "two models given" in one_error_line(err)
    picked = tmp_path / "picked.xyz"
    code, out, err = run(capsys, "sample", "CH3CH2OH", "--model", model, "--fidelity", "low", "-n", "2",
                         "--steps", "40", "--interval", "5", "--device", "cpu", "--out", picked)
    assert code == 0, err
    assert len(read(str(picked), index=":")) == 2 and "deprecated" not in err


def test_sample_still_parses_the_old_positional_model_with_a_deprecation_warning(capsys, model, tmp_path):
    picked = tmp_path / "picked.xyz"
    code, _, err = run(capsys, "sample", model, "CH3CH2OH", "--fidelity", "low", "-n", "2", "--steps", "40",
                       "--interval", "5", "--device", "cpu", "--out", picked)
    assert code == 0, err
    assert "'mfcalc sample MODEL STRUCTURE' is deprecated" in err
    assert f"mfcalc sample CH3CH2OH --model {model}" in err
    assert len(read(str(picked), index=":")) == 2
    code, _, err = run(capsys, "sample", model, "CH3CH2OH", "--model", model, "--out", tmp_path / "other.xyz")
    assert code == 1 and "two models given" in one_error_line(err)


# ----------------------------------------------------------------- md output
def test_md_says_where_it_wrote_what(capsys, model, tmp_path):
    out = tmp_path / "run.xyz"
    code, stdout, err = run(capsys, "md", "CH3CH2OH", "--model", model, "--steps", "20", "--device", "cpu",
                            "--out", out)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"wrote 3 frames (every 10 steps, last at step 20) in {out} (extended XYZ)"
    assert len(read(str(out), index=":")) == 3


@pytest.mark.parametrize("name", ["out.pdf", "out.png", "out", "out.cif"])
def test_md_refuses_a_trajectory_format_it_cannot_write_before_running(capsys, model, tmp_path, name):
    code, stdout, err = run(capsys, "md", "CH3CH2OH", "--model", model, "--steps", "5", "--out", tmp_path / name)
    line = one_error_line(err)
    assert code == 1 and "step" not in stdout  # no MD ran
    assert "cannot write an MD trajectory" in line and "use .traj (ASE trajectory), .xyz or .extxyz" in line
    assert not (tmp_path / name).exists()


# ----------------------------------------------------------------- data loss
def test_md_refuses_to_overwrite_unless_force(capsys, model, tmp_path):
    out = tmp_path / "md.traj"
    out.write_bytes(b"a week of MD")
    code, _, err = run(capsys, "md", "CH3CH2OH", "--model", model, "--steps", "10", "--out", out)
    assert code == 1 and f"'{out}' exists; pass --force to overwrite it" in one_error_line(err)
    assert out.read_bytes() == b"a week of MD"
    code, _, err = run(capsys, "md", "CH3CH2OH", "--model", model, "--steps", "10", "--out", out, "--force",
                       "--device", "cpu")
    assert code == 0, err
    assert len(read(str(out), index=":")) == 2


def test_relax_checks_its_output_before_the_work(capsys, model, tmp_path):
    existing = tmp_path / "relaxed.xyz"
    existing.write_text("keep me")
    for out, problem in [(existing, "exists; pass --force"), (tmp_path / "relaxed.pdf", "ASE cannot write and read back"),
                         (tmp_path / "no" / "such" / "dir.xyz", "does not exist; create it first")]:
        code, stdout, err = run(capsys, "relax", "CH3CH2OH", "--model", model, "--out", out)
        assert code == 1 and problem in one_error_line(err)
        assert "relaxation of" not in stdout  # refused before optimising, not after
    assert existing.read_text() == "keep me"
    code, stdout, err = run(capsys, "relax", "H2O", "--model", model, "--fidelity", "low", "--fmax", "0.05",
                            "--out", existing, "--force", "--device", "cpu")
    assert "relaxation of H2O" in stdout and read(str(existing)).get_chemical_formula() == "H2O"


def test_sample_and_export_refuse_to_overwrite_and_check_the_suffix(capsys, model, tmp_path, forcefield_factory):
    from mfcalc.modelfile import save_checkpoint

    picked = tmp_path / "picked.xyz"
    picked.write_text("labelled yesterday")
    code, _, err = run(capsys, "sample", "CH3CH2OH", "--model", model, "--out", picked)
    assert code == 1 and "exists; pass --force" in one_error_line(err)
    code, _, err = run(capsys, "sample", "CH3CH2OH", "--model", model, "--out", tmp_path / "picked.traj")
    assert code == 1 and "use one of ['.xyz', '.extxyz']" in one_error_line(err)
    assert picked.read_text() == "labelled yesterday"

    save_checkpoint(tmp_path / "ckpt.pt", forcefield_factory())
    target = tmp_path / "model.pt"
    target.write_bytes(b"the model we published")
    code, _, err = run(capsys, "export", tmp_path / "ckpt.pt", "-o", target)
    assert code == 1 and "exists; pass --force" in one_error_line(err)
    assert target.read_bytes() == b"the model we published"
    code, _, err = run(capsys, "export", tmp_path / "ckpt.pt", "-o", tmp_path / "model.txt")
    assert code == 1 and "use one of ['.pt']" in one_error_line(err)
    code, out, err = run(capsys, "export", tmp_path / "ckpt.pt", "-o", target, "--force")
    assert code == 0, err
    assert target.read_bytes()[:2] == b"PK"  # a TorchScript zip archive now


def test_a_shipped_model_is_never_overwritten_even_with_force(capsys, tmp_path, forcefield_factory):
    from mfcalc.modelfile import save_checkpoint

    shipped = resolve_model_path("chno-mf")
    before = shipped.stat().st_mtime_ns, shipped.stat().st_size
    save_checkpoint(tmp_path / "ckpt.pt", forcefield_factory())
    for argv in (["export", tmp_path / "ckpt.pt", "-o", shipped, "--force"],
                 ["finetune", "chno-mf", tmp_path / "cc.xyz", "--fidelity", "CCSD(T)", "-o", shipped.parent, "--force"],
                 ["md", "CH3CH2OH", "--steps", "5", "--out", shipped.parent / "md.traj", "--force"]):
        code, _, err = run(capsys, *argv)
        line = one_error_line(err)
        assert code == 1 and "a model shipped with mfcalc; refusing to write there even with --force" in line
    assert (shipped.stat().st_mtime_ns, shipped.stat().st_size) == before
    assert not (shipped.parent / "md.traj").exists()


def test_finetune_refuses_an_existing_model_directory_before_training(capsys, model, tmp_path):
    out = tmp_path / "my-molecule"
    out.mkdir()
    (out / "model.pt").write_bytes(b"last week's fine-tune")
    # the data file does not exist: the refusal must come first, before anything is read or trained
    code, _, err = run(capsys, "finetune", model, tmp_path / "missing.xyz", "--fidelity", "CC", "--new-fidelity",
                       "-o", out)
    line = one_error_line(err)
    assert code == 1 and f"'{out}' already holds model.pt; pass --force" in line
    assert (out / "model.pt").read_bytes() == b"last week's fine-tune"
    code, _, err = run(capsys, "finetune", model, tmp_path / "missing.xyz", "--fidelity", "CC", "--new-fidelity",
                       "-o", out, "--force")
    assert code == 1 and "already holds" not in err  # --force passes the check; the missing data stops it


def test_save_finetuned_refuses_a_shipped_model_directory(tiny_model):
    from mfcalc.finetune import check_output_dir

    with pytest.raises(PermissionError, match="a model shipped with mfcalc"):
        check_output_dir(MODELS_DIR / "chno-mf", force=True)


# ----------------------------------------------------------------- errors in one line
@pytest.mark.parametrize("error, shown", [
    (FloatingPointError("overflow encountered in exp"), "overflow encountered in exp"),
    (ValueError("bad value\nsecond line"), "bad value; second line"),
    (RuntimeError("torch said no"), "torch said no"),
    (ModelFileError("model.pt failed its checksum"), "model.pt failed its checksum"),
    (KeyError("energy"), "energy"),
    (TypeError("unexpected"), "TypeError: unexpected (run with --debug or MFCALC_DEBUG=1 for the traceback)"),
])
def test_failures_print_one_line_and_exit_1(capsys, monkeypatch, error, shown):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_md", fail)
    code, _, err = run(capsys, "md", "CH3CH2OH")
    assert code == 1
    assert one_error_line(err) == f"mfcalc md: error: {shown}"


def test_debug_shows_the_traceback(capsys, monkeypatch):
    def fail(args):
        raise FloatingPointError("overflow")

    monkeypatch.setattr(cli, "_cmd_md", fail)
    with pytest.raises(FloatingPointError):
        cli.main(["md", "CH3CH2OH", "--debug"])
    with pytest.raises(FloatingPointError):
        cli.main(["--debug", "md", "CH3CH2OH"])
    monkeypatch.setenv("MFCALC_DEBUG", "1")
    with pytest.raises(FloatingPointError):
        cli.main(["md", "CH3CH2OH"])


def test_a_missing_optional_extra_says_what_to_install(capsys, monkeypatch, tmp_path):
    write(str(tmp_path / "h2.xyz"), molecule("H2"))
    monkeypatch.setitem(sys.modules, "pyscf", None)  # as if pyscf were not installed
    code, _, err = run(capsys, "label", tmp_path / "h2.xyz", "--method", "HF/sto-3g", "--out", tmp_path / "o.xyz")
    line = one_error_line(err)
    assert code == 1
    assert line == ("mfcalc label: error: this needs the optional package 'pyscf', which is not installed; "
                    "install it with: pip install 'mfcalc[qm]'")


def test_errors_are_one_line_from_a_real_process_too(tiny_model, tmp_path):
    out = tmp_path / "md.xyz"
    out.write_text("x")
    done = subprocess.run([sys.executable, "-m", "mfcalc.cli", "md", "CH3CH2OH", "--model", str(tiny_model),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("mfcalc md: error: MD trajectory")


# ----------------------------------------------------------------- saying what takes long
def test_compile_says_what_it_is_doing_before_the_first_force_call(capsys, monkeypatch, tiny_model, tmp_path):
    """The compiled path itself takes 30-40 s to build, so the MFCalculator is replaced by the
    TorchScript one here; what is checked is that the notice is on stderr before any force call."""
    import mfcalc.calculator as calculator

    real = calculator.MFCalculator
    seen = {}

    class Recording(real):
        def __init__(self, *args, compile=False, **kwargs):
            seen["compile"] = compile
            super().__init__(*args, **kwargs)

        def calculate(self, *args, **kwargs):
            if "first call" not in seen:
                seen["first call"] = capsys.readouterr().err
            super().calculate(*args, **kwargs)

    monkeypatch.setattr(calculator, "MFCalculator", Recording)
    code, _, err = run(capsys, "md", "CH3CH2OH", "--model", tiny_model, "--steps", "2", "--compile", "--device", "cpu",
                       "--out", tmp_path / "c.xyz")
    assert code == 0 and seen["compile"] is True
    assert ("compiling the force path for 9 atoms (first call, ~30-40 s; cached on disk afterwards)..."
            in seen["first call"])


def test_vib_says_what_it_is_doing_before_the_wait(capsys, model):
    code, out, err = run(capsys, "vib", "H2O", "--model", model, "--fidelity", "low", "--no-relax", "--device", "cpu")
    assert code == 0, err
    assert "vib H2O at low: 18 displaced force calls for ase.vibrations and 18 for phonopy" in err
    assert "| mode |" in out


def test_the_module_docstring_lists_every_command():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert len(commands) == 11  # train export info evaluate md sample relax vib label ipi finetune
    for name in commands:
        assert f"``{name} " in cli.__doc__, name


# ----------------------------------------------------------------- cards
def test_info_names_the_test_set_of_every_number(capsys):
    """chno-mf: PBE/def2-SVP forces are 69.4 meV/Å pooled over 150 test frames and 134.7 on the
    50 frames of held-out molecules: both are shown, each saying what it was measured on."""
    card = json.loads(CHNO_CARD.read_text())
    code, out, err = run(capsys, "info", "chno-mf")
    assert code == 0, err
    lines = out.splitlines()
    error_lines = [line for line in lines if line.strip().startswith("E MAE")]
    assert error_lines and all("[test: " in line or "[measured on: " in line for line in error_lines)
    for row in card["test_errors_by_dataset"]:
        number = f"E MAE {1000 * row['energy_mae']:.2f} meV"
        if "forces_mae" in row:
            number += f", F MAE {1000 * row['forces_mae']:.1f} meV/Å"
        labelled = [line for line in error_lines if line.strip().startswith(number) and row["dataset"] in line]
        assert labelled, (row["dataset"], row["fidelity"])
        entry = next(d for d in card["training_data"]
                     if Path(d["path"]).name == row["dataset"] and d["fidelity"] == row["fidelity"])
        kind = "held-out molecules" if entry.get("split_by") == "name" else "held-out frames"
        assert any(f"{kind} of {row['dataset']}" in line for line in labelled)
    pbe = card["test_errors"]["PBE/def2-SVP"]
    pooled = [line for line in error_lines if f"F MAE {1000 * pbe['forces_mae']:.1f} meV/Å" in line]
    assert len(pooled) == 1 and f"all {pbe['n']} test frames pooled = held-out molecules of" in pooled[0]


def test_info_without_a_card_labels_from_the_training_data(capsys, tmp_path, forcefield_factory):
    meta = {"training_data": [{"path": "a/frames.xyz", "fidelity": "low", "test": 20},
                              {"path": "b/mols.xyz", "fidelity": "mid", "split_by": "name"}],
            "test_errors": {"low": {"n": 20, "energy_mae": 0.01, "forces_mae": 0.02},
                            "mid": {"n": 7, "energy_mae": 0.03}}}
    export_model(forcefield_factory(), tmp_path / "m.pt", meta)
    code, out, err = run(capsys, "info", tmp_path / "m.pt")
    assert code == 0, err
    assert "E MAE 10.00 meV, F MAE 20.0 meV/Å  [test: held-out frames of frames.xyz, n=20]" in out
    assert "E MAE 30.00 meV  [test: held-out molecules of mols.xyz, n=7]" in out


def _base_with_test_errors(tmp_path, forcefield_factory):
    errors = {name: {"n": 10, "energy_mae": 0.001 * (k + 1), "forces_mae": 0.01 * (k + 1)}
              for k, name in enumerate(["low", "mid", "high"])}
    meta = {"training_data": [{"path": "x.xyz", "fidelity": f, "test": 10} for f in errors],
            "test_errors": errors, "aliases": {"HI": "high"}, "default_fidelity": "high"}
    path = tmp_path / "base.pt"
    export_model(forcefield_factory(), path, meta)
    return path, errors


def _finetune(base, tmp_path, name, **kwargs):
    from mfcalc.data import read_gdml_npz
    from mfcalc.finetune import finetune, save_finetuned
    from mfcalc.training import TrainSettings

    data_dir = Path(__file__).resolve().parent.parent / "data" / "ethanol"
    fidelity = kwargs.pop("fidelity")
    data = read_gdml_npz(data_dir / "ethanol_ccsd_t-300.npz", fidelity)[:12]
    fast = TrainSettings(epochs=3, steps_per_epoch=4, batch_size=4, lr=1e-3, weight_decay=0.0, ema_decay=0.5, seed=0)
    result = finetune(base, data, fidelity, settings=fast, log=lambda *a: None, **kwargs)
    return result, save_finetuned(result, tmp_path / name)


def test_a_full_finetune_moves_every_base_error_under_before_fine_tuning(capsys, tmp_path, forcefield_factory):
    base, errors = _base_with_test_errors(tmp_path, forcefield_factory)
    result, path = _finetune(base, tmp_path, "full", fidelity="high", strategy="full")
    meta = result.metadata
    assert result.report["changed_fidelities"] == ["low", "mid", "high"]
    assert set(meta["test_errors"]) == {"high"}  # only what was measured after fine-tuning
    n_val = result.report["val"]
    assert n_val >= 2 and meta["test_errors"]["high"]["n"] == n_val
    assert meta["test_errors"]["high"]["measured_on"].startswith(f"fine-tuning validation set: {n_val} of the 12 new points")
    for name, e in errors.items():
        moved = meta["base_test_errors"][name]
        assert moved["energy_mae"] == e["energy_mae"] and moved["measured_on"].startswith("before fine-tuning")
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    assert f"[measured on: fine-tuning validation set: {n_val} of the 12 new points" in out
    assert out.count("not this model: ") == 3 and "changed by fine-tuning since" in out


def test_an_embedding_finetune_keeps_the_errors_of_the_fidelities_it_did_not_touch(tmp_path, forcefield_factory):
    base, errors = _base_with_test_errors(tmp_path, forcefield_factory)
    result, _ = _finetune(base, tmp_path, "new", fidelity="CC", strategy="embedding", new_fidelity=True)
    meta = result.metadata
    assert result.report["changed_fidelities"] == []
    assert {k: meta["test_errors"][k] for k in errors} == errors  # untouched: still the base's, still valid
    assert "base_test_errors" not in meta
    assert meta["test_errors"]["CC"]["measured_on"].startswith("fine-tuning validation set")
    # an existing fidelity fine-tuned through its embedding row alone: only that one changes
    result, _ = _finetune(base, tmp_path, "mid", fidelity="mid", strategy="embedding")
    assert result.report["changed_fidelities"] == ["mid"]
    assert result.metadata["test_errors"]["low"] == errors["low"]
    assert result.metadata["base_test_errors"]["mid"]["energy_mae"] == errors["mid"]["energy_mae"]
    assert "fine-tuning validation set" in result.metadata["test_errors"]["mid"]["measured_on"]

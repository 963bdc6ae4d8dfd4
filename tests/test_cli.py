"""The `fedmaml` CLI: help, config show/reference, run's config errors and exit codes."""

import re
import sys
import types

import pytest
import yaml

from fedmaml.cli import COMMANDS, DOC_MARKER, main
from fedmaml.config import Config, config_reference_markdown, config_to_dict, load_config


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd.name in out
    assert "run" in out and "config" in out


@pytest.mark.parametrize("command", ["run", "sweep", "tune"])
def test_commands_taking_a_config_mention_the_bundled_names(command, capsys):
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "name of a bundled example: quickstart, sweeps/moml_miniature" in out


def test_run_help_lists_the_keys_a_resume_may_change(capsys):
    # the one list the resume checks use (fedmaml/run_dir.py), read when the help is shown
    from fedmaml.run_dir import CHANGEABLE_ON_RESUME

    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert f"only {', '.join(CHANGEABLE_ON_RESUME)} may be given as key=value" in out, out


def test_building_the_parser_loads_no_config_package():
    import os
    import subprocess
    from pathlib import Path

    code = ("import sys; from fedmaml.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('fedmaml.config', 'fedmaml.run_dir') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.stdout.strip() == "[]"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: fedmaml" in capsys.readouterr().err


def test_group_without_subcommand(capsys):
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "show" in err and "reference" in err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_config_show_defaults(capsys):
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config_to_dict(Config())


def test_config_show_file_and_overrides(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("name: mine\n")
    assert main(["config", "show", str(f), "algorithm.beta=0.5", "model.hidden=[8]"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "mine"
    assert shown["algorithm"]["beta"] == 0.5
    assert shown["model"]["hidden"] == [8]


def test_config_show_overrides_without_file(capsys):
    assert main(["config", "show", "seed=4", "algorithm.beta=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["seed"] == 4 and shown["algorithm"]["beta"] == 0.5


def test_config_show_output_reloads(tmp_path, capsys):
    assert main(["config", "show", "federated.mode=cross_silo", "name=x"]) == 0
    f = tmp_path / "resolved.yaml"
    f.write_text(capsys.readouterr().out)
    assert load_config(f) == load_config(None, ["federated.mode=cross_silo", "name=x"])


def test_config_show_of_a_sweep_file_shows_its_base_config(capsys):
    """A file with a `sweep:` section is inspected as its base config (the runs' common part), with
    one line on stderr saying the section was left out."""
    from fedmaml.config import load_config_and_sweep

    path = "configs/sweeps/moml_miniature.yaml"
    assert main(["config", "show", path, "seed=4"]) == 0
    captured = capsys.readouterr()
    base, _ = load_config_and_sweep(path, ["seed=4"])
    assert yaml.safe_load(captured.out) == config_to_dict(base)
    assert "sweep" not in yaml.safe_load(captured.out)
    note = captured.err.strip().splitlines()
    assert len(note) == 1 and "sweep:" in note[0] and "base config" in note[0]
    assert f"fedmaml sweep {path} --dry-run" in note[0]


@pytest.mark.parametrize("target", ["configs/sweeps/moml_miniature.yaml", "sweeps/moml_miniature"])
def test_model_show_of_a_sweep_file_shows_the_base_model(target, capsys):
    assert main(["model", "show", target]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("mlp-1-40-40-1: 3 layer groups")
    assert "sweep:" in captured.err and "error" not in captured.err


def test_running_a_sweep_file_as_one_run_is_still_refused(capsys):
    assert main(["run", "configs/sweeps/moml_miniature.yaml"]) == 2
    assert "has a 'sweep:' section" in capsys.readouterr().err


def test_config_reference(capsys):
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == config_reference_markdown()


def test_config_reference_update_keeps_intro(tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    doc.write_text(f"# Intro\n\nHand-written.\n\n{DOC_MARKER}\n\nstale table\n")
    assert main(["config", "reference", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Intro\n\nHand-written.\n")
    assert "stale table" not in text
    assert text.endswith(config_reference_markdown())


@pytest.mark.parametrize("argv, expected", [
    (["config", "show", "algorithm.bta=0.5"], "algorithm.bta: unknown key; did you mean 'beta'?"),
    (["config", "show", "seed=-2"], "seed: -2 is out of range; allowed: >= 0"),
    (["config", "show", "data.family=mnist"], "data.family: 'mnist' is not allowed"),
    (["config", "show", "algorithm.memory_policy=decay_to_w"], "requires federated.mode 'cross_silo'"),
    (["config", "show", "seed"], "config file not found: seed"),
    (["run", "missing.yaml"], "config file not found: missing.yaml"),
    (["run", "missing.yaml", "seed=1"], "config file not found: missing.yaml"),
])
def test_user_errors_exit_2_without_traceback(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert expected in err
    assert "Traceback" not in err


def test_run_reports_bad_config_before_importing_the_engine(tmp_path, capsys, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  beta: 3\n")
    monkeypatch.setitem(sys.modules, "fedmaml.experiment", None)  # importing it would fail
    assert main(["run", str(f)]) == 2
    assert "c.yaml: algorithm.beta: 3.0 is out of range; allowed: (0, 1]" in capsys.readouterr().err


def test_run_invalid_yaml(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("name: [unclosed\n")
    assert main(["run", str(f)]) == 2
    assert "bad.yaml, line 2, column 1: invalid YAML" in capsys.readouterr().err


@pytest.fixture
def fake_experiment(monkeypatch):
    """A stand-in fedmaml.experiment that records what `run` passes to it."""
    calls = []
    module = types.ModuleType("fedmaml.experiment")
    module.run_experiment = lambda config, quiet=False: calls.append((config, quiet))
    module.statuses = lambda run_dir, config: {}  # no run directory: nothing to report
    monkeypatch.setitem(sys.modules, "fedmaml.experiment", module)
    return calls


def test_run_passes_resolved_config(tmp_path, fake_experiment):
    f = tmp_path / "c.yaml"
    f.write_text("name: r\n")
    # Overrides may come before and after options.
    assert main(["run", str(f), "seed=3", "--quiet", "algorithm.beta=0.4",
                 "--output-dir", str(tmp_path / "out")]) == 0
    (cfg, quiet), = fake_experiment
    assert quiet is True
    assert (cfg.name, cfg.seed, cfg.algorithm.beta) == ("r", 3, 0.4)
    assert cfg.output_dir == str(tmp_path / "out")


def test_run_not_quiet_by_default(tmp_path, fake_experiment):
    f = tmp_path / "c.yaml"
    f.write_text("name: r\n")
    assert main(["run", str(f)]) == 0
    assert fake_experiment[0][1] is False


def test_run_rejects_unknown_option(tmp_path, capsys, fake_experiment):
    assert main(["run", "c.yaml", "seed=1", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "seed=1" not in err.split("arguments:")[1]
    assert fake_experiment == []


def test_run_requires_config(capsys):
    assert main(["run"]) == 2
    assert "CONFIG" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import fedmaml.__main__ as entry

    assert entry.main is main


def test_the_vectorize_help_names_every_key_a_batch_carries_per_run(capsys):
    from fedmaml.engines.batch_plan import PER_RUN_KEYS, PER_RUN_PREFIXES

    assert main(["sweep", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    words = {k if k == "model.init_seed" else k.rsplit(".", 1)[-1] for k in PER_RUN_KEYS
             if k not in ("name", "output_dir")}
    words |= {p.rstrip(".") for p in PER_RUN_PREFIXES}
    # a whole word: "eta" inside "beta", or "seed" inside "init_seed", does not count
    assert not [w for w in sorted(words) if not re.search(rf"(?<![\w.]){re.escape(w)}(?!\w)", text)]


@pytest.mark.slow
def test_a_study_script_ends_on_ctrl_c_as_the_cli_does(tmp_path):
    """simulations/participation_study.py stopped by Ctrl-C: the sweep's resume hint and
    ``interrupted``, exit code 130, no KeyboardInterrupt traceback."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(repo / "simulations" / "participation_study.py"),
                             "--out", str(tmp_path)], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob("*/*/metrics.jsonl")):
        time.sleep(0.1)  # a run is training: the sweep has its hint to print
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "run the same command again to resume" in err
    assert err.rstrip().endswith("interrupted")

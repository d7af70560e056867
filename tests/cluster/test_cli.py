"""The `chimera` command line: help, model info, and clean failures."""

import subprocess
import sys

from chimera.checkpoint import save_model
from chimera.config import PRESETS
from chimera.model import Chimera, param_counts_of
from cluster.cli import main


def test_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"],
                            capture_output=True, text=True, check=True)
    assert "model" in result.stdout and "evolve" in result.stdout


def test_model_info_prints_pattern_and_parameter_counts(capsys):
    assert main(["model", "info", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    counts = param_counts_of(PRESETS["small"])
    assert "RRARRARRARRA" in out and "8 recurrent, 4 attention" in out
    assert f"{counts.embedding:,}" in out and f"{counts.non_embedding:,}" in out


def test_model_info_reads_a_saved_model_directory(tmp_path, tiny_config, capsys):
    save_model(Chimera(tiny_config), tmp_path)
    assert main(["model", "info", "--config", str(tmp_path)]) == 0
    assert tiny_config.pattern in capsys.readouterr().out


def test_unknown_preset_exits_non_zero_with_the_choices():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "model", "info", "--preset",
                             "huge"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'huge'" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_directory_is_a_clean_error(tmp_path, capsys):
    assert main(["model", "info", "--config", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_presets_command_lists_every_preset(capsys):
    assert main(["model", "presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)

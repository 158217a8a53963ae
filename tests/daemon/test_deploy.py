"""The operator files stay in step with the code: settings documented, processes runnable."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from delivery.cli import app
from delivery.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_environment_reference_documents_every_setting():
    """deploy/ENVIRONMENT.md names every DELIVERY_* variable Settings reads."""
    doc = (ROOT / "deploy" / "ENVIRONMENT.md").read_text()
    missing = [n for n in Settings.model_fields if f"`DELIVERY_{n.upper()}`" not in doc]
    assert missing == []


@pytest.mark.parametrize("process", ["web", "scheduler", "dispatcher", "handlers"])
def test_procfile_processes_are_cli_commands(process):
    """Each Procfile line runs an existing `delivery` command."""
    procfile = (ROOT / "Procfile").read_text()
    assert f"{process}: delivery {process}\n" in procfile
    result = CliRunner().invoke(app, [process, "--help"])
    assert result.exit_code == 0, result.output

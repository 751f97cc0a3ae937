"""The distmerge command: a summary line on success, one error line and exit 2 on a user mistake."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import merge_config
from distmerge.cli import app

pytestmark = pytest.mark.usefixtures("ray_cluster")
runner = CliRunner()


def test_merge_command(llama_family, tmp_path):
    base, experts = llama_family
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(merge_config(base, experts, "ties", density=0.3)))
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(config), "--out", str(out), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "merged (ties)" in result.output and "2 worker(s)" in result.output
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    again = runner.invoke(app, ["merge", str(config), "--out", str(out), "--quiet"])
    assert again.exit_code == 2
    assert "error:" in again.output and "already exists; pass --force" in again.output
    assert "Traceback" not in again.output
    forced = runner.invoke(app, ["merge", str(config), "--out", str(out), "--quiet", "--force"])
    assert forced.exit_code == 0, forced.output


def test_config_error_is_one_line(llama_family, tmp_path):
    base, experts = llama_family
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(merge_config(base, experts, "ties", density=2)))
    result = runner.invoke(app, ["merge", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: parameters.density: 2 is out of range (0.0, 1.0]"]
    assert not (tmp_path / "o").exists()


def test_emr_task_command(llama_family, tmp_path):
    base, experts = llama_family
    config = tmp_path / "emr.yaml"
    config.write_text(yaml.safe_dump(merge_config(base, experts, "emr")))
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(config), "--out", str(merged), "-q"]).exit_code == 0
    result = runner.invoke(app, ["emr-task", str(merged), "--task", "e1", "--out", str(tmp_path / "e1")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e1" / "model.safetensors.index.json").exists()
    missing = runner.invoke(app, ["emr-task", str(merged), "--task", "nope", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "task 'nope' is not in this EMR merge (tasks: e0, e1)" in missing.output

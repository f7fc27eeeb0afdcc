"""The console entry points: `glow-dist` and `python -m glow_dist`."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_help_lists_commands():
    for cmd in ([str(BIN / "glow-dist"), "--help"], [sys.executable, "-m", "glow_dist", "--help"]):
        out = run(*cmd)
        assert out.returncode == 0, out.stderr
        assert "usage: glow-dist" in out.stdout and "config" in out.stdout


def test_config_command_resolves_and_reports_errors(tmp_path):
    out = run(sys.executable, "-m", "glow_dist", "config", "--config", "configs/debug.yaml", "model.levels=1",
              "--out", str(tmp_path / "r.yaml"))
    assert out.returncode == 0, out.stderr
    assert "levels: 1" in out.stdout and (tmp_path / "r.yaml").read_text() == out.stdout
    bad = run(sys.executable, "-m", "glow_dist", "config", "--config", "configs/debug.yaml", "model.nope=1")
    assert bad.returncode == 2
    assert "unknown key 'model.nope'" in bad.stderr

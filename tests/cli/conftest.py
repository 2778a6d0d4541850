"""What every CLI test shares: the app, a runner that passes paths as strings, the one-error-line check,
and a snapshot of a folder to prove that a refused command wrote nothing and changed nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture
def app():
    from mimc.cli.app import app

    return app


def invoke(app, args, **kwargs):
    """Run ``mimc ARGS``; rich sizes tables to the terminal, so a wide one keeps every column readable."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"}, **kwargs)


def one_error_line(result, match: str, code: int = 2) -> None:
    """Exit ``code``, exactly one ``error:`` line on stderr naming ``match``, no traceback."""
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def calib(tmp_path, tiny_images):
    """The tiny labelled images as a calibration .npz."""
    import numpy as np

    images, labels = tiny_images
    path = tmp_path / "calib.npz"
    np.savez(path, images=images, labels=labels)
    return path


def snapshot(path: Path) -> dict:
    """Every file below ``path`` with its bytes."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}

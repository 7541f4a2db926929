"""The README is the user's manual: it must render (a broken table shows
as raw text on PyPI and GitHub), and the test command it gives must be
the one CI runs."""

import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_readme_is_valid_restructuredtext():
    docutils_core = pytest.importorskip('docutils.core', reason='docutils: tests/requirements.txt')
    warnings = io.StringIO()
    docutils_core.publish_doctree((REPO / 'README.rst').read_text(), settings_overrides={
        'warning_stream': warnings, 'report_level': 2, 'halt_level': 5})
    assert warnings.getvalue() == ''


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / 'README.rst').read_text()
    ci = (REPO / '.ci' / 'run').read_text()
    assert '\n    bash tests/run\n' in readme
    assert 'bash tests/run' in ci

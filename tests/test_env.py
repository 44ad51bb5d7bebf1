"""fastkd/_env.py: one parser and one truthy rule for every FASTKD_* switch, and its one table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastkd import _env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text", ["1", "true", "TRUE", " yes ", "On"])
def test_on_values(text):
    assert _env.flag("FASTKD_DISABLE_EXTENSION", {"FASTKD_DISABLE_EXTENSION": text}) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "OFF", "", "  "])
def test_off_values(text):
    assert _env.flag("FASTKD_DISABLE_EXTENSION", {"FASTKD_DISABLE_EXTENSION": text}) is False


def test_unset_takes_the_default():
    assert _env.flag("FASTKD_DISABLE_EXTENSION", {}) is False
    assert _env.flag("FASTKD_CPU_GRAD_CACHE", {}) is True  # the cache is on unless turned off


def test_any_other_value_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match=r"FASTKD_CPU_GRAD_CACHE='flase'.*1/true/yes/on or 0/false/no/off"):
        _env.flag("FASTKD_CPU_GRAD_CACHE", {"FASTKD_CPU_GRAD_CACHE": "flase"})


def test_unknown_switch_is_a_programming_error():
    with pytest.raises(KeyError, match="not a fastkd switch"):
        _env.flag("FASTKD_NO_SUCH_THING", {})


def test_import_refuses_a_bad_value():
    env = {**os.environ, "FASTKD_DISABLE_EXTENSION": "maybe"}
    r = subprocess.run([sys.executable, "-c", "import fastkd"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "FASTKD_DISABLE_EXTENSION='maybe'" in r.stderr


def test_every_switch_the_code_reads_is_in_the_table():
    """No FASTKD_* name in the sources that the one table does not know (docs/environment.md is made from it)."""
    names = set()
    for folder, pattern in (("fastkd", "*.py"), ("csrc", "*.*"), (".", "setup.py")):
        for f in (ROOT / folder).rglob(pattern):
            names |= set(re.findall(r"\bFASTKD_[A-Z0-9_]+\b", f.read_text(errors="ignore")))
    # a compile-time macro of the C++ code, not an environment variable
    names -= {"FASTKD_WITH_CUDA"}
    assert names <= {s.name for s in _env.SWITCHES}, names - {s.name for s in _env.SWITCHES}


def test_docs_table_is_the_generated_one():
    doc = (ROOT / "docs" / "environment.md").read_text()
    block = doc.split("<!-- generated: fastkd._env.markdown_table() -->\n", 1)[1].split("<!-- end generated -->", 1)[0]
    assert block == _env.markdown_table(), "regenerate docs/environment.md's table from fastkd._env.markdown_table()"

"""The house a newcomer reads: packages by stage with imports flowing one way (import-linter's
contracts in setup.cfg), small modules, one owner of the run folder's file names."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMM = ROOT / "summ"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold():
    """lint-imports with setup.cfg's contracts: layers by stage, a foundation that imports no stage,
    reports without torch, and no import cycle at any depth."""
    lint = Path(sys.executable).parent / "lint-imports"
    lint = lint if lint.exists() else shutil.which("lint-imports")
    assert lint, "lint-imports is missing: pip install -e '.[test]' installs import-linter"
    proc = subprocess.run([str(lint), "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _modules():
    return sorted(p for p in SUMM.rglob("*.py"))


def test_no_module_is_over_450_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_a_long_function_says_why_in_its_docstring():
    """Over 60 lines only with a reason: its docstring says "reads top to bottom" or "one figure" ..."""
    unexplained = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and "Long because" not in doc:
                    unexplained.append(f"{p.relative_to(ROOT)}:{node.name} ({length} lines)")
    assert not unexplained, unexplained


def test_the_run_folder_file_names_have_one_owner():
    owners = [p.relative_to(ROOT).as_posix() for p in _modules() if "metrics.json" in p.read_text(encoding="utf-8")]
    assert owners == ["summ/run_folder.py"]

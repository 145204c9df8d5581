"""The verbs as functions of the top-level package (`lmforge.finetune(...)`), imported on first use."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh(code: str) -> str:
    """Run `code` in a new interpreter (the suite has imported everything already) and return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_lmforge_imports_no_torch_and_every_export_resolves():
    out = fresh("import sys, lmforge; print('torch' in sys.modules)\n"
                "for name in lmforge.__all__: getattr(lmforge, name)\n"
                "print(sorted(n for n in lmforge.__all__ if not hasattr(lmforge, n)))")
    assert out.split("\n")[:2] == ["False", "[]"]


FINETUNE_TWICE = """
import inspect, lmforge
{first}
a, b = lmforge.finetune, lmforge.finetune
assert a is b and callable(a), (a, b)
assert list(inspect.signature(a).parameters)[:4] == ["checkpoint", "task", "data", "out"]
try:
    a("no-such-checkpoint", "classify", "x.tsv", "out")
except lmforge.UserError as e:
    print("UserError", e)
"""


def test_finetune_stays_the_verb_however_it_was_first_reached():
    """Importing the subpackage `lmforge.finetune` rebinds the parent's attribute to it: the name must
    still call the verb on the second access, and after any import of the subpackage."""
    for first in ("", "lmforge.pretrain", "import lmforge.finetune.objective", "from lmforge.finetune import finetune"):
        out = fresh(FINETUNE_TWICE.format(first=first))
        assert out.startswith("UserError") and "no-such-checkpoint" in out, (first, out)

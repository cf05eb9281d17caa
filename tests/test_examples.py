"""The scripts in examples/ run as documented."""

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_load_and_generate_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "load_and_generate.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "distload load: COMPLETE" in proc.stdout and "next token after" in proc.stdout

"""The README's recipe for an engine is the code the engine-style loader runs: the lines between
the markers in ``tests/track_jobs.py`` appear, as they are, in the README's recipe block."""

import os
import re
import textwrap

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_readme_recipe_is_what_the_engine_style_loader_runs():
    with open(os.path.join(ROOT, "tests", "track_jobs.py"), encoding="utf-8") as f:
        block = re.search(r"# ---- the lines an engine adds[^\n]*\n(.*?)\n\s*# ----\n", f.read(), re.S).group(1)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    recipe = readme.split("### The lines an engine adds", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    assert textwrap.dedent(block).strip() == recipe.strip()

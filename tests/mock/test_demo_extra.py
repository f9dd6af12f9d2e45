"""`cb-proxy demo` without its optional client dependency says what to install."""

from __future__ import annotations

import subprocess
import sys

# Runs the real CLI in a fresh interpreter in which `openai` cannot be imported, as after a plain
# `pip install cb-proxy`: a None entry in sys.modules is how Python marks a module as unimportable.
HIDE_OPENAI = """
import sys
sys.modules["openai"] = None
from proxy.cli import main
sys.exit(main(["demo", "--exit-after-tour", "--port", "0"]))
"""


def test_demo_without_the_demo_extra_names_the_install_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_OPENAI], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "cb-proxy[demo]"' in proc.stderr
    assert "Traceback" not in proc.stderr

"""Where things are, for tests in any folder: the repository root, this folder, the test plugins."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PLUGINS = TESTS / "plugins"

"""Process-level runtime settings."""

import sys

import pytest

from equicsp_core.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_takes_effect_on_glibc():
    """On Linux/glibc both mallopt calls succeed (idempotent, so calling it twice is fine)."""
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True

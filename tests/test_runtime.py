"""Process-level runtime settings."""

import json
import os
import subprocess
import sys

import pytest
import torch

from equicsp_core import cli
from equicsp_core.runtime import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_VARIABLES, bound_onednn_caches, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_takes_effect_on_glibc():
    """On Linux/glibc both mallopt calls succeed (idempotent, so calling it twice is fine)."""
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


def test_bound_onednn_caches_sets_unset_variables_and_keeps_the_users(monkeypatch):
    for name in ONEDNN_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert bound_onednn_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_CACHE_CAPACITY),
                                     "LRU_CACHE_CAPACITY": "7"}
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        bound_onednn_caches(0)


def test_the_program_bounds_the_caches_before_its_command(monkeypatch):
    """``equicsp`` sets the variables before any command runs (here ``equicsp info``, no checkpoint)."""
    for name in ONEDNN_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen = {}
    monkeypatch.setattr(cli, "_threads", lambda threads: seen.update({n: os.environ.get(n)
                                                                       for n in ONEDNN_CACHE_VARIABLES}))
    cli.main(["--quiet", "info"])
    assert seen == {name: str(ONEDNN_CACHE_CAPACITY) for name in ONEDNN_CACHE_VARIABLES}


_GROWTH = """
import json, torch
from equicsp_core.runtime import bound_onednn_caches, keep_freed_memory
keep_freed_memory()
bound_onednn_caches()
torch.set_num_threads(1)
torch.manual_seed(0)
layer = torch.nn.Linear(256, 256)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
rss = {}
for k in range(300):  # a new matmul shape every step, as the edges of a training batch
    rows = 1000 + (k * 7919) % 3000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(rows, 256)).float().sum().backward()
    if k + 1 in (100, 300):
        rss[k + 1] = rss_mb()
print(json.dumps(rss))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available(),
                    reason="reads /proc; bf16 matmuls through oneDNN")
def test_memory_stays_flat_over_many_bf16_matmul_shapes():
    """Bounded caches: 200 more distinct shapes add < 100 MB (with the libraries' 1024 entries this script
    grew by 330 MB on the 2-core AMX machine, BENCHMARKS.md "Memory of a long training run")."""
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARIABLES}
    result = subprocess.run([sys.executable, "-c", _GROWTH], capture_output=True, text=True, check=True,
                            env={**env, "OMP_NUM_THREADS": "1"})
    rss = json.loads(result.stdout)
    assert rss["300"] - rss["100"] < 100, rss

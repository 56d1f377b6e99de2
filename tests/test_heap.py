"""Freed memory kept for reuse: page faults counted by the kernel, and the numbers unchanged bit for bit.

Each check runs in a fresh Python process, so the test process's own allocator settings (conftest
keeps freed memory) neither help nor hide anything.
"""

import os
import subprocess
import sys

import pytest

from lora_np.training.heap import HEAP_VARS, _glibc, keep_freed_memory, transparent_huge_pages

pytestmark = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")

# 40 arrays of 1 MiB, each filled (so its pages are touched) and freed, as a step's temporaries are;
# prints the page faults of the last 30, after a warm-up of 10
ALLOC_LOOP = """
import resource, numpy as np
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    if i == 10:
        start = faults()
    a = np.empty(256 * 1024, dtype=np.float32)
    a.fill(1.0)
    del a
print(faults() - start)
"""
PAGES_PER_MIB = 256  # 4 KiB pages


def run(code):
    # a fresh process with none of the allocator variables this test process carries
    env = {k: v for k, v in os.environ.items() if k not in HEAP_VARS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(transparent_huge_pages() == "always", reason="huge pages 'always': faults per 2 MiB")
def test_glibcs_defaults_give_each_fresh_mebibyte_its_page_faults():
    # the problem itself: a 1 MiB block freed goes back to the system and returns page by page
    faults = int(run("from lora_np.training.heap import return_freed_memory; assert return_freed_memory()\n" + ALLOC_LOOP))
    assert faults >= 30 * PAGES_PER_MIB * 0.9


def test_kept_memory_is_reused_without_page_faults():
    faults = int(run("from lora_np.training.heap import keep_freed_memory; assert keep_freed_memory()\n" + ALLOC_LOOP))
    assert faults < PAGES_PER_MIB  # fewer than one fresh mebibyte in 30 allocations


def test_a_child_process_gets_the_settings_from_the_environment():
    # how the notebooks' kernels get them: keep_freed_memory writes the variables, glibc reads them
    # when the child starts, and the child itself calls nothing
    code = "from lora_np.training.heap import keep_freed_memory; keep_freed_memory(); import subprocess, sys; "
    code += f"print(subprocess.run([sys.executable, '-c', {ALLOC_LOOP!r}], capture_output=True, text=True).stdout)"
    assert int(run(code)) < PAGES_PER_MIB


TRAIN = """
import hashlib, numpy as np
from lora_np import LoraConfig, ModelConfig, cast, init_lora, init_params
from lora_np.data import VOCAB, make_splits
from lora_np.optim import AdamW
from lora_np.train import train
cfg = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=32, n_heads=2, n_layers=2, d_mlp=128)
params = cast(init_params(cfg, 0), np.float32)
lora = LoraConfig(r=2, alpha=2.0, targets=("W_q", "W_v"))
adapters = cast(init_lora(cfg, lora, seed=1), np.float32)
pre, _ = make_splits("pretrain", 400, 0)
train(params, pre, AdamW(params, lr=3e-3), steps=5, batch_size=64, block_size=16, seed=0, log_every=0)
train(params, pre, AdamW(adapters, lr=1e-2), steps=5, batch_size=64, block_size=16, seed=1, log_every=0,
      adapters=adapters, lora=lora)
h = hashlib.sha256()
for d in (params, adapters):
    for k in sorted(d):
        h.update(np.ascontiguousarray(d[k]).tobytes())
print(h.hexdigest())
"""


def test_training_gives_the_same_bits_either_way():
    kept = run("from lora_np.training.heap import keep_freed_memory; assert keep_freed_memory()\n" + TRAIN)
    returned = run("from lora_np.training.heap import return_freed_memory; assert return_freed_memory()\n" + TRAIN)
    assert kept == returned and len(kept) == 64


def test_keep_freed_memory_writes_the_variables_for_child_processes(monkeypatch):
    for var in HEAP_VARS:
        monkeypatch.delenv(var, raising=False)
    assert keep_freed_memory() is True
    assert all(os.environ[var] == value for var, value in HEAP_VARS.items())


def test_transparent_huge_pages_names_the_mode_in_brackets():
    assert transparent_huge_pages() in ("always", "madvise", "never", None)  # not "[madvise]", not the whole line


def test_return_freed_memory_takes_the_variables_back_from_child_processes():
    # glibc's names (mallopt(3), "Environment variables"), written here; 32 MiB is the largest
    # M_MMAP_THRESHOLD mallopt(3) allows on a 64-bit system, and 1 GiB the trim threshold chosen
    code = """
import os, subprocess, sys
from lora_np.training.heap import keep_freed_memory, return_freed_memory
show = "import os; print(sorted((k, v) for k, v in os.environ.items() if k.startswith('MALLOC_')))"
def child():
    return subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True).stdout.strip()
keep_freed_memory()
print(child())
return_freed_memory()
print(child())
"""
    kept, returned = run(code).splitlines()
    assert kept == str([("MALLOC_MMAP_THRESHOLD_", str(32 * 2**20)), ("MALLOC_TRIM_THRESHOLD_", str(2**30))])
    assert returned == "[]"

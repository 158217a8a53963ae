"""
Serving processes tune the cyclic garbage collector once started
(``delivery.startup.tune_gc``): what start-up made is frozen out of the collector's
walks, and cycles made afterwards are still collected.
"""

import subprocess
import sys

# In a child process: freezing is for the whole interpreter, not for a test.
PROBE = """
import gc, sys, weakref
from delivery.startup import tune_gc
before = gc.get_freeze_count()
tune_gc()
print(before, gc.get_freeze_count())
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
print(gone() is None)
"""


def test_start_up_is_frozen_and_later_cycles_are_collected() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    counts, collected = done.stdout.splitlines()
    before, after = counts.split()
    assert int(after) > int(before) + 10_000  # the modules imported so far, at least
    assert collected == "True"

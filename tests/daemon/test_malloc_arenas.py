"""
The long-running processes cap glibc's malloc arenas (``delivery.startup.MALLOC_ARENAS``):
threads started after the cap share the main arena instead of taking one each.
"""

import os
import subprocess
import sys

# Counts the arenas glibc reports (one <heap> per arena in malloc_info's XML) after
# four threads have each allocated while the main thread held memory of its own.
PROBE = """
import ctypes, os, sys, tempfile, threading
from delivery.startup import cap_malloc_arenas
capped = cap_malloc_arenas() if sys.argv[1] == "cap" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
held = [libc.malloc(4096) for _ in range(16)]
def work():
    for _ in range(200):
        libc.free(libc.malloc(64 * 1024))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "malloc_info.xml")
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    xml = open(path).read()
print(capped, xml.count("<heap nr="))
"""


def _arenas(mode: str, env: dict[str, str]) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    capped, heaps = done.stdout.split()
    return capped, int(heaps)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}


def test_threads_share_one_arena_once_capped() -> None:
    assert _arenas("cap", _env()) == ("True", 1)
    # Without the cap the same threads took arenas of their own.
    assert _arenas("free", _env())[1] > 1


def test_an_operators_malloc_arena_max_wins() -> None:
    capped, heaps = _arenas("cap", {**_env(), "MALLOC_ARENA_MAX": "3"})
    assert capped == "False"
    assert heaps > 1

# The worker of the `procpool map` benchmark: one line in, one line out, a tiny
# computation per line (procpool map's line protocol: flush after each reply).
import sys

for line in sys.stdin:
    n = int(line)
    print((n * n + 7) % 1000003, flush=True)

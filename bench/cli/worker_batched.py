# The same worker as worker.py, answering in batches: it reads whatever lines have
# arrived, answers them all, and flushes once (procpool map sends a task's lines
# together, so this saves a write per line).
import sys

inp, out = sys.stdin.buffer, sys.stdout.buffer
rest = b""
while True:
    data = inp.read1(1 << 16)
    if not data:
        break
    *lines, rest = (rest + data).split(b"\n")
    out.write(b"".join(b"%d\n" % ((int(n) * int(n) + 7) % 1000003) for n in lines))
    out.flush()

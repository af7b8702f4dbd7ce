# The reference for the `procpool map` benchmark: the same computation per line with
# CPython's multiprocessing.Pool (map with its automatic chunk size, the fastest way it
# offers), reading stdin and writing one result line per input line, in order.
# Usage: python3 mp_pool_lines.py PROCESSES < lines > results
import sys
from multiprocessing import Pool


def f(line):
    n = int(line)
    return (n * n + 7) % 1000003


if __name__ == "__main__":
    lines = sys.stdin.readlines()
    with Pool(int(sys.argv[1])) as pool:
        results = pool.map(f, lines)
    sys.stdout.write("".join(f"{r}\n" for r in results))

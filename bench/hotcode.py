#!/usr/bin/env python3
"""bench/hotcode.py: the code a round trip runs, from a callgrind file that
`OUT=dir CACHE=1 bash bench/instructions.sh` kept (written with --dump-instr=yes).

An instruction is hot when it ran at least once per two round trips (COUNT / 2 times in the
counted part); the script prints how many hot instructions there are, the 64-byte cache lines
they lie in (what the instruction cache must hold for a round trip to run from it; 512 lines
fill a 32 KiB L1i), and the functions with the most hot lines.

Usage: python3 bench/hotcode.py OUT/cg.PID.1 COUNT [TOP]
"""
import collections
import re
import sys


def main():
    path, count = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    cost = collections.Counter()  # (object, address) -> instructions run there
    owner = {}  # (object, address) -> function
    names = {}
    obj = fn = None
    last = [0, 0]
    call_line = False

    def position(tok, prev):
        # Callgrind compresses positions: absolute (hex), relative (+n/-n) or the same (*).
        if tok == "*":
            return prev
        if tok.startswith("0x"):
            return int(tok, 16)
        if tok[0] in "+-":
            return prev + int(tok)
        return int(tok)

    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        if line[0].isdigit() or line[0] in "+-*":
            toks = line.split()
            last = [position(toks[0], last[0]),
                    position(toks[1], last[1]) if len(toks) > 1 else last[1]]
            if call_line:
                # The line after calls= is the call's inclusive cost: not this function's own.
                call_line = False
                continue
            if len(toks) > 2:
                key = (obj, last[0])
                cost[key] += int(toks[2])
                owner[key] = fn
        elif line.startswith("calls="):
            call_line = True
        elif line.startswith("ob="):
            obj = line[3:].split(")")[0]
        elif line.startswith(("fn=", "cfn=")):
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            if m and line.startswith("fn="):
                fn = names.get(m.group(1))

    hot = [k for k, v in cost.items() if v >= count // 2]
    lines = {(o, a // 64) for (o, a) in hot}
    print(f"hot instructions {len(hot)}, cache lines {len(lines)} "
          f"({len(lines) * 64 / 1024:.1f} KiB)")
    per_fn = collections.defaultdict(set)
    per_fn_instr = collections.Counter()
    for k in hot:
        per_fn[owner[k]].add((k[0], k[1] // 64))
        per_fn_instr[owner[k]] += 1
    for f, ls in sorted(per_fn.items(), key=lambda x: -len(x[1]))[:top]:
        print(f"{len(ls):5d} lines {per_fn_instr[f]:6d} instructions  {(f or '?')[:140]}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Runs `sigil bench` in two configurations by turns (ABBA, repeated) in one session and prints
each configuration's mean rate, p99 and broker CPU per operation, and B/A, per scenario.

  broker/bench/scripts/turns.py SIGIL_BIN 'A args' 'B args' [ROUNDS] [-- common args]

Example (what [limits] cost):
  broker/bench/scripts/turns.py target/release/sigil '--limits on' '--limits off' 2 \
      -- --embedded --scenario jwt,x509 --duration 8s --warmup 2s
"""
import json
import shlex
import statistics
import subprocess
import sys


def run(binary, args):
    out = subprocess.run([binary, "bench", "--json", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["scenarios"]


def main():
    argv = sys.argv[1:]
    common = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], shlex.split(" ".join(argv[i + 1:]))
    binary, a, b = argv[0], shlex.split(argv[1]), shlex.split(argv[2])
    rounds = int(argv[3]) if len(argv) > 3 else 2
    got = {"A": [], "B": []}
    for _ in range(rounds):
        for name, args in (("A", a), ("B", b), ("B", b), ("A", a)):
            got[name].append(run(binary, common + args))
            print(f"{name}: " + ", ".join(
                f"{s} {v['ops_per_s']:.0f}/s" for s, v in got[name][-1].items()), flush=True)
    for scenario in got["A"][0]:
        row = {}
        for name in ("A", "B"):
            runs = [r[scenario] for r in got[name]]
            row[name] = (statistics.mean(r["ops_per_s"] for r in runs),
                         statistics.mean(r["p99_ms"] for r in runs),
                         statistics.mean(1e6 * (r.get("broker_cores") or 0) / r["ops_per_s"]
                                         for r in runs))
        (ra, pa, ca), (rb, pb, cb) = row["A"], row["B"]
        print(f"{scenario}: A {ra:.0f}/s p99 {pa:.1f} ms {ca:.0f} us/op | "
              f"B {rb:.0f}/s p99 {pb:.1f} ms {cb:.0f} us/op | "
              f"rate A/B {100 * ra / rb:.1f}%, CPU/op A/B {100 * ca / cb if cb else 0:.1f}%")


if __name__ == "__main__":
    main()

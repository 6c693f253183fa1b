#!/usr/bin/env python3
"""Instruction counts of one cgtproxy binary, which (unlike wall-clock
figures) do not depend on what else the machine runs.

usage (as root): benches/instructions.py BIN OUT [N] [E] [cold|event|both]

- cold start: `BIN run --once` on a tree of N (10,000) cgroups + 4, under
  valgrind --tool=callgrind -> OUT.cold;
- per event: a running daemon handling E (300) mkdirs and then E rmdirs,
  one at a time (30 ms apart, so each is its own batch) -> OUT.evE, and the
  same daemon handling none -> OUT.ev0; per event = (evE - ev0) / 2E.
  `callgrind_annotate OUT.cold` lists the top functions.
- STRACE=1: `strace -c` instead of callgrind (syscalls, in OUT.*.log).

It re-runs itself in `unshare -n` (a private network namespace: it loads
the shipped ruleset there); its cgroups live in a random-named subtree of the
cgroup2 mount, removed at the end. Config: one rule, `/.*` -> direct (the
bench suite's). Build BIN with symbols for readable profiles:
CARGO_PROFILE_RELEASE_STRIP=none CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --release --target x86_64-unknown-linux-musl --target-dir target-prof
"""
import os, random, subprocess, sys, tempfile, time

here = os.path.dirname(os.path.abspath(__file__))
bin_, out = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
e = int(sys.argv[4]) if len(sys.argv) > 4 else 300
mode = sys.argv[5] if len(sys.argv) > 5 else "both"
strace = os.environ.get("STRACE") == "1"
# Always in a private network namespace of its own (it loads a ruleset).
if os.environ.get("CGTPROXY_INSTR_NETNS") != "1":
    os.execvp("unshare", ["unshare", "-n", "env", "CGTPROXY_INSTR_NETNS=1",
                          sys.executable, os.path.abspath(__file__)] + sys.argv[1:])

mount = None
for line in open("/proc/self/mountinfo"):
    left, _, right = line.partition(" - ")
    if right.split(" ")[0] == "cgroup2":
        mount = left.split(" ")[4]
top = f"{mount}/cgtproxy-instr-{os.getpid()}-{random.randrange(1 << 32):08x}"
os.mkdir(top)


def tool(name):
    if strace:
        return ["strace", "-c", "-o", "/dev/stderr"]
    return ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}.{name}"]


def rmtree(t):
    for _, dirs, _, fd in os.fwalk(t, topdown=False):
        for d in dirs:
            try:
                os.rmdir(d, dir_fd=fd)
            except OSError:
                pass
    os.rmdir(t)


try:
    w = f"{top}/w"
    os.makedirs(f"{w}/l3/l4/l5")
    for i in range(n):
        os.mkdir(f"{w}/c-{i}")
    cfg = os.path.join(tempfile.mkdtemp(), "config.json")
    with open(cfg, "w") as f:
        f.write('{ "route": false, "rules": [ { "match": "/.*", "target": "direct" } ] }')
    subprocess.run(["nft", "-f", os.path.join(here, "..", "nft", "cgtproxy.nft")], check=True)
    flush = ["nft", "flush", "map", "inet", "cgtproxy", "cgroups"]
    if mode in ("both", "cold"):
        subprocess.run(flush, check=True)
        subprocess.run(tool("cold") + [bin_, "run", "-c", cfg, "--cgroup-root", w, "--once"],
                       check=True, stderr=open(f"{out}.cold.log", "w"))
    if mode in ("both", "event"):
        for k in (0, e):
            subprocess.run(flush, check=True)
            ev = f"{top}/ev{k}"
            os.mkdir(ev)
            r, wfd = os.pipe()
            p = subprocess.Popen(tool(f"ev{k}") + [bin_, "run", "-c", cfg, "--cgroup-root", ev,
                                                   "--ready-fd", str(wfd)],
                                 pass_fds=(wfd,), stderr=open(f"{out}.ev{k}.log", "w"))
            os.close(wfd)
            assert os.read(r, 1) == b"\n", "the daemon did not get ready"
            for i in range(k):
                os.mkdir(f"{ev}/e-{i}")
                time.sleep(0.03)
            for i in range(k):
                os.rmdir(f"{ev}/e-{i}")
                time.sleep(0.03)
            time.sleep(0.5)
            # SIGTERM to the daemon itself (under strace, its child).
            pid = p.pid
            if strace:
                pid = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
            os.kill(pid, 15)
            p.wait()
finally:
    rmtree(top)

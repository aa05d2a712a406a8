"""Where bindguard's time goes on each path, on a loaded host: imports, then a profile of the run.

    sudo .venv/bin/python bench/hotspots.py --size 20k:2000            # every path
    sudo .venv/bin/python bench/hotspots.py --size 100k:2000 held      # one path
    sudo .venv/bin/python bench/hotspots.py unit held_unit              # run by a service (the rig)
    sudo .venv/bin/python bench/hotspots.py daemon_nginx_first          # nginx.service, discovery run each time

For each path, in the loaded namespace: the median over --runs runs of `python -X importtime`
(each module's cumulative import time, top-level modules and their biggest children), then one
cProfile run of bindguard.cli.main, sorted by cumulative time. Profiling slows Python code down
(the /proc scan most): read it for shares, and take wall times from bench/run.py.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from load import Load, Size  # noqa: E402
from run import bindguard_argv, child_env, inside, install_debian_units  # noqa: E402
from unit_agent import UnitAgent  # noqa: E402

PROFILE_ONE = """
import cProfile, os, sys
sys.argv = ["bindguard", *sys.argv[1:]]
profile = cProfile.Profile()
profile.enable()
from bindguard.cli import main
code = main()
profile.disable()
profile.dump_stats(os.environ["BENCH_PROFILE_OUT"])
sys.exit(code)
"""


PATHS = ("clear", "held", "timewait", "noop", "unit", "held_unit", "daemon_nginx", "daemon_nginx_first", "daemon_ssh")
# daemon_*: Debian's units, discovery remembered; daemon_nginx_first: the first start after a change,
# nginx.service's unit file touched before each run (as bench/run.py does), so discovery runs in full
IN_UNIT = ("unit", "held_unit", "daemon_nginx", "daemon_nginx_first", "daemon_ssh")


def paths(info: dict) -> dict[str, list[str]]:
    return {
        "clear": ["check", str(info["free_port"])],
        "held": ["check", str(info["held_port"])],
        "timewait": ["check", "--no-reuseaddr", "--wait", "0", str(info["timewait_port"])],
        "noop": ["check", "--unit", "bench-noop.service"],
        "unit": ["check", str(info["free_port"])],
        "held_unit": ["check", str(info["held_port"])],
        "daemon_nginx": ["check", "--unit", "bench-nginx.service"],
        "daemon_nginx_first": ["check", "--unit", "bench-nginx.service"],
        "daemon_ssh": ["check", "--unit", "bench-ssh.service"],
    }


def runner(agent):
    """(argv, env) -> the process's output: run from here, or by the agent's service."""
    if agent is None:
        return lambda argv, env: subprocess.run(argv, env=env, capture_output=True, text=True).stderr
    return lambda argv, env: agent.probe(argv, env, limit=1_000_000)["sample"]


def touching(run, path: Path):
    """run, the file at path touched (its ctime moved) before each run: discovery's answer is not remembered."""
    def touched(argv, env):
        os.utime(path)
        return run(argv, env)
    return touched


def import_times(run, python: list[str], args: list[str], env: dict[str, str], runs: int) -> str:
    cumulative: dict[str, list[int]] = defaultdict(list)
    depth: dict[str, int] = {}
    order: list[str] = []
    for _ in range(runs):
        for line in run([*python, "-X", "importtime", *args], env).splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            _, cum, name = line[len("import time:"):].split("|")
            module = name.rstrip()
            depth[module.strip()] = (len(module) - len(module.lstrip())) // 2
            module = module.strip()
            if module not in cumulative:
                order.append(module)
            cumulative[module].append(int(cum))
    median = {m: statistics.median(v) / 1000 for m, v in cumulative.items()}
    total = sum(t for m, t in median.items() if depth[m] == 0)
    lines = [f"  imports: {total:.1f} ms in all (median of {runs}); modules >= 0.5 ms, nested as imported:"]
    lines += [f"    {'  ' * depth[m]}{m:<40} {median[m]:6.2f} ms" for m in order
              if depth[m] <= 2 and median[m] >= 0.5]
    return "\n".join(lines)


def profile(run, python: list[str], args: list[str], env: dict[str, str], out: Path) -> str:
    run([*python, "-c", PROFILE_ONE, *args], {**env, "BENCH_PROFILE_OUT": str(out)})
    text = io.StringIO()
    stats = pstats.Stats(str(out), stream=text)
    stats.strip_dirs().sort_stats("cumulative").print_stats(30)
    body = text.getvalue()
    return "  profile (cProfile, cumulative):\n" + "\n".join("    " + line for line in body.splitlines()[4:] if line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", choices=PATHS, default=["clear", "held", "timewait", "noop"],
                        metavar="PATH", help=f"any of {', '.join(PATHS)} (default: the first four)")
    parser.add_argument("--size", type=Size.parse, default=Size(20000, 2000))
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: sudo .venv/bin/python bench/hotspots.py")
    launcher_dir = tempfile.TemporaryDirectory(prefix="bindguard-hotspots-")
    bindguard, extra, _ = bindguard_argv(None, Path(launcher_dir.name))  # the package's launcher: a Python script
    python = [sys.executable] if bindguard[0].endswith("/bindguard") else bindguard[:-2]
    script = [bindguard[0]] if bindguard[0].endswith("/bindguard") else ["-m", "bindguard"]
    env = child_env(extra)
    out = Path(f"/tmp/bindguard-bench-{os.getpid()}.prof")
    agent = UnitAgent() if set(args.paths) & set(IN_UNIT) else None
    units = {}
    try:
        if agent:
            units = install_debian_units(agent)
        with Load(args.size) as load:
            print(f"{args.size.label}: {load.info['sockstat']}, held PID {load.info['held_pid']} "
                  f"({load.info['held_scan_position']} in PID order)")
            if agent:
                agent.enter(load.netns)
            try:
                with inside(load.netns):
                    for name in args.paths:
                        load.refresh()
                        argv = paths(load.info)[name]
                        run = runner(agent if name in IN_UNIT else None)
                        if name == "daemon_nginx_first":
                            if "nginx" not in units:
                                parser.error("daemon_nginx_first needs Debian's nginx installed (./setup.sh --test)")
                            run = touching(run, units["nginx"])
                        where = " (run by a service)" if name in IN_UNIT else ""
                        print(f"\n== {name}: bindguard {' '.join(argv)}{where}")
                        # the launcher's #! line runs python -IS: given to python as a script, spelled out
                        isolated = ["-I", "-S"] if script[0].endswith("/bindguard") else []
                        print(import_times(run, [*python, *isolated], [*script, *argv], env, args.runs))
                        print(profile(run, python, argv, env, out))
            finally:
                if agent:
                    agent.enter("-")
    finally:
        if agent:
            agent.close()
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

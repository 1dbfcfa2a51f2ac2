"""Campaign throughput on the AiiDA daemon: compositions per hour of ``aiida-equicsp campaign submit``.

Builds a throwaway production profile the way ``tests/daemon/conftest.py`` does (its own ``AIIDA_PATH`` in a
temporary folder, its own PostgreSQL database and role, RabbitMQ, a ``localhost`` computer with
``core.direct``, the ``equicsp`` code of this virtual environment and a ``pw`` code), installs the PseudoDojo
family offline (:func:`aiida_equicsp.pseudos.install_pseudodojo_family`), starts the daemon with ``--workers``
workers and runs one campaign of ABX3 perovskites with the shipped ``perov_5`` model through the real CLI
(``aiida-equicsp campaign submit --wait``), at most ``--max-concurrent`` work chains at once. When every work
chain has terminated it reads their ``ctime``/``mtime`` (and those of the processes they called) from the
database and writes the report to ``--out``.

Modes:

- ``ml``: the ``fast`` protocol, 8 candidates per composition, sampling and CHGNet relaxation only;
- ``dft``: the same plus a pw.x relaxation of the best candidate (``top_k`` 1) at the PseudoDojo family's
  ``low`` cutoffs (the highest over the campaign's elements: one set of overrides serves the whole campaign),
  ``kpoints_distance`` 0.8, ``meta_convergence`` False, ``withmpi`` False, as ``examples/predict_and_relax.py``.

Throughput is the number of compositions finished ok divided by the span from the first work chain's
``ctime`` to the last one's ``mtime``. The computer polls its jobs every second (``FAST_POLLING`` of the
daemon tests; AiiDA's default is 10 s).

Everything is taken down at the end, on failure and Ctrl-C (SIGINT, SIGTERM) too: submitter, daemon, any job
still running in the profile's folder, RabbitMQ queue and exchanges, profile, database, role, folder.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_campaign.py --mode ml \\
        --num-compositions 8 --max-concurrent 2 --workers 2 --out benchmarks/results/campaign_ml.json
    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_campaign.py --mode dft \\
        --num-compositions 2 --max-concurrent 2 --workers 2 --out benchmarks/results/campaign_dft.json

Run it with the virtual environment's Python (its ``bin`` holds ``verdi``, ``aiida-equicsp`` and ``equicsp``).
Needs ``psql``, PostgreSQL (trust authentication for the superuser, ``EQUICSP_TEST_PG*`` as in the daemon
tests) and RabbitMQ on 127.0.0.1:5672.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon.conftest import (  # the repository root is on the path only now
    DELETE_BROKER_OBJECTS,
    PG_HOST,
    PG_PORT,
    RABBITMQ,
    VENV_BIN,
    DaemonProfile,
    _listening,
    create_profile,
    new_profile,
    psql,
    stop_daemon,
)

#: ABX3 perovskites, in the order a campaign takes them (``--num-compositions`` takes the first ones).
PEROVSKITES = ["SrTiO3", "BaTiO3", "CaTiO3", "KNbO3", "KTaO3", "BaZrO3", "SrZrO3", "NaNbO3"]
#: The campaign's label in the throwaway profile.
LABEL = "bench"
#: Process states of a terminated work chain.
TERMINAL = ("finished", "excepted", "killed")

#: Installs the PseudoDojo family (offline) and prints its label and 'low' cutoffs (Ry), per composition and
#: the highest over all of them, as JSON. ``%(formulas)r``: the campaign's formulas.
INSTALL_FAMILY = """
import json

from pymatgen.core import Composition

from aiida_equicsp.pseudos import install_pseudodojo_family

family = install_pseudodojo_family()
formulas = %(formulas)r
def cutoffs(elements):
    return family.get_recommended_cutoffs(elements=tuple(sorted(elements)), stringency="low", unit="Ry")
elements = {str(element) for formula in formulas for element in Composition(formula)}
per = {formula: cutoffs({str(element) for element in Composition(formula)}) for formula in formulas}
print(json.dumps({"label": family.label, "campaign": cutoffs(elements), "per_composition": per}))
"""

#: Prints the campaign's states whenever they change, until ``n`` compositions are queued and all terminated.
MONITOR = """
import sys
import time

from aiida_equicsp.campaign import campaign_status, load_campaign

label, n, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
terminal = %(terminal)r
last = None
while True:
    try:
        statuses = campaign_status(load_campaign(label))
    except ValueError:  # the submitter has not created the campaign yet
        statuses = []
    line = " ".join(f"{s.composition}:{s.state}" + (f"[{s.exit_status}]" if s.exit_status else "")
                    for s in statuses)
    if line != last:
        print(f"  {time.strftime('%%H:%%M:%%S')} {line}", flush=True)
        last = line
    if len(statuses) == n and all(s.state in terminal for s in statuses):
        break
    time.sleep(interval)
"""

#: Prints, as JSON, per composition: its current work chain's times and those of the processes it called,
#: and the campaign's winners.
COLLECT = """
import json

from aiida.cmdline.utils.common import get_workchain_report
from aiida.common.links import LinkType

from aiida_equicsp.campaign import campaign_status, current_work_chains, load_campaign
from aiida_equicsp.queries import winners_dataframe

group = load_campaign(%(label)r)
def times(node):
    return {"ctime": node.ctime.timestamp(), "mtime": node.mtime.timestamp(),
            "seconds": round((node.mtime - node.ctime).total_seconds(), 1)}
chains = current_work_chains(group)
compositions = []
for status in campaign_status(group):
    entry = {"composition": status.composition, "pk": status.pk, "state": status.state,
             "exit_status": status.exit_status, "attempts": status.attempts}
    node = chains.get(status.composition)
    if node is not None:
        entry.update(times(node))
        entry["exit_message"] = node.exit_message
        called = node.base.links.get_outgoing(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).all()
        entry["called"] = [{"link": link.link_label, "process": link.node.process_label,
                            "exit_status": link.node.exit_status, **times(link.node)}
                           for link in sorted(called, key=lambda link: link.node.ctime)]
        pw = [descendant for descendant in node.called_descendants
              if descendant.process_label == "PwCalculation"]
        entry["pw_calculations"] = len(pw)
        entry["pw_seconds"] = round(sum(times(calc)["seconds"] for calc in pw), 1)
        if "ranking" in node.outputs:
            rows = node.outputs.ranking["rows"]
            entry["candidates"] = len(rows)
            entry["ml_relaxed"] = sum(row["ml_rank"] is not None for row in rows)
        if not node.is_finished_ok:
            entry["report"] = get_workchain_report(node, "REPORT").splitlines()[-30:]
    compositions.append(entry)
frame = winners_dataframe(group)
def plain(value):
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value  # NaN (no DFT energy): null
winners = [{key: plain(value) for key, value in record.items()}
           for record in frame.drop(columns=["structure_uuid"]).to_dict("records")]
print(json.dumps({"settings": group.base.extras.get("equicsp_campaign"), "compositions": compositions,
                  "winners": winners}))
"""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), handled like Ctrl-C: the ``finally`` clauses take everything down."""


def _on_signal(signum: int, _frame) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


def machine() -> dict:
    """CPU model (``lscpu``), cores, memory, kernel, load: what the figures were measured on."""
    info = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "CPU(s)", "Thread(s) per core",
                               "Core(s) per socket", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None)
    return {"cpu": info.get("Model name", platform.processor() or "unknown"), "lscpu": info,
            "cores": os.cpu_count(), "memory_gib": round(int(memory) / 2**20, 1) if memory else None,
            "kernel": platform.release(), "python": platform.python_version(),
            "load_average_at_start": [round(load, 2) for load in os.getloadavg()], "nice": os.nice(0)}


def create_bench_profile(profile: DaemonProfile, password: str, pw_executable: str, created: list[str]) -> None:
    """The profile of the daemon tests (``tests/daemon/conftest.py``), plus a ``pw`` code.

    ``created`` collects what exists so far ("role", "database", "profile"): :func:`tear_down` deletes that.
    """
    create_profile(profile, password, created)
    profile.verdi("code", "create", "core.code.installed", "--non-interactive", "--label", "pw",
                  "--computer", "localhost", "--filepath-executable", pw_executable,
                  "--default-calc-job-plugin", "quantumespresso.pw")


def kill_leftovers(root: Path) -> list[int]:
    """Stop every process of this user whose working directory is inside ``root`` (jobs the daemon left
    running, a daemon still shutting down): only this script starts processes there. SIGTERM, then SIGKILL
    after 10 s. Returns their pids."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.uids().real == os.getuid() \
                    and Path(process.cwd()).is_relative_to(root):
                process.terminate()
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    _, alive = psutil.wait_procs(found, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [process.pid for process in found]


def tear_down(profile: DaemonProfile, created: list[str], children: list[subprocess.Popen]) -> None:
    """Take down, in order, whatever exists: submitter and monitor, daemon, leftover jobs, broker objects,
    profile, database, role, folder. Each step runs even if the one before failed; SIGINT and SIGTERM wait."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}

    def leftovers() -> None:
        killed = kill_leftovers(profile.root)
        if killed:
            print(f"killed leftover processes {killed}")

    steps = []
    try:
        for child in children:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
        if "profile" in created:
            steps.append(("daemon", lambda: stop_daemon(profile)))
        steps.append(("leftover processes", leftovers))
        if "profile" in created:
            steps.append(("broker objects", lambda: profile.python(DELETE_BROKER_OBJECTS, check=False, timeout=60)))
            steps.append(("profile", lambda: profile.verdi("profile", "delete", "--force", "--delete-data",
                                                           profile.name, check=False, timeout=120)))
        if "database" in created:
            steps.append(("database", lambda: psql(f"DROP DATABASE IF EXISTS {profile.name} WITH (FORCE)")))
        if "role" in created:
            steps.append(("role", lambda: psql(f"DROP ROLE IF EXISTS {profile.name}")))
        steps.append(("folder", lambda: shutil.rmtree(profile.root, ignore_errors=True)))
        for what, step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001  (go on taking the rest down)
                print(f"teardown: {what} failed: {error}", file=sys.stderr)
        print(f"torn down: {', '.join(what for what, _ in steps)}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def daemon_log_tail(root: Path, lines: int = 60) -> str:
    logs = sorted((root / ".aiida").rglob("aiida-*.log"))
    return "\n".join("\n".join(log.read_text(errors="replace").splitlines()[-lines:]) for log in logs)


def campaign_overrides(args: argparse.Namespace, cutoffs: dict | None) -> dict:
    """The ``--overrides`` of the campaign: 8 candidates, best one to DFT at the family's low cutoffs."""
    overrides: dict = {"num_samples": args.num_samples, "top_k": 1}
    if args.mode == "dft":
        ecutwfc, ecutrho = cutoffs["campaign"]
        overrides["dft"] = {"overrides": {"meta_convergence": False, "base_relax": {
            "kpoints_distance": args.kpoints_distance,
            "pw": {"parameters": {"SYSTEM": {"ecutwfc": ecutwfc, "ecutrho": ecutrho}}}}},
            "options": {"withmpi": False}}
    return overrides


def run_campaign(args: argparse.Namespace, profile: DaemonProfile, root: Path,
                 children: list[subprocess.Popen]) -> dict:
    """Set up the family, start the daemon, run the campaign to the end; the report (without the machine)."""
    formulas = PEROVSKITES[:args.num_compositions]
    print(f"installing the PseudoDojo family (offline) in profile {profile.name} ...", flush=True)
    family = json.loads(profile.python(INSTALL_FAMILY % {"formulas": formulas}).strip().splitlines()[-1])
    overrides = campaign_overrides(args, family)
    overrides_file = root / "overrides.yaml"
    overrides_file.write_text(yaml.safe_dump(overrides))
    print(f"overrides: {json.dumps(overrides)}", flush=True)

    profile.verdi("daemon", "start", str(args.workers))
    command = [str(VENV_BIN / "aiida-equicsp"), "--profile", profile.name, "campaign", "submit", LABEL,
               "--code", "equicsp@localhost", "--model", args.model, "--protocol", "fast",
               "--max-concurrent", str(args.max_concurrent), "--overrides", str(overrides_file),
               "--wait", "--interval", str(args.interval), *(arg for f in formulas for arg in ("--formula", f))]
    if args.mode == "dft":
        command += ["--dft", "--pw-code", "pw@localhost", "--pseudo-family", family["label"]]
    print(f"submitting {len(formulas)} compositions ({', '.join(formulas)}), at most {args.max_concurrent} at once, "
          f"{args.workers} daemon workers, mode {args.mode} ...", flush=True)
    submitter_log = root / "submitter.log"
    started = time.time()
    with submitter_log.open("w") as log:
        submitter = subprocess.Popen(command, env=profile.env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                     text=True)
    children.append(submitter)
    preamble = f"from aiida import load_profile\nload_profile({profile.name!r})\n"
    monitor = subprocess.Popen([sys.executable, "-c", preamble + MONITOR % {"terminal": TERMINAL}, LABEL,
                                str(len(formulas)), str(args.poll)], env=profile.env, cwd=root)
    children.append(monitor)
    deadline = started + args.timeout
    timed_out = False
    while monitor.poll() is None:
        if submitter.poll() not in (None, 0):
            raise RuntimeError(f"the submitter exited {submitter.returncode}:\n{submitter_log.read_text()}")
        if time.time() > deadline:
            timed_out = True
            print(f"timed out after {args.timeout} s: collecting what finished", flush=True)
            break
        time.sleep(1)
    observed = time.time() - started
    if not timed_out and monitor.returncode != 0:
        raise RuntimeError(f"the monitor exited {monitor.returncode}")
    if not timed_out:
        submitter.wait(timeout=60)

    collected = json.loads(profile.python(COLLECT % {"label": LABEL}, timeout=600).strip().splitlines()[-1])
    chains = [entry for entry in collected["compositions"] if entry.get("ctime") is not None]
    ok = [entry for entry in chains if entry["state"] == "finished" and entry["exit_status"] == 0]
    first = min((entry["ctime"] for entry in chains), default=None)
    last = max((entry["mtime"] for entry in chains if entry["state"] in TERMINAL), default=None)
    span = None if first is None or last is None else last - first
    for entry in collected["compositions"]:  # seconds after the first submission, easier to read than epochs
        for item in [entry, *entry.get("called", [])]:
            if "ctime" in item:
                item["start_s"] = round(item.pop("ctime") - first, 1)
                item["end_s"] = round(item.pop("mtime") - first, 1)
    seconds = [entry["seconds"] for entry in ok]
    return {
        "mode": args.mode, "model": args.model, "formulas": formulas, "workers": args.workers,
        "max_concurrent": args.max_concurrent, "num_samples": args.num_samples, "protocol": "fast",
        "submitter_interval_s": args.interval, "job_poll_interval_s": 1.0, "timed_out": timed_out,
        "pseudo_family": family["label"] if args.mode == "dft" else None,
        "dft_cutoffs_ry": {"stringency": "low", "campaign": family["campaign"],
                           "per_composition": family["per_composition"]} if args.mode == "dft" else None,
        "kpoints_distance": args.kpoints_distance if args.mode == "dft" else None,
        "overrides": overrides,
        "compositions_total": len(formulas), "compositions_finished_ok": len(ok),
        "span_s": None if span is None else round(span, 1),
        "compositions_per_hour": None if not span or not ok else round(len(ok) / span * 3600, 2),
        "observed_wall_s": round(observed, 1),
        "composition_seconds": {"min": min(seconds), "median": round(statistics.median(seconds), 1),
                                "max": max(seconds), "mean": round(statistics.mean(seconds), 1)}
        if seconds else None,
        "states": {state: sum(entry["state"] == state for entry in collected["compositions"])
                   for state in sorted({entry["state"] for entry in collected["compositions"]})},
        "submitter_output": submitter_log.read_text().splitlines()[-12:],
        "compositions": collected["compositions"], "winners": collected["winners"],
        "settings": collected["settings"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_campaign.py", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["ml", "dft"], default="ml", help="ml: sample + CHGNet; dft: + pw.x on "
                        "the best candidate")
    parser.add_argument("--num-compositions", type=int, default=len(PEROVSKITES),
                        help=f"the first N of {', '.join(PEROVSKITES)}")
    parser.add_argument("--max-concurrent", type=int, default=2, help="work chains of the campaign active at once")
    parser.add_argument("--workers", type=int, default=2, help="daemon workers")
    parser.add_argument("--num-samples", type=int, default=8, help="candidates per composition (default 8)")
    parser.add_argument("--model", default="perov_5", help="shipped checkpoint (default perov_5)")
    parser.add_argument("--kpoints-distance", type=float, default=0.8, help="k-point spacing (1/Å) of --mode dft")
    parser.add_argument("--pw-executable", default=shutil.which("pw.x") or "/usr/bin/pw.x")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between two submitter passes")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between two looks at the campaign")
    parser.add_argument("--timeout", type=float, default=7200.0,
                        help="stop waiting after this many seconds; the report then says timed_out")
    parser.add_argument("--out", required=True, help="JSON report, e.g. benchmarks/results/campaign_ml.json")
    args = parser.parse_args()
    if not 1 <= args.num_compositions <= len(PEROVSKITES):
        parser.error(f"--num-compositions must be 1 to {len(PEROVSKITES)}")
    if args.max_concurrent < 1 or args.workers < 1:
        parser.error("--max-concurrent and --workers must be at least 1")
    if not (VENV_BIN / "verdi").is_file() or not (VENV_BIN / "equicsp").is_file():
        parser.error(f"run it with the virtual environment's python: no verdi/equicsp in {VENV_BIN}")
    if shutil.which("psql") is None or not _listening(PG_HOST, int(PG_PORT)):
        parser.error(f"needs psql and PostgreSQL on {PG_HOST}:{PG_PORT}")
    if not _listening(*RABBITMQ):
        parser.error(f"needs RabbitMQ on {RABBITMQ[0]}:{RABBITMQ[1]}")
    if args.mode == "dft" and not Path(args.pw_executable).is_file():
        parser.error(f"no pw.x at {args.pw_executable}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    report = {"command": "python benchmarks/bench_campaign.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    root = Path(tempfile.mkdtemp(prefix="equicsp-bench-campaign-"))
    profile, password = new_profile(root, "equicsp_bench")
    created: list[str] = []
    children: list[subprocess.Popen] = []
    try:
        create_bench_profile(profile, password, args.pw_executable, created)
        report.update(run_campaign(args, profile, root, children))
        report["machine"]["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    except BaseException:
        if "profile" in created:
            print(f"failed; daemon log:\n{daemon_log_tail(root)}", file=sys.stderr)
        raise
    finally:
        tear_down(profile, created, children)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['compositions_finished_ok']}/{report['compositions_total']} compositions finished ok in "
          f"{report['span_s']} s: {report['compositions_per_hour']} compositions/hour "
          f"(per composition {report['composition_seconds']}); wrote {args.out}")
    return 0 if report["compositions_finished_ok"] == report["compositions_total"] else 1


if __name__ == "__main__":
    sys.exit(main())

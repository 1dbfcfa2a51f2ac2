"""Soak: a campaign of 50+ compositions on the AiiDA daemon, the daemon killed with SIGKILL twice on the way.

Builds the throwaway PostgreSQL + RabbitMQ profile of the daemon tests (``tests/daemon/conftest.py``: own
``AIIDA_PATH``, database and role, ``localhost`` with ``core.direct``, the ``equicsp`` code of this virtual
environment), starts the daemon and runs ``aiida-equicsp campaign submit --wait`` over ``--num-compositions``
ABO3 compositions with the shipped ``perov_5`` model, ML relaxation only, tiny settings (2 candidates, 20
sampling steps, 20 CHGNet steps). When a third and again when two thirds of the compositions have terminated,
the daemon's circus arbiter and all its workers get SIGKILL at once (no chance to clean up: a power cut of the
daemon), and ``verdi daemon start`` brings it back after ``--down`` seconds. The submitter keeps running
throughout: it submits into RabbitMQ while no daemon listens. The machine's own RabbitMQ and PostgreSQL are
never touched.

Afterwards, read from the database:

- every composition has exactly one ``equicsp.predict_relax`` work chain (in the group or outside it) and it
  finished ok;
- no process of the profile is left in a non-terminal state (nothing stuck);
- nothing is duplicated: no process called two processes under the same link label, except a process
  function the kill interrupted, which AiiDA leaves ``running`` and the campaign's submitter closes as
  ``killed`` once the replayed step has called its twin (``aiida_equicsp.campaign``, "A daemon killed
  mid-step"; counted in ``interrupted_functions_closed``); every process of the profile is one of the
  campaign's work chains or called by one.

The report (``--out``, JSON) holds the counts, the kills, the restarts, the wall time and the list of anything
lost or duplicated (each must be empty). Everything is taken down at the end, on failure and Ctrl-C too
(``bench_campaign.tear_down``).

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak_campaign.py --num-compositions 50 \\
        --out benchmarks/results/soak_campaign.json

Needs ``psql``, PostgreSQL (trust authentication for the superuser) and RabbitMQ on 127.0.0.1:5672, like
the daemon tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from collections import Counter
from itertools import product
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_campaign import Interrupted, _on_signal, daemon_log_tail, machine, tear_down  # noqa: E402
from tests.daemon.conftest import (  # noqa: E402
    PG_HOST,
    PG_PORT,
    RABBITMQ,
    VENV_BIN,
    DaemonProfile,
    _listening,
    create_profile,
    new_profile,
)

#: ABO3 compositions, A and B cations the perov_5 model has seen; ``--num-compositions`` takes the first ones.
COMPOSITIONS = [f"{a}{b}O3" for a, b in product(("Sr", "Ba", "Ca", "Pb", "La", "Y", "Cd", "Mg"),
                                                ("Ti", "Zr", "Hf", "Sn", "Ge", "Mn", "V"))]
LABEL = "soak"
#: 2 candidates of 20 sampling steps, 20 CHGNet steps, the best one kept: the cheapest complete work chain.
OVERRIDES = {"num_samples": 2, "top_k": 1, "sample": {"parameters": {"steps": 20}},
             "relax": {"parameters": {"steps": 20}}}

#: Writes ``{"terminated": n, "queued": m}`` of the campaign to ``argv[1]`` every ``argv[2]`` seconds.
MONITOR = """
import json
import os
import sys
import time

from aiida_equicsp.campaign import campaign_status, load_campaign

path, interval = sys.argv[1], float(sys.argv[2])
terminal = ("finished", "excepted", "killed")
while True:
    try:
        statuses = campaign_status(load_campaign(%(label)r))
    except ValueError:  # the submitter has not created the campaign yet
        statuses = []
    progress = {"queued": len(statuses), "terminated": sum(s.state in terminal for s in statuses),
                "submitted": sum(s.pk is not None for s in statuses)}
    with open(path + ".tmp", "w") as handle:
        json.dump(progress, handle)
    os.replace(path + ".tmp", path)
    time.sleep(interval)
"""

#: Everything the checks need, as JSON: per predict-relax work chain its composition, state and group
#: membership; every process of the profile with its state, caller and the label of the link it was called by.
AUDIT = """
import json

from aiida import orm
from aiida.common.links import LinkType

from aiida_equicsp.campaign import PROCESS_TYPE, load_campaign

members = {node.pk for node in load_campaign(%(label)r).nodes}
chains = []
for node in orm.QueryBuilder().append(orm.WorkChainNode, filters={"process_type": PROCESS_TYPE}).all(flat=True):
    chains.append({"pk": node.pk, "composition": node.base.extras.get("equicsp_composition", node.label),
                   "state": node.process_state.value if node.process_state else None,
                   "exit_status": node.exit_status, "in_group": node.pk in members})
processes = []
for node in orm.QueryBuilder().append(orm.ProcessNode).all(flat=True):
    called_by = node.base.links.get_incoming(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).all()
    processes.append({"pk": node.pk, "label": node.process_label,
                      "state": node.process_state.value if node.process_state else None,
                      "caller": called_by[0].node.pk if called_by else None,
                      "status": node.process_status,
                      "link": called_by[0].link_label if called_by else None})
print(json.dumps({"chains": chains, "processes": processes}))
"""

TERMINAL = ("finished", "excepted", "killed")


def daemon_processes(profile: DaemonProfile) -> list[int]:
    """The pids of the daemon: its circus arbiter (from the pid file) and every process below it."""
    import psutil

    pid_files = list((profile.root / ".aiida").rglob(f"circus-{profile.name}.pid"))
    if not pid_files:
        return []
    arbiter = psutil.Process(int(pid_files[0].read_text().strip()))
    return [arbiter.pid, *(child.pid for child in arbiter.children(recursive=True))]


def kill_daemon(profile: DaemonProfile) -> list[int]:
    """SIGKILL to the arbiter and all its workers at once; returns their pids once they are gone."""
    import psutil

    pids = daemon_processes(profile)
    if not pids:
        raise RuntimeError("no daemon to kill: its pid file is missing")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=30)
    return pids


def read_progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"queued": 0, "terminated": 0, "submitted": 0}


def check(audit: dict, formulas: list[str]) -> dict:
    """What the soak must leave: one finished-ok work chain per composition, nothing stuck, nothing twice."""
    by_composition: dict[str, list[dict]] = {}
    for chain in audit["chains"]:
        by_composition.setdefault(chain["composition"], []).append(chain)
    lost = [f for f in formulas if not any(c["state"] == "finished" and c["exit_status"] == 0
                                           for c in by_composition.get(f, []))]
    repeated = {f: [c["pk"] for c in chains] for f, chains in by_composition.items() if len(chains) != 1}
    outside = sorted(set(by_composition) - set(formulas))
    not_in_group = [c["pk"] for c in audit["chains"] if not c["in_group"]]
    stuck = [p for p in audit["processes"] if p["state"] not in TERMINAL]
    closed = [p["pk"] for p in audit["processes"] if p["state"] == "killed"
              and (p["status"] or "").startswith("its daemon worker died while it ran")]
    calls = Counter((p["caller"], p["link"]) for p in audit["processes"]
                    if p["caller"] is not None and p["pk"] not in closed)
    duplicated_calls = [{"caller": caller, "link": link, "times": times}
                        for (caller, link), times in calls.items() if times > 1]
    retried = sorted(p["pk"] for p in audit["processes"] if (p["link"] or "").startswith("iteration_")
                     and p["link"] != "iteration_01")
    chain_pks = {c["pk"] for c in audit["chains"]}
    by_pk = {p["pk"]: p for p in audit["processes"]}

    def top(pk: int) -> int:
        while by_pk[pk]["caller"] is not None:
            pk = by_pk[pk]["caller"]
        return pk

    strays = [p["pk"] for p in audit["processes"] if top(p["pk"]) not in chain_pks]
    return {"lost": lost, "repeated_work_chains": repeated, "unknown_compositions": outside,
            "work_chains_outside_group": not_in_group, "stuck_processes": stuck,
            "duplicated_calls": duplicated_calls, "interrupted_functions_closed": closed, "stray_processes": strays, "retried_calculations": retried,
            "calls_by_link": dict(Counter(p["link"] or "campaign" for p in audit["processes"])),
            "processes": len(audit["processes"]), "work_chains": len(audit["chains"])}


def run_soak(args: argparse.Namespace, profile: DaemonProfile, root: Path, children: list) -> dict:
    formulas = COMPOSITIONS[:args.num_compositions]
    overrides_file = root / "overrides.yaml"
    overrides_file.write_text(yaml.safe_dump(OVERRIDES))
    profile.verdi("daemon", "start", str(args.workers))
    command = [str(VENV_BIN / "aiida-equicsp"), "--profile", profile.name, "campaign", "submit", LABEL,
               "--code", "equicsp@localhost", "--model", "perov_5", "--protocol", "fast",
               "--max-concurrent", str(args.max_concurrent), "--overrides", str(overrides_file),
               "--wait", "--interval", "5", *(arg for f in formulas for arg in ("--formula", f))]
    submitter_log = root / "submitter.log"
    started = time.time()
    with submitter_log.open("w") as log:
        children.append(subprocess.Popen(command, env=profile.env, cwd=root, stdout=log, stderr=subprocess.STDOUT))
    submitter = children[-1]
    progress_file = root / "progress.json"
    preamble = f"from aiida import load_profile\nload_profile({profile.name!r})\n"
    children.append(subprocess.Popen([sys.executable, "-c", preamble + MONITOR % {"label": LABEL},
                                      str(progress_file), "10"], env=profile.env, cwd=root))
    kills, restarts = [], 0
    thresholds = [len(formulas) // 3, 2 * len(formulas) // 3]
    deadline = started + args.timeout
    last = None
    while True:
        progress = read_progress(progress_file)
        if progress != last:
            print(f"  {time.strftime('%H:%M:%S')} {progress}", flush=True)
            last = progress
        if progress["queued"] == len(formulas) and progress["terminated"] == len(formulas):
            break
        if submitter.poll() not in (None, 0):
            raise RuntimeError(f"the submitter exited {submitter.returncode}:\n{submitter_log.read_text()}")
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {args.timeout} s at {progress}")
        if thresholds and progress["terminated"] >= thresholds[0]:
            thresholds.pop(0)
            pids = kill_daemon(profile)
            kills.append({"at_s": round(time.time() - started, 1), "terminated_before": progress["terminated"],
                          "pids": pids})
            print(f"  SIGKILL to the daemon (pids {pids}) with {progress['terminated']} terminated", flush=True)
            time.sleep(args.down)
            profile.verdi("daemon", "start", str(args.workers))
            restarts += 1
            print("  daemon restarted", flush=True)
        time.sleep(5)
    wall = time.time() - started
    submitter.wait(timeout=120)
    # The user's next `campaign submit` (nothing left to submit) closes what a kill after the last submission
    # left behind (see aiida_equicsp.campaign, "A daemon killed mid-step").
    final_pass = profile.aiida_equicsp("campaign", "submit", LABEL, "--code", "equicsp@localhost").stdout
    audit = json.loads(profile.python(AUDIT % {"label": LABEL}, timeout=600).strip().splitlines()[-1])
    return {"compositions": len(formulas), "formulas": formulas, "overrides": OVERRIDES, "model": "perov_5",
            "workers": args.workers, "max_concurrent": args.max_concurrent, "kills": kills,
            "daemon_restarts": restarts, "daemon_down_s": args.down, "wall_s": round(wall, 1),
            "submitter_output_tail": submitter_log.read_text().splitlines()[-5:],
            "final_pass": final_pass.strip().splitlines()[-1:], **check(audit, formulas)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/soak_campaign.py", description=__doc__.split("\n")[0])
    parser.add_argument("--num-compositions", type=int, default=50, help=f"1 to {len(COMPOSITIONS)}")
    parser.add_argument("--max-concurrent", type=int, default=3, help="work chains of the campaign active at once")
    parser.add_argument("--workers", type=int, default=2, help="daemon workers")
    parser.add_argument("--down", type=float, default=20.0, help="seconds the daemon stays dead after a kill")
    parser.add_argument("--timeout", type=float, default=7200.0, help="give up after this many seconds")
    parser.add_argument("--out", required=True, help="JSON report, e.g. benchmarks/results/soak_campaign.json")
    args = parser.parse_args()
    if not 3 <= args.num_compositions <= len(COMPOSITIONS):
        parser.error(f"--num-compositions must be 3 to {len(COMPOSITIONS)}")
    if missing := [name for name in ("verdi", "equicsp", "aiida-equicsp") if not (VENV_BIN / name).is_file()]:
        parser.error(f"run it with the virtual environment's python: no {', '.join(missing)} in {VENV_BIN}")
    if not _listening(PG_HOST, int(PG_PORT)) or not _listening(*RABBITMQ):
        parser.error(f"needs PostgreSQL on {PG_HOST}:{PG_PORT} and RabbitMQ on {RABBITMQ[0]}:{RABBITMQ[1]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".check").write_text("")  # --out must be writable before an hour of work
    out.with_name(out.name + ".check").unlink()

    signal.signal(signal.SIGTERM, _on_signal)
    root = Path(tempfile.mkdtemp(prefix="equicsp-soak-"))
    profile, password = new_profile(root, "equicsp_soak")
    created: list[str] = []
    children: list[subprocess.Popen] = []
    report = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    try:
        create_profile(profile, password, created)
        report.update(run_soak(args, profile, root, children))
    except (Exception, Interrupted) as error:
        print(f"soak failed: {error}\n--- daemon log ---\n{daemon_log_tail(root)}", file=sys.stderr)
        raise
    finally:
        tear_down(profile, created, children)
    out.write_text(json.dumps(report, indent=1) + "\n")
    bad = {key: report[key] for key in ("lost", "repeated_work_chains", "unknown_compositions",
                                        "work_chains_outside_group", "stuck_processes",
                                        "duplicated_calls", "stray_processes") if report[key]}
    print(f"{report['compositions']} compositions, {len(report['kills'])} SIGKILLs, {report['daemon_restarts']} "
          f"restarts, {report['wall_s']} s; problems: {bad or 'none'} -> {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

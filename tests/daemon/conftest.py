"""A throwaway production profile for daemon tests: PostgreSQL, RabbitMQ and an AiiDA daemon, all through subprocesses.

The tests of ``tests/aiida`` load aiida-core's temporary SQLite profile into the pytest process. A daemon test
must not touch it, so nothing here imports a profile: every ``verdi``, ``aiida-equicsp`` and Python call runs
in a subprocess whose ``AIIDA_PATH`` is a temporary folder of this module's own. The fixture builds the profile
the way docs/aiida.md tells a user to (database and role with ``psql``, ``verdi profile setup core.psql_dos``, a
localhost computer, the ``equicsp`` code) and takes all of it down again, on failure too: daemon, RabbitMQ
queue and exchanges, profile, database and role.

``verdi presto --use-postgres`` is not used: it creates the database with the server's default locale
(``en_US.UTF-8``), which a server with only ``C.UTF-8`` refuses.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The virtual environment's executables (verdi, aiida-equicsp, equicsp): on the daemon's PATH too.
VENV_BIN = Path(sys.executable).parent
#: Where PostgreSQL and RabbitMQ listen (overridable for another machine).
PG_HOST, PG_PORT = os.environ.get("EQUICSP_TEST_PGHOST", "127.0.0.1"), os.environ.get("EQUICSP_TEST_PGPORT", "5432")
PG_SUPERUSER = os.environ.get("EQUICSP_TEST_PGUSER", "postgres")
RABBITMQ = ("127.0.0.1", 5672)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def psql(sql: str) -> None:
    """Run one SQL statement as the PostgreSQL superuser (trust authentication)."""
    subprocess.run(["psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_SUPERUSER, "-d", "postgres", "-v",
                    "ON_ERROR_STOP=1", "-q", "-c", sql], check=True, capture_output=True, text=True, timeout=60)


@dataclass
class DaemonProfile:
    """A profile of its own ``AIIDA_PATH``; commands run in subprocesses with :attr:`env`."""

    name: str
    root: Path
    env: dict[str, str]

    def run(self, *command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command with the profile's environment; on ``check`` a failure shows its output."""
        result = subprocess.run(command, env=self.env, cwd=self.root, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def verdi(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(VENV_BIN / "verdi"), "-p", self.name, *args, **kwargs)

    def aiida_equicsp(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(VENV_BIN / "aiida-equicsp"), "--profile", self.name, *args, **kwargs)

    def python(self, code: str, **kwargs) -> str:
        """Run Python ``code`` with the profile loaded; returns its standard output."""
        preamble = f"from aiida import load_profile\nload_profile({self.name!r})\n"
        return self.run(sys.executable, "-c", preamble + textwrap.dedent(code), **kwargs).stdout


#: Deletes the profile's RabbitMQ launch queue and exchanges: they are durable and outlive the profile.
DELETE_BROKER_OBJECTS = """
import asyncio

import aio_pika
from aiida.brokers.rabbitmq.broker import RabbitmqBroker
from aiida.brokers.rabbitmq.utils import get_launch_queue_name, get_message_exchange_name, get_task_exchange_name
from aiida.manage import get_manager

profile = get_manager().get_profile()
prefix = f"aiida-{profile.uuid}"


async def main():
    connection = await aio_pika.connect(RabbitmqBroker(profile).get_url())
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(get_launch_queue_name(prefix))
        for exchange in (get_message_exchange_name(prefix), get_task_exchange_name(prefix)):
            await channel.exchange_delete(exchange)


asyncio.run(main())
"""

#: The computer polls its jobs every second (default 10 s): the test waits on them.
FAST_POLLING = """
from aiida import orm

orm.load_computer("localhost").set_minimum_job_poll_interval(1.0)
"""


def stop_daemon(profile: DaemonProfile) -> None:
    """``verdi daemon stop``; if that fails, SIGTERM to the circus arbiter of the pid file (it stops its workers)."""
    if profile.verdi("daemon", "stop", check=False, timeout=120).returncode == 0:
        return
    for pid_file in (profile.root / ".aiida").rglob(f"circus-{profile.name}.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass


def new_profile(root: Path, prefix: str) -> tuple[DaemonProfile, str]:
    """A profile object (nothing created yet) of its own name and ``AIIDA_PATH``, and its database password."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIIDA_")}
    env.update(AIIDA_PATH=str(root), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return DaemonProfile(name, root, env), secrets.token_hex(8)


def create_profile(profile: DaemonProfile, password: str, created: list[str]) -> None:
    """Role, database and profile of ``profile`` (PostgreSQL + RabbitMQ), localhost and the ``equicsp`` code.

    ``created`` collects what exists so far ("role", "database", "profile"), for the caller's teardown.
    """
    name, root = profile.name, profile.root
    psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    created.append("role")
    psql(f"CREATE DATABASE {name} OWNER {name} ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' "
         "TEMPLATE template0")
    created.append("database")
    profile.run(str(VENV_BIN / "verdi"), "profile", "setup", "core.psql_dos", "--non-interactive",
                "--profile-name", name, "--set-as-default", "--email", "campaign@example.org",
                "--first-name", "Campaign", "--last-name", "Test", "--institution", "aiida-equicsp",
                "--database-hostname", PG_HOST, "--database-port", PG_PORT, "--database-username", name,
                "--database-password", password, "--database-name", name,
                "--repository-uri", f"file://{root / 'repository'}", "--broker", "core.rabbitmq")
    created.append("profile")
    profile.verdi("config", "set", "warnings.rabbitmq_version", "False")
    # The daemon answers its controller within 2 s by default: too short on a machine busy with jobs.
    profile.verdi("config", "set", "daemon.timeout", "30")
    profile.verdi("computer", "setup", "--non-interactive", "--label", "localhost", "--hostname", "localhost",
                  "--transport", "core.local", "--scheduler", "core.direct", "--work-dir", str(root / "work"),
                  "--mpiprocs-per-machine", "1", "--prepend-text", "export OMP_NUM_THREADS=1")
    profile.verdi("computer", "configure", "core.local", "localhost", "--non-interactive", "--safe-interval", "0")
    profile.python(FAST_POLLING)
    profile.verdi("code", "create", "core.code.installed", "--non-interactive", "--label", "equicsp",
                  "--computer", "localhost", "--filepath-executable", str(VENV_BIN / "equicsp"),
                  "--default-calc-job-plugin", "equicsp.sample")


def require_services() -> None:
    """Skip when PostgreSQL (with ``psql``) or RabbitMQ is not there; with ``CI=true`` fail instead: the
    project's machines run both, so a green CI run must have exercised the daemon."""
    missing = []
    if shutil.which("psql") is None or not _listening(PG_HOST, int(PG_PORT)):
        missing.append(f"psql and PostgreSQL on {PG_HOST}:{PG_PORT}")
    if not _listening(*RABBITMQ):
        missing.append(f"RabbitMQ on {RABBITMQ[0]}:{RABBITMQ[1]}")
    if not missing:
        return
    reason = f"needs {' and '.join(missing)}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; with CI=true the daemon tests must run, not skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def daemon_profile(tmp_path_factory):
    """A PostgreSQL + RabbitMQ profile with a configured localhost and the ``equicsp`` code; deleted afterwards."""
    require_services()
    profile, password = new_profile(tmp_path_factory.mktemp("aiida-daemon"), "equicsp_daemon")
    name = profile.name
    created: list[str] = []
    try:
        create_profile(profile, password, created)
        yield profile
    finally:
        if "profile" in created:
            stop_daemon(profile)
            profile.python(DELETE_BROKER_OBJECTS, check=False, timeout=60)
            profile.verdi("profile", "delete", "--force", "--delete-data", name, check=False, timeout=120)
        if "database" in created:
            psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if "role" in created:
            psql(f"DROP ROLE IF EXISTS {name}")

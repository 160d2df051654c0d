"""A throwaway PostgreSQL cluster on loopback for tests, from the distribution's server binaries.

`initdb` refuses to run as root, so under root the cluster belongs to the `postgres` user (which the Debian
package creates) and every server command runs through `runuser`. The cluster lives in a temporary folder,
listens on 127.0.0.1 only, on a free port, and is removed when the test session ends. Passwords are
required over TCP (scram-sha-256), so the URLs the tests use carry a real secret.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "pg-Secret-4711"  # the tests check that this string never reaches logs, params or the catalog


def server_bin() -> Path | None:
    """The newest installed `/usr/lib/postgresql/<version>/bin` that has initdb and pg_ctl, or None."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    found = [b for b in found if (b / "pg_ctl").is_file()]
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


# The settings that put a home's catalog and MLflow store elsewhere than its SQLite files.
DATABASE_ENV = ("FEATUREATLAS_CATALOG_URL", "FEATUREATLAS_MLFLOW_TRACKING_URI")


def fresh_database_env(cluster: Cluster) -> dict[str, str]:
    """DATABASE_ENV pointing at two new, empty databases of `cluster`."""
    return {name: cluster.url(cluster.create_database()) for name in DATABASE_ENV}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    bin: Path
    data: Path
    port: int
    user_prefix: list[str]
    options: str

    def url(self, database: str = "postgres", driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database; returns its name."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        dsn = f"host=127.0.0.1 port={self.port} user=postgres password={PASSWORD} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def start(self) -> None:
        log = self.data.parent / "log"
        done = subprocess.run(
            [
                *self.user_prefix,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(log),
                "-o",
                self.options,
                "-w",
                "-t",
                "120",
                "start",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{text}")

    def stop(self) -> None:
        subprocess.run(
            [
                *self.user_prefix,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],  # fmt: skip
            capture_output=True,
            timeout=60,
        )


def start_cluster() -> Cluster:
    """initdb + pg_ctl start in a fresh temporary folder; raises with the server's own output on failure."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="featureatlas-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    root.chmod(0o700)
    data, sock = root / "data", root / "sock"
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if prefix:
        shutil.chown(pwfile, "postgres")
    run = [*prefix]
    subprocess.run([*run, "mkdir", "-m", "700", str(sock)], check=True, capture_output=True, timeout=30)
    init = subprocess.run(
        [
            *run,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    port = free_port()
    opts = f"-h 127.0.0.1 -p {port} -k {sock} -F -c max_connections=100"
    cluster = Cluster(bin=bin_dir, data=data, port=port, user_prefix=prefix, options=opts)
    cluster.start()
    return cluster


def remove_cluster(cluster: Cluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.data.parent, ignore_errors=True)

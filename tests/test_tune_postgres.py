"""Two `catdog tune` workers at once on one study in a real PostgreSQL server (a throwaway cluster).

The cluster is made with the server's own tools (initdb, pg_ctl) in a temporary folder and listens on a free
loopback port; it is stopped and removed afterwards. initdb refuses to run as root, so under root the cluster
belongs to `nobody`. The test skips, saying why, where no PostgreSQL server binaries are installed (`make test`
installs Debian's `postgresql` when run as root).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_kaggle_folder

pytestmark = pytest.mark.slow

TRIALS_PER_WORKER = 4


def postgres_bin_dir() -> Path | None:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True) + [shutil.which("initdb") or ""]:
        if initdb and Path(initdb).is_file() and (Path(initdb).parent / "pg_ctl").is_file():
            return Path(initdb).parent
    return None


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url():
    """postgresql:// URL of a fresh cluster, removed when the test ends."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql (make test does, as root)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root and runuser is missing, so initdb (which refuses root) cannot run as nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    folder = Path(tempfile.mkdtemp(prefix="catdog-postgres-"))
    if as_user:
        shutil.chown(folder, "nobody")
    data, port = folder / "data", free_loopback_port()
    run = lambda *command: subprocess.run([*as_user, *map(str, command)], capture_output=True, text=True, timeout=120)
    try:
        made = run(bin_dir / "initdb", "-D", data, "-U", "catdog", "--auth=trust", "--no-sync")
        if made.returncode:
            pytest.skip(f"initdb failed, so no throwaway PostgreSQL cluster: {made.stderr.strip()[-300:]}")
        started = run(bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "start", "-o",
                      f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off")
        if started.returncode:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else started.stderr
            pytest.skip(f"the throwaway PostgreSQL server did not start: {log.strip()[-300:]}")
        yield f"postgresql://catdog@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_in_postgresql(tmp_path, postgres_url):
    import optuna

    from catdog.training.tune import TuneConfig, run_tuning

    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    # Fill the feature cache first (the workers inherit it through CATDOG_CACHE), so the workers' time goes to trials.
    run_tuning(TuneConfig(data=str(data), out=str(tmp_path / "warm"), preset="fast", trials=1, max_epochs=2, progress=False),
               log=lambda _: None)
    command = [sys.executable, "-m", "catdog.cli", "tune", "--data", str(data), "--preset", "fast", "--storage",
               postgres_url, "--study", "shared", "--trials", str(TRIALS_PER_WORKER), "--max-epochs", "4", "--no-progress"]
    workers = [subprocess.Popen([*command, "--out", str(tmp_path / f"worker-{index}")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=os.environ.copy()) for index in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output

    trials = optuna.load_study(study_name="shared", storage=postgres_url.replace("postgresql://", "postgresql+psycopg://")).trials
    assert len(trials) == 2 * TRIALS_PER_WORKER
    assert sorted(trial.number for trial in trials) == list(range(2 * TRIALS_PER_WORKER))  # no duplicates, no gaps
    assert len({trial._trial_id for trial in trials}) == 2 * TRIALS_PER_WORKER
    by_worker = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(trial.number)
    assert sorted(len(numbers) for numbers in by_worker.values()) == [TRIALS_PER_WORKER, TRIALS_PER_WORKER]
    assert {worker.pid for worker in workers} == {int(name.rsplit(":", 1)[1]) for name in by_worker}
    assert all(trial.state.is_finished() for trial in trials)
    # Workers started together draw different parameters (their samplers are seeded apart).
    assert len({trial.params["lr"] for trial in trials}) == 2 * TRIALS_PER_WORKER
    # Each worker's report covers the whole study as it stood when it finished; the later one saw all trials.
    reports = [json.loads((tmp_path / f"worker-{index}" / "study.json").read_text()) for index in range(2)]
    assert max(report["trials"] for report in reports) == 2 * TRIALS_PER_WORKER

"""Sharing artifacts, end to end: `dvc push` to the shipped default remote (a folder beside the
clone) and to a real OpenSSH server on loopback, `dvc pull` into a second clone, and a `dvc push`
killed mid-way that the next `dvc push` completes.

The SSH server is Debian's `openssh-server` (installed with apt-get when missing), run by the
test on a free loopback port with its own config, host key and a throwaway client key.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    BRANCH,
    cached_outputs,
    command_env,
    commit_all,
    dvc,
    dvc_ok,
    fresh_copy,
    git,
    ran_stages,
    tiny_project,
    tree_digest,
)

pytestmark = pytest.mark.slow

DEFAULT_REMOTE = "storage"  # shipped in .dvc/config: ../lorapipe-storage, beside the clone


# --- an OpenSSH server on loopback ------------------------------------------------------------


@dataclass(frozen=True)
class SshServer:
    process: subprocess.Popen[bytes]
    port: int
    user: str
    keyfile: Path  # the client's private key
    root: Path  # config, keys, log; remotes go under root/"srv"
    log: Path

    def url(self, name: str) -> str:
        """A remote URL as it goes into .dvc/config: host and path, no credentials."""
        return f"ssh://127.0.0.1{self.root / 'srv' / name}"

    def credentials(self) -> dict[str, str]:
        """What goes into .dvc/config.local only."""
        return {"port": str(self.port), "user": self.user, "keyfile": str(self.keyfile)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def find_sshd() -> str | None:
    candidates = [shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def sshd_binary() -> str:
    """The sshd binary; Debian's openssh-server is installed with apt-get when missing."""
    found = find_sshd()
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("no sshd, and no apt-get to install openssh-server with")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        pytest.skip("no sshd; installing openssh-server needs root or sudo")
    apt = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y"]
    for step in (["update"], ["install", "--no-install-recommends", "openssh-server"]):
        done = subprocess.run([*apt, *step], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            pytest.skip(f"cannot install openssh-server (apt-get {step[0]}): {' / '.join(tail)}")
    found = find_sshd()
    assert found, "apt-get installed openssh-server, yet no sshd binary is found"
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_sshd(root: Path) -> SshServer:
    """sshd on a free loopback port, key-only, for the current user; stop() it when done."""
    sshd = sshd_binary()
    (root / "srv").mkdir(parents=True, exist_ok=True)
    host_key, client_key = root / "host_ed25519", root / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lorapipe-test", "-f", str(key)],
            check=True,
        )
    authorized = root / "authorized_keys"
    shutil.copy(f"{client_key}.pub", authorized)
    if os.geteuid() == 0:
        # As root, sshd insists on its privilege separation directory (systemd usually makes it).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    user, port = getpass.getuser(), free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        f"AllowUsers {user}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "StrictModes no\n"  # the keys live in a temp folder others may read
        "UsePAM no\n"
        "Subsystem sftp internal-sftp\n"
    )
    checked = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, f"{config} is not a valid sshd config: {checked.stderr}"
    log = root / "sshd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    server = SshServer(process, port, user, client_key, root, log)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"sshd did not start on port {port}:\n{log.read_text()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


def configure_credentials(
    project: Path, server: SshServer, name: str, keys: list[str] | None = None
) -> None:
    """`dvc remote modify --local` for each credential (or the named ones)."""
    for key, value in server.credentials().items():
        if keys is None or key in keys:
            dvc_ok(project, "remote", "modify", "--local", name, key, value)


def add_ssh_remote(project: Path, server: SshServer, name: str) -> None:
    """`dvc remote add` (URL in .dvc/config) + `dvc remote modify --local` (credentials)."""
    dvc_ok(project, "remote", "add", name, server.url(name))
    configure_credentials(project, server, name)


# --- a pipeline run to share ------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    project: Path
    origin: Path  # a bare git repository: the team's git remote


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Shared:
    """A tiny pipeline run, committed and pushed to a bare git remote (not yet `dvc push`ed)."""
    root = tmp_path_factory.mktemp("sharing")
    project = tiny_project(root / "lorapipe", tiny_model_dir)
    dvc_ok(project, "repro")
    commit_all(project, "pipeline run")
    origin = root / "origin.git"
    git(root, "init", "-q", "--bare", "-b", BRANCH, str(origin))
    git(project, "remote", "add", "origin", str(origin))
    git(project, "push", "-q", "origin", BRANCH)
    return Shared(project, origin)


def clone(origin: Path, dest: Path) -> Path:
    git(dest.parent, "clone", "-q", str(origin), dest.name)
    return dest


# Outputs holding raw text: `push: false` in dvc.yaml, so no remote has them.
RAW_TEXT = ("data/preprocessed", "data/split")


def assert_same_outputs(got: Path, want: Path, skip: tuple[str, ...] = ()) -> None:
    for out in (o for o in cached_outputs() if o not in skip):
        assert (got / out).exists(), f"{out} was not pulled"
        assert tree_digest(got / out) == tree_digest(want / out), f"{out} differs"


# --- the flows --------------------------------------------------------------------------------


def test_push_to_the_default_remote_then_pull_needs_no_rerun(shared: Shared) -> None:
    """Flow 7: `dvc push` to the shipped default remote; a second clone `dvc pull`s the data and
    models (metrics come with git) and its `dvc repro` remakes only the raw-text data folders
    that are never pushed (`push: false`: their PII is not yet redacted)."""
    project = shared.project
    storage = project.parent / "lorapipe-storage"
    remotes = dvc_ok(project, "remote", "list").stdout
    assert re.search(rf"^{DEFAULT_REMOTE}\s+{re.escape(str(storage))}\s+\(default\)", remotes, re.M)

    start = time.monotonic()
    dvc_ok(project, "push")
    print(f"dvc push: {time.monotonic() - start:.1f} s")
    in_sync = dvc_ok(project, "status", "--cloud").stdout
    assert f"Cache and remote '{DEFAULT_REMOTE}' are in sync." in in_sync
    assert any(storage.joinpath("files", "md5").rglob("*.dir"))

    other = clone(shared.origin, project.parent / "teammate")
    assert not (other / "models" / "adapters").exists()
    start = time.monotonic()
    plain = dvc(other, "pull")
    assert plain.returncode != 0 and "data/preprocessed" in plain.stderr  # not on the remote
    dvc_ok(other, "pull", "--allow-missing")
    print(f"dvc pull: {time.monotonic() - start:.1f} s")
    assert_same_outputs(other, project, skip=RAW_TEXT)
    for metrics in ("train.json", "eval/tuned.json"):
        assert (other / "metrics" / metrics).read_bytes() == (
            project / "metrics" / metrics
        ).read_bytes()
    again = dvc_ok(other, "repro")
    assert ran_stages(again) == ["preprocess", "split"]  # the rest: "didn't change, skipping"
    assert_same_outputs(other, project)
    assert "Data and pipelines are up to date." in dvc_ok(other, "repro").stdout


def test_ssh_remote_with_credentials_in_config_local_only(shared: Shared, sshd: SshServer) -> None:
    """Flow 7 over a real SSH server: the remote's URL is shared through git, the port, user and
    key stay in each clone's .dvc/config.local; push, pull elsewhere, same bytes."""
    project = shared.project
    add_ssh_remote(project, sshd, "ssh")
    config = (project / ".dvc" / "config").read_text()
    local = (project / ".dvc" / "config.local").read_text()
    assert sshd.url("ssh") in config
    for key, value in sshd.credentials().items():
        assert f"{key} = {value}" in local
        assert not re.search(rf"^\s*{key}\s*=", config, re.M), config
    git(project, "add", ".dvc/config")
    git(project, "commit", "-q", "-m", "ssh remote")
    git(project, "push", "-q", "origin", BRANCH)
    # config.local is ignored by git, and no commit ever held a credential.
    assert git(project, "check-ignore", ".dvc/config.local").strip() == ".dvc/config.local"
    history = git(project, "log", "--all", "-p")
    assert str(sshd.keyfile) not in history
    assert sshd.keyfile.read_text().splitlines()[1] not in history  # the private key itself
    dvc_history = git(project, "log", "--all", "-p", "--", ".dvc")
    assert not re.search(r"^\+\s*(keyfile|port|user|password)\s*=", dvc_history, re.M)

    start = time.monotonic()
    dvc_ok(project, "push", "-r", "ssh")
    print(f"dvc push -r ssh: {time.monotonic() - start:.1f} s")
    assert "are in sync" in dvc_ok(project, "status", "--cloud", "-r", "ssh").stdout

    other = clone(shared.origin, project.parent / "ssh-teammate")
    configure_credentials(other, sshd, "ssh", ["port", "user"])
    # The key is not in git: until this clone is given one, the server turns it away. (An
    # empty HOME keeps the client from trying, or asking passphrases for, the user's own keys.)
    home = project.parent / "empty-home"
    home.mkdir()
    pulled = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "-r", "ssh"],
        cwd=other,
        env={**command_env(), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pulled.returncode != 0
    assert "Permission denied" in pulled.stderr, pulled.stderr
    configure_credentials(other, sshd, "ssh", ["keyfile"])
    start = time.monotonic()
    dvc_ok(other, "pull", "-r", "ssh", "--allow-missing")
    print(f"dvc pull -r ssh: {time.monotonic() - start:.1f} s")
    assert_same_outputs(other, project, skip=RAW_TEXT)
    assert ran_stages(dvc_ok(other, "repro")) == ["preprocess", "split"]
    assert "Data and pipelines are up to date." in dvc_ok(other, "status").stdout


# --- an interrupted push ----------------------------------------------------------------------


def write_payload(folder: Path, files: int, size: int) -> dict[str, str]:
    """Random files (incompressible, all distinct); their sha256 by name."""
    folder.mkdir(parents=True)
    digests = {}
    for i in range(files):
        data = os.urandom(size)
        (folder / f"part-{i:04d}.bin").write_bytes(data)
        digests[f"part-{i:04d}.bin"] = hashlib.sha256(data).hexdigest()
    return digests


def objects_in(storage: Path) -> list[Path]:
    return [p for p in storage.rglob("*") if p.is_file()] if storage.exists() else []


def kill_push_midway(project: Path, push_args: list[str], storage: Path, total: int) -> None:
    """Start `dvc push`, SIGKILL it once files have started arriving in the remote."""
    log = project.parent / "killed-push.log"
    with log.open("w") as out:
        push = subprocess.Popen(
            [sys.executable, "-m", "dvc", "push", *push_args],
            cwd=project,
            env=command_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not objects_in(storage / "files"):
            assert push.poll() is None, f"the push ended before any transfer:\n{log.read_text()}"
            assert time.monotonic() < deadline, "nothing reached the remote in 120 s"
            time.sleep(0.005)
        assert push.poll() is None, "the push finished before it could be killed"
        push.send_signal(signal.SIGKILL)
    finally:
        if push.poll() is None:
            push.kill()
        push.wait()
    assert push.returncode == -signal.SIGKILL
    arrived = len(objects_in(storage / "files"))
    assert arrived < total, f"{arrived} of {total} objects: the push was not cut short"


@pytest.mark.parametrize("kind", ["default", "ssh"])
def test_an_interrupted_push_is_completed_by_the_next_one(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Flow 8: `dvc push` killed mid-way (SIGKILL, no chance to clean up), then `dvc push` again:
    another clone's `dvc pull` gets complete files."""
    project = fresh_copy(tmp_path / "lorapipe")
    digests = write_payload(project / "data" / "payload", files=64, size=2 * 1024 * 1024)
    dvc_ok(project, "add", "data/payload")
    commit_all(project, "payload")
    if kind == "default":
        # The shipped default remote, pointed elsewhere for this clone only.
        remote, storage = DEFAULT_REMOTE, tmp_path / "nas" / "lorapipe"
        dvc_ok(project, "remote", "modify", "--local", remote, "url", str(storage))
        args = ["data/payload"]
    else:
        server: SshServer = request.getfixturevalue("sshd")
        remote = f"ssh-{tmp_path.name}"
        add_ssh_remote(project, server, remote)
        storage = server.root / "srv" / remote
        commit_all(project, "ssh remote")
        args = ["-r", remote, "data/payload"]
    # (The copy's dvc.lock names the reference run's outputs, which no cache here holds: push
    # and pull the payload by name.)

    kill_push_midway(project, args, storage, total=len(digests) + 1)
    dvc_ok(project, "push", *args)
    assert "are in sync" in dvc_ok(project, "status", "--cloud", *args).stdout

    other = clone(project, tmp_path / "elsewhere")
    if kind == "default":
        dvc_ok(other, "remote", "modify", "--local", remote, "url", str(storage))
    else:
        configure_credentials(other, request.getfixturevalue("sshd"), remote)
    dvc_ok(other, "pull", *args)
    got = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (other / "data" / "payload").iterdir()
    }
    assert got == digests

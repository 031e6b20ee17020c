"""Rehearse cluster.yaml's node commands for real: `ray up` on Ray's on-prem provider, over SSH to this machine.

    flock /tmp/flat-ray-ray.lock .venv/bin/python scripts/cluster_rehearsal.py [--cluster-yaml PATH] [--logs DIR]

Run it as root, alone with Ray: `ray up` runs `ray stop` (scripts/node/head_start.sh) and so does `ray down`, and
`ray stop` ends every Ray on the machine (hence the lock where others run Ray; scripts/test.sh runs it last).

What it sets up, and removes at the end (it stops only processes it started):
- Debian's openssh-server, rsync, socat and nfs-common, installed with apt when missing (the last two stand in for
  an image that has them, so scripts/node/setup.sh skips apt); these stay installed;
- a temporary folder (on /dev/shm where it has room: scratch_folder) holding everything else: an ed25519 key made
  for the run; an sshd of its own (its own config and host key, ListenAddress 127.0.0.1, port 22: Ray's SSH runner
  always uses port 22); a copy of the checkout's files that `ray up` runs from (copy_checkout: from the repository
  itself Ray would hash all of .venv on every `ray up`); the node's home; the stand-in for the shared storage;
- a temporary user, an alias of root (uid 0, so no sudo is needed) whose home is that folder's `home/`, so the
  node's `~/venv`, `~/flat-ray`, `~/mlflow` and `~/ray_bootstrap_config.yaml` land there. Its ~/.bashrc and
  ~/.profile are Debian's /etc/skel ones (as on an Ubuntu image) after one line that stands in for the image: this
  interpreter's bin folder first on PATH (an image with Python 3.11) and PIP_COMPILE=0 (no byte-compiling of the
  node's venv at install: about 25 s here; its modules compile when first imported). Its pip configuration and
  cache are root's (symlinks), so the node install uses the same package indexes and the wheels built for .venv.

The rehearsal config is cluster.yaml with its provider (`local`, head_ip 127.0.0.1, no worker ips), auth (that user
and key), node types (the local provider allows none: it makes its own), max_workers (0) and cluster name
(`<name>-rehearsal`) replaced; file_mounts, rsync settings and every command list are kept, with only these site
values substituted, in the commands and in the README's sweep line:
- the SOURCE of scripts/node/mount_shared.sh becomes `none` (no NFS here: the folder is the same storage for every
  process of this one machine);
- its MOUNTPOINT (/shared) becomes the temporary folder's `shared/`, so nothing is written outside that folder;
- `/home/<cluster.yaml's ssh_user>` becomes the temporary home (today's commands have none; older ones did).

Then it checks, and exits 1 with the list of what failed:
1. `ray up -y` completes;
2. the MLflow server answers /health and its REST API on the head's address (`hostname -I`) and on 127.0.0.1:5000
   (the socat forward);
3. `ray status` against the head's GCS address (with the node's Ray auth settings) shows the head;
4. the README's sweep line (the line after `# the sweep` in its cluster code block) succeeds as written, with
   `--dry-run` added to its flat-ray command (the job runs on the head with the node's venv); where TOFU's published
   logs are in ../shared/data, its Llama-2 retain90 logs are first put where the README's `git clone` of
   locuslab/tofu puts them on the shared mount (this machine cannot reach GitHub), and the dry run must list that
   cell's reference there: the job runs where the tofu space's relative references resolve;
5. a second `ray up -y --no-restart` keeps the same MLflow server process, still answering;
6. `ray down -y` leaves no Ray process of the node (MLflow and its forward are not Ray's: on a cloud `ray down`
   ends them with the instance; here the rehearsal stops them afterwards).
The commands' output goes to logs that are removed with the rest (--logs keeps a copy); a failed command's last
lines are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
# TOFU's published logs of its Llama-2 retain90 model (../shared/data), and their folder in a clone of locuslab/tofu
TOFU_LOGS = ROOT.parent / "shared" / "data" / "tofu_eval_logs" / "llama2-7b_retain90"
TOFU_RETAIN90 = "ft_epoch5_lr1e-05_llama2-7b_retain90_wd0.01"
RAY = ROOT / ".venv" / "bin" / "ray"
USER = "flat-ray-rehearsal"
APT_PACKAGES = ["openssh-server", "rsync", "socat", "nfs-common"]
RAY_TMP = Path("/tmp/ray")  # Ray's default temp folder: the head's session and the local provider's state


class Rehearsal:
    def __init__(self, cluster_yaml: Path, logs: Path | None = None):
        self.cluster = yaml.safe_load(cluster_yaml.read_text())
        self.tmp = Path(tempfile.mkdtemp(prefix="flat-ray-rehearsal-", dir=scratch_folder()))
        self.home, self.shared, self.logs = self.tmp / "home", self.tmp / "shared", self.tmp / "logs"
        self.checkout = self.tmp / "checkout"
        self.key = self.tmp / "id_ed25519"
        self.config = self.tmp / "cluster.yaml"
        self.addr = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
        self.keep_logs = logs
        self.timings: list[tuple[str, float]] = []
        self.failures: list[str] = []
        self.sshd: subprocess.Popen | None = None
        self.user_added = False
        self.made_run_sshd = False
        # what Ray keeps outside that folder: the head's session, the local provider's state, SSH control sockets
        # and `ray up`'s config cache; the rehearsal removes only what appeared while it ran
        self.ray_tmp_existed = RAY_TMP.exists()
        self.links_before = {p.name: os.readlink(p) for p in RAY_TMP.glob("*") if p.is_symlink()}
        self.latest_before = self.session_latest()
        self.session: Path | None = None
        self.tmp_before = set(Path("/tmp").glob("ray_ssh_*")) | set(Path("/tmp").glob("ray-config-*"))

    # -- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def session_latest() -> Path | None:
        latest = RAY_TMP / "session_latest"
        return Path(os.path.realpath(latest)) if latest.is_symlink() else None

    def step(self, name: str, fn, *args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings.append((name, time.monotonic() - start))

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"rehearsal: FAILED: {what}", flush=True)

    def run(self, name: str, cmd, *, timeout: float, env: dict | None = None, quiet: bool = False) -> tuple[int, str]:
        """Run a command from the checkout's copy (where `ray up cluster.yaml` is run), its output in logs/NAME.log."""
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            try:
                rc = subprocess.run(cmd, cwd=self.checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -1
                out.write(f"\nrehearsal: timed out after {timeout} s\n")
        text = log.read_text(errors="replace")
        if rc != 0 and not quiet:
            tail = "\n".join(text.splitlines()[-40:])
            print(f"rehearsal: `{name}` exited {rc}; the end of its output:\n{tail}", flush=True)
        return rc, text

    def ray_env(self) -> dict:
        """The client's environment: the node's Ray auth settings (a token only where the node has one)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"  # `ray` as on the machine you run `ray up` on
        env["RAY_UP_enable_autoscaler_v2"] = "1"  # Ray's default, set to silence its notice
        env["RAY_USAGE_STATS_ENABLED"] = "0"  # `ray up` passes it on to the head: no report from CI
        token = self.home / ".ray" / "auth_token"
        if token.exists():
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token.read_text().strip())
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def ours(self) -> list[psutil.Process]:
        """Processes started through the rehearsal's user (their HOME is its home), those of its sshd, and the SSH
        clients `ray up` left holding connections open with the rehearsal's key."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                env = proc.info["environ"] or {}
                line = " ".join(proc.info["cmdline"] or [])
            except psutil.Error:
                continue
            if proc.pid != os.getpid() and (env.get("HOME") == str(self.home) or str(self.key) in line):
                found.append(proc)
        if self.sshd is not None:
            try:
                found += psutil.Process(self.sshd.pid).children(recursive=True)
            except psutil.Error:
                pass
        return list({p.pid: p for p in found}.values())

    def mlflow_server(self) -> psutil.Process | None:
        """The node's MLflow server process (its workers are its children)."""
        mlflow = str(self.home / "venv" / "bin" / "mlflow")
        for proc in self.ours():
            try:
                if mlflow in proc.cmdline()[:2] and "server" in proc.cmdline():
                    return proc
            except psutil.Error:
                pass
        return None

    def mlflow_answers(self, base: str) -> str | None:
        """None when `base` answers /health and a REST call; else what went wrong."""
        try:
            for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
                with urllib.request.urlopen(base + path, timeout=5) as response:
                    response.read()
        except Exception as e:  # noqa: BLE001 - reported as the check's failure
            return f"{path}: {e}"
        return None

    # -- set-up -------------------------------------------------------------------------------------------------
    def install_packages(self) -> None:
        missing = [p for p in APT_PACKAGES
                   if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
        if missing:
            print(f"rehearsal: apt-get install {' '.join(missing)}", flush=True)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
            # apt-get update only when the package lists are missing or stale
            if self.run("apt", install, timeout=600, env=env, quiet=True)[0] != 0:
                for cmd in (["apt-get", "update", "-q"], install):
                    if self.run("apt", cmd, timeout=600, env=env)[0] != 0:
                        raise SystemExit(f"rehearsal: {' '.join(cmd)} failed")

    def copy_checkout(self) -> None:
        """The checkout's files as a fresh clone has them plus your changes (git's tracked and untracked, not
        ignored). `ray up` hashes the whole local folder of a file mount to decide whether a node is up to date,
        ignoring rsync_exclude: from the repository itself it would read .venv (2.5 GB, 6 s per `ray up` here) and
        whatever flat_ray_work holds."""
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True)
        if listed.returncode != 0:  # not a git checkout: all but what is never copied to a node
            shutil.copytree(ROOT, self.checkout, symlinks=True,
                            ignore=shutil.ignore_patterns(".venv", "flat_ray_work", ".git", "__pycache__"))
            return
        for name in filter(None, listed.stdout.decode().split("\0")):
            source, target = ROOT / name, self.checkout / name
            if source.exists() or source.is_symlink():  # a tracked file deleted in the working tree is left out
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)

    def make_user(self) -> None:
        self.home.mkdir()
        if subprocess.run(["id", USER], capture_output=True).returncode == 0:
            raise SystemExit(f"rehearsal: user {USER} exists (a rehearsal still running, or killed): `userdel -f "
                             f"{USER}` if none runs")
        # uid 0 (-o: an alias of root) with password '*': not locked, so sshd lets its key in
        subprocess.run(["useradd", "-o", "-u", "0", "-g", "0", "-M", "-N", "-d", str(self.home), "-s", "/bin/bash",
                        "-p", "*", USER], check=True, stderr=subprocess.DEVNULL)
        self.user_added = True
        python_bin = Path(sys.base_prefix) / "bin"
        # the image's Python 3.11; and no byte-compiling of the node's venv at install (about 25 s here), its
        # modules compile as they are first imported
        stand_in = f'export PATH="{python_bin}:$PATH" PIP_COMPILE=0  # the rehearsal\'s stand-in image\n'
        for name in (".bashrc", ".profile"):
            skel = Path("/etc/skel") / name
            (self.home / name).write_text(stand_in + (skel.read_text() if skel.exists() else ""))
        for sub in (".config/pip", ".cache/pip"):
            if (Path.home() / sub).exists():
                (self.home / sub).parent.mkdir(parents=True, exist_ok=True)
                (self.home / sub).symlink_to(Path.home() / sub)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flat-ray rehearsal", "-f",
                        str(self.key)], check=True)
        ssh = self.home / ".ssh"
        ssh.mkdir(mode=0o700)
        shutil.copy(self.key.with_suffix(".pub"), ssh / "authorized_keys")

    def start_sshd(self) -> None:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 22))
            except OSError as e:
                raise SystemExit(f"rehearsal: port 22 on 127.0.0.1 is taken ({e}); Ray's SSH runner always uses port "
                                 "22, so the rehearsal needs it") from None
        host_key = self.tmp / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        config = self.tmp / "sshd_config"
        config.write_text(f"""\
ListenAddress 127.0.0.1
Port 22
HostKey {host_key}
PidFile {self.tmp / 'sshd.pid'}
AllowUsers {USER}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
""")
        if not Path("/run/sshd").exists():  # sshd's privilege separation folder
            Path("/run/sshd").mkdir(mode=0o755)
            self.made_run_sshd = True
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(self.logs / "sshd.log")],
                                     stdin=subprocess.DEVNULL)
        for _ in range(50):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", 22)) == 0:
                    break
            time.sleep(0.1)
        rc, _ = self.run("ssh", ["ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                 "-o", "UserKnownHostsFile=/dev/null", f"{USER}@127.0.0.1", "true"], timeout=30)
        if rc != 0:
            raise SystemExit("rehearsal: cannot SSH to the rehearsal's user; sshd's log:\n"
                             + (self.logs / "sshd.log").read_text())

    def write_config(self) -> None:
        config, self.site_shared = rehearsal_config(self.cluster, user=USER, key=self.key, home=self.home,
                                                    shared=self.shared)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    # -- checks -------------------------------------------------------------------------------------------------
    def check_mlflow(self, when: str) -> None:
        for base in (f"http://{self.addr}:5000", "http://127.0.0.1:5000"):
            deadline = time.monotonic() + 20
            while (error := self.mlflow_answers(base)) and time.monotonic() < deadline:
                time.sleep(1)
            if error:
                server = self.mlflow_server()
                log = self.home / "mlflow" / "server.log"
                tail = "\n".join(log.read_text().splitlines()[-10:]) if log.exists() else "(no ~/mlflow/server.log)"
                self.fail(f"{when}: MLflow does not answer at {base} ({error}); "
                          + (f"its server runs (pid {server.pid}); its log:\n{tail}" if server
                             else "no MLflow server process of the node runs"))

    def check_status(self) -> None:
        rc, out = self.run("ray-status", [str(RAY), "status", f"--address={self.addr}:6379"], timeout=60,
                           env=self.ray_env())
        if rc != 0 or not re.search(r"^(Active|Idle):\n 1 local\.cluster\.node$", out, re.M):
            self.fail(f"`ray status --address={self.addr}:6379` does not show the head (exit {rc})")

    def check_job(self) -> None:
        """The README's sweep line as a job; where TOFU's published logs are at hand (../shared/data), one of them
        stands in for the README's clone of locuslab/tofu on the shared mount, and the job must find it there."""
        planted = None
        if TOFU_LOGS.is_dir():
            planted = self.shared / "tofu" / "data" / TOFU_RETAIN90 / "eval_results" / "ds_size300"
            shutil.copytree(TOFU_LOGS, planted)
        rc, out = self.run("job", ["bash", "-c", self.sweep], timeout=300, env=self.ray_env())
        if rc != 0 or "nothing was started" not in out:
            self.fail(f"the README's sweep line with --dry-run (exit {rc})")
        elif planted and f"published logs at {planted} " not in out:
            self.fail(f"the README's sweep line did not find the tofu space's reference where the README's clone "
                      f"puts it ({planted})")

    def check_down(self) -> None:
        """No Ray process of the node is left; says which of its services outlived `ray down`."""
        mlflow = self.mlflow_server()
        services = {mlflow.pid, *(p.pid for p in mlflow.children(recursive=True))} if mlflow else set()
        left, socat = [], []
        for proc in self.ours():
            try:
                if proc.name() == "socat":
                    socat.append(proc.pid)
                elif proc.pid not in services and proc.name() not in ("ssh", "sshd"):
                    left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                pass
        if left:
            self.fail("`ray down -y` left processes of the node running: " + "; ".join(left))
        if mlflow or socat:
            print(f"rehearsal: after `ray down` (which runs `ray stop` on the head: Ray's processes only), MLflow "
                  f"(pid {mlflow and mlflow.pid}) and its forward (socat, pid {' '.join(map(str, socat)) or None}) "
                  "still run, as head_start.sh keeps them across `ray up`; a cloud ends them with the instance, "
                  "on-prem stop them yourself. The rehearsal stops them now.", flush=True)

    # -- the rehearsal ------------------------------------------------------------------------------------------
    def main(self) -> int:
        start = time.monotonic()
        self.logs.mkdir()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up when CI stops the run, too
        try:
            self.step("prerequisites (apt, user, key, sshd)", self.prepare)
            env = self.ray_env()
            rc, _ = self.step("ray up", self.run, "ray-up", [str(RAY), "up", "-y", str(self.config)],
                              timeout=900, env=env)
            if rc != 0:
                self.fail("`ray up -y` failed")
            if self.session_latest() != self.latest_before:
                self.session = self.session_latest()
            self.step("MLflow answers", self.check_mlflow, "after `ray up`")
            first = self.mlflow_server()
            self.step("ray status", self.check_status)
            self.step("README sweep line (--dry-run) as a job", self.check_job)
            rc, _ = self.step("ray up --no-restart", self.run, "ray-up-no-restart",
                              [str(RAY), "up", "-y", "--no-restart", str(self.config)], timeout=600, env=env)
            if rc != 0:
                self.fail("`ray up -y --no-restart` failed")
            again = self.mlflow_server()
            if first is None or again is None or first.pid != again.pid:
                self.fail(f"the MLflow server is not the same process after `ray up --no-restart` "
                          f"({first and first.pid} then {again and again.pid})")
            self.check_mlflow("after `ray up --no-restart`")
            rc, _ = self.step("ray down", self.run, "ray-down", [str(RAY), "down", "-y", str(self.config)],
                              timeout=300, env=env)
            if rc != 0:
                self.fail("`ray down -y` failed")
            self.check_down()
        finally:
            self.step("clean-up", self.clean_up)
        self.timings.append(("total", time.monotonic() - start))
        print("rehearsal: " + ", ".join(f"{name} {secs:.0f} s" for name, secs in self.timings), flush=True)
        if self.failures:
            print(f"rehearsal FAILED ({len(self.failures)}):\n" + "\n".join(f"- {f}" for f in self.failures))
            return 1
        print("rehearsal passed: `ray up` of cluster.yaml's commands on the local provider installed the node, "
              "started MLflow (private address and 127.0.0.1:5000) and Ray, ran the README's sweep line "
              "(--dry-run) as a job, kept MLflow through `ray up --no-restart`, and `ray down` stopped Ray")
        return 0

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("rehearsal: run it as root (it adds a user and starts an sshd on port 22)")
        self.copy_checkout()
        self.install_packages()
        self.shared.mkdir()
        self.make_user()
        self.start_sshd()
        self.write_config()
        self.sweep = readme_sweep_line((ROOT / "README.md").read_text(), self.site_shared, str(self.shared))

    def clean_up(self) -> None:
        """Stop what the rehearsal started (only that), remove its user, files and Ray's records of its cluster."""
        procs = self.ours()
        made: set[Path] = set()
        for proc in procs:
            try:
                # the job queue folder MLflow's server makes for itself (in /dev/shm) and leaves behind
                if huey := proc.environ().get("_MLFLOW_HUEY_STORAGE_PATH"):
                    made.add(Path(huey))
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=1)  # MLflow's workers take longer; nothing of theirs is kept
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.kill()
            self.sshd.wait()
        if self.user_added:
            # -f: the user's uid (0) always has processes; userdel says so and removes the user anyway
            subprocess.run(["userdel", "-f", USER], capture_output=True)
            if subprocess.run(["id", USER], capture_output=True).returncode == 0:
                self.fail(f"could not remove the user {USER}")
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        made |= (set(Path("/tmp").glob("ray_ssh_*")) | set(Path("/tmp").glob("ray-config-*"))) - self.tmp_before
        db = f"sqlite:///{self.home}/mlflow/mlflow.db"  # MLflow's lock file for it is named by its hash
        made |= {Path(tempfile.gettempdir()) / f"db_init_lock-{hashlib.md5(db.encode()).hexdigest()}"}
        made |= {RAY_TMP / f"cluster-{self.cluster['cluster_name']}-rehearsal.{ext}" for ext in ("lock", "state")}
        for path in made | {self.session} - {None}:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not self.ray_tmp_existed:
            shutil.rmtree(RAY_TMP, ignore_errors=True)
        elif self.session is not None:
            # Ray's links to the latest session (session_latest, prom_metrics_service_discovery.json) back to where
            # they pointed before
            for link in (p for p in RAY_TMP.glob("*") if p.is_symlink()):
                if self.session.name in os.readlink(link):
                    link.unlink()
                    if link.name in self.links_before:
                        link.symlink_to(self.links_before[link.name])
        if self.keep_logs is not None:
            shutil.copytree(self.logs, self.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def scratch_folder() -> str | None:
    """/dev/shm where it has room for the node's 2.4 GB venv: written and removed there in a fraction of the time
    it takes on a disk (here an ext4 mounted with discard: 8 s to remove it from /tmp); else the temp folder."""
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > 8 * 2**30 else None
    except OSError:
        return None


def rehearsal_config(cluster: dict, *, user: str, key: Path, home: Path, shared: Path) -> tuple[dict, str]:
    """cluster.yaml for Ray's on-prem provider on this machine, and cluster.yaml's shared mount point: provider,
    auth, node types and name replaced, file mounts, rsync settings and commands kept with the site values
    substituted (module docstring)."""
    mounts = [m for c in cluster["setup_commands"] if (m := re.search(r"mount_shared\.sh\s+(\S+)\s+(\S+)", c))]
    if len(mounts) != 1:
        raise SystemExit("rehearsal: cluster.yaml's setup_commands need one scripts/node/mount_shared.sh line")
    source, site_shared = mounts[0].groups()
    site_home = f"/home/{cluster['auth']['ssh_user']}"

    def local(command: str) -> str:
        command = command.replace(f"mount_shared.sh {source} ", "mount_shared.sh none ")
        return substitute(substitute(command, site_shared, str(shared)), site_home, str(home))

    config = {
        "cluster_name": f"{cluster['cluster_name']}-rehearsal",
        "max_workers": 0,  # no worker ips
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": user, "ssh_private_key": str(key)},
    }
    for name in ("upscaling_speed", "idle_timeout_minutes", "file_mounts", "file_mounts_sync_continuously",
                 "rsync_exclude", "rsync_filter"):
        if name in cluster:
            config[name] = cluster[name]
    for name in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands"):
        config[name] = [local(c) for c in cluster.get(name) or []]
    return config, site_shared


def readme_sweep_line(readme: str, site_shared: str, shared: str) -> str:
    """The line after `# the sweep` in the README (with its continuation lines), the shared mount substituted and
    --dry-run added at the end of its `bash -lc '...'` command."""
    lines = readme.splitlines()
    marker = [i for i, line in enumerate(lines) if line.strip().startswith("# the sweep")]
    if len(marker) != 1:
        raise SystemExit("rehearsal: README.md needs one `# the sweep` line before its sweep command")
    command = []
    for line in lines[marker[0] + 1:]:
        command.append(line.rstrip())
        if not line.rstrip().endswith("\\"):
            break
    text = "\n".join(command)
    if not text.endswith("'") or not re.search(r"bash -lc '(cd \S+ && )?flat-ray ", text):
        raise SystemExit(f"rehearsal: the README's sweep line is not `... bash -lc '[cd DIR && ]flat-ray ...'`:\n{text}")
    return substitute(text[:-1] + " --dry-run'", site_shared, shared)


def substitute(text: str, old: str, new: str) -> str:
    """Replace the path `old` where it stands as a whole path or a path's start (`/shared`, `/shared/ray`), not
    inside another word (`mount_shared.sh`)."""
    return re.sub(rf"(?<![\w.~/-]){re.escape(old)}(?![\w.-])", new, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cluster-yaml", type=Path, default=ROOT / "cluster.yaml")
    parser.add_argument("--logs", type=Path, help="copy the commands' logs here (they are removed otherwise)")
    args = parser.parse_args()
    return Rehearsal(args.cluster_yaml, args.logs).main()


if __name__ == "__main__":
    sys.exit(main())

"""``tfdlrm cluster`` and the private network of a one-host cluster (tfdlrm/parallel/cluster.py,
netns.py): its ports accept no connection from this host's own addresses, only from inside;
the chief's TF_CONFIG checks; bad input refused before any process starts; no process left."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers import REPO, assert_clean_error
from tests.helpers.cli import run_main
from tfdlrm.errors import UserError
from tfdlrm.parallel import cluster as cluster_module
from tfdlrm.parallel.devices import NETWORK_ENV, check_cluster_addresses
from tfdlrm.parallel.netns import NoPrivateNetwork
from tfdlrm.parallel.ps import listening_notice
from tfdlrm.training.rundir import load_run


def host_addresses() -> list[str]:
    """This host's own addresses other than loopback (``ip -o addr``, else its name's)."""
    found = set()
    try:
        text = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
        found = {m.group(1) for m in re.finditer(r"\binet6? ([0-9a-fA-F.:]+)/", text)}
    except OSError:
        found = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    return sorted(a for a in found if not (a.startswith("127.") or a == "::1" or a.lower().startswith("fe80")))


def accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


LISTENER = """
import socket, sys
sys.path.insert(0, {repo!r})
if {private}:
    from tfdlrm.parallel.netns import enter_private_network
    enter_private_network()
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 0))  # every interface, as TensorFlow's servers bind
s.listen()
port = s.getsockname()[1]
socket.create_connection(("127.0.0.1", port), timeout=3).close()
print(port, flush=True)
sys.stdin.read()
"""


def start_listener(private: bool):
    proc = subprocess.Popen([sys.executable, "-c", LISTENER.format(repo=str(REPO), private=private)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        message = proc.stderr.read().strip().splitlines()
        pytest.skip(f"no private network here: {message[-1] if message else 'the listener died'}")
    return proc, int(line)


def test_a_private_network_hides_a_port_bound_on_every_interface():
    addresses = host_addresses() + ["127.0.0.1"]
    assert len(addresses) > 1, "this host has no address but loopback: nothing to show"
    open_proc, open_port = start_listener(private=False)
    private_proc, private_port = start_listener(private=True)  # it connected to itself inside
    try:
        # the control: the same listener outside a namespace is reachable on every address
        assert all(accepts(a, open_port) for a in addresses), addresses
        assert not any(accepts(a, private_port) for a in addresses), addresses
    finally:
        for proc in (open_proc, private_proc):
            proc.kill()
            proc.wait(timeout=10)


def test_no_private_network_is_refused_unless_open_ports_is_asked(monkeypatch):
    def refuse():
        raise NoPrivateNetwork("a network namespace needs root (Operation not permitted)")

    monkeypatch.setattr(cluster_module, "enter_private_network", refuse)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="private network .* needs root.*--open-ports"):
        cluster_module.run_cluster(["train"], workers=1, ps=1)


def test_tf_config_addresses_are_checked_before_connecting(monkeypatch):
    good = {"chief": ["127.0.0.1:2000"], "worker": ["localhost:2001"], "ps": ["[::1]:2002"]}
    check_cluster_addresses(good, loopback_only=True)
    check_cluster_addresses({"worker": ["192.0.2.7:2001"], "ps": ["127.0.0.1:2002"]})  # multi-host: any address
    with pytest.raises(UserError, match="names 127.0.0.1:2001 for both worker 0 and ps 0"):
        check_cluster_addresses({"worker": ["127.0.0.1:2001"], "ps": ["127.0.0.1:2001"]})
    with pytest.raises(UserError, match="ps 0 host 'no-such-host.invalid' does not resolve"):
        check_cluster_addresses({"worker": ["127.0.0.1:2001"], "ps": ["no-such-host.invalid:2002"]})
    with pytest.raises(UserError, match="worker 0 address '127.0.0.1' is not host:port"):
        check_cluster_addresses({"worker": ["127.0.0.1"]})
    with pytest.raises(UserError, match="runs on this host only, but TF_CONFIG's worker 1 is 192.0.2.7:2001"):
        check_cluster_addresses({"worker": ["127.0.0.1:2000", "192.0.2.7:2001"]}, loopback_only=True)
    # through the commands: a server and the chief both check, one line each, before any connection
    twice = {"cluster": {"worker": ["127.0.0.1:2001"], "ps": ["127.0.0.1:2001"]}, "task": {"type": "ps", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(twice))
    assert_clean_error(run_main(["server"]), "127.0.0.1:2001 for both worker 0 and ps 0")
    remote = {"cluster": {"worker": ["192.0.2.7:2001"], "ps": ["127.0.0.1:2002"]}, "task": {"type": "chief"}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(remote))
    monkeypatch.setenv(NETWORK_ENV, "private")
    assert_clean_error(run_main(["train", "--parallel", "ps", "--steps-per-epoch", "2"]),
                       "worker 0 is 192.0.2.7:2001", "not a loopback address")


def test_a_lost_task_is_named_by_its_address_else_by_the_error(monkeypatch):
    from tfdlrm.cli.main import lost_task_message

    class UnavailableError(Exception):
        pass

    UnavailableError.__module__ = "tensorflow.python.framework.errors_impl"
    cluster = {"chief": ["127.0.0.1:1000"], "ps": ["127.0.0.1:2000", "127.0.0.1:2001"], "worker": ["127.0.0.1:3000"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster}))
    refused = ('from remote target /job:chief/replica:0/task:0 ... /job:worker/replica:0/task:0 {grpc_message:"failed '
               'to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2001: Failed to connect to remote '
               'host: Connection refused"}')
    assert lost_task_message(UnavailableError(refused)).startswith("lost the cluster's ps 1 (Connection refused)")
    closed = 'from remote target /job:worker/replica:0/task:0 while calling ... {grpc_message:"Socket closed"}'
    assert lost_task_message(UnavailableError(closed)).startswith("lost the cluster's worker 0 (Socket closed)")
    reset = 'from remote target /job:chief/replica:0/task:0 {grpc_message:"recvmsg:Connection reset by peer"}'
    assert "parameter servers or workers (recvmsg:Connection reset by peer)" in lost_task_message(
        UnavailableError(reset))
    assert lost_task_message(ValueError(refused)) is None  # only TensorFlow's errors


def test_the_server_says_who_can_reach_its_port(monkeypatch):
    cluster = {"worker": ["127.0.0.1:2001"], "ps": ["10.0.0.5:2222"]}
    monkeypatch.delenv(NETWORK_ENV, raising=False)
    text = listening_notice("ps", 0, cluster)
    for fragment in ("port 2222", "EVERY network interface", "authenticates no one", "cluster's hosts",
                     "docs/parallelism.md, Security"):
        assert fragment in text, text
    monkeypatch.setenv(NETWORK_ENV, "private")
    assert "port 2001 inside tfdlrm cluster's private network namespace" in listening_notice("worker", 0, cluster)


@pytest.mark.parametrize("args, fragments", [
    (["cluster", "--", "evaluate"], ["-- train ARGS", "'evaluate'"]),
    (["cluster"], ["-- train ARGS", "nothing"]),
    (["cluster", "--", "train", "--parallel", "mirrored", "--steps-per-epoch", "2"], ["drop --parallel mirrored"]),
    (["cluster", "--", "train", "--devices", "2", "--steps-per-epoch", "2"], ["drop --devices"]),
    (["cluster", "--", "train"], ["--steps-per-epoch"]),
    (["cluster", "--memory-per-process", "lots", "--", "train", "--steps-per-epoch", "2"],
     ["--memory-per-process", "'lots'"]),
    (["cluster", "--workers", "0", "--", "train", "--steps-per-epoch", "2"], ["--workers", "'0'"]),
    (["cluster", "--", "train", "--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_cluster_input_is_refused_before_any_process_starts(args, fragments, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert_clean_error(run_main(args), *fragments)


def test_a_cluster_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["10.0.0.1:2000"]}}))
    assert_clean_error(run_main(["cluster", "--", "train", "--steps-per-epoch", "2"]), "unset TF_CONFIG")


def launcher_env(mark: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TFDLRM_TEST_MARK=mark)
    for name in ("TF_USE_LEGACY_KERAS", "TF_CONFIG", NETWORK_ENV):
        env.pop(name, None)
    return env


def processes_marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (the launcher's children inherit it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"TFDLRM_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_server_that_dies_at_start_stops_the_cluster_in_one_line():
    mark = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-m", "tfdlrm", "cluster", "--workers", "1", "--ps", "1",
                           "--memory-per-process", "100MB", "--", "train", "--steps-per-epoch", "2"],
                          env=launcher_env(mark), cwd=REPO, capture_output=True, text=True, timeout=120)
    if "private network" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert_clean_error(proc, "server exited at start", "capped at 100,000,000 bytes")
    assert proc.returncode == 2
    assert processes_marked(mark) == []


def test_a_cap_too_small_for_a_server_shards_is_one_line_and_stops_the_cluster():
    """26 x 3M rows over 2 servers: 2.3 GiB of shards each, under a 2.4 GiB cap a process: the chief
    refuses before any variable exists, and no process is left."""
    mark = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-m", "tfdlrm", "cluster", "--workers", "1", "--ps", "2",
                           "--memory-per-process", "2500MiB", "--", "train", "--preset", "kaggle", "--rows", "3000000",
                           "--optimizer", "sgd", "--steps-per-epoch", "2", "--batch-size", "2048", "--train-examples",
                           "8192", "--eval-examples", "4096"],
                          env=launcher_env(mark), cwd=REPO, capture_output=True, text=True, timeout=300)
    if "private network" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert_clean_error(proc, "each parameter server needs an estimated 3.", "table shards and their slots 2.",
                       "more than 2.4 GiB (tfdlrm cluster --memory-per-process)")
    assert proc.returncode == 2
    assert "memory per process (estimated): chief" in proc.stdout + proc.stderr
    assert none_left(mark)


def start_cluster(mark: str, out, *extra: str) -> tuple:
    """``tfdlrm cluster`` (2 ps, 2 workers) training the tiny preset into ``out``: the launcher, the lines
    up to its ``tfdlrm cluster:`` line, and each task's (job, index, port, pid)."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tfdlrm", "cluster", "--workers", "2", "--ps", "2", "--", "train",
         "--steps-per-epoch", "100", "--epochs", "2", "--train-examples", "102400", "--eval-examples", "2048",
         "--batch-size", "256", "--optimizer", "adagrad", "--lr", "0.05", "--out", str(out), *extra],
        env=launcher_env(mark), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while not (lines and lines[-1].startswith("tfdlrm cluster:")):
        line = launcher.stdout.readline()
        if not line:
            err = launcher.stderr.read()
            if "private network" in err:
                pytest.skip(err.strip())
            raise AssertionError("".join(lines) + err)
        lines.append(line)
    tasks = re.findall(r"(ps|worker) (\d) 127\.0\.0\.1:(\d+) \(pid (\d+)\)", lines[-1])
    assert sorted((job, int(i)) for job, i, _, _ in tasks) == [("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1)]
    return launcher, lines, tasks


def none_left(mark: str) -> bool:
    deadline = time.time() + 10
    while processes_marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    return processes_marked(mark) == []


@pytest.mark.slow
def test_cluster_ports_are_private_a_lost_server_is_one_line_and_the_rerun_resumes(tmp_path):
    """docs/parallelism.md's one-host cluster: 2 ps and 2 workers as `tfdlrm server` processes in a
    private network namespace. While it runs, no port answers on this host's addresses but each does
    inside; a parameter server killed (-9) after the first epoch's checkpoint stops the chief with one
    line naming it; the same command again resumes from that checkpoint and, a worker killed (-9) as
    its epoch starts, the other does every step; no process is left after either."""
    mark = uuid.uuid4().hex
    launcher, lines, tasks = start_cluster(mark, tmp_path / "run")
    try:
        assert "private network namespace" in lines[-1]
        for job, index, port, pid in tasks:  # each said where it listens, then that it serves
            said = [line for line in lines if line.startswith(f"[{job} {index}] ")]
            assert f"listens on port {port} inside" in said[0] and "serving at" in said[1], said
        for address in host_addresses() + ["127.0.0.1"]:
            assert not any(accepts(address, int(port)) for _, _, port, _ in tasks), address
        if os.geteuid() == 0:  # inside the servers' namespace each port answers
            probe = "import socket, sys; [socket.create_connection(('127.0.0.1', int(p)), timeout=3).close() " \
                    "for p in sys.argv[1:]]; print('inside: all accept')"
            inside = subprocess.run(["nsenter", f"--net=/proc/{tasks[0][3]}/ns/net", sys.executable, "-c", probe,
                                     *[port for _, _, port, _ in tasks]], capture_output=True, text=True, timeout=30)
            assert "inside: all accept" in inside.stdout, inside.stderr
        first = tmp_path / "run" / "checkpoints" / "epoch-001.json"
        deadline = time.time() + 240
        while not first.exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.exists() and launcher.poll() is None, "the first epoch's checkpoint was not written in time"
        os.kill(int([pid for job, i, _, pid in tasks if (job, i) == ("ps", "1")][0]), 9)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
    assert launcher.returncode == 1, out[-2000:] + err[-3000:]
    assert_clean_error(subprocess.CompletedProcess([], launcher.returncode, out, err), "lost the cluster's",
                       "rerun the same command")
    said = [line for line in err.splitlines() if "error:" in line][0]  # ps 1, or no name: never another task
    assert "lost the cluster's ps 1 (" in said or "lost the cluster's parameter servers or workers (" in said, said
    assert none_left(mark)

    launcher, lines, tasks = start_cluster(mark, tmp_path / "run")  # ps 1 back: the same command
    try:
        while not lines[-1].startswith("dlrm inputs"):  # the chief's last line before its epoch starts
            lines.append(launcher.stdout.readline())
            assert lines[-1], "".join(lines)
        os.kill(int([pid for job, i, _, pid in tasks if (job, i) == ("worker", "1")][0]), 9)
        out, err = launcher.communicate(timeout=300)
        out = "".join(lines) + out
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
    assert launcher.returncode == 0, err[-3000:]
    assert "resuming from" in out and "epoch-001" in out and "step 100, epoch 2 from its start" in out, out
    assert "parameter servers: 2 worker(s), 2 ps" in out and "dlrm held-out: exact AUC" in out
    assert none_left(mark)
    model, _ = load_run(str(tmp_path / "run"))  # sharded on the servers, whole here
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads((tmp_path / "run" / "checkpoints" / "epoch-002.json").read_text())["step"] == 200  # all done
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.presets import get_preset
    from tfdlrm.training.evaluate import evaluate

    data = open_data("synthetic", get_preset("tiny"), train_examples=102400, eval_examples=2048)
    # The reload predicts what the chief evaluated at the end. Not to 1e-6: in 1 of ~10 runs with a
    # worker lost mid-epoch the two differed by 1.7e-4 in log loss (not explained yet: see the issue's
    # note). The first epoch's weights gave 4.7e-3 more in one run.
    assert evaluate(model, data.eval_dataset(4096)).logloss == pytest.approx(  # the chief's batches
        metrics["evaluation"]["logloss"], abs=1e-3)

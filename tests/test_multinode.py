"""Running as Ray jobs on a real cluster started with `ray start`: token authentication, and the
pipeline on two nodes against S3."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # an answer (401 without the token): the server is up
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _stop_ray_node(proc: subprocess.Popen) -> None:
    """Stop one `ray start --block` node: SIGTERM makes it stop the processes it started (its
    documented shutdown); anything of its session still alive after that is killed (by session id,
    so the test session's own Ray and other clusters are untouched)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == proc.pid:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _job_status(client, job: str, head_temp: str, grace_s: float = 60.0):
    """The job's status; a dashboard that stops answering for a moment is asked again, one that stays
    away for ``grace_s`` fails the test with the end of the head's dashboard log (what it said last)."""
    deadline = time.time() + grace_s
    while True:
        try:
            return client.get_job_status(job)
        except OSError as exc:  # requests' ConnectionError ("Connection refused") is an OSError
            if time.time() < deadline:
                time.sleep(2)
                continue
            log = os.path.join(head_temp, "session_latest", "logs", "dashboard.log")
            tail = Path(log).read_text(errors="replace")[-4000:] if os.path.exists(log) else "(no dashboard.log)"
            raise AssertionError(f"the head's dashboard stopped answering: {exc}\n{log}:\n{tail}") from exc


@pytest.mark.slow
def test_token_auth_refuses_job_submission_without_the_token(tmp_path):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = secrets.token_hex(16)
    gcs, dash = _free_port(), _free_port()
    temp = f"/tmp/asd-auth-{secrets.token_hex(4)}"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    # every port of its own: the test session's Ray runs beside it with the default agent ports
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=1", "--include-dashboard=true", f"--temp-dir={temp}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{url}/api/version", timeout=300)
        with pytest.raises(AuthenticationError, match="Unauthorized|authentication"):
            JobSubmissionClient(url).submit_job(entrypoint="python -c 'print(1)'")
        client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
        job, deadline = None, time.time() + 300
        while job is None:
            try:
                job = client.submit_job(entrypoint="python -c 'print(41 + 1)'")
            except RuntimeError as exc:  # "No available agent to submit job" while the job agent starts
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(2)
        for _ in range(300):
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                break
            time.sleep(1)
        assert status == JobStatus.SUCCEEDED and "42" in client.get_job_logs(job)
    finally:
        _stop_ray_node(head)
        shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------- two nodes + S3


def _ray_node_ports() -> list[str]:
    """Every per-node port of its own: the test session's Ray holds the defaults."""
    return [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]


def _job_result(logs: str) -> dict:
    """The job's final JSON line (the last line of the logs that parses as a JSON object)."""
    import json

    for line in reversed(logs.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError("no final JSON line in the job logs:\n" + logs[-4000:])


@pytest.mark.slow
@pytest.mark.s3
def test_pipeline_job_runs_on_two_nodes_against_s3(s3_bucket, tmp_path):
    """A local two-node Ray cluster (head and worker as separate `ray start` processes, two
    logical CPUs each) and moto S3: the pipeline (corpus, featurize, pre-training, log-mel and
    pre-trained embeddings, scoring), submitted as a Ray job with the repository as its
    working_dir, writes its outputs to S3, and the job's tasks ran on both nodes."""
    from pathlib import Path

    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes, list_tasks
    from ray.util.state.exception import ServerUnavailable

    from asd.io import storage

    repo = str(Path(__file__).resolve().parents[1])
    gcs, dash = _free_port(), _free_port()
    temp = f"/tmp/asd-2n-{secrets.token_hex(4)}"  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # the token test covers authentication
    env.pop("RAY_ADDRESS", None)
    # two logical CPUs a node: with one, the embedding actors (0.5 CPU each, spread one per node)
    # leave no node a whole CPU for Ray Data's 1-CPU read tasks, and the dataset never starts
    common = ["--block", "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]
    procs = [subprocess.Popen(
        ["ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp}-head",
         *common, *_ray_node_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{url}/api/version", timeout=300)
        procs.append(subprocess.Popen(
            ["ray", "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp}-worker", *common, *_ray_node_ports()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.time() + 300
        while True:
            try:
                nodes = list_nodes(address=url, filters=[("state", "=", "ALIVE")])
            except ServerUnavailable:  # the dashboard answers before its state API does
                nodes = []
            if len(nodes) == 2:
                break
            assert time.time() < deadline, f"the worker node did not join: {nodes}"
            time.sleep(2)

        root = f"{s3_bucket}/run"
        overrides = [
            # data=synthetic: 4 small machine types (the default, realistic_small, has 6); this test is
            # about two nodes and S3, not accuracy
            "ray=cluster", "ray.progress=false", f"root={root}", "data=synthetic",
            "stages=[make_corpus,featurize,pretrain,embed,score]", "recipe=pretrained", "compare=[logmel]",
            "data.spec.n_train_source=6", "data.spec.n_train_target=2",
            "data.spec.n_test_per_domain=4", "data.spec.duration_s=1.0", "data.workers=1",
            "recipe.pretrain.train.steps=4", "recipe.pretrain.train.checkpoint_every=2",
            "recipe.pretrain.train.batch_size=8",
            # small batches, so every stage has several tasks to spread (64 rows would be one batch)
            "featurize.batch_size=8", "embed.batch_size=8", "score.batch_size=8",
        ]
        # the moto endpoint for the job; the (moto) credentials come from the nodes' environment
        aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REQUEST_CHECKSUM_CALCULATION",
                                          "AWS_RESPONSE_CHECKSUM_VALIDATION") if k in os.environ}
        client = JobSubmissionClient(url)
        job, deadline = None, time.time() + 300
        while job is None:
            try:
                job = client.submit_job(
                    entrypoint="python -m jobs.pipeline " + " ".join(f"'{o}'" for o in overrides),
                    runtime_env={"working_dir": repo, "excludes": [".git", "outputs"],
                                 "env_vars": {**aws, "ASD_HYDRA_DIR": str(tmp_path / "hydra"), "TQDM_DISABLE": "1",
                                             # Ray Data's Parquet listing starts 32 footer-reading actors per
                                             # read by default: minutes of worker start-up on two cores
                                             "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}},
                )
            except RuntimeError as exc:  # "No available agent to submit job" while the job agent starts
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(2)
        status, deadline = None, time.time() + 480
        while time.time() < deadline:
            status = _job_status(client, job, f"{temp}-head")
            if status.is_terminal():
                break
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-6000:]
        out = _job_result(logs)

        # outputs on S3
        assert out["root"] == root and out["stages"]["featurize"]["n_featurized"] == 4 * (6 + 2 + 8)
        pre = out["stages"]["recipes"]["pretrained"]["pretrain"]
        assert pre["steps"] == 4 and pre["checkpoint"] == f"{root}/checkpoints/pretrain/step-00000004"
        assert storage.exists(f"{pre['checkpoint']}/state.pt") and storage.exists(f"{root}/models/pretrain/encoder.pt")
        for tag in ("logmel", "pretrained"):
            scores = f"{root}/scores/{tag}"
            assert out["stages"]["recipes"][tag]["score"]["scores"] == scores
            assert storage.is_published(scores) and storage.read_table(f"{scores}/scores.parquet").num_rows == 4 * 8
            assert "official score" in storage.read_text(f"{scores}/report.md")
            fs, path = storage.filesystem(scores)
            names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
            assert any(n.startswith("anomaly_score_") for n in names), names
            assert any(n.startswith("decision_result_") for n in names), names
        assert storage.exists(f"{root}/scores/comparison.md") and storage.exists(f"{root}/models/CURRENT")

        # the job's tasks ran on both nodes (Ray's task events, read through the dashboard)
        job_id = client.get_job_info(job).job_id
        tasks = list_tasks(address=url, filters=[("job_id", "=", job_id)], detail=True, limit=10_000,
                           raise_on_missing_output=False)
        label = {n.node_id: "head" if n.is_head_node else "worker" for n in nodes}
        ran: dict[str, set] = {}
        for t in tasks:
            if t.node_id and t.state == "FINISHED":
                ran.setdefault(t.name, set()).add(label.get(t.node_id, t.node_id))
        where = {name: sorted(n) for name, n in ran.items()}
        assert set().union(*ran.values()) == {"head", "worker"}, where
        featurized = set().union(*[n for name, n in ran.items() if "_featurize_udf" in name])
        assert featurized == {"head", "worker"}, where  # one stage's tasks, spread over both nodes
    finally:
        for p in reversed(procs):  # the worker node first, then the head
            _stop_ray_node(p)
        for suffix in ("-head", "-worker"):
            shutil.rmtree(temp + suffix, ignore_errors=True)

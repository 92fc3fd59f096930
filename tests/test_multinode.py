"""Running as Ray jobs on a real cluster started with `ray start`: token authentication."""

import os
import secrets
import signal
import socket
import subprocess
import time

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
        os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", temp], check=False)

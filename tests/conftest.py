"""Shared test harness.

- ``ray_session``: one local Ray instance for the whole session (2 logical CPUs, no
  dashboard), started on first use; Ray token auth is disabled for tests only.
- ``s3``: a moto S3 server on 127.0.0.1. ``.ci/run`` starts one and exports
  ``AWS_ENDPOINT_URL``; a plain local ``pytest`` starts one in-process. The AWS
  variables are set before Ray starts, so Ray workers reach the same server.
- ``small_corpus``: a generated DCASE-like corpus (session scoped).
- ``triage_served``, ``triage_night``: a served log-mel root and a rescored night with anomalies and
  sensor faults, for the triage pages' tests (``tests/triage_fixtures.py``).
- ``real_data``: ``../shared/data/real`` (or ``ASD_REAL_DATA``) when present, else the test is skipped;
  ``toycar_dev``: the built DCASE 2023 ToyCar development set in it, else skipped.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

# --- environment shared with Ray workers: set before anything starts Ray -------------
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")


from jobs.common import ray_data_defaults  # noqa: E402  (after the environment above)

ray_data_defaults(cpus=2)  # the test session's Ray has 2 logical CPUs (ray_session)

from jobs import schema  # noqa: E402

schema.register()  # tests compose every job's config directly (as each job module does for its own)

from tests.triage_fixtures import triage_night, triage_served  # noqa: E402, F401  (the triage pages' fixtures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if "AWS_ENDPOINT_URL" not in os.environ:
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"
    _START_MOTO_HERE = True
else:
    _START_MOTO_HERE = False

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("ASD_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def _endpoint_up(url: str) -> bool:
    host, port = url.split("://", 1)[1].split(":")
    try:
        with socket.create_connection((host, int(port.split("/")[0])), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a running moto S3 server (started here unless .ci/run already did)."""
    url = os.environ["AWS_ENDPOINT_URL"]
    server = None
    if not _endpoint_up(url):
        if not _START_MOTO_HERE:
            pytest.fail(f"AWS_ENDPOINT_URL={url} is set but nothing listens there")
        from moto.server import ThreadedMotoServer

        port = int(url.rsplit(":", 1)[1])
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    yield url
    if server is not None:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket for one test: returns ``s3://<bucket>``."""
    import boto3

    name = f"asd-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh instance, never another session's cluster
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=1_500_000_000,
        )
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A generated DCASE-like corpus: a few types, both domains, normal and anomalous tests."""
    from asd.data.synthetic import default_spec, make_corpus

    root = tmp_path_factory.mktemp("corpus")
    spec = default_spec(n_train_source=12, n_train_target=3, n_test_per_domain=8, duration_s=2.0, seed=7)
    make_corpus(spec, str(root), workers=1, progress=False)
    return str(root)


@pytest.fixture(scope="session")
def real_data():
    if not REAL_DATA.is_dir():
        pytest.skip(f"real DCASE clips not found at {REAL_DATA} (set ASD_REAL_DATA)")
    return REAL_DATA


@pytest.fixture
def toycar_dev():
    """The complete DCASE 2023 ToyCar development set, built from its kit (docs/results.md); the
    test is skipped where it has not been built (CI)."""
    folder = REAL_DATA / "dcase2023_toycar_dev"
    wavs = list((folder / "ToyCar" / "train").glob("*.wav")) if folder.is_dir() else []
    if len(wavs) < 998:
        pytest.skip(f"the DCASE 2023 ToyCar development set is not built at {folder} ({len(wavs)} training WAVs; "
                    "docs/results.md says how to build it, ASD_REAL_DATA where)")
    return folder


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

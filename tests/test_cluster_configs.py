"""Static checks of the deployment files (cluster_configs/, docs/cluster.md): fast, no network.

- every YAML parses; the AWS launcher config validates against Ray's installed
  ``autoscaler/ray-schema.json``; the KubeRay manifests and the CronJob have the fields
  KubeRay / Kubernetes require;
- images and Ray versions agree with each other and with pyproject's pin (and Python 3.11);
- every ``python -m jobs.X`` named exists, with Hydra options that exist;
- security: no key-shaped strings anywhere in the repository, no config turns Ray token
  auth off, no Ray port (8265/6379/10001) open to the world in the AWS security group.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CC = REPO / "cluster_configs"
DOC = REPO / "docs" / "cluster.md"
CONF = REPO / "jobs" / "conf"
AWS = CC / "aws" / "asd-cluster.yaml"
K8S = CC / "k8s"
RAY_PORTS = (8265, 6379, 10001)


# --------------------------------------------------------------------------- helpers


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def _yaml_files() -> list[Path]:
    return sorted(p for p in CC.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.y*ml")) for d in _load_all(p)]


def _of_kind(kind: str) -> list[dict]:
    return [d for d in _k8s_docs() if d.get("kind") == kind]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _ray_pin() -> str:
    """'2.60' from ``ray[train,data,default]==2.60.*``."""
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.match(r"^ray(\[[^\]]*\])?==(\d+\.\d+)(\.\*|\.\d+)?$", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml does not pin ray==X.Y.*")


def _py_tag() -> str:
    """'py311' from ``requires-python = ">=3.11"``."""
    m = re.search(r"(\d+)\.(\d+)", _pyproject()["project"]["requires-python"])
    assert m, "requires-python has no version"
    return f"py{m.group(1)}{m.group(2)}"


def _deployment_texts() -> dict[str, str]:
    """Every text file under cluster_configs/ plus docs/cluster.md."""
    files = [p for p in CC.rglob("*") if p.is_file()] + [DOC]
    return {_rel(p): p.read_text(encoding="utf-8") for p in sorted(files) if not _is_binary(p)}


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _repo_files() -> list[Path]:
    """Tracked files plus untracked files git does not ignore (what a commit could include)."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True)
        names = sorted({n for n in out.stdout.decode("utf-8", "replace").split("\0") if n})
        return [REPO / n for n in names if (REPO / n).is_file()]
    skip = {".git", "outputs", "__pycache__", ".venv", "build", "dist"}
    return sorted(p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts))


def _walk(node, path=()):
    """Yield (path, key, value) for every mapping entry in a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a RayCluster / RayJob / CronJob document."""
    found = []
    for _path, key, value in _walk(doc):
        if key == "template" and isinstance(value, dict) and isinstance(value.get("spec"), dict) \
                and "containers" in value["spec"]:
            found.append(value["spec"])
    return found


# --------------------------------------------------------------------------- parsing


def test_expected_files_exist():
    for rel in ["README.md", "aws/asd-cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob-pipeline.yaml",
                "k8s/cronjob-rescore.yaml", "local/README.md", "local/start.sh", "docker/Dockerfile"]:
        assert (CC / rel).is_file(), f"cluster_configs/{rel} is missing"
    assert DOC.is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_every_yaml_parses(path):
    docs = _load_all(path)
    assert docs, f"{_rel(path)} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{_rel(path)}: every document must be a mapping"


# --------------------------------------------------------------------------- AWS launcher


@pytest.fixture(scope="module")
def aws() -> dict:
    (cfg,) = _load_all(AWS)
    return cfg


def _ray_schema_path() -> Path | None:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return p if p.is_file() else None


def test_aws_required_fields(aws):
    assert isinstance(aws.get("cluster_name"), str) and aws["cluster_name"]
    assert aws["provider"]["type"] == "aws" and aws["provider"]["region"]
    assert isinstance(aws.get("max_workers"), int)
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    for name, nt in types.items():
        assert "resources" in nt and "node_config" in nt, name
        assert nt["node_config"].get("InstanceType"), name
        assert nt.get("min_workers", 0) <= nt.get("max_workers", aws["max_workers"]), name
    workers = [nt for n, nt in types.items() if n != aws["head_node_type"]]
    assert sum(nt.get("max_workers", 0) for nt in workers) <= aws["max_workers"]


def test_aws_validates_against_ray_schema(aws):
    schema_path = _ray_schema_path()
    if schema_path is None:
        pytest.skip("ray's autoscaler/ray-schema.json is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(aws, json.loads(schema_path.read_text(encoding="utf-8")))


def test_aws_passes_ray_validate_config(aws):
    """Ray's own check after filling in defaults (offline; a private API, so skip if it moved)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray.autoscaler._private.util not available")
    validate_config(prepare_config(json.loads(json.dumps(aws))))


def test_aws_cluster_shape(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU: 0 (no training work on it)"
    assert re.match(r"^(g5|g6|g6e)\.", types["gpu_finetune"]["node_config"]["InstanceType"])
    assert re.match(r"^(p4d|p4de|p5|p5e|p5en)\.", types["gpu_pretrain"]["node_config"]["InstanceType"])
    assert re.match(r"^[cmr]\d", types["cpu_featurize"]["node_config"]["InstanceType"])
    for name in ("gpu_finetune", "gpu_pretrain", "cpu_featurize"):
        assert types[name].get("min_workers", 0) == 0, f"{name} should scale from zero"
        assert types[name].get("max_workers", 0) >= 1, name
    for name, nt in types.items():
        arn = nt["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.match(r"^arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+$", arn), \
            f"{name}: S3 access must come from an IAM instance profile ARN"


def test_aws_token_auth_on(aws):
    mounts = aws.get("file_mounts", {})
    assert any(remote.endswith("/.ray/auth_token") and local == "~/.ray/auth_token"
               for remote, local in mounts.items()), "the local Ray token must be copied to every node"
    for key, start in (("head_start_ray_commands", "ray start --head"),
                       ("worker_start_ray_commands", "ray start --address")):
        cmds = [c for c in aws[key] if "ray start" in c]
        assert cmds and all(start in c for c in cmds), key
        assert all("RAY_AUTH_MODE=token" in c for c in cmds), f"{key}: ray start must run with RAY_AUTH_MODE=token"
    head_cmds = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_cmds and "--dashboard-host 0.0.0.0" not in head_cmds


def _world_open_ray_ports(rules: list[dict]) -> list[tuple[int, str]]:
    """(port, cidr) for every Ray port a rule opens to the whole internet."""
    bad = []
    for rule in rules or []:
        proto = str(rule.get("IpProtocol", "-1"))
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        ports = [p for p in RAY_PORTS
                 if proto in ("-1", "all") or lo in (-1, None) or (proto in ("tcp", "6") and lo <= p <= hi)]
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        bad += [(p, c) for p in ports for c in cidrs if c in ("0.0.0.0/0", "::/0")]
    return bad


def test_security_group_checker_catches_open_ports():
    assert _world_open_ray_ports([{"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                                   "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]) == [(8265, "0.0.0.0/0")]
    assert _world_open_ray_ports([{"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}])
    assert _world_open_ray_ports([{"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 11000,
                                   "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]) == \
        [(8265, "0.0.0.0/0"), (6379, "0.0.0.0/0"), (10001, "0.0.0.0/0")]
    assert not _world_open_ray_ports([{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                       "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert not _world_open_ray_ports([{"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                                       "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}])


def test_aws_ray_ports_not_open_to_world(aws):
    rules = aws["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not _world_open_ray_ports(rules), "dashboard/GCS/client ports must stay inside the cluster"
    # and no other place in the config smuggles in an ingress rule
    for _path, key, value in _walk(aws):
        if key == "IpPermissions":
            assert not _world_open_ray_ports(value)


# --------------------------------------------------------------------------- KubeRay / Kubernetes


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_raycluster_fields():
    (rc,) = _of_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head Service must not be exposed"
    assert isinstance(head["rayStartParams"], dict)
    assert str(head["rayStartParams"].get("num-cpus")) == "0", "no training work on the head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"gpu-finetune", "gpu-pretrain"} <= set(groups)
    for group in [head, *groups.values()]:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers)
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], g["groupName"]
        assert g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]

    def gpus(g):
        return int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))

    assert gpus(groups["gpu-finetune"]) == 1
    assert gpus(groups["gpu-pretrain"]) == 8
    assert any(gpus(g) == 0 for g in groups.values()), "a CPU worker group for featurization"
    assert spec.get("enableInTreeAutoscaling") is True


def test_kuberay_token_auth_from_secret():
    (rc,) = _of_kind("RayCluster")
    auth = rc["spec"].get("authOptions") or {}
    if auth:
        assert auth.get("mode", "token") == "token"
        assert auth.get("secretName"), "the token must come from a named Secret"
    else:  # manual wiring: every Ray container reads the token from a Secret
        for pod in _pod_specs(rc):
            env = _env(pod["containers"][0])
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token"
            assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {})
    for doc in _k8s_docs():
        for _path, key, value in _walk(doc):
            if key == "env" and isinstance(value, list):
                for e in value:
                    if e.get("name") == "RAY_AUTH_TOKEN":
                        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), \
                            "RAY_AUTH_TOKEN must come from a Secret, never a literal"
    assert not _of_kind("Secret"), "no Secret manifests (with tokens) in the repository"


def test_kuberay_irsa_service_account():
    (rc,) = _of_kind("RayCluster")
    sas = {d["metadata"]["name"]: d for d in _of_kind("ServiceAccount")}
    assert sas, "a ServiceAccount for IRSA"
    for sa in sas.values():
        arn = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
        assert re.match(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]+$", arn)
    for pod in _pod_specs(rc):
        assert pod.get("serviceAccountName") in sas, "every Ray pod uses the IRSA ServiceAccount"


def test_kuberay_rayjob_runs_the_pipeline():
    (rc,) = _of_kind("RayCluster")
    (job,) = _of_kind("RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python -m jobs.pipeline ")
    for part in ("ray=cluster", "root=s3://", "data=dir", "data.input=s3://"):
        assert part in entry, part
    if "clusterSelector" in spec:
        assert spec["clusterSelector"].get("ray.io/cluster") == rc["metadata"]["name"]
        assert not spec.get("shutdownAfterJobFinishes"), "never tear down the shared cluster"
    else:
        assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = ["", "", "", "jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec", "sun|mon|tue|wed|thu|fri|sat"]


def _valid_cron(expr: str) -> bool:
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi), names in zip(fields, _CRON_RANGES, _CRON_NAMES):
        for item in field.split(","):
            base, _, step = item.partition("/")
            if step and not step.isdigit():
                return False
            if base == "*" or (names and re.fullmatch(f"({names})(-({names}))?", base, re.I)):
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", base)
            if not m or not all(lo <= int(x) <= hi for x in m.groups() if x is not None):
                return False
    return True


def test_cron_validator():
    assert _valid_cron("30 2 * * *") and _valid_cron("*/15 0-6 1,15 * mon-fri")
    for bad in ("30 2 * *", "61 2 * * *", "0 24 * * *", "@daily", "0 2 * * * *", "x 2 * * *"):
        assert not _valid_cron(bad), bad


def test_cronjob_submits_nightly_rescore():
    (rc,) = _of_kind("RayCluster")
    (cron,) = _of_kind("CronJob")
    assert cron["apiVersion"] == "batch/v1" and cron["metadata"]["name"]
    assert _valid_cron(cron["spec"]["schedule"]), cron["spec"]["schedule"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure")
    (container,) = pod["containers"]
    cmd = " ".join(container.get("command", []) + container.get("args", []))
    cmd = re.sub(r"\\\s*\n\s*", " ", cmd).replace('"', "").replace("'", "")
    for part in ("ray job submit", "python -m jobs.rescore", "ray=cluster", "root=s3://", "inbox=s3://"):
        assert part in cmd, part
    assert f"http://{rc['metadata']['name']}-head-svc" in cmd, "submit to the RayCluster's head Service"
    env = _env(container)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = (rc["spec"].get("authOptions") or {}).get("secretName")
    if secret:
        assert ref["name"] == secret and ref["key"] == "auth_token"


# --------------------------------------------------------------------------- versions


def test_images_and_ray_versions_agree():
    pin, py = _ray_pin(), _py_tag()
    texts = _deployment_texts()
    stock = {(f, t) for f, s in texts.items() for t in re.findall(r"rayproject/ray(?:-ml|-llm)?:([\w.\-]+)", s)}
    assert stock, "no rayproject/ray image named anywhere"
    versions = set()
    for f, tag in stock:
        m = re.fullmatch(r"(\d+\.\d+\.\d+)-(py\d+)(-[\w.]+)?", tag)
        assert m, f"{f}: image tag {tag!r} should pin an exact Ray version and Python"
        assert m.group(1).startswith(pin + "."), f"{f}: Ray {m.group(1)} but pyproject pins {pin}.*"
        assert m.group(2) == py, f"{f}: {m.group(2)} but pyproject needs {py}"
        versions.add(m.group(1))
    assert len(versions) == 1, f"files disagree on the Ray version: {sorted(versions)}"
    (version,) = versions

    # custom images carry the same Ray/Python in their tag; rayVersion fields match
    for f, s in texts.items():
        for rv, tpy in re.findall(r"/asd:[\w.\-]*?ray(\d+\.\d+\.\d+)-(py\d+)", s):
            assert (rv, tpy) == (version, py), f"{f}: asd image tag says ray{rv}-{tpy}"
        for rv in re.findall(r"^\s*rayVersion:\s*[\"']?([\w.]+)", s, re.M):
            assert rv == version, f"{f}: rayVersion {rv} != {version}"
        for rv in re.findall(r"\bray(?:\[[^\]]*\])?==([\d.*]+)", s):
            assert rv.startswith(pin), f"{f}: ray=={rv} != {pin}.*"
    froms = re.findall(r"^FROM\s+(\S+)", (CC / "docker" / "Dockerfile").read_text(), re.M)
    assert froms and all(f.startswith(f"rayproject/ray:{version}-{py}") for f in froms)

    # one image for every pod in the Kubernetes manifests
    k8s_images = {c["image"] for d in _k8s_docs() for pod in _pod_specs(d) for c in pod["containers"]}
    assert len(k8s_images) == 1, f"Kubernetes manifests use several images: {sorted(k8s_images)}"
    (rc,) = _of_kind("RayCluster")
    assert rc["spec"]["rayVersion"] == version


# --------------------------------------------------------------------------- job commands


def _job_commands() -> list[tuple[str, str, list[str]]]:
    """(file, job module, override tokens) for every ``python -m jobs.X ...`` in the deployment files."""
    found = []
    for f, text in _deployment_texts().items():
        joined = re.sub(r"\\\s*\n\s*", " ", text)  # shell line continuations
        for m in re.finditer(r"python -m jobs\.(\w+)([^\n]*)", joined):
            found.append((f, m.group(1), m.group(2).split()))
    return found


def _primary_config(job: str) -> tuple[set[str], set[str]]:
    """(config groups in the job's defaults list, other top-level keys) of jobs/conf/<job>.yaml."""
    cfg = yaml.safe_load((CONF / f"{job}.yaml").read_text(encoding="utf-8")) or {}
    groups, keys = set(), {k for k in cfg if k not in ("defaults",)} | {"hydra"}
    for entry in cfg.get("defaults", []):
        if isinstance(entry, dict):
            groups.update(k.split("@")[0].split("/")[-1] for k in entry)
        elif entry != "_self_":  # a shared config of jobs/conf (base.yaml, served.yaml)
            more_groups, more_keys = _primary_config(entry)
            groups |= more_groups
            keys |= more_keys
    return groups, keys


def test_job_commands_and_hydra_options_exist():
    commands = _job_commands()
    assert {"pipeline", "rescore"} <= {job for _f, job, _o in commands}
    for f, job, tokens in commands:
        assert (REPO / "jobs" / f"{job}.py").is_file(), f"{f}: jobs/{job}.py does not exist"
        assert (CONF / f"{job}.yaml").is_file(), f"{f}: jobs/conf/{job}.yaml does not exist"
        groups, keys = _primary_config(job)
        if any("=" in t for t in tokens):  # a runnable command, not a mention in prose
            assert any(t.strip("'\"`").startswith("ray=cluster") for t in tokens), \
                f"{f}: `python -m jobs.{job}` on a cluster needs ray=cluster"
        for tok in tokens:
            m = re.match(r"^([+~]{0,2})([A-Za-z_][\w.]*)=(.*)$", tok.strip("'\"`"))
            if not m:
                continue
            prefix, key, value = m.groups()
            top = key.split(".")[0]
            if top in groups and "." not in key:
                value = re.match(r"['\"`]*([\w\-/]*)", value).group(1)
                assert (CONF / top / f"{value}.yaml").is_file(), \
                    f"{f}: {job}: {key}={value} but jobs/conf/{top}/{value}.yaml does not exist"
            elif (CONF / top).is_dir() and top not in groups:
                assert prefix.startswith("+"), f"{f}: {job} has no '{top}' group in its defaults (use +{key}=)"
            else:
                assert top in groups or top in keys or prefix.startswith("+"), \
                    f"{f}: {job} has no config key '{top}' (from {tok!r})"


# --------------------------------------------------------------------------- security


def _secret_patterns() -> dict[str, re.Pattern]:
    # built from pieces so this file never contains a string its own checks would match
    return {
        "AWS access key id": re.compile(r"(?<![A-Z0-9])(?:" + "AK" + "IA|" + "AS" + "IA)[0-9A-Z]{16}(?![A-Z0-9])"),
        "AWS secret access key": re.compile(
            r"aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
            re.I),
        "private key block": re.compile("-----" + r"BEGIN (?:[A-Z0-9]+ )*PRIVATE " + "KEY-----"),
    }


def _find_secrets(text: str) -> list[str]:
    return [name for name, pat in _secret_patterns().items() if pat.search(text)]


def test_secret_patterns_catch_samples():
    key_id = "AK" + "IA" + "Q3EXAMPLE7ZZ4X2B"
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert _find_secrets(f"id: {key_id}") == ["AWS access key id"]
    assert _find_secrets(f"aws_secret_access_key = {secret}") == ["AWS secret access key"]
    assert _find_secrets(f'AWS_SECRET_ACCESS_KEY: "{secret}"') == ["AWS secret access key"]
    assert _find_secrets("-----" + "BEGIN RSA PRIVATE " + "KEY-----\nMIIE") == ["private key block"]
    assert _find_secrets("-----" + "BEGIN OPENSSH PRIVATE " + "KEY-----") == ["private key block"]
    assert not _find_secrets("AWS_SECRET_ACCESS_KEY=testing  arn:aws:iam::123456789012:role/x")


def test_no_key_shaped_strings_in_repository():
    hits = []
    for path in _repo_files():
        if path.stat().st_size > 5_000_000 or _is_binary(path):
            continue
        found = _find_secrets(path.read_text(encoding="utf-8", errors="replace"))
        hits += [f"{_rel(path)}: {name}" for name in found]
    assert not hits, "key-shaped strings in the repository:\n" + "\n".join(hits)


_AUTH_OFF_ALLOWED = ("tests/", ".ci/", "scripts/test.sh")
_AUTH_OFF_TEXT = re.compile(r"RAY_AUTH_MODE[\"']?\s*[:=]\s*[\"']?disabled", re.I)


def _disables_auth(doc) -> bool:
    for _path, key, value in _walk(doc):
        if key == "env" and isinstance(value, list):
            if any(isinstance(e, dict) and e.get("name") == "RAY_AUTH_MODE"
                   and str(e.get("value", "")).lower() == "disabled" for e in value):
                return True
        if key in ("env", "env_vars", "environment") and isinstance(value, dict):
            if str(value.get("RAY_AUTH_MODE", "")).lower() == "disabled":
                return True
        if key == "authOptions" and isinstance(value, dict) and str(value.get("mode", "")).lower() == "disabled":
            return True
    return False


def test_auth_checker_catches_samples():
    assert _disables_auth({"env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]})
    assert _disables_auth({"spec": {"authOptions": {"mode": "disabled"}}})
    assert _disables_auth({"runtime_env": {"env_vars": {"RAY_AUTH_MODE": "disabled"}}})
    assert not _disables_auth({"env": [{"name": "RAY_AUTH_MODE", "value": "token"}]})
    assert _AUTH_OFF_TEXT.search("export RAY_AUTH_MODE=disabled")
    assert _AUTH_OFF_TEXT.search('RAY_AUTH_MODE: "disabled"')


def test_no_config_disables_ray_auth():
    deployment = {_rel(p) for p in CC.rglob("*") if p.is_file()} | {_rel(DOC)}
    offenders = []
    for path in _repo_files():
        rel = _rel(path)
        if rel.startswith(_AUTH_OFF_ALLOWED) or _is_binary(path):
            continue
        is_yaml = path.suffix in (".yaml", ".yml")
        if not (is_yaml or path.suffix == ".sh" or rel in deployment):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if _AUTH_OFF_TEXT.search(text):
            offenders.append(rel)
        elif is_yaml:
            try:
                docs = list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                continue  # parse errors of our own YAML are reported by test_every_yaml_parses
            if any(_disables_auth(d) for d in docs):
                offenders.append(rel)
    assert not offenders, f"these files turn Ray token auth off: {offenders}"


# --------------------------------------------------------------------------- local + docs


def test_local_start_script():
    script = CC / "local" / "start.sh"
    text = script.read_text(encoding="utf-8")
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    for part in ("export RAY_AUTH_MODE=token", "ray get-auth-token --generate", "ray start", "--head", "--num-cpus"):
        assert part in text, part
    readme = (CC / "local" / "README.md").read_text(encoding="utf-8")
    assert "ray job submit --working-dir . -- python -m jobs.pipeline ray=cluster" in readme


def test_docs_runtime_env_matches_pyproject():
    text = DOC.read_text(encoding="utf-8")
    envs = [json.loads(m) for m in re.findall(r"--runtime-env-json '(\{.*?\})'", text, re.S)]
    pips = [e["pip"] for e in envs if "pip" in e]
    assert pips, "docs/cluster.md should show the runtime_env pip list"
    wanted = {d for d in _pyproject()["project"]["dependencies"] if not re.match(r"^ray\b", d)}
    for pip in pips:
        assert set(pip) == wanted, f"runtime_env pip list drifted from pyproject: {set(pip) ^ wanted}"
    for part in ("ray up", "ray attach", "ray dashboard", "ray job submit --address",
                 "scores/<tag>/report.md", "rescore/date=YYYY-MM-DD", "RAY_AUTH_MODE=token"):
        assert part in text, part
    assert re.search(r"kubectl (-n \S+ )?apply -f cluster_configs/k8s/raycluster.yaml", text)

"""The cluster definitions in cluster/ and docker/ are valid for the tools that read them, and hold the sd35m preset.

- cluster/ray-cluster.yaml against the autoscaler schema shipped inside the installed ray package;
- cluster/kuberay/*.yaml against the KubeRay CRDs in ../shared/schemas/kuberay (the openAPIV3Schema of the manifest's
  apiVersion), strictly: a field the CRD does not define is an error, as `kubectl apply` (strict field validation)
  would report it;
- both layouts offer what `role_demands(sd35m)` asks for, at their minimum size, and the RayJob's entrypoint is a
  valid Step-GRPO configuration;
- docker/Dockerfile installs the same torch and Ray versions that pyproject.toml pins.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from drm_ray.config import load_config
from drm_ray.placement import role_demands, shortfalls

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "schemas" / "kuberay"   # beside the checkout, as CI lays it out
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _load(path: Path) -> dict:
    # the C loader when present: the CRDs are 1-2 MB of YAML (seconds with the pure-Python one)
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _validate(instance: dict, schema: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


# ------------------------------------------------------------------------------------------ Ray cluster launcher


def test_ray_cluster_yaml_matches_the_autoscaler_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(ROOT / "cluster" / "ray-cluster.yaml")
    assert _validate(config, schema) == []
    # the schema's check is real: a misspelled node-type field is rejected
    broken = json.loads(json.dumps(config))
    broken["available_node_types"]["rollout_gpu"]["max_worker"] = 3
    assert _validate(broken, schema)


def test_ray_cluster_layout_holds_sd35m_and_keeps_the_head_free():
    config = _load(ROOT / "cluster" / "ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    assert head.get("CPU") == 0 and not head.get("GPU") and "rollout" not in head and "learner" not in head

    def nodes(size: str) -> list[dict]:
        out = [head]
        for name, t in types.items():
            if name != config["head_node_type"]:
                out += [t["resources"]] * t[size]
        return out

    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) \
        <= config["max_workers"]
    sd35m = load_config("sd35m", job="step_grpo")
    assert shortfalls(role_demands(sd35m), nodes("min_workers")) == []
    assert shortfalls(role_demands(load_config("sd35m", ["rollout.num_workers=16"])), nodes("max_workers")) == []
    too_many = shortfalls(role_demands(load_config("sd35m", ["rollout.num_workers=17"])), nodes("max_workers"))
    assert len(too_many) == 1 and too_many[0].startswith("need 18 rollout"), too_many
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])


# ------------------------------------------------------------------------------------------ KubeRay


def _strict(schema):
    """An openAPIV3Schema as JSON Schema that rejects fields the CRD does not define."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd_schema(kind: str, api_version: str) -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared/ folder beside the checkout)")
    crd = _load(CRD_DIR / CRDS[kind])
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{kind} CRD has no version {version}")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_the_crds(name):
    manifest = _load(ROOT / "cluster" / "kuberay" / name)
    schema = _crd_schema(manifest["kind"], manifest["apiVersion"])
    assert _validate(manifest, schema) == []
    broken = json.loads(json.dumps(manifest))
    broken["spec"]["unknownField"] = 1  # strictness is real
    assert _validate(broken, schema)


def _ray_resources(group: dict, head: bool) -> dict[str, float]:
    """The Ray resources KubeRay gives a pod of this group: CPU / GPU from the container limits unless
    rayStartParams says otherwise, custom ones from rayStartParams.resources."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    out = {"CPU": float(params.get("num-cpus", limits["cpu"])),
           "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    if "resources" in params:
        out.update(json.loads(json.loads(params["resources"])))  # a JSON string inside quotes, as ray start wants
    assert head or out["CPU"] > 0
    return out


def test_kuberay_layout_holds_sd35m_and_the_job_is_consistent_with_the_cluster():
    cluster = _load(ROOT / "cluster" / "kuberay" / "raycluster.yaml")
    job = _load(ROOT / "cluster" / "kuberay" / "rayjob.yaml")
    head = _ray_resources(cluster["spec"]["headGroupSpec"], head=True)
    assert head["CPU"] == 0 and head["GPU"] == 0
    groups = cluster["spec"]["workerGroupSpecs"]
    at_min = [head] + [_ray_resources(g, head=False) for g in groups for _ in range(g["minReplicas"])]
    at_max = [head] + [_ray_resources(g, head=False) for g in groups for _ in range(g["maxReplicas"])]

    # the entrypoint is a valid Step-GRPO configuration, and the cluster can hold it without scaling
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/step_grpo.py"] and argv[2] == "--config"
    cfg = load_config(argv[3], argv[4:], job="step_grpo")
    assert cfg.run.output_dir.startswith("/shared/") and cfg.rollout.autoscale_wait_s > 0
    assert shortfalls(role_demands(cfg), at_min) == []
    assert shortfalls(role_demands(load_config(argv[3], [*argv[4:], "rollout.num_workers=16"])), at_max) == []

    # the job runs on this cluster, with the same token mode and token, and outputs on the shared volume
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    auth = cluster["spec"]["authOptions"]
    env = {e["name"]: e for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert auth["mode"] == "token" and env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == auth["secretName"]
    for spec in [cluster["spec"]["headGroupSpec"], *groups]:
        pod = spec["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts["/shared"]] == "drm-ray-shared"
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in pod["containers"][0]["env"])
    storage = _load(ROOT / "cluster" / "kuberay" / "storage.yaml")
    assert storage["metadata"]["name"] == "drm-ray-shared" and storage["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------------------------------ Docker


def test_dockerfile_installs_the_pinned_torch_first_and_the_pinned_ray():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    ray_pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', pyproject).group(1)
    assert re.search(rf"ARG BASE_IMAGE=rayproject/ray:{re.escape(ray_pin)}-py311-", dockerfile)
    torch_at = dockerfile.index(f"torch=={torch_pin}")
    assert torch_at < dockerfile.index("pip install --no-cache-dir .")
    assert re.search(r"^USER 1000", dockerfile, re.M)  # non-root
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1:] and "*" in ignored  # allow-list: .venv, outputs, .git, *.db stay out
    assert not any(line.startswith("!") and (".venv" in line or "outputs" in line) for line in ignored)

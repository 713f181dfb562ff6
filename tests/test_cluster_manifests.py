"""kubectl-free checks of cluster/ and the job configs: the fields Kubernetes, KubeRay and the Ray cluster launcher
require, the security settings the README promises (token auth on, dashboard not public), and that each job's
entrypoint names a config that loads."""
import copy
import json
import os
import re
import shlex

import pytest
import ray
import yaml

from conftest import REPO
from pipeline.config import config_from_dict, load_config
from pipeline.vocab import STAGE_NAMES

DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO / "cluster" / name).read_text()))


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def object_problems(doc: dict) -> list[str]:
    """What every Kubernetes object needs."""
    problems = [f"missing {key}" for key in ("apiVersion", "kind", "metadata") if key not in doc]
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS_NAME.match(name):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 name")
    if doc.get("kind") == "Ingress" or (doc.get("kind") == "Service" and
                                         doc.get("spec", {}).get("type") in PUBLIC_SERVICE_TYPES):
        problems.append(f"{doc['kind']} {name} would expose the cluster")
    return problems


def pod_problems(template: dict, where: str) -> list[str]:
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    problems = [] if containers else [f"{where}: no containers"]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        problems += [f"{where}: container without {key}" for key in ("name", "image") if not c.get(key)]
        problems += [f"{where}: {c.get('name')} mounts undeclared volume {m['name']}"
                     for m in c.get("volumeMounts", []) if m["name"] not in volumes]
    return problems


def ray_cluster_spec_problems(spec: dict, pvc_names: set[str]) -> list[str]:
    """A KubeRay RayClusterSpec for this project: required fields, token auth, a private head, GPU workers, and
    the shared volume on every pod."""
    problems = []
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("authOptions must be {mode: token, secretName: ...}")
    head = spec.get("headGroupSpec")
    groups = spec.get("workerGroupSpecs") or []
    if not head:
        return problems + ["missing headGroupSpec"]
    if head.get("serviceType", "ClusterIP") in PUBLIC_SERVICE_TYPES:
        problems.append(f"head serviceType {head['serviceType']} makes the dashboard public")
    pods = [("head", head)] + [(f"worker group {g.get('groupName')}", g) for g in groups]
    for where, group in pods:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}: rayStartParams must be a map of strings, got {params!r}")
        problems += pod_problems(group.get("template") or {}, where)
        claims = {v["persistentVolumeClaim"]["claimName"] for v in group.get("template", {}).get("spec", {})
                  .get("volumes", []) if "persistentVolumeClaim" in v}
        if not claims & pvc_names:
            problems.append(f"{where}: does not mount the shared volume ({sorted(pvc_names)})")
    if not groups:
        problems.append("no workerGroupSpecs")
    for g in groups:
        if not g.get("groupName"):
            problems.append("a worker group without groupName")
        sizes = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(n, int) for n in sizes) or not sizes[0] <= sizes[1] <= sizes[2]:
            problems.append(f"worker group {g.get('groupName')}: need minReplicas <= replicas <= maxReplicas, "
                            f"got {sizes}")
    gpus = [int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for g in groups for c in g.get("template", {}).get("spec", {}).get("containers", [])]
    if not any(gpus):
        problems.append("no worker group asks for nvidia.com/gpu")
    return problems


def kuberay_problems(docs: list[dict]) -> list[str]:
    problems = [p for doc in docs for p in object_problems(doc)]
    pvcs = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"
            and "ReadWriteMany" in d.get("spec", {}).get("accessModes", [])}
    for doc in docs:
        if doc.get("kind") == "RayCluster":
            problems += ray_cluster_spec_problems(doc.get("spec") or {}, pvcs)
        elif doc.get("kind") == "RayJob":
            spec = doc.get("spec") or {}
            if not spec.get("entrypoint"):
                problems.append("RayJob without entrypoint")
            problems += ray_cluster_spec_problems(spec.get("rayClusterSpec") or {}, pvcs)
        if doc.get("kind") in ("RayCluster", "RayJob") and doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{doc['kind']}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    return problems


@pytest.mark.parametrize("name, kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifests_are_complete(name, kind):
    docs = load_all(name)
    assert kind in by_kind(docs)
    assert kuberay_problems(docs) == []


def test_the_checks_catch_what_they_check():
    """Each kind of mistake is reported, so a passing check above means something."""
    docs = load_all("kuberay-raycluster.yaml")
    cluster = by_kind(docs)["RayCluster"]
    broken = copy.deepcopy(docs)
    spec = by_kind(broken)["RayCluster"]["spec"]
    del spec["authOptions"]
    spec["headGroupSpec"]["serviceType"] = "LoadBalancer"
    spec["workerGroupSpecs"][0]["minReplicas"] = 5
    spec["workerGroupSpecs"][0]["rayStartParams"] = {"num-gpus": 8}
    del spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    broken.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "dashboard"}})
    problems = "\n".join(kuberay_problems(broken))
    for expected in ("authOptions", "makes the dashboard public", "minReplicas <= replicas", "map of strings",
                     "container without image", "Ingress dashboard would expose"):
        assert expected in problems
    assert kuberay_problems(docs) == [] and cluster["spec"]["authOptions"]["mode"] == "token"


def test_rayjob_runs_the_raycluster_spec_and_a_loadable_config():
    cluster, job = by_kind(load_all("kuberay-raycluster.yaml")), by_kind(load_all("kuberay-rayjob.yaml"))
    assert job["RayJob"]["spec"]["rayClusterSpec"] == cluster["RayCluster"]["spec"]
    assert job["PersistentVolumeClaim"] == cluster["PersistentVolumeClaim"]
    spec = job["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline", "run"]
    config = REPO / os.path.relpath(argv[4], "/app")  # cluster/Dockerfile copies the repository's jobs/ to /app
    load_config(str(config))
    stages = argv[argv.index("--stages") + 1].split(",")
    assert set(stages) <= set(STAGE_NAMES)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["env_vars"]


def test_images_run_the_installed_ray():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    images = {image for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
              for image in re.findall(r"^\s*image: (\S+)", (REPO / "cluster" / name).read_text(), re.MULTILINE)}
    images.add(yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())["docker"]["image"])
    assert len(images) == 1, images  # one image, built from cluster/Dockerfile, everywhere


def test_cluster_launcher_config_validates_against_rays_schema():
    """Ray's own schema for `ray up` configs, plus what this project needs of it."""
    import jsonschema
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached only through `ray dashboard`'s SSH tunnel
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    assert "~/.ray/auth_token" in config["file_mounts"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(t["min_workers"] == t["max_workers"] for t in workers)
    broken = copy.deepcopy(config)
    broken["provider"] = {"region": "us-east-1"}  # no type
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_job_configs_and_runtime_env():
    gpu = load_config(str(REPO / "jobs" / "gpu.yaml"))
    assert gpu.reference.tensor_parallel_size > 1 and gpu.reference.use_gpu and gpu.train.use_gpu
    assert gpu.train.num_workers > 8  # more GPUs than one node has: FSDP2 across nodes
    assert "://" in gpu.run.storage  # shared by every node
    demo = yaml.safe_load((REPO / "jobs" / "cluster_demo.yaml").read_text())
    config_from_dict(demo)  # keys and types; its /tmp inputs are made by `python -m pipeline.demo`
    assert all(os.path.isabs(s["path"]) for s in demo["data"]["sources"]) and os.path.isabs(demo["run"]["storage"])
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert set(runtime_env) <= {"excludes", "env_vars"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())  # Ray takes only strings
    assert {".venv/", "runs/"} <= set(runtime_env["excludes"])


def test_the_main_demo_config_is_valid(tmp_path):
    """jobs/dpo_vs_dpop.yaml, the README's main command, with its data written here."""
    from pipeline.demo import write_problem_data

    data = write_problem_data(str(tmp_path))
    cfg = load_config(str(REPO / "jobs" / "dpo_vs_dpop.yaml"),
                      [f"data.sources.0.path={data['problems']}", f"eval.sources.0.path={data['problems_test']}"])
    assert cfg.tune.dpop_lambda == [0.0, 50.0] and cfg.eval.policies == ["tune"]
    assert cfg.eval.select_by == "problems_test/exact_match" and cfg.data.sources[0].format == "math_corruption"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")
                                        if "model" in yaml.safe_load(p.read_text())))
def test_every_job_config_has_valid_keys_and_values(name):
    """Every pipeline config in jobs/ (the demos, the GPU run, the real-model comparisons) passes validation, so no
    documented command starts from a config that fails on its keys."""
    config_from_dict(yaml.safe_load((REPO / "jobs" / name).read_text()))

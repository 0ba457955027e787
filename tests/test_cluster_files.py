"""The cluster files in cluster/, checked offline.

- cluster/aws.yaml, cluster/gcp.yaml: Ray's own checks, the ones `ray up` runs before it calls a
  cloud API (`prepare_config` merges the provider's defaults shipped with Ray, `validate_config`
  checks ray-schema.json and the node-type rules), then what spd-ray needs from them.
- cluster/kuberay-rayjob.yaml: the RayJob's structure (no Kubernetes here), its entrypoint's
  overrides through spd-ray's own config loader.
- cluster/runtime_env.yaml: what `ray job submit --working-dir .` would upload, zipped by Ray's
  own packaging code.

Every checker also meets a deliberately broken copy, so each of these tests can fail.
"""

from __future__ import annotations

import copy
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _zip_files
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from spd_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
INSTALL_DIR = "/home/ubuntu/spd-ray"  # where file_mounts puts the checkout on every node

# GPUs per instance, for the types a launcher file may use (a typo in a type fails here).
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
            "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8, "g6.12xlarge": 4,
            "g6.48xlarge": 8, "g6e.12xlarge": 4, "g6e.48xlarge": 8, "p4d.24xlarge": 8,
            "p4de.24xlarge": 8, "p5.48xlarge": 8}
# GCP accelerator-optimized machine types come with a fixed accelerator and count.
GCP_GPUS = {"g2-standard-4": ("nvidia-l4", 1), "g2-standard-8": ("nvidia-l4", 1),
            "g2-standard-12": ("nvidia-l4", 1), "g2-standard-16": ("nvidia-l4", 1),
            "g2-standard-32": ("nvidia-l4", 1), "g2-standard-24": ("nvidia-l4", 2),
            "g2-standard-48": ("nvidia-l4", 4), "g2-standard-96": ("nvidia-l4", 8),
            "a2-highgpu-1g": ("nvidia-tesla-a100", 1), "a2-highgpu-2g": ("nvidia-tesla-a100", 2),
            "a2-highgpu-4g": ("nvidia-tesla-a100", 4), "a2-highgpu-8g": ("nvidia-tesla-a100", 8),
            "a2-megagpu-16g": ("nvidia-tesla-a100", 16),
            "a2-ultragpu-1g": ("nvidia-a100-80gb", 1), "a2-ultragpu-2g": ("nvidia-a100-80gb", 2),
            "a2-ultragpu-4g": ("nvidia-a100-80gb", 4), "a2-ultragpu-8g": ("nvidia-a100-80gb", 8)}

# `pip install -e DIR` or `pip install -e "DIR[extras]"`
PACKAGE_INSTALL = re.compile(r"pip install\b.*\s-e\s+\"?" + re.escape(INSTALL_DIR)
                             + r"/?(\[(?P<extras>[\w,-]+)\])?\"?(\s|$)")
TORCH_INSTALL = re.compile(r"pip install\b.*\storch(==|\s|$)")
RAY_PIN = re.compile(r"ray\[[^\]]*\]==([0-9][0-9.]*)")
# The job passes these to its own ray.init (spd_ray/local_ray.py, ray_session); Ray refuses a job
# runtime_env with the same keys.
DRIVER_ENV_VARS = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"}
RUNTIME_ENV_FIELDS = {"working_dir", "excludes", "env_vars", "pip", "uv", "py_modules", "conda",
                      "py_executable", "config", "image_uri", "nsight", "java_jars"}


def load_launcher(cloud: str) -> dict:
    return yaml.safe_load(LAUNCHERS[cloud].read_text())


def ray_checked(raw: dict) -> dict:
    """What `ray up` does offline before bootstrapping (which calls the cloud's APIs)."""
    config = prepare_config(copy.deepcopy(raw))  # + defaults.yaml, merged setup commands, min/max
    validate_config(config)  # ray-schema.json (jsonschema), head type, sum of min_workers
    return config


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]}


def _install_problems(where: str, commands: list[str], *, gpu: bool) -> list[str]:
    problems = []
    pkg = [i for i, c in enumerate(commands) if PACKAGE_INSTALL.search(c)]
    torch = [i for i, c in enumerate(commands) if TORCH_INSTALL.search(c)]
    if not pkg:
        problems.append(f"{where}: no `pip install -e {INSTALL_DIR}`")
    if not torch:
        problems.append(f"{where}: no torch install")
    if pkg and torch:
        if min(torch) > min(pkg):
            problems.append(f"{where}: torch must be installed before the package")
        cpu_index = "download.pytorch.org/whl/cpu" in commands[min(torch)]
        if gpu and cpu_index:
            problems.append(f"{where}: GPU nodes get the CPU build of torch")
        if not gpu and not cpu_index:
            problems.append(f"{where}: the head (no GPU) should take the CPU build of torch")
    extras = {e for c in commands if (m := PACKAGE_INSTALL.search(c)) for e in (m["extras"] or "").split(",")}
    if gpu and pkg and "vllm" not in extras:  # generation.backend=vllm imports it on these nodes
        problems.append(f"{where}: GPU nodes must install the package with its vllm extra "
                        f"(pip install -e \"{INSTALL_DIR}[vllm]\")")
    pins = {m for c in commands for m in RAY_PIN.findall(c)}
    if len(pins) != 1:
        problems.append(f"{where}: expected one pinned Ray version, got {sorted(pins)}")
    return problems


def launcher_problems(config: dict, cloud: str) -> list[str]:
    """What spd-ray needs from a launcher config (after prepare_config)."""
    problems = []
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append("head: resources must have CPU: 0 so no task or actor lands on it")
    if head["resources"].get("GPU", 0):
        problems.append("head: should have no GPU")
    if head.get("max_workers", 0) != 0:
        problems.append("head: max_workers must be 0")
    workers = worker_types(config)
    if not workers:
        problems.append("no worker node types")
    for name, t in workers.items():
        gpus, nc = t["resources"].get("GPU", 0), t["node_config"]
        if gpus < 1:
            problems.append(f"{name}: a worker type without GPU resources")
        if t["resources"].get("CPU", 0) < 1:
            problems.append(f"{name}: a worker type without CPUs")
        if not 0 <= t["min_workers"] <= t["max_workers"]:
            problems.append(f"{name}: needs 0 <= min_workers <= max_workers")
        if t["max_workers"] > config["max_workers"]:
            problems.append(f"{name}: max_workers above the cluster's max_workers")
        if cloud == "aws":
            if AWS_GPUS.get(nc.get("InstanceType")) != gpus:
                problems.append(f"{name}: {nc.get('InstanceType')} does not have {gpus} GPUs")
        else:
            accels = nc.get("guestAccelerators") or []
            if sum(a.get("acceleratorCount", 0) for a in accels) != gpus:
                problems.append(f"{name}: guestAccelerators do not add up to {gpus} GPUs")
            if nc.get("machineType") in GCP_GPUS:
                kind, count = GCP_GPUS[nc["machineType"]]
                if [(a.get("acceleratorType"), a.get("acceleratorCount")) for a in accels] != [(kind, count)]:
                    problems.append(f"{name}: {nc['machineType']} comes with {count}x {kind}")
            sched = nc.get("scheduling")
            if not isinstance(sched, dict):  # the GCP API takes an object (ray-project/ray#46248)
                problems.append(f"{name}: scheduling must be a mapping")
            elif sched.get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GPU VMs need scheduling.onHostMaintenance: TERMINATE")
            elif _preemptible(t) and sched.get("automaticRestart") is True:
                problems.append(f"{name}: preemptible VMs cannot restart automatically")
        commands = t.get("worker_setup_commands", config["worker_setup_commands"])
        problems += _install_problems(name, commands, gpu=True)
    for name, t in types.items():
        image = (t["node_config"].get("ImageId", "") if cloud == "aws" else
                 " ".join(d.get("initializeParams", {}).get("sourceImage", "")
                          for d in t["node_config"].get("disks", [])))
        if image.strip().lower() in ("", "latest_dlami"):  # Ray's default AMI is Ubuntu 18.04
            problems.append(f"{name}: no explicit image")
    spot = [n for n, t in workers.items() if _preemptible(t)]
    if not spot:
        problems.append("no spot / preemptible GPU worker type")
    if len(spot) == len(workers):
        problems.append("no on-demand GPU worker type")
    problems += _install_problems("head", config["head_setup_commands"], gpu=False)
    if len({m for c in config["head_setup_commands"] + config["worker_setup_commands"]
            for m in RAY_PIN.findall(c)}) > 1:
        problems.append("head and workers pin different Ray versions")
    if not any("install -y bubblewrap" in c for c in config["setup_commands"]):
        problems.append("setup_commands must install bubblewrap (the sandbox for model-written code)")
    source = config["file_mounts"].get(INSTALL_DIR)
    if source is None or (ROOT / source).resolve() != ROOT:
        problems.append(f"file_mounts must copy the repository root to {INSTALL_DIR}")
    if ".git" not in config["rsync_exclude"] or ".gitignore" not in config["rsync_filter"]:
        problems.append("rsync_exclude needs .git and rsync_filter .gitignore (.venv is GBs)")
    head_start = " ".join(config["head_start_ray_commands"])
    if "ray start --head" not in head_start or "--autoscaling-config=~/ray_bootstrap_config.yaml" not in head_start:
        problems.append("head_start_ray_commands: not the standard `ray start --head ...`")
    if "ray start --address=$RAY_HEAD_IP:6379" not in " ".join(config["worker_start_ray_commands"]):
        problems.append("worker_start_ray_commands: not the standard `ray start --address=...`")
    return problems


def _preemptible(node_type: dict) -> bool:
    nc = node_type["node_config"]
    if (nc.get("InstanceMarketOptions") or {}).get("MarketType") == "spot":
        return True
    sched = nc.get("scheduling")
    return isinstance(sched, dict) and (sched.get("preemptible") is True
                                        or sched.get("provisioningModel") == "SPOT")


def ray_pin(config: dict) -> str:
    (version,) = {m for c in config["setup_commands"] for m in RAY_PIN.findall(c)}
    return version


# ------------------------------------------------------------------ launcher configs


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_config_passes_ray_validation(cloud):
    config = ray_checked(load_launcher(cloud))
    assert config["provider"]["type"] == cloud
    assert config["auth"]["ssh_user"] == "ubuntu"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_config_meets_spd_ray_needs(cloud):
    assert launcher_problems(ray_checked(load_launcher(cloud)), cloud) == []


def _a_gpu_type(config: dict) -> dict:
    return next(iter(worker_types(config).values()))


RAY_BREAKAGES = {
    "node type without resources": (
        lambda c: _a_gpu_type(c).pop("resources"), jsonschema.ValidationError),
    "node type without node_config": (
        lambda c: _a_gpu_type(c).pop("node_config"), jsonschema.ValidationError),
    "misspelled node-type key": (
        lambda c: _a_gpu_type(c).__setitem__("min_worker", 1), jsonschema.ValidationError),
    "misspelled top-level key": (
        lambda c: c.__setitem__("setup_command", c.pop("setup_commands")), jsonschema.ValidationError),
    "fractional GPU resource": (
        lambda c: _a_gpu_type(c)["resources"].__setitem__("GPU", 0.5), jsonschema.ValidationError),
    "head type not among the node types": (
        lambda c: c.__setitem__("head_node_type", "no-such-type"), ValueError),
    "min_workers above the cluster's max_workers": (
        lambda c: _a_gpu_type(c).__setitem__("min_workers", c["max_workers"] + 1), ValueError),
}


@pytest.mark.parametrize("breakage", sorted(RAY_BREAKAGES))
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_ray_validation_rejects_broken_copies(cloud, breakage):
    raw = load_launcher(cloud)
    breaker, error = RAY_BREAKAGES[breakage]
    breaker(raw)
    with pytest.raises(error):
        ray_checked(raw)


def _drop_preemptible(config: dict) -> None:
    for t in worker_types(config).values():
        t["node_config"].pop("InstanceMarketOptions", None)
        sched = t["node_config"].get("scheduling")
        if isinstance(sched, dict):
            sched.pop("preemptible", None)
            sched.pop("provisioningModel", None)


SPD_BREAKAGES = {
    "head takes CPUs": lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(CPU=8),
    "worker without GPUs": lambda c: _a_gpu_type(c)["resources"].pop("GPU"),
    "min_workers above max_workers": lambda c: _a_gpu_type(c).update(min_workers=3, max_workers=2),
    "no spot/preemptible type": _drop_preemptible,
    "workers do not install the package": lambda c: c.update(worker_setup_commands=[
        x for x in c["worker_setup_commands"] if not PACKAGE_INSTALL.search(x)]),
    "head installs the package before torch": lambda c: c.update(
        head_setup_commands=sorted(c["head_setup_commands"], key=lambda x: "torch" in x)),
    "workers get the CPU torch": lambda c: c.update(worker_setup_commands=[
        x + " --index-url https://download.pytorch.org/whl/cpu" if TORCH_INSTALL.search(x) else x
        for x in c["worker_setup_commands"]]),
    "workers install the package without vLLM": lambda c: c.update(worker_setup_commands=[
        x.replace("[vllm]", "") for x in c["worker_setup_commands"]]),
    "repository not mounted": lambda c: c.update(file_mounts={}),
    "no bubblewrap": lambda c: c.update(setup_commands=[x for x in c["setup_commands"] if "bwrap" not in x]),
    ".git copied to the nodes": lambda c: c["rsync_exclude"].remove(".git"),
}


@pytest.mark.parametrize("breakage", sorted(SPD_BREAKAGES))
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_spd_ray_checks_catch_broken_copies(cloud, breakage):
    config = ray_checked(load_launcher(cloud))  # schema-valid; breakages are spd-ray's own
    SPD_BREAKAGES[breakage](config)
    assert launcher_problems(config, cloud)


def test_gcp_scheduling_as_a_list_is_caught():
    config = ray_checked(load_launcher("gcp"))
    _a_gpu_type(config)["node_config"]["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]
    assert any("scheduling must be a mapping" in p for p in launcher_problems(config, "gcp"))


def test_aws_instance_type_typo_is_caught():
    config = ray_checked(load_launcher("aws"))
    _a_gpu_type(config)["node_config"]["InstanceType"] = "g5.12xlarg"
    assert launcher_problems(config, "aws")


# ------------------------------------------------------------------ KubeRay RayJob


def load_rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d is not None]


def _pod_mounts(template: dict) -> dict[str, str]:
    """volume name -> mount path, over the pod's containers."""
    return {m["name"]: m["mountPath"] for c in template["spec"]["containers"]
            for m in c.get("volumeMounts", [])}


def _pvc_volumes(template: dict) -> dict[str, str]:
    """volume name -> claimName, for the pod's PVC volumes."""
    return {v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}


def rayjob_problems(docs: list[dict]) -> list[str]:
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    if len(jobs) != 1:
        return [f"expected one RayJob, found {len(jobs)}"]
    job = jobs[0]
    spec = job.get("spec", {})
    problems = []
    if job.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl < 0:
        problems.append("ttlSecondsAfterFinished must be a non-negative integer")

    argv = shlex.split(spec.get("entrypoint", ""))
    output_dir = None
    if argv[:2] != ["python", "jobs/spd.py"]:
        problems.append("entrypoint must run `python jobs/spd.py`")
    elif "--config" not in argv[2:-1]:
        problems.append("entrypoint must pass --config")
    else:
        i = argv.index("--config")
        overrides = argv[2:i] + argv[i + 2:]
        try:
            cfg = load_config(ROOT / argv[i + 1], overrides)
            output_dir = cfg.run.output_dir
        except ConfigError as err:
            problems.append(f"entrypoint: {err}")
        if output_dir is not None and not output_dir.startswith("/"):
            problems.append("run.output_dir must be an absolute path on the shared volume")

    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    except yaml.YAMLError as err:
        env = {}
        problems.append(f"runtimeEnvYAML: {err}")
    if not isinstance(env, dict) or set(env) - RUNTIME_ENV_FIELDS:
        problems.append(f"runtimeEnvYAML: unexpected fields {sorted(set(env) - RUNTIME_ENV_FIELDS)}")
    else:
        try:  # the working_dir is a path in the image, not here: check the types only
            RuntimeEnv(**{**env, "working_dir": "."} if "working_dir" in env else dict(env))
        except (TypeError, ValueError) as err:
            problems.append(f"runtimeEnvYAML: {err}")
        env_vars = set(env.get("env_vars") or {})
        if env_vars & DRIVER_ENV_VARS:
            problems.append(f"runtimeEnvYAML: {sorted(env_vars & DRIVER_ENV_VARS)} conflict "
                            "with the job's own ray.init (spd_ray/pipeline.py)")
        if "WANDB_API_KEY" in env_vars:
            problems.append("runtimeEnvYAML: secrets belong in the pods' env, from a Secret")
        if "working_dir" in env and ".git" not in (env.get("excludes") or []):
            problems.append("runtimeEnvYAML: working_dir without excludes: [.git]")

    cluster = spec.get("rayClusterSpec", {})
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("rayClusterSpec.enableInTreeAutoscaling must be true")
    head = cluster.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('headGroupSpec.rayStartParams must have num-cpus: "0" (a string)')
    groups = cluster.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no workerGroupSpecs")
    templates = {"head": head.get("template", {"spec": {"containers": []}})}
    for g in groups:
        name = g.get("groupName", "?")
        templates[name] = g.get("template", {"spec": {"containers": []}})
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        if not all(isinstance(x, int) for x in (lo, n, hi)) or not 0 <= lo <= n <= hi or hi < 1:
            problems.append(f"{name}: needs 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1")
        gpus = [int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                for c in templates[name]["spec"]["containers"]]
        if not any(gpus):
            problems.append(f'{name}: no container with resources.limits["nvidia.com/gpu"]')

    claims = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    for name, template in templates.items():
        mounts, pvcs = _pod_mounts(template), _pvc_volumes(template)
        shared = [mounts[v] for v in pvcs if v in mounts]
        if not shared:
            problems.append(f"{name}: no PVC volume mounted")
        elif output_dir is not None and not any(
                Path(output_dir) == Path(p) or Path(p) in Path(output_dir).parents for p in shared):
            problems.append(f"{name}: run.output_dir {output_dir} is not on the shared volume")
        for claim in pvcs.values():
            if claim in claims and "ReadWriteMany" not in claims[claim]["spec"].get("accessModes", []):
                problems.append(f"PVC {claim} must be ReadWriteMany (mounted by every pod)")
        for c in template["spec"]["containers"]:
            sc = c.get("securityContext", {})  # bubblewrap's namespaces, forbidden by the defaults
            if (sc.get("seccompProfile", {}).get("type") != "Unconfined"
                    or sc.get("appArmorProfile", {}).get("type") != "Unconfined"):
                problems.append(f"{name}: container {c.get('name')} forbids the sandbox's namespaces "
                                "(securityContext seccompProfile and appArmorProfile: Unconfined)")
            for e in c.get("env", []):
                if e.get("name") == "WANDB_API_KEY" and "secretKeyRef" not in e.get("valueFrom", {}):
                    problems.append(f"{name}: WANDB_API_KEY must come from a Secret")
    return problems


def test_rayjob_manifest():
    docs = load_rayjob_docs()
    assert rayjob_problems(docs) == []
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["entrypoint"].startswith("python jobs/spd.py --config configs/")


def _rayjob(docs):
    return next(d for d in docs if d["kind"] == "RayJob")["spec"]


def _gpu_group(docs):
    return _rayjob(docs)["rayClusterSpec"]["workerGroupSpecs"][0]


RAYJOB_BREAKAGES = {
    "kind misspelled": lambda d: _rayjob_doc(d).update(kind="Rayjob"),
    "old apiVersion": lambda d: _rayjob_doc(d).update(apiVersion="ray.io/v1alpha1"),
    "cluster kept": lambda d: _rayjob(d).update(shutdownAfterJobFinishes=False),
    "autoscaling off": lambda d: _rayjob(d)["rayClusterSpec"].update(enableInTreeAutoscaling=False),
    "head takes CPUs": lambda d: _rayjob(d)["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    .update({"num-cpus": "4"}),
    "minReplicas above maxReplicas": lambda d: _gpu_group(d).update(minReplicas=5, replicas=5),
    "no GPU limit": lambda d: [c["resources"]["limits"].pop("nvidia.com/gpu")
                               for c in _gpu_group(d)["template"]["spec"]["containers"]],
    "another script": lambda d: _rayjob(d).update(entrypoint="python train.py"),
    "misspelled override": lambda d: _rayjob(d).update(
        entrypoint=_rayjob(d)["entrypoint"] + " run.outptu_dir=/mnt/x"),
    "output off the volume": lambda d: _rayjob(d).update(
        entrypoint=_rayjob(d)["entrypoint"] + " run.output_dir=/tmp/runs"),
    "driver env var in runtime_env": lambda d: _rayjob(d).update(
        runtimeEnvYAML=_rayjob(d)["runtimeEnvYAML"] + "env_vars: {HF_HUB_OFFLINE: '0'}\n"),
    "no shared volume on workers": lambda d: _gpu_group(d)["template"]["spec"].update(volumes=[]),
    "default seccomp on workers": lambda d: [c.pop("securityContext")
                                             for c in _gpu_group(d)["template"]["spec"]["containers"]],
}


def test_image_installs_bubblewrap():
    assert re.search(r"^RUN .*apt-get install .*bubblewrap", (CLUSTER / "Dockerfile").read_text(), re.M)


def test_gpu_image_installs_the_package_with_vllm():
    """The image is the GPU nodes' (rayproject/ray:...-gpu): generation.backend=vllm imports vLLM
    there, pinned as ray[llm] pins it, and the pin agrees with pyproject.toml's extra."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\S+-gpu", dockerfile, re.M)
    assert re.search(r'^RUN pip install .*-e "/home/ray/spd-ray\[vllm\]"', dockerfile, re.M)
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from importlib.metadata import requires

    pinned = [r.split(";")[0].strip() for r in requires("ray") if 'extra == "llm"' in r and r.startswith("vllm")]
    assert [p.replace("[audio]", "") for p in pinned] == extras["vllm"]


def _rayjob_doc(docs):
    return next(d for d in docs if d["kind"] == "RayJob")


@pytest.mark.parametrize("breakage", sorted(RAYJOB_BREAKAGES))
def test_rayjob_checks_catch_broken_copies(breakage):
    docs = load_rayjob_docs()
    RAYJOB_BREAKAGES[breakage](docs)
    assert rayjob_problems(docs)


def test_ray_versions_agree():
    """The cluster's Ray must match the Ray that submits to it."""
    versions = {cloud: ray_pin(load_launcher(cloud)) for cloud in LAUNCHERS}
    versions["kuberay rayVersion"] = _rayjob(load_rayjob_docs())["rayClusterSpec"]["rayVersion"]
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-", (CLUSTER / "Dockerfile").read_text(), re.M)
    versions["Dockerfile"] = base and base.group(1)
    assert len(set(versions.values())) == 1, versions


# ------------------------------------------------------------------ what --working-dir uploads


def _upload(tmp_path: Path, excludes: list[str]) -> zipfile.ZipFile:
    """The package `ray job submit --working-dir .` would build (Ray's own zip code, .gitignore on)."""
    out = tmp_path / "pkg.zip"
    _zip_files(str(ROOT), excludes, str(out), include_gitignore=True)
    return zipfile.ZipFile(out)


def test_working_dir_upload_excludes_git_and_outputs(tmp_path):
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_FIELDS and "working_dir" not in env  # --working-dir gives it
    assert not set(env.get("env_vars") or {}) & (DRIVER_ENV_VARS | {"WANDB_API_KEY"})
    RuntimeEnv(**env)
    with _upload(tmp_path, env["excludes"]) as pkg:
        names = pkg.namelist()
        size = sum(i.compress_size for i in pkg.infolist())
    tops = {n.split("/")[0] for n in names}
    assert not tops & {".git", ".venv", "runs", "wandb"}, sorted(tops)
    assert {"jobs/spd.py", "pyproject.toml", "configs/testbed.yaml"} <= set(names)
    assert any(n.startswith("spd_ray/") for n in names)
    assert size < min(100 * 2**20, GCS_STORAGE_MAX_SIZE), f"{size / 2**20:.1f} MiB"


def test_rayignore_keeps_git_out_even_without_excludes(tmp_path):
    """.gitignore does not cover .git itself: the repository's .rayignore does."""
    assert ".git" in (ROOT / ".rayignore").read_text().split()
    with _upload(tmp_path, []) as pkg:
        assert not any(n.split("/")[0] == ".git" for n in pkg.namelist())

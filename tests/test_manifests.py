"""The cluster manifests validate against the KubeRay CRDs, and the validator catches what it claims to.

Negative cases start from a valid manifest in cluster/ and break one thing, so each proves one check fires.
The CRDs (1-2 MB of YAML each) are parsed once per session by the validator's own cache.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsss_ray import kuberay
from wsss_ray.kuberay import ManifestError, validate_document, validate_file

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = kuberay.DEFAULT_CRD_DIR  # vendored in the package: a missing schema fails these tests, never skips them
# Files a RayJob entrypoint names before they exist. Existence is checked for every other path; drop entries here
# once they land (the sweep's jobs/run_sweep.py and tuning/label_smoothing.yaml have).
PENDING_PATHS: tuple[str, ...] = ()
LAUNCHER = "cluster-launcher.yaml"


@functools.cache
def _documents(name: str) -> tuple[Any, ...]:
    with open(CLUSTER / name, encoding="utf-8") as handle:
        return tuple(doc for doc in yaml.safe_load_all(handle) if doc is not None)


def _load(name: str, index: int = 0) -> Any:
    """A private copy of one parsed document, safe to mutate."""

    return copy.deepcopy(_documents(name)[index])


def _errors(document: Any, source: str = "test.yaml") -> list[ManifestError]:
    return validate_document(document, source=source, crd_dir=CRD_DIR, repo_root=REPO, allow_missing=PENDING_PATHS)


def _messages(errors: list[ManifestError]) -> list[str]:
    return [str(error) for error in errors]


def _head_container(raycluster: dict[str, Any]) -> dict[str, Any]:
    return raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------------------------ valid files

KUBE_FILES = sorted(p.name for p in CLUSTER.glob("*.yaml") if p.name != LAUNCHER)


def test_cluster_folder_has_the_expected_manifests() -> None:
    assert set(KUBE_FILES) >= {
        "raycluster.yaml",
        "rayjob-pipeline.yaml",
        "rayjob-sweep.yaml",
        "secret-example.yaml",
    }


@pytest.mark.parametrize("name", KUBE_FILES)
def test_manifest_validates(name: str) -> None:
    errors = validate_file(CLUSTER / name, crd_dir=CRD_DIR, repo_root=REPO, allow_missing=PENDING_PATHS)
    assert _messages(errors) == []


def test_cluster_launcher_validates_and_has_required_keys() -> None:
    (launcher,) = _documents(LAUNCHER)
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands"):
        assert key in launcher, key
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    assert launcher["head_node_type"] in launcher["available_node_types"]
    for node_type in launcher["available_node_types"].values():
        assert {"resources", "min_workers", "max_workers"} <= set(node_type)
        assert node_type["node_config"]["InstanceType"]
    assert _messages(validate_file(CLUSTER / LAUNCHER, crd_dir=CRD_DIR, repo_root=REPO)) == []


def test_rayjobs_embed_the_same_cluster_as_raycluster() -> None:
    # One cluster shape everywhere: a fix to raycluster.yaml must reach the RayJobs too.
    cluster_spec = _documents("raycluster.yaml")[0]["spec"]
    for name in ("rayjob-pipeline.yaml", "rayjob-sweep.yaml"):
        assert _documents(name)[0]["spec"]["rayClusterSpec"] == cluster_spec, name


def test_raycluster_layout() -> None:
    spec = _documents("raycluster.yaml")[0]["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    assert all(group["minReplicas"] == 0 for group in groups.values())
    gpu_pod = groups["gpu-workers"]["template"]["spec"]
    gpu_resources = gpu_pod["containers"][0]["resources"]
    assert gpu_resources["requests"]["nvidia.com/gpu"] == 1 and gpu_resources["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in groups.values())]
    for pod in pods:
        shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        for container in pod["containers"]:
            assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
            assert {ref["name"] for ref in refs.values()} == {"wsss-s3-credentials"}
            assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_rayjobs_clean_up_and_run_the_named_entrypoints() -> None:
    expected = {
        "rayjob-pipeline.yaml": "python jobs/run_pipeline.py --config jobs/configs/voc.yaml",
        "rayjob-sweep.yaml": "python jobs/run_sweep.py --space tuning/label_smoothing.yaml",
    }
    for name, entrypoint in expected.items():
        spec = _documents(name)[0]["spec"]
        assert spec["entrypoint"] == entrypoint
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
        assert env_vars["VOC_ROOT"].startswith("s3://") and env_vars["WSSS_OUTPUT"].startswith("s3://")


def test_secret_template_holds_only_placeholders() -> None:
    secret = next(doc for doc in _documents("secret-example.yaml") if doc["kind"] == "Secret")
    assert secret["metadata"]["name"] == "wsss-s3-credentials"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    assert "data" not in secret


def test_runtime_env_excludes_drop_local_state_but_not_the_package() -> None:
    with open(REPO / "jobs" / "runtime_env.yaml", encoding="utf-8") as handle:
        runtime_env = yaml.safe_load(handle)
    assert runtime_env["working_dir"] == "."
    assert "pip" not in runtime_env and "uv" not in runtime_env
    assert list(kuberay.runtime_env_problems(runtime_env)) == []
    assert _messages(validate_file(REPO / "jobs" / "runtime_env.yaml", crd_dir=CRD_DIR, repo_root=REPO)) == []
    # Ray matches excludes with its vendored pathspec; use the very same matcher.
    from ray._private.thirdparty import pathspec
    spec = pathspec.PathSpec.from_lines("gitwildmatch", runtime_env["excludes"])
    for dropped in (".venv/bin/python", "data/toy-voc/x.jpg", "results/demo/metrics.json", ".git/HEAD"):
        assert spec.match_file(dropped), dropped
    shipped = [p.relative_to(REPO).as_posix() for p in (REPO / "wsss_ray").rglob("*.py")]
    shipped += ["jobs/run_pipeline.py", "jobs/configs/voc.yaml"]
    assert "wsss_ray/data/voc.py" in shipped
    assert [path for path in shipped if spec.match_file(path)] == []


# ------------------------------------------------------------------------------------------------ negatives


def test_error_names_file_document_and_path() -> None:
    cluster = _load("raycluster.yaml")
    _head_container(cluster)["resourcez"] = _head_container(cluster).pop("resources")
    messages = _messages(_errors(cluster, source="cluster/raycluster.yaml"))
    assert "cluster/raycluster.yaml[0]: spec.headGroupSpec.template.spec.containers[0].resourcez: unknown field" in (
        messages
    )


def test_unknown_field_deep_in_worker_pod_template() -> None:
    job = _load("rayjob-pipeline.yaml")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    worker["volumes"][0]["emptyDir"]["medium_"] = "Memory"
    messages = _messages(_errors(job))
    path = "spec.rayClusterSpec.workerGroupSpecs[1].template.spec.volumes[0].emptyDir.medium_"
    assert messages == [f"test.yaml[0]: {path}: unknown field"]


def test_maps_and_int_or_string_are_not_unknown_fields() -> None:
    # Free-form maps (labels, rayStartParams, resource quantities) accept any key; int-or-string takes both.
    cluster = _load("raycluster.yaml")
    cluster["metadata"]["labels"]["team"] = "vision"
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] = "8080"
    _head_container(cluster)["resources"]["limits"]["ephemeral-storage"] = "20Gi"
    _head_container(cluster)["resources"]["requests"]["cpu"] = 2
    assert _messages(_errors(cluster)) == []


def test_wrong_type() -> None:
    cluster = _load("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    messages = _messages(_errors(cluster))
    assert messages == ["test.yaml[0]: spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"]


def test_missing_required_field() -> None:
    cluster = _load("raycluster.yaml")
    del cluster["spec"]["workerGroupSpecs"][1]["groupName"]
    messages = _messages(_errors(cluster))
    assert messages == ["test.yaml[0]: spec.workerGroupSpecs[1]: 'groupName' is a required property"]


def test_bad_enum() -> None:
    cluster = _load("raycluster.yaml")
    cluster["spec"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    (message,) = _messages(_errors(cluster))
    assert message.startswith("test.yaml[0]: spec.autoscalerOptions.upscalingMode: 'Eager' is not one of")


def test_api_version_must_be_v1() -> None:
    cluster = _load("raycluster.yaml")
    cluster["apiVersion"] = "ray.io/v1alpha1"
    assert _messages(_errors(cluster)) == ["test.yaml[0]: apiVersion: must be ray.io/v1, got 'ray.io/v1alpha1'"]


def test_inline_secret_value() -> None:
    cluster = _load("raycluster.yaml")
    env = _head_container(cluster)["env"]
    index = next(i for i, e in enumerate(env) if e["name"] == "AWS_SECRET_ACCESS_KEY")
    env[index] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}
    (message,) = _messages(_errors(cluster))
    assert message.startswith(f"test.yaml[0]: spec.headGroupSpec.template.spec.containers[0].env[{index}].value: ")
    assert "Secret" in message and "hunter2" not in message


def test_secret_in_runtime_env_yaml() -> None:
    job = _load("rayjob-pipeline.yaml")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] = "hunter2"
    job["spec"]["runtimeEnvYAML"] = yaml.safe_dump(runtime_env)
    (message,) = _messages(_errors(job))
    assert message.startswith("test.yaml[0]: spec.runtimeEnvYAML.env_vars.AWS_SECRET_ACCESS_KEY: ")


def test_privileged_container() -> None:
    cluster = _load("raycluster.yaml")
    gpu_container = cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    gpu_container["securityContext"]["privileged"] = True
    path = "spec.workerGroupSpecs[1].template.spec.containers[0].securityContext.privileged"
    assert _messages(_errors(cluster)) == [f"test.yaml[0]: {path}: privileged containers are not allowed"]


def test_missing_resource_limits() -> None:
    job = _load("rayjob-sweep.yaml")
    del job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]
    assert _messages(_errors(job)) == [
        "test.yaml[0]: spec.submitterPodTemplate.spec.containers[0].resources.limits: missing resources.limits"
    ]


def test_missing_autoscaler_resources() -> None:
    cluster = _load("raycluster.yaml")
    del cluster["spec"]["autoscalerOptions"]["resources"]
    assert _messages(_errors(cluster)) == [
        "test.yaml[0]: spec.autoscalerOptions.resources: missing resources (requests and limits are required)"
    ]


@pytest.mark.parametrize(
    ("entrypoint", "missing"),
    [
        ("python jobs/run_pipelines.py --config jobs/configs/voc.yaml", "script jobs/run_pipelines.py"),
        ("python jobs/run_pipeline.py --config jobs/configs/vocc.yaml", "--config jobs/configs/vocc.yaml"),
        ("python jobs/run_pipeline.py --config=jobs/configs/nope.yaml", "--config jobs/configs/nope.yaml"),
        ("python jobs/run_sweep.py --space tuning/nope.yaml", "--space tuning/nope.yaml"),
    ],
)
def test_entrypoint_naming_missing_file(entrypoint: str, missing: str) -> None:
    job = _load("rayjob-pipeline.yaml")
    job["spec"]["entrypoint"] = entrypoint
    assert _messages(_errors(job)) == [f"test.yaml[0]: spec.entrypoint: {missing} does not exist in the repository"]


def test_entrypoint_outside_jobs() -> None:
    job = _load("rayjob-pipeline.yaml")
    job["spec"]["entrypoint"] = "python wsss_ray/cli.py run --config jobs/configs/voc.yaml"
    assert _messages(_errors(job)) == [
        "test.yaml[0]: spec.entrypoint: entrypoint script wsss_ray/cli.py is not under jobs/"
    ]


def test_pending_paths_are_errors_unless_allowed() -> None:
    job = _load("rayjob-sweep.yaml")
    errors = validate_document(job, source="s.yaml", crd_dir=CRD_DIR, repo_root=REPO)
    pending_missing = [p for p in PENDING_PATHS if not (REPO / p).exists()]
    assert len(errors) == len(pending_missing)


def test_other_kinds_need_basic_shape() -> None:
    secret = _load("secret-example.yaml")
    del secret["metadata"]["name"]
    assert _messages(_errors(secret)) == ["test.yaml[0]: metadata.name: missing"]


def test_launcher_with_inline_credentials_or_unpinned_torch() -> None:
    (launcher,) = copy.deepcopy(_documents(LAUNCHER))
    launcher["provider"]["aws_access_key_id"] = "AKIAABCDEFGHIJKLMNOP"
    launcher["setup_commands"] = [c for c in launcher["setup_commands"] if "torch==" not in c]
    messages = _messages(_errors(launcher))
    assert "test.yaml[0]: provider.aws_access_key_id: credentials must not be inline: use an IAM instance profile" in (
        messages
    )
    assert "test.yaml[0]: setup_commands: torch must be installed pinned (torch==...) before the project" in messages


def test_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [str(CLUSTER / "raycluster.yaml"), str(CLUSTER / "rayjob-pipeline.yaml")]
    assert kuberay.main([*good, "--crd-dir", str(CRD_DIR)]) == 0
    cluster = _load("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([_load("secret-example.yaml"), cluster]), encoding="utf-8")
    assert kuberay.main([str(bad), "--crd-dir", str(CRD_DIR)]) == 1
    assert f"{bad}[1]: spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'" in capsys.readouterr().err


def test_the_crds_ship_with_the_package_and_a_missing_one_fails(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # The default schema folder is inside the package (with KubeRay's licence and the commit it comes from), so a
    # clone or install with nothing beside it validates; a folder without the CRDs is an error, never a skip.
    assert CRD_DIR == Path(kuberay.__file__).resolve().parent / "crds"
    for name in (*kuberay.CRD_FILES.values(), "LICENSE", "README.md"):
        assert (CRD_DIR / name).is_file(), name
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "feeaf72" in (CRD_DIR / "README.md").read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=f"KubeRay CRD for RayCluster not found at {tmp_path}"):
        validate_document(_load("raycluster.yaml"), source="x.yaml", crd_dir=tmp_path, repo_root=REPO)

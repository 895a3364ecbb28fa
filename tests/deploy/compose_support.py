"""Read docker-compose.yml and the Dockerfiles the way Docker would, and run services locally.

No Docker engine is needed: the compose file is parsed with YAML (anchors and `<<` merges resolve
there), `${VAR:-default}` interpolation is done here, and a service "container" is emulated by

- its image's file tree: the Dockerfile's COPY instructions, replayed into a temporary folder that
  is put first on PYTHONPATH and used as the working directory (WORKDIR), so a module the image
  does not copy cannot be imported;
- its environment: the image's ENV, then `env_file`, then `environment`, as Docker merges them;
- translated addresses only: the `postgres`, `redis` and `seaweedfs` hostnames become local servers, other
  service hostnames and container ports become free local ports, and container paths (named
  volumes and the image's own filesystem) become temporary folders.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from tests.support.services import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
PYPROJECT = REPO_ROOT / "pyproject.toml"
PROJECT_PACKAGES = ("core", "api", "worker", "demo", "migrations", "patchbay_cli")

# ---------------------------------------------------------------------------------------------
# Interpolation (compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`,
# `${VAR:+alt}`, `$VAR` and `$$`; the same rules as a POSIX shell for these forms).
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?\Z", re.S)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is missing, or malformed syntax."""


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Expand variables in `text` as docker compose does (`$$` is a literal `$`)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        following = text[i + 1: i + 2]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "{":
            depth, j = 0, i + 1
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            else:
                raise InterpolationError(f"unterminated ${{ in {text!r}")
            out.append(_expand(text[i + 2: j], variables))
            i = j + 1
        elif match := _NAME.match(text, i + 1):
            out.append(variables.get(match.group(), ""))
            i = match.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _expand(expression: str, variables: dict[str, str]) -> str:
    match = _BRACED.match(expression)
    if not match:
        raise InterpolationError(f"invalid interpolation ${{{expression}}}")
    name, operator, argument = match.groups()
    value = variables.get(name)
    if operator is None:
        return value or ""
    missing = (not value) if operator.startswith(":") else value is None
    kind = operator[-1]
    if kind == "-":
        return interpolate(argument, variables) if missing else value
    if kind == "?":
        if missing:
            raise InterpolationError(f"{name}: {interpolate(argument, variables) or 'required'}")
        return value
    return "" if missing else interpolate(argument, variables)  # "+"


def interpolate_tree(node: Any, variables: dict[str, str]) -> Any:
    """Interpolate every string value of a parsed YAML document (keys are left alone)."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, variables) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """A `.env` file as compose reads it: KEY=VALUE lines, comments, optional quotes."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
        values[key] = value
    return values


def load_compose(path: Path = COMPOSE_FILE, variables: dict[str, str] | None = None) -> dict:
    """The compose document with anchors, merges and interpolation resolved."""
    return load_compose_text(path.read_text(), variables)


def load_compose_text(text: str, variables: dict[str, str] | None = None) -> dict:
    """A compose document given as text (YAML resolves anchors and `<<` merges; we interpolate)."""
    return interpolate_tree(yaml.safe_load(text), variables or {})


# ---------------------------------------------------------------------------------------------
# Compose service helpers
# ---------------------------------------------------------------------------------------------


def as_argv(command: str | list[str] | None) -> list[str]:
    """A compose `command`/healthcheck `test` as an argument list."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def environment_of(service: dict) -> dict[str, str]:
    """A service's `environment` (mapping or list form) as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def env_file_paths(service: dict) -> list[tuple[str, bool]]:
    """Each `env_file` entry of a service as (path, required)."""
    entries = service.get("env_file")
    if entries is None:
        return []
    if not isinstance(entries, list):
        entries = [entries]
    result = []
    for entry in entries:
        if isinstance(entry, dict):
            result.append((str(entry["path"]), bool(entry.get("required", True))))
        else:
            result.append((str(entry), True))
    return result


def build_of(service: dict) -> tuple[Path, Path] | None:
    """(context, dockerfile) of a service that builds an image, resolved in the repo."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        context, dockerfile = build, "Dockerfile"
    else:
        context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    context_dir = (REPO_ROOT / context).resolve()
    return context_dir, (context_dir / dockerfile).resolve()


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, container target) of each volume of a service, short or long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            mounts.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return mounts


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~"))


def published_container_ports(service: dict) -> list[int]:
    """The container side of each `ports` entry."""
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            container = str(entry).rsplit(":", 1)[-1].split("/")[0]
            ports.append(int(container))
    return ports


_PORT_FLAG = re.compile(r"(--port(?:=|\s+))(\d+)")


def command_ports(argv: list[str]) -> list[int]:
    """Ports a command binds with `--port N` / `--port=N` (also inside `sh -c` strings)."""
    ports = []
    for index, arg in enumerate(argv):
        if arg == "--port" and index + 1 < len(argv) and argv[index + 1].isdigit():
            ports.append(int(argv[index + 1]))
        ports.extend(int(m.group(2)) for m in _PORT_FLAG.finditer(arg))
    return ports


def shell_words(argv: list[str]) -> list[list[str]]:
    """The command lines inside an argv: itself, or each `sh -c` script split into words."""
    if len(argv) >= 3 and Path(argv[0]).name in {"sh", "bash"} and argv[1] == "-c":
        return [shlex.split(part) for part in re.split(r"&&|\|\||;|\n", argv[2]) if part.strip()]
    return [argv]


# ---------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        pending = ""
        for raw in path.read_text().splitlines():
            stripped = raw.strip()
            if stripped.startswith("#") or (not stripped and not pending):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            line = (pending + stripped).strip()
            pending = ""
            if line:
                keyword, _, args = line.partition(" ")
                instructions.append((keyword.upper(), args.strip()))
        return cls(path, instructions)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    @property
    def env(self) -> dict[str, str]:
        """Every ENV, in order (later wins)."""
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if words and "=" in words[0]:
                for word in words:
                    key, _, value = word.partition("=")
                    env[key] = interpolate(value, env)
            elif words:
                env[words[0]] = " ".join(words[1:])
        return env

    @property
    def workdir(self) -> str:
        workdir = "/"
        for args in self.all("WORKDIR"):
            workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
        return workdir

    @property
    def cmd(self) -> list[str]:
        cmds = self.all("CMD")
        if not cmds:
            return []
        return _exec_form(cmds[-1])

    @property
    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of each COPY/ADD from the build context (no --from)."""
        result = []
        for key, args in self.instructions:
            if key not in {"COPY", "ADD"}:
                continue
            words = _exec_form(args) if args.startswith("[") else shlex.split(args)
            if any(word.startswith("--from") for word in words):
                continue
            words = [word for word in words if not word.startswith("--")]
            result.append((words[:-1], words[-1]))
        return result

    @property
    def pip_installs(self) -> list[str]:
        """The arguments of every `pip install` in RUN instructions."""
        found = []
        for args in self.all("RUN"):
            for part in re.split(r"&&|;", args):
                words = shlex.split(part)
                if "pip" in [Path(w).name for w in words[:3]] and "install" in words:
                    found.extend(words[words.index("install") + 1:])
        return found


def _exec_form(args: str) -> list[str]:
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError:
        return ["/bin/sh", "-c", args]
    return [str(part) for part in parsed]


def stage_image_tree(dockerfile: Dockerfile, context: Path, root: Path) -> Path:
    """Replay the Dockerfile's COPY instructions under `root` (as "/"); returns the WORKDIR there."""
    workdir = dockerfile.workdir
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sources, dest in dockerfile.copies:
        dest_path = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
        target = root / dest_path.lstrip("/")
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            matches = sorted(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
            for src in matches:
                if not src.exists():
                    raise FileNotFoundError(f"{dockerfile.path.name}: COPY source {source} does not exist")
                if src.is_dir():
                    shutil.copytree(src, target, dirs_exist_ok=True, ignore=ignore)
                else:
                    final = target / src.name if into_dir else target
                    final.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, final)
    tree = root / workdir.lstrip("/")
    tree.mkdir(parents=True, exist_ok=True)
    return tree


def image_requirements(dockerfile: Dockerfile) -> list[str]:
    """The requirement strings an image's `pip install` lines install (the project with its extras)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements: list[str] = []
    for word in dockerfile.pip_installs:
        if word.startswith("-"):
            continue
        match = re.fullmatch(r"\.(?:\[([^\]]*)\])?", word)
        if match:
            requirements += project.get("dependencies", [])
            for extra in filter(None, (e.strip() for e in (match.group(1) or "").split(","))):
                requirements += project.get("optional-dependencies", {}).get(extra, [])
        else:
            requirements.append(word)
    return requirements


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions that `requirements` pull in, transitively."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset]] = set()
    stack = [(text, ("",)) for text in requirements]
    while stack:
        text, parent_extras = stack.pop()
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": extra}) for extra in parent_extras):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        stack += [(child, ("", *req.extras)) for child in dist.requires or ()]
    return {name for name, _ in seen}


def not_in_image(requirements: list[str]) -> list[str]:
    """Top-level modules that the project's full install brings here but the image would not have.

    The image has the closure of `requirements` (plus pip/setuptools/wheel and the project);
    what else the project installs here (torch in the API image, test tools, ...) is absent there.
    Packages a developer installed by hand are left alone: the project never imports them.
    """
    from importlib import metadata

    from packaging.utils import canonicalize_name

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    everything = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                                  for r in extra]
    available = _closure(requirements) | {"pip", "setuptools", "wheel", canonicalize_name(project["name"])}
    blocked = _closure(everything) - available
    return sorted(top for top, dists in metadata.packages_distributions().items()
                  if top not in sys.stdlib_module_names and top not in PROJECT_PACKAGES
                  and not top.startswith("__editable__") and top != "_distutils_hack"
                  and all(canonicalize_name(d) in blocked for d in dists))


# Imported at interpreter start (after .pth files) in every emulated container.
IMAGE_SITECUSTOMIZE = """\
import importlib.abc
import importlib.machinery
import sys

# The venv's editable install points at the repo; the image has only what it COPYs (on PYTHONPATH).
sys.meta_path[:] = [f for f in sys.meta_path
                    if not (getattr(f, "__module__", "") or type(f).__module__).startswith("__editable__")]
_MISSING = frozenset({missing!r})


class _NotInImage(importlib.abc.MetaPathFinder):
    # Packages the image does not install are not found, exactly as if absent: `import` raises
    # ModuleNotFoundError and `importlib.util.find_spec` answers None (optional imports then fall back).
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _MISSING:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):  # importlib.metadata still sees installed metadata
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [_NotInImage() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def write_image_shim(folder: Path, dockerfile: Dockerfile) -> Path:
    """A folder with the sitecustomize that makes this interpreter see only the image's packages."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = not_in_image(image_requirements(dockerfile))
    (folder / "sitecustomize.py").write_text(IMAGE_SITECUSTOMIZE.format(missing=missing))
    return folder


def image_pythonpath(dockerfile: Dockerfile, context: Path, root: Path) -> tuple[Path, str]:
    """(WORKDIR, PYTHONPATH) of an emulated image staged under `root`."""
    tree = stage_image_tree(dockerfile, context, root / "fs")
    shim = write_image_shim(root / "shim", dockerfile)
    return tree, f"{tree}{os.pathsep}{shim}"


# ---------------------------------------------------------------------------------------------
# Running services locally
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalCompose:
    """The compose services as local processes over real Postgres and Redis."""

    compose: dict
    root: Path
    database_url: str  # a fresh local database, any scheme: the compose URL's scheme is kept
    redis_url: str  # a spare local Redis database, e.g. redis://127.0.0.1:6379/7
    s3_endpoint: str | None = None  # a local S3-compatible server standing in for the `seaweedfs` service
    s3_credentials: tuple[str, str] | None = None  # its access key and secret
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    _trees: dict[Path, tuple[Path, str]] = field(default_factory=dict)

    @property
    def services(self) -> dict[str, dict]:
        return self.compose["services"]

    def port(self, service: str, container_port: int) -> int:
        """The local port standing in for a service's container port."""
        key = (service, int(container_port))
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def dockerfile(self, service: str) -> tuple[Path, Dockerfile]:
        built = build_of(self.services[service])
        assert built is not None, f"service {service} builds no image"
        context, path = built
        return context, Dockerfile.parse(path)

    def _image(self, service: str) -> tuple[Path, str]:
        context, dockerfile = self.dockerfile(service)
        if dockerfile.path not in self._trees:
            root = self.root / "images" / dockerfile.path.name
            self._trees[dockerfile.path] = image_pythonpath(dockerfile, context, root)
        return self._trees[dockerfile.path]

    def image_tree(self, service: str) -> Path:
        """The service image's WORKDIR, staged from its Dockerfile's COPY instructions."""
        return self._image(service)[0]

    # -- translation ----------------------------------------------------------------------------

    def local_path(self, service: str, container_path: str) -> Path:
        """A container path as a local folder: a named volume, or the container's own filesystem."""
        best: tuple[str, Path] | None = None
        for source, target in volume_mounts(self.services[service]):
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                base = self.root / "volumes" / source if is_named_volume(source) else (REPO_ROOT / source).resolve()
                if best is None or len(target) > len(best[0]):
                    best = (target, base)
        if best is not None:
            target, base = best
            return base / container_path[len(target):].lstrip("/")
        return self.root / "containers" / service / container_path.lstrip("/")

    def local_url(self, url: str) -> str:
        """A URL whose host is a compose service, pointed at the local stand-in."""
        parts = urlsplit(url)
        host = parts.hostname
        if host not in self.services:
            return url
        if host == "postgres":
            from sqlalchemy.engine import URL, make_url

            local, remote = make_url(self.database_url), make_url(url)
            return URL.create(remote.drivername, username=local.username, password=local.password,
                              host=local.host, port=local.port, database=local.database,
                              query=remote.query).render_as_string(hide_password=False)
        if host == "redis":
            local = urlsplit(self.redis_url)
            return urlunsplit((parts.scheme, local.netloc, local.path, parts.query, parts.fragment))
        if host == "seaweedfs" and self.s3_endpoint:
            return self.s3_endpoint.rstrip("/") + parts.path
        port = self.port(host, parts.port or 80)
        return urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, parts.query, parts.fragment))

    def local_value(self, service: str, value: str) -> str:
        if "://" in value:
            return ",".join(self.local_url(part.strip()) if "://" in part else part for part in value.split(","))
        if value.startswith("/") and ":" not in value:
            path = self.local_path(service, value)
            path.parent.mkdir(parents=True, exist_ok=True)
            return str(path)
        return value

    def container_env(self, service: str) -> dict[str, str]:
        """The environment inside the container: image ENV < env_file < environment."""
        spec = self.services[service]
        env: dict[str, str] = {}
        if build_of(spec):
            env.update(self.dockerfile(service)[1].env)
        for path, required in env_file_paths(spec):
            resolved = REPO_ROOT / path
            if Path(path).name == ".env":
                resolved = ENV_EXAMPLE  # the README's deployment step: cp .env.example .env
            if resolved.exists():
                env.update(read_env_file(resolved))
            elif required:
                raise FileNotFoundError(f"{service}: env_file {path} is required")
        env.update(environment_of(spec))
        return env

    def env(self, service: str) -> dict[str, str]:
        """The local process environment of a service."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PATCHBAY_", "POSTGRES_", "FLOWER_", "CELERY_"))}
        env.update({key: self.local_value(service, value) for key, value in self.container_env(service).items()})
        if self.s3_credentials and "AWS_ACCESS_KEY_ID" in env:  # the local server's, as postgres's are translated
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = self.s3_credentials
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        if build_of(self.services[service]):
            env["PYTHONPATH"] = self._image(service)[1]
        return env

    def container_argv(self, service: str) -> list[str]:
        spec = self.services[service]
        argv = as_argv(spec.get("command"))
        if not argv and build_of(spec):
            argv = self.dockerfile(service)[1].cmd
        return argv

    def argv(self, service: str) -> list[str]:
        """The service's command with venv executables and local ports."""
        argv = list(self.container_argv(service))
        if argv and (VENV_BIN / argv[0]).exists():
            argv[0] = str(VENV_BIN / argv[0])

        def remap(match: re.Match) -> str:
            return f"{match.group(1)}{self.port(service, int(match.group(2)))}"

        out = []
        for index, arg in enumerate(argv):
            if index > 0 and argv[index - 1] == "--port" and arg.isdigit():
                out.append(str(self.port(service, int(arg))))
            else:
                out.append(_PORT_FLAG.sub(remap, arg))
        return out

    def cwd(self, service: str) -> Path:
        return self.image_tree(service) if build_of(self.services[service]) else self.root

    # -- processes ------------------------------------------------------------------------------

    def log_path(self, service: str) -> Path:
        path = self.root / "logs" / f"{service}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, service: str, argv: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a one-shot service (or another command in its container) to completion."""
        return subprocess.run(argv or self.argv(service), env=self.env(service), cwd=self.cwd(service),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, service: str) -> subprocess.Popen:
        """Start a long-running service in its own process group, logging to a file."""
        with open(self.log_path(service), "ab") as log:
            proc = subprocess.Popen(self.argv(service), env=self.env(service), cwd=self.cwd(service),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def log(self, service: str) -> str:
        path = self.log_path(service)
        return path.read_text(errors="replace")[-8000:] if path.exists() else ""

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """TERM the process group, then KILL it if it lingers."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children the leader left behind
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            self.stop(proc)


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.3,
               alive: Iterable[subprocess.Popen] = ()) -> Any:
    """Poll `check` until it returns something truthy; None on timeout or when a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if any(proc.poll() is not None for proc in alive):
            return check() or None
        time.sleep(interval)
    return None

"""Management-job specs (jobs/*.yaml): one short YAML file per service, validated in full before anything
is rendered or sent to Nomad, so a typo fails with the file and key named instead of a scheduler error."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml


class SpecError(ValueError):
    """A spec problem, always naming the file and the key."""


DRIVERS = ("raw_exec", "exec", "docker")
CHECK_TYPES = ("http", "tcp")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")


@dataclass(frozen=True)
class Check:
    type: str = "http"
    path: str = "/"
    interval: str = "10s"
    timeout: str = "2s"


@dataclass(frozen=True)
class Service:
    name: str
    port: str
    tags: tuple[str, ...] = ()
    check: Check = field(default_factory=Check)


@dataclass(frozen=True)
class JobSpec:
    name: str
    driver: str
    count: int
    cpu: int
    memory: int
    command: tuple[str, ...] = ()
    """Program and arguments; `${NOMAD_PORT_<label>}` and the like are Nomad's runtime interpolation."""
    image: str | None = None
    datacenters: tuple[str, ...] = ("*",)
    regions: tuple[str, ...] = ()
    """Empty: the region the client talks to."""
    node_class: str | None = None
    ports: tuple[tuple[str, int | None], ...] = ()
    """(label, static port) pairs; None asks Nomad for a dynamic port."""
    env: tuple[tuple[str, str], ...] = ()
    service: Service | None = None
    max_per_rack: int = 1
    source: str = "<spec>"


KEYS = (
    "name", "driver", "command", "image", "count", "cpu", "memory", "datacenters", "regions", "node_class",
    "ports", "env", "service", "max_per_rack",
)  # fmt: skip
SERVICE_KEYS = ("name", "port", "tags", "check")
CHECK_KEYS = ("type", "path", "interval", "timeout")


class _Reader:
    """Typed reads of one mapping, every error prefixed with the file and the dotted key."""

    def __init__(self, source: str, prefix: str, raw: object, known: tuple[str, ...]) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(raw, Mapping):
            self.fail("", f"expected a mapping of keys, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            self.fail(unknown[0], f"unknown key; known keys are {', '.join(known)}")
        self.raw: Mapping[str, Any] = raw

    def fail(self, key: str, message: str) -> NoReturn:
        where = ".".join(part for part in (self.prefix, key) if part) or "spec"
        raise SpecError(f"{self.source}: {where}: {message}")

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def string(self, key: str, default: str | None = None, pattern: re.Pattern[str] | None = None) -> str:
        value = self.raw.get(key, default)
        if value is None:
            self.fail(key, "missing (required)")
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            self.fail(key, f"{value!r} does not match {pattern.pattern}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.string(key, default)
        if value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            self.fail(key, "missing (required)")
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"expected an integer from {low} to {high}, got {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f"expected a list of non-empty strings, got {value!r}")
        return tuple(value)

    def mapping(self, key: str) -> Mapping[Any, Any]:
        value = self.raw.get(key) or {}
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a mapping, got {value!r}")
        return value


def _command(spec: _Reader) -> tuple[str, ...]:
    value = spec.raw.get("command")
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as exc:
            spec.fail("command", f"cannot split {value!r} into words: {exc}")
        return tuple(words)
    return spec.strings("command")


def _ports(spec: _Reader) -> tuple[tuple[str, int | None], ...]:
    ports: list[tuple[str, int | None]] = []
    for label, value in spec.mapping("ports").items():
        key = f"ports.{label}"
        if not isinstance(label, str) or not _LABEL.match(label):
            spec.fail(key, f"port label {label!r} must match {_LABEL.pattern}")
        if value == "dynamic":
            ports.append((label, None))
        elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
            ports.append((label, value))
        else:
            spec.fail(key, f"expected a port number from 1 to 65535 or 'dynamic', got {value!r}")
    return tuple(ports)


def _env(spec: _Reader) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, value in spec.mapping("env").items():
        if not isinstance(name, str) or not isinstance(value, str | int | float) or isinstance(value, bool):
            spec.fail(f"env.{name}", f"expected NAME: string, got {value!r}")
        pairs.append((str(name), str(value)))
    return tuple(pairs)


def _service(spec: _Reader, job_name: str, ports: tuple[tuple[str, int | None], ...]) -> Service | None:
    if not spec.has("service"):
        return None
    service = _Reader(spec.source, "service", spec.raw["service"], SERVICE_KEYS)
    labels = [label for label, _ in ports]
    port = service.string("port", labels[0] if len(labels) == 1 else None)
    if port not in labels:
        service.fail("port", f"{port!r} is not one of the job's ports ({', '.join(labels) or 'none declared'})")
    check = _Reader(spec.source, "service.check", service.raw.get("check") or {}, CHECK_KEYS)
    return Service(
        name=service.string("name", job_name, _NAME),
        port=port,
        tags=service.strings("tags"),
        check=Check(
            type=check.choice("type", CHECK_TYPES, "http"),
            path=check.string("path", "/", re.compile(r"^/")),
            interval=check.string("interval", "10s", _DURATION),
            timeout=check.string("timeout", "2s", _DURATION),
        ),
    )


def parse_spec(raw: object, source: str) -> JobSpec:
    spec = _Reader(source, "", raw, KEYS)
    name = spec.string("name", pattern=_NAME)
    driver = spec.choice("driver", DRIVERS)
    command = _command(spec)
    image = spec.string("image") if spec.has("image") else None
    if driver == "docker" and image is None:
        spec.fail("image", "missing (required with driver docker)")
    if driver != "docker" and image is not None:
        spec.fail("image", f"only the docker driver runs images; driver {driver} runs a command")
    if driver != "docker" and not command:
        spec.fail("command", f"missing (required with driver {driver})")
    ports = _ports(spec)
    return JobSpec(
        name=name,
        driver=driver,
        count=spec.integer("count", 1, 1000, 1),
        cpu=spec.integer("cpu", 10, 1_000_000),
        memory=spec.integer("memory", 10, 1_000_000),
        command=command,
        image=image,
        datacenters=spec.strings("datacenters", ("*",)),
        regions=spec.strings("regions"),
        node_class=spec.string("node_class") if spec.has("node_class") else None,
        ports=ports,
        env=_env(spec),
        service=_service(spec, name, ports),
        max_per_rack=spec.integer("max_per_rack", 1, 1000, 1),
        source=source,
    )


def load_spec(path: Path) -> JobSpec:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    spec = parse_spec(raw, str(path))
    if spec.name != path.name.removesuffix(".yaml").removesuffix(".yml"):
        raise SpecError(f"{path}: name: {spec.name!r} differs from the file name; name the file {spec.name}.yaml")
    return spec


def load_specs(directory: str | Path) -> list[JobSpec]:
    """Every spec in the directory, sorted by name; any bad one fails the whole load."""
    folder = Path(directory)
    if not folder.is_dir():
        raise SpecError(f"{folder}: jobs directory not found (nomad.jobs_dir)")
    return [load_spec(p) for p in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])]

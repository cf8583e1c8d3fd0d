"""The file catalog source: a JSON object of service name -> Consul health entries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.catalog.consul_format import CatalogFormatError, snapshot_from_services
from bridge.gcpause import gc_paused
from bridge.model import Snapshot


def load_catalog(path: str | Path) -> Snapshot:
    with gc_paused():
        return _load(path)


def _load(path: str | Path) -> Snapshot:
    try:
        raw: Any = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise CatalogFormatError(f"cannot read catalog {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CatalogFormatError(f"catalog {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, Mapping) or not all(isinstance(v, list) for v in raw.values()):
        raise CatalogFormatError(
            f"catalog {path}: expected a JSON object of service name -> array of health entries"
        )
    return snapshot_from_services(raw)

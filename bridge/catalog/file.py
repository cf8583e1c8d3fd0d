"""The file catalog source: a JSON object of service name -> Consul health entries."""

from __future__ import annotations

from pathlib import Path

from bridge.catalog.consul_format import CatalogFormatError, parse_catalog
from bridge.core.gcpause import gc_paused
from bridge.core.model import Snapshot


def load_catalog(path: str | Path) -> Snapshot:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CatalogFormatError(f"cannot read catalog {path}: {exc.strerror}") from None
    with gc_paused():
        return parse_catalog(data, f"catalog {path}")

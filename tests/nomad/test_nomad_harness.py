"""The test harness's real Nomad cluster starts with its clients' classes and racks, runs a raw_exec service
that Consul's DNS finds, and speaks mutual TLS."""

from __future__ import annotations

import os
import ssl
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.harness.consul_agent import ConsulAgent, resolver
from tests.harness.nomad_cluster import DEFAULT_CLIENTS, NomadCluster
from tests.harness.wait import wait_until


def _node_details(cluster: NomadCluster) -> dict[str, dict[str, Any]]:
    return {n["Name"]: cluster.api(f"/v1/node/{n['ID']}") for n in cluster.nodes()}


def _check_topology(cluster: NomadCluster) -> None:
    members = cluster.api("/v1/agent/members")["Members"]
    assert [(m["Name"].split(".")[0], m["Status"]) for m in members] == [("nomad-server", "alive")]
    nodes = _node_details(cluster)
    assert "nomad-server" not in nodes  # the server is not a client
    assert sorted(nodes) == sorted(c.name for c in DEFAULT_CLIENTS)
    for spec in DEFAULT_CLIENTS:
        node = nodes[spec.name]
        assert node["Status"] == "ready"
        assert node["NodeClass"] == spec.node_class
        assert node["Meta"]["rack"] == spec.rack
        assert node["Drivers"]["raw_exec"]["Healthy"]
        assert set(node["Drivers"]) == {"raw_exec"}
    racks = [n["Meta"]["rack"] for n in nodes.values()]
    assert sorted(racks) == ["rack-a", "rack-a", "rack-b", "rack-c"]
    assert sum(n["NodeClass"] == "lb" for n in nodes.values()) == 2


@pytest.mark.nomad
def test_nomad_cluster_topology(nomad_cluster: NomadCluster) -> None:
    _check_topology(nomad_cluster)
    consul = nomad_cluster.consul
    # Nomad registered itself in Consul (its own sync loop, on its own time), one Consul client agent per
    # Nomad client.
    wait_until(lambda: {"nomad", "nomad-client"} <= set(consul.api("/v1/catalog/services")))
    consul_nodes = {n["Node"] for n in consul.api("/v1/catalog/nodes")}
    assert {c.name for c in DEFAULT_CLIENTS} <= consul_nodes


RAW_EXEC_JOB: dict[str, Any] = {
    "Job": {
        "ID": "smoke-web",
        "Name": "smoke-web",
        "Type": "service",
        "Datacenters": ["dc1"],
        "Constraints": [{"LTarget": "${node.class}", "RTarget": "lb", "Operand": "="}],
        "TaskGroups": [
            {
                "Name": "web",
                "Count": 2,
                "Constraints": [{"Operand": "distinct_hosts", "RTarget": "true"}],
                "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
                "Services": [
                    {
                        "Name": "smoke-web",
                        "PortLabel": "http",
                        "Provider": "consul",
                        "Tags": ["rack-${meta.rack}"],
                        "Checks": [{"Type": "http", "Path": "/", "Interval": 1_000_000_000, "Timeout": 1_000_000_000}],
                    }
                ],
                "Tasks": [
                    {
                        "Name": "srv",
                        "Driver": "raw_exec",
                        "Config": {
                            "command": "/bin/sh",
                            "args": [
                                "-c",
                                'exec "$PYTHON" -m http.server "$NOMAD_PORT_http" --bind 127.0.0.1',
                            ],
                        },
                        "Env": {"PYTHON": "python3"},
                        "Resources": {"CPU": 50, "MemoryMB": 64},
                    }
                ],
            }
        ],
    }
}


@pytest.mark.nomad
def test_nomad_raw_exec_service_reaches_consul_dns(nomad_cluster: NomadCluster) -> None:
    consul = nomad_cluster.consul
    nomad_cluster.api("/v1/jobs", method="POST", body=RAW_EXEC_JOB)
    try:
        healthy = wait_until(
            lambda: (h := consul.api("/v1/health/service/smoke-web?passing=true")) and len(h) == 2 and h,
            timeout=180,
        )
        assert {e["Node"]["Node"] for e in healthy} == {"nomad-c1", "nomad-c3"}  # the lb class
        assert sorted(t for e in healthy for t in e["Service"]["Tags"]) == ["rack-rack-a", "rack-rack-b"]
        srv = resolver(consul).resolve("smoke-web.service.consul", "SRV")
        ports = sorted(rr.port for rr in srv)
        assert ports == sorted(e["Service"]["Port"] for e in healthy)
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                assert resp.status == 200
    finally:
        nomad_cluster.api("/v1/job/smoke-web?purge=true", method="DELETE")
    wait_until(lambda: not consul.api("/v1/health/service/smoke-web"), timeout=120)


@pytest.mark.nomad
def test_nomad_cluster_mutual_tls(consul_agent: ConsulAgent, nomad_binary: str) -> None:
    with NomadCluster(nomad_binary, consul_agent, tls=True) as cluster:
        assert cluster.api_url.startswith("https://")
        _check_topology(cluster)
        # Without a client certificate the API refuses the handshake.
        no_cert = ssl.create_default_context(cafile=str(cluster.env()["NOMAD_CACERT"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{cluster.api_url}/v1/nodes", timeout=5, context=no_cert).read()
        # The nomad CLI works with the env the cluster hands out.
        out = subprocess.run(
            [nomad_binary, "node", "status", "-json"],
            env={**os.environ, **cluster.env()},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        assert all(name in out for name in ("nomad-c1", "nomad-c2", "nomad-c3", "nomad-c4"))

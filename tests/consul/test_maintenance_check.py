"""A director in maintenance shows in Consul: its /health answers 429, which a real Consul's HTTP check reports
as a warning (and passing again after `maintenance off`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.agent.http import serve
from bridge.catalog.registration import Announcer, service_id
from bridge.core.config import BgpConfig, ConsulConfig
from bridge.dataplane.shadow import ShadowKernel
from bridge.files.maintenance import Maintenance, clear_maintenance, write_maintenance
from tests.harness.consul_agent import ConsulAgent, free_port
from tests.harness.shadow_agent import Catalog, director, web
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul


def check_status(consul: ConsulAgent, sid: str) -> str:
    found = [c["Status"] for c in consul.api("/v1/agent/checks").values() if c["ServiceID"] == sid]
    return str(found[0]) if found else ""


def test_maintenance_turns_the_agents_consul_check_to_warning_and_off_turns_it_back(consul_agent, tmp_path):
    agent = director(tmp_path, Catalog([web(1)]), ShadowKernel())
    config = replace(agent.config, http_bind=f"127.0.0.1:{free_port()}", node_name="lb1",
                     consul=ConsulConfig(address=consul_agent.http_url))
    agent.config = config
    agent.sync("start", full=True)
    server = serve(agent)
    announcer = Announcer(config)
    try:
        announcer.register()
        sid = service_id(config)
        wait_until(lambda: check_status(consul_agent, sid) == "passing", timeout=30)
        assert isinstance(config.bgp, BgpConfig)
        write_maintenance(config.bgp.maintenance_file, Maintenance("kernel upgrade", 1.0, "ops@lb1"))
        wait_until(lambda: check_status(consul_agent, sid) == "warning", timeout=30)
        clear_maintenance(config.bgp.maintenance_file)
        wait_until(lambda: check_status(consul_agent, sid) == "passing", timeout=30)
    finally:
        announcer.stop()
        server.stop()

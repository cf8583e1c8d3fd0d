"""SIGHUP's reload, as a function of the agent: the live keys take effect at once, the others wait for a
restart and say so, and a configuration that does not validate changes nothing."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace

import pytest

from bridge.agent.director import DirectorReconciler
from bridge.agent.shell import Agent
from bridge.core.config import Config, ConfigError
from tests.harness.shadow_agent import Catalog, web
from tests.harness.web import CONFIG


def agent_with(tmp_path, reload) -> Agent:
    config = replace(CONFIG, dataplane="shadow", local_address="192.0.2.1", state_file=str(tmp_path / "state.json"))
    return Agent(DirectorReconciler(config), Catalog([web(1)]), reload)  # type: ignore[arg-type]


def test_live_keys_take_effect_and_the_others_wait_for_a_restart(tmp_path, caplog):
    agent = agent_with(tmp_path, lambda: new)
    new = replace(agent.config, drain_timeout=5.0, vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/25"),),
                  http_bind="127.0.0.1:1", role="backend")
    book = agent.reconciler.book
    with caplog.at_level(logging.INFO, logger="maglev-bridge"):
        agent.reload_config()
    assert agent.config.drain_timeout == 5.0 and str(agent.config.vip_cidrs[0]) == "198.51.100.0/25"
    assert agent.config.http_bind == CONFIG.http_bind and agent.config.role == "director"
    assert agent.reconciler.book is not book, "the desired state is computed again under the new configuration"
    assert "changed key(s) role, http_bind need a restart" in caplog.text
    assert "now in effect: vip_cidrs, drain_timeout" in caplog.text
    assert agent.trigger.take() == ("configuration reloaded", True)


@pytest.mark.parametrize(("error", "said"), [
    (ConfigError("fou_port: expected an integer from 1 to 65535, got 0"),
     "keeping the running one: fou_port: expected an integer"),
    # the reload runs in the worker, outside the pass boundary: a bug there must not end the agent
    (RecursionError("maximum recursion depth exceeded"), "could not be read, keeping the running one"),
], ids=["invalid", "unexpected error"])
def test_a_configuration_that_does_not_validate_changes_nothing(tmp_path, caplog, error, said):
    def bad() -> Config:
        raise error

    agent = agent_with(tmp_path, bad)
    before = agent.config
    with caplog.at_level(logging.ERROR, logger="maglev-bridge"):
        agent.reload_config()
    assert agent.config is before
    assert said in caplog.text


@pytest.mark.parametrize("key", ["tag_prefix", "route_protocol", "link_prefix", "state_file", "dataplane"])
def test_keys_built_into_the_running_agent_need_a_restart(tmp_path, caplog, key):
    agent = agent_with(tmp_path, lambda: changed)
    changed = replace(agent.config, **{key: {"tag_prefix": "lb", "route_protocol": 246, "link_prefix": "x",
                                             "state_file": "/elsewhere", "dataplane": "kernel"}[key]})
    with caplog.at_level(logging.INFO, logger="maglev-bridge"):
        agent.reload_config()
    assert getattr(agent.config, key) != getattr(changed, key)
    assert f"changed key(s) {key} need a restart" in caplog.text


def test_a_sigterm_before_the_scheduler_runs_stops_the_agent_without_an_error(tmp_path):
    """Nomad may stop an allocation while the agent is still starting; the handler runs stop() then."""
    agent = agent_with(tmp_path, None)
    agent.source.stop = lambda: None  # type: ignore[attr-defined]
    agent.stop()
    agent.work()  # returns at once: the stop is kept for the worker


from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_configuration_file_is_valid_and_documents_every_key():
    config = load_config(ROOT / "maglev-bridge.example.yaml")
    assert config.fou_port == 5555 and config.tag_prefix == "maglev"
    text = (ROOT / "maglev-bridge.example.yaml").read_text()
    from bridge.config import _PARSERS
    missing = [key for key in _PARSERS if f"{key}:" not in text]
    assert missing == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fou_port": 70000}, "fou_port: expected an integer from 1 to 65535, got 70000"),
        ({"vip_cidrs": ["198.51.100.1/24"]}, "vip_cidrs[0]: '198.51.100.1/24' is not a network"),
        ({"vip_cidrs": "198.51.100.0/24"}, "vip_cidrs: expected a list"),
        ({"tunnel_map": [{"backend": "10.0.0.0/16", "tunnel": "100.64.0.0/24"}]},
         "tunnel_map[0]: backend /16 and tunnel /24 must have equal prefix lengths"),
        ({"tunnel_map": [{"backend": "10.0.0.0/16"}]}, "tunnel_map[0]: expected {backend: <cidr>, tunnel: <cidr>}"),
        ({"default_flags": ["mh-port", "sh-port"]}, "default_flags: unknown flag(s) ['sh-port']"),
        ({"drain_timeout": "soon"}, "drain_timeout: expected a number"),
        ({"vip_cidr": []}, "vip_cidr: unknown key"),
        ({"role": "router"}, "role: expected one of ['director', 'backend']"),
        ({"local_address": "nowhere"}, "local_address:"),
        ({"link_prefix": "toolongname"}, "link_prefix: 'toolongname' is too long"),
        ({"consul": {"adress": "x"}}, "consul.adress: unknown key"),
        ({"sysctls": {"net.ipv4.ip_forward": 1}}, "sysctls: 'net.ipv4.ip_forward': only IPVS sysctls"),
        ({"sysctls": {"net.ipv4.vs.sloppy_tcp": "yes"}}, "sysctls.net.ipv4.vs.sloppy_tcp: expected an integer"),
        ({"bgp": {"table": 254}}, "bgp.table: expected a routing table from 1 to 252"),
        ({"bgp": {"table": "245"}}, "bgp.table: expected an integer"),
        ({"conn_sync": {"syncid": 1}}, "conn_sync.interface: required"),
        ({"conn_sync": {"interface": "eth0", "syncid": 300}}, "conn_sync.syncid: expected an integer from 0 to 255"),
    ],
)
def test_bad_configuration_is_one_clear_message_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_tunnel_map_keeps_host_bits():
    from bridge.addr import ipv4_int, ipv4_text
    config = parse_config({"tunnel_map": [{"backend": "10.20.0.0/16", "tunnel": "100.64.0.0/16"}]})
    assert ipv4_text(config.tunnel_address(ipv4_int("10.20.3.4"))) == "100.64.3.4"
    assert config.tunnel_address(ipv4_int("10.21.3.4")) is None


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vip_cidrs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_reports_a_bad_configuration_with_exit_code_2(tmp_path, capsys):
    from bridge.cli import main
    path = tmp_path / "c.yaml"
    path.write_text("fou_port: 0\n")
    assert main(["plan", "--config", str(path), "--catalog", str(ROOT / "examples/demo-catalog.json")]) == 2
    assert "fou_port: expected an integer from 1 to 65535, got 0" in capsys.readouterr().err


def test_director_sysctls_default_to_what_moved_flows_need_and_a_listed_set_replaces_them():
    assert dict(parse_config({}).sysctls) == {"net.ipv4.vs.sloppy_tcp": 1, "net.ipv4.vs.expire_nodest_conn": 1}
    assert parse_config({"sysctls": {"net.ipv4.vs.sloppy_tcp": 1}}).sysctls == (("net.ipv4.vs.sloppy_tcp", 1),)


def test_a_bare_bgp_section_means_the_defaults_and_no_section_means_no_announcements():
    bgp = parse_config({"bgp": None}).bgp
    assert bgp is not None and (bgp.table, bgp.maintenance_file) == (245, "/var/lib/maglev-bridge/maintenance")
    assert parse_config({}).bgp is None

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from bridge.core.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_configuration_file_is_valid_and_documents_every_key():
    config = load_config(ROOT / "maglev-bridge.example.yaml")
    assert config.fou_port == 5555 and config.tag_prefix == "maglev"
    text = (ROOT / "maglev-bridge.example.yaml").read_text()
    from bridge.core.config import _PARSERS
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
    from bridge.core.addr import ipv4_int, ipv4_text
    config = parse_config({"tunnel_map": [{"backend": "10.20.0.0/16", "tunnel": "100.64.0.0/16"}]})
    assert ipv4_text(config.tunnel_address(ipv4_int("10.20.3.4"))) == "100.64.3.4"
    assert config.tunnel_address(ipv4_int("10.21.3.4")) is None


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vip_cidrs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_reports_a_bad_configuration_with_exit_code_2(tmp_path, capsys):
    from bridge.cli.main import main
    path = tmp_path / "c.yaml"
    path.write_text("fou_port: 0\n")
    assert main(["plan", "--config", str(path), "--catalog", str(ROOT / "examples/demo-catalog.json")]) == 2
    assert "fou_port: expected an integer from 1 to 65535, got 0" in capsys.readouterr().err


# -- checked for what it means: what would fail at use fails at load, naming the key --------------------


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("::1:9119", "http_bind: '::1:9119': an IPv6 address needs brackets"),
        ("localhost:9119", "http_bind: 'localhost' is not an IP address"),
        ("127.0.0.1:0", "http_bind: port '0' must be a number from 1 to 65535"),
        ("127.0.0.1:70000", "http_bind: port '70000' must be a number from 1 to 65535"),
        ("127.0.0.1:٩١", "http_bind: port '٩١' must be a number"),
        ("127.0.0.1", "http_bind: a port is needed"),
        ("127.0.0.1:", "http_bind: '127.0.0.1:': the port after ':' is missing"),
        ("[127.0.0.1]:80", "http_bind: '127.0.0.1' in brackets is not an IPv6 address"),
        ("[::1]x:80", "http_bind: '[::1]x:80': expected [IPv6]:port"),
    ],
)
def test_http_bind_that_could_not_be_bound_is_refused_at_load(bind, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"http_bind": bind})
    assert message in str(err.value)


@pytest.mark.parametrize(("bind", "host", "port"),
                         [("127.0.0.1:9119", "127.0.0.1", 9119), ("[::1]:80", "::1", 80), ("0.0.0.0:1", "0.0.0.0", 1)])
def test_http_bind_forms_that_bind(bind, host, port):
    address = parse_config({"http_bind": bind}).http_address
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize(
    ("consul", "message"),
    [
        ({"address": "unix:///run/consul.sock"}, "consul.address: scheme 'unix' is not supported"),
        ({"address": "ftp://127.0.0.1:8500"}, "consul.address: scheme 'ftp' is not supported"),
        ({"address": "http://127.0.0.1:8500/v1"}, "consul.address: 'http://127.0.0.1:8500/v1': only scheme://host:port"),
        ({"address": "http://token@127.0.0.1"}, "only scheme://host:port is allowed"),
        ({"address": "http://::1:8500"}, "consul.address: '::1:8500': an IPv6 address needs brackets"),
        ({"address": "http://127.0.0.1:85000"}, "consul.address: port '85000'"),
        ({"dns_address": "consul:8600"}, "consul.dns_address: 'consul' is not an IP address"),
        ({"token_file": "/nonexistent/token"}, "consul.token_file: /nonexistent/token does not exist"),
        ({"token_file": "/"}, "consul.token_file: / is not a regular file"),
        ({"address": "https://127.0.0.1:8501", "cert_file": __file__}, "consul.key_file: consul.cert_file is set"),
        ({"ca_file": __file__}, "consul.address: ca_file is set but http://127.0.0.1:8500 is not https://"),
        ({"wait": "\u0665m"}, "consul.wait: '\u0665m' is not a duration"),
    ],
)
def test_consul_section_that_the_client_could_not_use_is_refused_at_load(consul, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"consul": consul})
    assert message in str(err.value)


def test_nomad_address_is_checked_like_consul():
    with pytest.raises(ConfigError, match=r"nomad.address: scheme 'unix' is not supported"):
        parse_config({"nomad": {"address": "unix:///run/nomad.sock"}})


def test_addresses_the_clients_can_dial():
    config = parse_config({"consul": {"address": "https://[2001:db8::1]:8501", "ca_file": __file__},
                           "nomad": {"address": "127.0.0.1"}})
    assert config.consul is not None and config.consul.url.text == "https://[2001:db8::1]:8501"
    assert config.nomad is not None and config.nomad.url.text == "http://127.0.0.1:4646"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tunnel_map": [{"backend": "10.0.0.0/16", "tunnel": "100.64.0.0/16"},
                         {"backend": "10.0.1.0/24", "tunnel": "100.65.0.0/24"}]},
         "tunnel_map[1].backend: 10.0.1.0/24 overlaps tunnel_map[0].backend 10.0.0.0/16: a backend address would map"),
        ({"tunnel_map": [{"backend": "10.0.0.0/16", "tunnel": "100.64.0.0/16"},
                         {"backend": "10.1.0.0/16", "tunnel": "100.64.0.0/16"}]},
         "tunnel_map[1].tunnel: 100.64.0.0/16 overlaps tunnel_map[0].tunnel 100.64.0.0/16: two backends would share"),
        ({"tunnel_map": [{"backend": "10.0.0.0/16", "tunnel": "10.0.0.0/16"}]},
         "tunnel_map[0].tunnel: 10.0.0.0/16 overlaps tunnel_map[0].backend 10.0.0.0/16: tunnel addresses are routed"),
        ({"tunnel_map": [{"backend": "10.0.0.0/16", "tunnel": "100.64.0.0/16"}], "vip_cidrs": ["100.64.3.0/24"]},
         "vip_cidrs[0]: 100.64.3.0/24 overlaps tunnel_map[0].tunnel 100.64.0.0/16"),
        ({"tunnel_map": [{"backend": "10.0.0.0/16", "tunnel": "100.64.0.0/16"}], "vip_cidrs": ["10.0.0.0/8"]},
         "vip_cidrs[0]: 10.0.0.0/8 overlaps tunnel_map[0].backend 10.0.0.0/16"),
    ],
)
def test_prefixes_that_overlap_or_collide_are_refused(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_yaml_aliases_are_refused_before_anything_expands_them(tmp_path):
    """A "billion laughs" file of 400 bytes: nine levels of nine aliases would be 10^9 strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nvip_cidrs: *a8\n")
    assert path.stat().st_size < 600
    with pytest.raises(ConfigError, match=r"line 2: YAML aliases \(\*a0\) are not supported"):
        load_config(path)


@pytest.mark.parametrize("document", [{"fou_port": "x" * 1_000_000, "ignored": 1}, {"sysctls": "x" * 1_000_000},
                                      {"sysctls": {"x" * 1_000_000: 1}}], ids=["fou_port", "sysctls", "sysctl name"])
def test_a_huge_value_makes_a_short_message(document):
    with pytest.raises(ConfigError) as err:
        parse_config(document)
    assert len(str(err.value)) < 300


def test_keys_that_are_not_strings_are_named_not_crashed_on():
    with pytest.raises(ConfigError, match=r"^1: unknown key"):
        parse_config({1: 2})
    with pytest.raises(ConfigError, match=r"consul.1: unknown key"):
        parse_config({"consul": {1: 2, "address": "http://127.0.0.1:8500"}})


# -- tokens: token_file first, then the environment, for both clients ------------------------------------


def test_token_file_wins_over_the_environment_for_consul_and_nomad(tmp_path, monkeypatch):
    from bridge.catalog.consul import make_client
    from bridge.nomad.client import make_api

    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    monkeypatch.setenv("NOMAD_TOKEN", "from-env")
    token = tmp_path / "token"
    token.write_text("from-file\n")
    config = parse_config({"consul": {"token_file": str(token)}, "nomad": {"token_file": str(token)}})
    assert config.consul is not None and config.nomad is not None
    assert make_client(config.consul).token == "from-file"
    assert make_api(config.nomad).token == "from-file"
    token.write_text("")
    assert make_client(config.consul).token is None, "an empty token file means no token, not the environment's"
    bare = parse_config({"consul": {}, "nomad": {}})
    assert bare.consul is not None and bare.nomad is not None
    assert make_client(bare.consul).token == "from-env" and make_api(bare.nomad).token == "from-env"


def test_a_token_file_gone_after_load_is_an_error_naming_the_key(tmp_path):
    from bridge.clients import read_token
    from bridge.core.addr import EndpointError

    with pytest.raises(EndpointError, match=r"consul.token_file: cannot read .*/gone: No such file"):
        read_token("consul.token_file", str(tmp_path / "gone"), "CONSUL_HTTP_TOKEN")


def test_error_bodies_are_summarised_never_repeated():
    from bridge.clients import summarize_body

    body = ("rpc error: ACL not found\r\nX-Consul-Token: 5f3c8e2a-1b2c-4d5e-8f90-123456789abc\x1b[31m"
            + "padding " * 500)
    line = summarize_body(body)
    assert "5f3c8e2a" not in line and "\x1b" not in line and "\n" not in line
    assert line.startswith("rpc error: ACL not found <redacted>") and len(line) <= 160


# -- any document: a ConfigError naming a key, or a configuration; never anything else ---------------------


def _documents():
    from hypothesis import strategies as st

    from bridge.core.config import _PARSERS, ConsulConfig, NomadConfig

    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
    scalars |= st.sampled_from(
        ["127.0.0.1:9119", "[::1]:1", "http://127.0.0.1:8500", "https://[::1]", "10.0.0.0/8", "5m", "mh-port",
         "198.51.100.0/24", "/etc/hostname", "kernel", "director", 4093, 5555])
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8) | st.sampled_from(["backend", "tunnel"]), inner,
                                            max_size=3), max_leaves=6)
    section = lambda cls: st.dictionaries(st.sampled_from([f.name for f in fields(cls)]), values, max_size=4)  # noqa: E731
    return st.dictionaries(st.sampled_from([*sorted(_PARSERS), "unknown"]), values, max_size=5).flatmap(
        lambda doc: st.fixed_dictionaries({}, optional={"consul": section(ConsulConfig), "nomad": section(NomadConfig)})
        .map(lambda extra: {**doc, **extra}))


def test_any_document_is_a_configuration_or_one_config_error():
    from hypothesis import given, settings

    @settings(max_examples=200, deadline=None)
    @given(_documents())
    def check(document):
        try:
            parse_config(document)
        except ConfigError as exc:
            assert len(str(exc)) < 600 and ":" in str(exc)

    check()


def test_director_sysctls_default_to_what_moved_flows_need_and_a_listed_set_replaces_them():
    assert dict(parse_config({}).sysctls) == {"net.ipv4.vs.sloppy_tcp": 1, "net.ipv4.vs.expire_nodest_conn": 1}
    assert parse_config({"sysctls": {"net.ipv4.vs.sloppy_tcp": 1}}).sysctls == (("net.ipv4.vs.sloppy_tcp", 1),)


def test_a_bare_bgp_section_means_the_defaults_and_no_section_means_no_announcements():
    bgp = parse_config({"bgp": None}).bgp
    assert bgp is not None and (bgp.table, bgp.maintenance_file) == (245, "/var/lib/maglev-bridge/maintenance")
    assert parse_config({}).bgp is None

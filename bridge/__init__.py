"""maglev-bridge: the Consul-driven IPVS Maglev + Foo-over-UDP director agent."""


def version() -> str:
    """The version of the running build (the artifact's under Nomad), as /status, the agent's Consul meta
    and `status --discover` report it: during a rolling upgrade they show which director runs which.
    importlib.metadata is imported here, not with the package: every module of it would pay for it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _distribution_version

    try:
        return _distribution_version("maglev-bridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"

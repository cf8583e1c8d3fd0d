"""The Nomad API through python-nomad, with the TLS settings of the `nomad:` section (CA, client
certificate and key for mutual TLS, server name), the region, namespace and token. Every failure becomes
a NomadError that says what was asked and what Nomad answered, so commands can print one line."""

from __future__ import annotations

from typing import Any

import nomad
import requests
from nomad.api.exceptions import BaseNomadException

from bridge import clients
from bridge.core.addr import EndpointError
from bridge.core.config import NomadConfig
from bridge.nomad.render import JobSource

Job = dict[str, Any]


class NomadError(RuntimeError):
    """Nomad could not be reached, or refused; the message names the call."""


def read_token(config: NomadConfig) -> str | None:
    """`token_file` first, else NOMAD_TOKEN. Never logged."""
    try:
        return clients.read_token("nomad.token_file", config.token_file, "NOMAD_TOKEN")
    except EndpointError as exc:
        raise NomadError(str(exc)) from None


def make_api(config: NomadConfig, region: str | None = None) -> nomad.Nomad:
    session = requests.Session()
    if config.tls_server_name and config.url.scheme == "https":
        session.mount("https://", clients.ServerNameAdapter(config.tls_server_name))
    return nomad.Nomad(
        address=config.url.text,
        region=region or config.region,
        namespace=config.namespace,
        token=read_token(config),
        verify=config.ca_file or True,
        cert=clients.client_cert(config.cert_file, config.key_file) or (),
        timeout=15,
        session=session,
    )


def _describe(exc: BaseNomadException) -> str:
    resp = exc.nomad_resp
    if isinstance(resp, requests.Response):
        return f"HTTP {resp.status_code}: {clients.summarize_body(resp.text, limit=1000)}"
    return str(resp)


class NotFound(NomadError):
    """Nomad has no such object."""


class NomadClient:
    """The calls the job commands need, for one region."""

    def __init__(self, config: NomadConfig, region: str | None = None) -> None:
        self.region = region or config.region
        self.api = make_api(config, region)

    def _call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = call(*args, **kwargs)
        except nomad.api.exceptions.URLNotFoundNomadException as exc:
            raise NotFound(f"{what}: {_describe(exc)}") from None
        except BaseNomadException as exc:
            raise NomadError(f"{what}: {_describe(exc)}") from None
        except (requests.RequestException, OSError) as exc:
            raise NomadError(f"{what}: {exc}") from None
        return result.json() if isinstance(result, requests.Response) else result

    def _object(self, what: str, call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(self._call(what, call, *args, **kwargs))

    def _list(self, what: str, call: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return list(self._call(what, call, *args, **kwargs) or [])

    def parse(self, source: JobSource) -> Job:
        """HCL2 to JSON by Nomad's own parser. python-nomad's `jobs.parse` sends no variables, so the
        variables go through its requester (same session, TLS, region and token)."""
        body = {"JobHCL": source.hcl, "Variables": source.variables, "Canonicalize": False}
        return self._object(f"parse {source.origin}", self.api.jobs.request, "parse", method="post", json=body)

    def validate(self, job: Job) -> dict[str, Any]:
        return self._object(f"validate {job['ID']}", self.api.validate.validate_job, {"Job": job})

    def plan(self, job: Job) -> dict[str, Any]:
        return self._object(f"plan {job['ID']}", self.api.job.plan_job, job["ID"], {"Job": job}, diff=True)

    def register(self, job: Job) -> dict[str, Any]:
        return self._object(f"register {job['ID']}", self.api.job.register_job, job["ID"], {"Job": job})

    def job(self, job_id: str) -> Job | None:
        try:
            return self._object(f"read job {job_id}", self.api.job.get_job, job_id)
        except NotFound:
            return None

    def evaluation(self, eval_id: str) -> dict[str, Any]:
        return self._object(f"read evaluation {eval_id}", self.api.evaluation.get_evaluation, eval_id)

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self._object(f"read deployment {deployment_id}", self.api.deployment.get_deployment, deployment_id)

    def deployment_allocations(self, deployment_id: str) -> list[dict[str, Any]]:
        return self._list(
            f"read allocations of deployment {deployment_id}",
            self.api.deployment.get_deployment_allocations,
            deployment_id,
        )

    def allocations(self, job_id: str) -> list[dict[str, Any]]:
        return self._list(f"read allocations of {job_id}", self.api.job.get_allocations, job_id)

    def node(self, node_id: str) -> dict[str, Any]:
        return self._object(f"read node {node_id}", self.api.node.get_node, node_id)

    def deregister(self, job_id: str, purge: bool = False) -> None:
        self._call(f"stop {job_id}", self.api.job.deregister_job, job_id, purge=purge or None)

# The maglev-bridge agent as a Nomad system job: one director on every client of the director node class
# and, optionally, one backend agent on every client of the class that hosts the balanced services.
#
#   maglev-bridge jobs deploy --agent-config agent.yaml --agent-artifact URL --agent-artifact-checksum FILE \
#       --agent-var-file agent.vars.hcl --only maglev-bridge
#
# (or `nomad job run -var-file=... -var config="$(cat agent.yaml)" -var artifact_url=URL
# -var artifact_checksum=sha256:HEX hcl/maglev-bridge.nomad.hcl`). The job brings the agent with it: every
# client fetches the build of `make dist` from artifact_url (go-getter refuses it unless its checksum is
# artifact_checksum) and runs it from the allocation directory, so a new client gets its agent from Nomad and
# an upgrade is a change of artifact_url, rolled one agent at a time. Without artifact_url the job runs the
# agent from `venv`, for sites that install it by other means. The agents run with raw_exec: they program
# the host's IPVS, routes and FOU sockets, which no isolating driver allows.
#
# BIRD runs next to the director agent as a host service, not in this job (Debian `bird2`, configured from
# examples/bird-director.conf), so that an agent restart or upgrade never touches a BGP session: with a
# `bgp:` section the agent only keeps the VIP routes in its kernel table, which that BIRD learns. The
# maintenance file (`bgp.maintenance_file`, default /var/lib/maglev-bridge/maintenance) is on the host and
# outlives allocations. Run `maglev-bridge maintenance on|off` on the director host with a configuration
# whose `bgp:` section matches the job's; set `http_port` (a static port, and `http_bind` in that
# configuration) if the command should wait for the agent's confirmation. While a director is in
# maintenance its check is a warning (429): `maglev-bridge jobs deploy`, which waits for passing checks,
# counts that director as not yet healthy until `maintenance off`.

variable "config" {
  type        = string
  description = <<-EOT
    The agents' YAML configuration (keys as in maglev-bridge.example.yaml). The job appends http_bind,
    state_file, node_name and rack for each allocation, so values given here for those keys are overridden.
  EOT
}

variable "artifact_url" {
  type        = string
  default     = ""
  description = "URL of the agent's build (make dist: maglev-bridge-<version>-<platform>.pyz); empty: run from venv."
}

variable "artifact_checksum" {
  type        = string
  default     = ""
  description = "The build's checksum as go-getter takes it, sha256:<hex>; the client refuses a download that differs."
}

variable "python" {
  type        = string
  default     = "python3"
  description = "The CPython that runs the build; its version and machine must be those in the build's name."
}

variable "venv" {
  type        = string
  default     = "/opt/maglev-bridge/venv"
  description = "Without artifact_url: the virtualenv holding maglev-bridge on every client (<venv>/bin/maglev-bridge)."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "director_class" {
  type        = string
  default     = "lb"
  description = "Node class of the load-balancer clients: one director on each."
}

variable "backend_class" {
  type        = string
  default     = "app"
  description = "Node class of the clients hosting balanced services: one backend agent on each; empty for none."
}

variable "http_port" {
  type        = number
  default     = 0
  description = "Static port of the agent's /health and /status; 0 takes a dynamic port (several agents per host)."
}

variable "state_dir" {
  type        = string
  default     = ""
  description = "Host directory for the agent's state file; empty keeps it in the allocation directory."
}

variable "service_name" {
  type        = string
  default     = "maglev-bridge"
  description = "Consul service the allocations register as (<name>.service.consul), tagged role=... and rack=..."
}

variable "stagger" {
  type        = string
  default     = "30s"
  description = "Pause between replacing one agent and the next."
}

locals {
  # The build fetched from artifact_url, unpacked by shiv into the task directory at its first start; or the
  # virtualenv on the host.
  from_artifact = var.artifact_url != ""
  build         = "$${NOMAD_TASK_DIR}/maglev-bridge.pyz"
  command       = local.from_artifact ? var.python : "${var.venv}/bin/maglev-bridge"
  launch        = local.from_artifact ? ["-I", local.build] : []
  roles         = { for role, class in { director = var.director_class, backend = var.backend_class } : role => class if class != "" }
  state_dir     = var.state_dir != "" ? var.state_dir : "{{ env \"NOMAD_ALLOC_DIR\" }}/data"
}

job "maglev-bridge" {
  type        = "system"
  datacenters = var.datacenters
  priority    = 80

  # One director at a time, so a bad version never takes every director down at once. Nomad 1.6 enforces
  # only max_parallel and stagger for system jobs; health_check and min_healthy_time take effect where
  # the system scheduler runs deployments, and `maglev-bridge jobs deploy` waits for the Consul checks.
  update {
    max_parallel     = 1
    stagger          = var.stagger
    health_check     = "checks"
    min_healthy_time = "10s"
    healthy_deadline = "3m"
  }

  dynamic "group" {
    for_each = local.roles
    labels   = [group.key]

    content {
      constraint {
        attribute = "$${node.class}"
        value     = group.value
      }

      network {
        dynamic "port" {
          for_each = var.http_port == 0 ? [] : [var.http_port]
          labels   = ["http"]
          content {
            static = port.value
          }
        }
        dynamic "port" {
          for_each = var.http_port == 0 ? ["dynamic"] : []
          labels   = ["http"]
          content {}
        }
      }

      service {
        name     = var.service_name
        port     = "http"
        provider = "consul"
        # "metrics" and meta.metrics_path are what Prometheus' consul_sd relabel rules select, meta.node
        # and meta.role the labels they give each target (examples/prometheus.yml); the agent registers
        # itself the same way when it registers.
        tags = ["role=${group.key}", "rack=$${meta.rack}", "metrics"]
        meta {
          metrics_path = "/metrics"
          node         = "$${node.unique.name}"
          role         = "${group.key}"
        }

        check {
          type     = "http"
          path     = "/health"
          interval = "5s"
          timeout  = "2s"
        }
      }

      task "agent" {
        driver = "raw_exec"

        dynamic "artifact" {
          for_each = local.from_artifact ? [var.artifact_url] : []
          content {
            source      = artifact.value
            destination = "local/maglev-bridge.pyz"
            mode        = "file"
            options {
              checksum = var.artifact_checksum
            }
          }
        }

        config {
          command = local.command
          args    = concat(local.launch, ["run", "--config", "$${NOMAD_TASK_DIR}/maglev-bridge.yaml", "--role", group.key])
        }

        env {
          SHIV_ROOT = "$${NOMAD_TASK_DIR}/shiv"
        }

        # The agent leaves the kernel as it is and deregisters from Consul on SIGTERM; give it the time.
        kill_signal  = "SIGTERM"
        kill_timeout = "30s"

        template {
          destination = "local/maglev-bridge.yaml"
          change_mode = "restart"
          data        = <<-EOT
            ${var.config}
            http_bind: "{{ env "NOMAD_IP_http" }}:{{ env "NOMAD_PORT_http" }}"
            state_file: "${local.state_dir}/maglev-bridge-${group.key}.json"
            node_name: "{{ env "node.unique.name" }}"
            rack: "{{ env "meta.rack" }}"
          EOT
        }

        resources {
          cpu    = 200
          memory = 256
        }
      }
    }
  }
}

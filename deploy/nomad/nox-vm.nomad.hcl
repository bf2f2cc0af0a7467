# A nox VM as a Nomad job (raw_exec): Nomad runs `nox run NAME` in the
# foreground and owns its lifecycle. See docs/multi-host.md ("Cluster
# managers") for the contract nox keeps for it; tests/scheduler.rs checks it.
#
# Needs on each client: nox and qemu installed (scripts/setup-host.sh), the
# raw_exec driver enabled (plugin "raw_exec" { config { enabled = true } }),
# and the image at the path below. The VM's disk is local to the client it
# was created on: a rescheduled allocation on another client defines the VM
# anew there from the same arguments (a stateless VM), as the prestart task
# does.
#
#   nomad job run -var name=web -var image=/srv/images/debian-13.qcow2 nox-vm.nomad.hcl

variable "name" {
  type        = string
  description = "The VM's name (a DNS label)"
}

variable "image" {
  type        = string
  description = "qcow2/raw image file or catalog name (e.g. debian-13) on every client"
}

variable "cpus" {
  type    = number
  default = 2
}

variable "memory" {
  type    = string
  default = "2G"
}

variable "nox" {
  type    = string
  default = "/usr/local/bin/nox"
}

job "nox-vm" {
  type = "service"

  group "vm" {
    count = 1

    network {
      # Nomad picks the host ports; nox uses them: the guest's SSH forward
      # (--ssh-port; bound on the client's 127.0.0.1 only: `nox ssh NAME` on
      # the client, or add a --publish for services the guest offers) and
      # the readiness endpoint (--ready-listen).
      port "ssh" {}
      port "ready" {}
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    # Idempotent: defines the VM the first time, keeps it as it is after
    # that, and fails (naming the differences) if a VM of that name exists
    # with other settings. --no-start: the main task runs it.
    task "define" {
      driver = "raw_exec"
      lifecycle {
        hook    = "prestart"
        sidecar = false
      }
      config {
        command = var.nox
        args = [
          "create", var.name, "--if-absent", "--no-start",
          "--image", var.image,
          "--cpus", "${var.cpus}",
          "--memory", var.memory,
          "--network", "user",
          "--ssh-port", "${NOMAD_PORT_ssh}",
        ]
      }
    }

    task "vm" {
      driver = "raw_exec"
      config {
        command = var.nox
        # --ready-listen on the allocation's address: Nomad's check reaches
        # it there (127.0.0.1 would do for a check run by the local agent).
        args = ["run", var.name, "--ready-listen", "${NOMAD_ADDR_ready}"]
      }

      # SIGTERM (or SIGINT): ACPI powerdown, then qemu is forced after the
      # VM's stop timeout (nox create --stop-timeout, 60 s by default), and
      # nox run exits 0. kill_timeout must exceed that stop timeout.
      kill_signal  = "SIGTERM"
      kill_timeout = "90s"

      service {
        name     = "nox-vm-${var.name}"
        port     = "ready"
        provider = "nomad"
        check {
          # 200 once the guest's SSH server answers, 503 before.
          type     = "http"
          port     = "ready"
          path     = "/"
          interval = "10s"
          timeout  = "5s"
        }
      }

      resources {
        # Host-side budget of the task: nox's supervisor plus qemu, whose
        # guest memory is the VM's --memory (memory here is in MB).
        cpu    = 500
        memory = 2304
      }
    }
  }
}

"""Boot one throwaway VM on Debian's 6.1 kernel (IPVS, ip_vs_mh, fou, ipip as modules) and run a command
inside it, from the repository folder, as root.

    .venv/bin/python -m tests.vm.boot [--timeout S] [options] -- CMD [ARG...]

The VM is virtme-ng (`vng`) on qemu: the guest sees the host's filesystem read-only (the repository is an
overlay there: writable, changes thrown away) and a fresh kernel with its own network stack.  Before CMD runs
the guest loads the modules, brings `lo` up, gives the user-mode NIC 10.0.2.15/24 (10.0.2.2:PORT is the
host's 127.0.0.1:PORT; there is deliberately *no default route*, so nothing sent from the VM can leave it
by accident) and exports MAGLEV_VM=1.

CMD's stdout/stderr are streamed to this process's stdout/stderr while it runs, and its exit code becomes
ours.  When CMD could not be run or did not finish we exit non-zero with a message:
    124  the overall --timeout expired (partial output has been shown)
    125  the VM did not boot, the guest setup failed, or the VM died before CMD finished
Works without a tty or stdin (CI).  See tests/vm/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]
KERNEL_SCRIPT = REPO / "scripts" / "vm-kernel.sh"

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125

# Modules CMD can rely on; setup fails (exit 125) when one does not load.
REQUIRED_MODULES = (
    "ip_vs", "ip_vs_mh", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh",
    "fou", "ipip", "ip_tunnel", "nf_conntrack", "nf_tables",
    "veth", "bridge", "dummy",
)
# Loaded when present; a failure is only logged.
# (Anything else is loaded on demand by the guest kernel through the host's modprobe.  IPv6 tunnel modules are
# left out on purpose: they add ip6tnl0/sit0 to every namespace.)
OPTIONAL_MODULES = ("nf_conntrack_netlink",)

# Environment forwarded from the host into the guest (besides everything named MAGLEV_*).
FORWARD_ENV = ("CI", "PYTEST_ADDOPTS", "NO_COLOR", "FORCE_COLOR", "TERM", "LANG", "LC_ALL", "TZ")

# The guest side: a shell script whose @...@ placeholders write_guest_script() fills in.
GUEST_SH = Path(__file__).with_name("guest.sh")


def log(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


@dataclass
class Stream:
    """Copies what the guest appends to one file in the output folder to one of our streams."""

    path: Path
    sink: BinaryIO
    offset: int = 0

    def pump(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.sink.write(data)
            self.sink.flush()


@dataclass
class Attempt:
    accel: str
    out: Path
    returncode: int | None = None
    timed_out: bool = False
    boot_timed_out: bool = False
    seconds: float = 0.0
    streams: list[Stream] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return (self.out / name).exists()

    def read(self, name: str) -> str:
        try:
            return (self.out / name).read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""


def find_vng() -> str:
    here = Path(sys.executable).parent / "vng"
    if here.exists():
        return str(here)
    found = shutil.which("vng")
    if not found:
        raise SystemExit(f"vm: ERROR: virtme-ng (vng) not found next to {sys.executable} or on PATH; "
                         "install the test extras (pip install -e '.[test]')")
    return found


def find_kernel(explicit: str | None) -> str:
    if explicit:
        if not Path(explicit).is_file():
            raise SystemExit(f"vm: ERROR: kernel image {explicit} does not exist")
        return explicit
    proc = subprocess.run(["bash", str(KERNEL_SCRIPT)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise SystemExit(f"vm: ERROR: {KERNEL_SCRIPT} failed (exit {proc.returncode}); cannot boot a VM")
    return lines[-1]


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def fast_ro_dirs(kernel: str) -> list[str]:
    """Host folders (outside the repository) that the guest should read through the cached mount: the
    python installation behind the venv and the unpacked kernel's modules.  System folders stay on virtme's
    own (writable overlay) mounts."""
    dirs: list[str] = []
    for p in {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(kernel).resolve().parents[1]}:
        if p == REPO or REPO in p.parents:
            continue
        if len(p.parts) < 3 or p.parts[1] in ("usr", "etc", "var", "tmp", "lib", "bin", "sbin", "run", "proc",
                                              "sys", "dev", "opt", "srv", "home"):
            continue
        dirs.append(str(p))
    return sorted(dirs)


def guest_env(extra: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("MAGLEV_") and not k.startswith("MAGLEV_VM")}
    env.update({k: os.environ[k] for k in FORWARD_ENV if k in os.environ})
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"vm: ERROR: --env wants KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def write_guest_script(out: Path, kernel: str, cmd: list[str], cmd_timeout: int, net: bool, modules: list[str],
                       env: dict[str, str]) -> Path:
    venv_bin = str(Path(sys.executable).parent)
    path = ":".join([venv_bin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    required = list(REQUIRED_MODULES) + [m for m in modules if m not in REQUIRED_MODULES]
    text = (GUEST_SH.read_text()
            .replace("@OUT@", shlex.quote(str(out)))
            .replace("@REPO@", shlex.quote(str(REPO)))
            .replace("@FAST_RO@", " ".join(shlex.quote(d) for d in fast_ro_dirs(kernel)))
            .replace("@REQUIRED@", " ".join(required))
            .replace("@OPTIONAL@", " ".join(OPTIONAL_MODULES))
            .replace("@NET@", "1" if net else "0")
            .replace("@PATH@", shlex.quote(path))
            .replace("@ENV@", "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())))
            .replace("@CMD_TIMEOUT@", str(cmd_timeout))
            .replace("@CMD@", shlex.join(cmd)))
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise SystemExit(f"vm: ERROR: {GUEST_SH} has placeholders boot.py does not fill in: {left}")
    script = out / "guest.sh"
    script.write_text(text)
    return script


def vng_command(vng: str, kernel: str, out: Path, script: Path, accel: str, args: argparse.Namespace) -> list[str]:
    # --force-9p: vng otherwise probes virtiofsd first; Debian 12 only has qemu's C virtiofsd, which vng
    # cannot drive, and the failed probe costs ~6 s of sleeping per boot.
    cmd = [vng, "--force-9p", "-r", kernel, "--memory", args.memory, "--rwdir", str(out)]
    if args.cpus:
        cmd += ["--cpus", str(args.cpus)]
    for folder in args.share:
        cmd += ["--rwdir", str(Path(folder).resolve())]
    if args.net:
        cmd += ["--network", "user", "--no-dhcp"]
    # -v: the guest console (kernel messages, panics) goes to vng.log; it is shown when something fails
    cmd.append("-v")
    qemu = ["-fsdev", "local,id=maglevfs,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=maglevfs,mount_tag=maglevhost"]
    if accel == "tcg":
        cmd.append("--disable-kvm")
        # a big translation cache and `max` make emulation several times faster than qemu's defaults
        qemu = ["-cpu", "max", "-accel", "tcg,thread=multi,tb-size=512", *qemu]
    cmd += ["--exec", f"sh {script}"]
    # must be last: vng hands everything after it to qemu
    cmd.append("--qemu-opts=" + " ".join(qemu))
    return cmd


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_vm(vng: str, kernel: str, cmd: list[str], accel: str, args: argparse.Namespace, deadline: float,
           boot_timeout: float) -> Attempt:
    out = Path(tempfile.mkdtemp(prefix="maglev-vm-", dir=args.out_root))
    os.chmod(out, 0o755)
    attempt = Attempt(accel=accel, out=out)
    remaining = deadline - time.monotonic()
    # leave the guest time to write its exit code before we pull the plug
    cmd_timeout = max(5, int(remaining - min(60.0, remaining / 4)))
    script = write_guest_script(out, kernel, cmd, cmd_timeout, args.net, args.module, guest_env(args.env))
    command = vng_command(vng, kernel, out, script, accel, args)
    (out / "vng-command").write_text(shlex.join(command) + "\n")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    attempt.streams = [Stream(out / "stdout", sys.stdout.buffer), Stream(out / "stderr", sys.stderr.buffer)]
    log(f"booting {Path(kernel).name} ({accel}), output folder {out}")
    start = time.monotonic()
    with (out / "vng.log").open("wb") as vng_log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=vng_log, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                for s in attempt.streams:
                    s.pump()
                now = time.monotonic()
                if now >= deadline:
                    attempt.timed_out = True
                    break
                if not attempt.has("booted") and now - start > boot_timeout:
                    attempt.boot_timed_out = True
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    attempt.returncode = proc.returncode
    attempt.seconds = time.monotonic() - start
    for s in attempt.streams:
        s.pump()
    return attempt


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def report(a: Attempt, args: argparse.Namespace) -> int:
    """Tell what happened and choose our exit code."""
    booted, started, finished = a.read("booted"), a.read("started"), a.read("finished")
    if args.verbose:
        log(f"vng output ({a.out / 'vng.log'}):\n{tail(a.read('vng.log'), 400)}")
    rc_text = a.read("rc")
    if rc_text.isdigit():
        rc = int(rc_text)
        times = f"boot {booted}s, CMD {float(finished) - float(started):.1f}s" if started and finished else ""
        log(f"CMD exited with {rc} ({times}, whole VM run {a.seconds:.1f}s, accel {a.accel})")
        if rc == EXIT_TIMEOUT:
            log(f"CMD was killed by the guest-side timeout (exit {EXIT_TIMEOUT}); raise --timeout")
        return rc
    if a.timed_out:
        if started:
            log(f"ERROR: timeout after {a.seconds:.0f}s while CMD was running (its output so far is above); "
                "VM killed. Raise --timeout?")
        else:
            log(f"ERROR: timeout after {a.seconds:.0f}s before CMD started; VM killed. Guest setup log:\n"
                f"{tail(a.read('setup.log'))}")
        return EXIT_TIMEOUT
    if not booted:
        why = "did not reach the guest script in time" if a.boot_timed_out else "exited before the guest script ran"
        log(f"ERROR: the VM {why} (accel {a.accel}, vng exit {a.returncode}). vng/qemu output:\n"
            f"{tail(a.read('vng.log'))}")
        return EXIT_VM_FAILED
    if a.has("setup-failed"):
        log(f"ERROR: guest setup failed: {a.read('setup-failed')}. Guest setup log:\n{tail(a.read('setup.log'))}")
        return EXIT_VM_FAILED
    setup = "" if started else f" Guest setup log:\n{tail(a.read('setup.log'))}\n"
    log(f"ERROR: the VM stopped before CMD {'finished' if started else 'started'} (no exit code; kernel "
        f"panic, OOM or qemu crash?). vng exit {a.returncode}.{setup} Guest console (vng.log):\n"
        f"{tail(a.read('vng.log'))}")
    return EXIT_VM_FAILED


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        ours, cmd = argv[:i], argv[i + 1:]
    else:
        ours, cmd = argv, []
    p = argparse.ArgumentParser(prog="python -m tests.vm.boot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=float(os.environ.get("MAGLEV_VM_TIMEOUT", "1800")),
                   help="wall-clock bound for the whole run, boot included (default 1800 s, $MAGLEV_VM_TIMEOUT)")
    p.add_argument("--boot-timeout", type=float, default=180.0,
                   help="give up when the guest has not started its setup after this long (default 180 s)")
    p.add_argument("--accel", choices=("tcg", "kvm", "auto"), default=os.environ.get("MAGLEV_VM_ACCEL", "tcg"),
                   help="tcg: software emulation (default; KVM is broken on the nested CI machines); kvm: KVM "
                        "only; auto: try KVM for --kvm-boot-timeout seconds, then fall back to tcg")
    p.add_argument("--kvm-boot-timeout", type=float, default=30.0)
    p.add_argument("--kernel", default=os.environ.get("MAGLEV_VM_KERNEL"),
                   help="vmlinuz to boot (default: what scripts/vm-kernel.sh prints)")
    p.add_argument("--memory", default=os.environ.get("MAGLEV_VM_MEMORY", "2G"))
    p.add_argument("--cpus", type=int, default=None, help="guest CPUs (default: vng's, the host's count)")
    p.add_argument("--no-net", dest="net", action="store_false", help="no user-mode NIC in the guest")
    p.add_argument("--module", action="append", default=[], help="extra module that must load (repeatable)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE to export in the guest (repeatable)")
    p.add_argument("--out-root", default=None, help="where the per-run output folder is made (default: $TMPDIR)")
    p.add_argument("--share", action="append", default=[], metavar="DIR",
                   help="a host folder (outside the repository) the guest may write to, at the same path; "
                        "e.g. for a benchmark's results (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the output folder even when CMD succeeded")
    p.add_argument("-v", "--verbose", action="store_true", help="print the whole guest console (vng.log) at the end")
    args = p.parse_args(ours)
    if not cmd:
        p.error("no command: use  python -m tests.vm.boot [options] -- CMD [ARG...]")
    return args, cmd


def main(argv: list[str] | None = None) -> int:
    args, cmd = parse_args(sys.argv[1:] if argv is None else argv)
    deadline = time.monotonic() + args.timeout
    if os.geteuid() != 0:
        log("warning: not root; vng/qemu may still work, the kernel tests inside run as root anyway")
    vng = find_vng()
    kernel = find_kernel(args.kernel)
    accel = args.accel
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
        if accel == "kvm":
            attempt = run_vm(vng, kernel, cmd, "kvm", args, deadline, args.kvm_boot_timeout)
            if attempt.has("booted"):
                return finish(attempt, args)
            why = (f"did not boot within {args.kvm_boot_timeout:.0f}s" if attempt.boot_timed_out
                   else f"failed before booting (vng exit {attempt.returncode})")
            log(f"KVM {why}; falling back to software emulation. KVM's vng output:\n{tail(attempt.read('vng.log'), 5)}")
            if not args.keep:
                shutil.rmtree(attempt.out, ignore_errors=True)
            accel = "tcg"
    elif accel == "kvm" and not kvm_usable():
        log("ERROR: --accel kvm but /dev/kvm is not usable")
        return EXIT_VM_FAILED
    attempt = run_vm(vng, kernel, cmd, accel, args, deadline, args.boot_timeout)
    return finish(attempt, args)


def finish(attempt: Attempt, args: argparse.Namespace) -> int:
    rc = report(attempt, args)
    if rc == 0 and not args.keep:
        shutil.rmtree(attempt.out, ignore_errors=True)
    else:
        log(f"logs kept in {attempt.out} (setup.log, vng.log, stdout, stderr, guest.sh)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""What the kernel refused, in a module of its own: the commands that catch it (`maglev-bridge`'s exit code 1)
must not pay for importing netlink (pyroute2) when they never reach the kernel, as `plan` does not."""


class ApplyError(RuntimeError):
    """A failed operation, named, with the kernel's reason."""

"""Run a command under the kernel-level confinement that deploy/systemd/gateway.service asks systemd for, without
systemd (the tests run in a container where systemd is not PID 1):

- ``NoNewPrivileges=yes``: prctl(PR_SET_NO_NEW_PRIVS);
- ``MemoryDenyWriteExecute=yes``: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux 6.3+), the kernel's own
  version of systemd's seccomp filter: no mapping both writable and executable, none made executable later;
- ``SystemCallFilter=`` with ``SystemCallErrorNumber=EPERM``: a seccomp filter through libseccomp, allowing the
  system calls of the file given (one name a line; the unit's groups expanded by the test), EPERM for the rest;
- ``RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX``: in the same filter, socket(2) of any other family fails
  with EAFNOSUPPORT, as systemd makes it fail.

Both are inherited across fork and execve, so the command and everything it starts are confined.

    python tests/ops/confined_exec.py ALLOWED_SYSCALLS_FILE -- COMMAND [ARGS...]
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket as socket_module
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | errno.EPERM
SCMP_ACT_ERRNO_EAFNOSUPPORT = 0x00050000 | errno.EAFNOSUPPORT
SCMP_CMP_EQ, SCMP_CMP_GE = 4, 5
ALLOWED_FAMILIES = (socket_module.AF_UNIX, socket_module.AF_INET, socket_module.AF_INET6)   # 1, 2, 10


class ArgCompare(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value})")


def _seccomp(allowed: list[str]) -> int:
    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    context = seccomp.seccomp_init(SCMP_ACT_ERRNO_EPERM)
    added = 0
    for name in allowed:
        if name == "socket":   # by family only: _restrict_families
            continue
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0:   # a name of another architecture (e.g. _time64 variants): nothing to allow here
            continue
        if seccomp.seccomp_rule_add(context, SCMP_ACT_ALLOW, number, 0) == 0:
            added += 1
    _restrict_families(seccomp, context)
    if seccomp.seccomp_load(context) != 0:
        raise OSError("seccomp_load failed")
    return added


def _restrict_families(seccomp: ctypes.CDLL, context: int) -> None:
    """socket(2): the allowed families pass, every other one gets EAFNOSUPPORT (0, 3-9, and 11 and above)."""
    number = seccomp.seccomp_syscall_resolve_name(b"socket")
    seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(ArgCompare)]

    def rule(action: int, *compares: tuple[int, int, int]) -> None:
        array = (ArgCompare * len(compares))(*(ArgCompare(0, op, a, b) for op, a, b in compares))
        if seccomp.seccomp_rule_add_array(context, action, number, len(compares), array) != 0:
            raise OSError(f"seccomp rule for socket {compares}")

    for family in ALLOWED_FAMILIES:
        rule(SCMP_ACT_ALLOW, (SCMP_CMP_EQ, family, 0))
    for family in (0, *range(3, 10)):   # libseccomp takes one comparison per argument and rule: no range
        rule(SCMP_ACT_ERRNO_EAFNOSUPPORT, (SCMP_CMP_EQ, family, 0))
    rule(SCMP_ACT_ERRNO_EAFNOSUPPORT, (SCMP_CMP_GE, 11, 0))


def main(argv: list[str]) -> None:
    allowed_file, separator, *command = argv
    assert separator == "--" and command, __doc__
    libc = ctypes.CDLL(None, use_errno=True)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    _prctl(libc, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
    with open(allowed_file) as handle:
        _seccomp([line.strip() for line in handle if line.strip()])
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])

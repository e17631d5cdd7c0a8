"""Several "hosts" on one machine: network namespaces on a bridge, with optionally shaped links.

    python -m multinode.netns up --hosts K [--rate 100mbit] [--prefix lcnn]
    python -m multinode.netns exec HOST -- CMD ...   # CMD inside HOST, with HOST as its hostname
    python -m multinode.netns rsh HOST WORDS ...     # the same, called as ssh is (mpiexec's agent)
    python -m multinode.netns status [--prefix lcnn]
    python -m multinode.netns down [--prefix lcnn]   # kills what runs inside, removes everything

Host i is namespace PREFIX{i} with address 10.231.N.(i+1)/24 on its `eth0` (N is 0 for the
default prefix); the bridge PREFIXbr in the root namespace has 10.231.N.254. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from libe_cnn.errors import UserError

DEFAULT_PREFIX = "lcnn"
INTERFACE = "eth0"  # the same name inside every host, so one GLOO_SOCKET_IFNAME fits all
ETC_NETNS = Path("/etc/netns")
_SHIELD = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}  # no second Ctrl-C cuts a cleanup short


def subnet(prefix: str = DEFAULT_PREFIX) -> str:
    # Another prefix gets another /24, so a test's hosts never clash with a user's.
    octet = 0 if prefix == DEFAULT_PREFIX else 1 + zlib.crc32(prefix.encode()) % 253
    return f"10.231.{octet}"


def address(i: int, prefix: str = DEFAULT_PREFIX) -> str:
    """Host i's address; address(253) is the bridge's, the root namespace's on the hosts' network."""
    return f"{subnet(prefix)}.{i + 1}"


def agent_path(prefix: str = DEFAULT_PREFIX) -> Path:
    """The rsh agent script `up` writes: one executable path, as MPI launchers want."""
    return Path("/run") / f"{prefix}-netns" / "rsh"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode:
        raise UserError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.returncode}")
    return result


def require_root() -> None:
    """UserError unless we are root with ip and unshare on PATH."""
    if os.geteuid() != 0:
        raise UserError("multinode.netns needs root (network namespaces, veths, a bridge): run it with sudo")
    if missing := [tool for tool in ("ip", "unshare") if not shutil.which(tool)]:
        raise UserError(f"`{missing[0]}` not found: install iproute2 and util-linux")


def host_names(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The existing hosts with this prefix, in index order."""
    # Interface names have at most 15 characters (PREFIX + "v" + index); a final letter keeps
    # prefixes apart (with "t1", host t10 would also be host 10 of "t").
    if not re.fullmatch(r"[a-z]([a-z0-9]{0,8}[a-z])?", prefix):
        raise UserError(f"bad prefix {prefix!r}: 1-10 lowercase letters or digits, first and last a letter")
    listed = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    names = [n for n in listed if re.fullmatch(re.escape(prefix) + r"\d+", n)]
    return sorted(names, key=lambda n: int(n[len(prefix):]))


def _our_links(prefix: str) -> list[str]:
    links = [line.split()[0].split("@")[0] for line in _run("ip", "-br", "link", check=False).stdout.splitlines()]
    return [x for x in links if x == f"{prefix}br" or re.fullmatch(re.escape(prefix) + r"v\d+", x)]


def host_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside host `name`, with its own hostname.

    `ip netns exec` enters the network namespace and bind-mounts /etc/netns/NAME/hosts over
    /etc/hosts; a fresh UTS namespace gives the host its name, which MPI uses to tell hosts apart.
    Every step execs, so the command is the caller's direct child: signals and exit code pass straight.
    """
    return ["ip", "netns", "exec", name, "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]


def up(count: int, rate: str | None = None, prefix: str = DEFAULT_PREFIX) -> list[tuple[str, str]]:
    """Create `count` hosts; on any failure or interruption remove what was made, then re-raise."""
    require_root()
    if not 1 <= count <= 253:
        raise UserError(f"--hosts must be 1..253 (one /24), not {count}")
    if rate and not shutil.which("tc"):
        raise UserError("--rate needs `tc`: install iproute2")
    if host_names(prefix) or f"{prefix}br" in _our_links(prefix) or agent_path(prefix).parent.exists():
        again = "" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"
        raise UserError(f"hosts {prefix}* already exist: run `python -m multinode.netns down{again}` first")
    names = [f"{prefix}{i}" for i in range(count)]
    hosts = "".join(f"{address(i, prefix)} {n}\n" for i, n in enumerate(names))
    try:
        # The agent first: `down` removes it by path whether or not anything else was made.
        agent = agent_path(prefix)
        agent.parent.mkdir(parents=True)
        # This interpreter and this checkout, whatever the caller's directory: mpiexec runs it from anywhere.
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
                "from multinode.netns import main; sys.exit(main(['rsh', *sys.argv[1:]]))")
        agent.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{code}" "$@"\n')
        agent.chmod(0o755)
        br = f"{prefix}br"
        for step in (["link", "add", br, "type", "bridge"], ["addr", "add", f"{address(253, prefix)}/24", "dev", br],
                     ["link", "set", br, "up"]):
            _run("ip", *step)
        for i, name in enumerate(names):
            _run("ip", "netns", "add", name)
            (ETC_NETNS / name).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / name / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{hosts}")
            veth = f"{prefix}v{i}"
            # The peer is born inside the namespace, so its name cannot clash with the root's eth0.
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", INTERFACE, "netns", name)
            _run("ip", "link", "set", veth, "master", br, "up")
            for step in (["addr", "add", f"{address(i, prefix)}/24", "dev", INTERFACE],
                         ["link", "set", INTERFACE, "up"], ["link", "set", "lo", "up"]):
                _run("ip", "-n", name, *step)
            if rate:
                # Both ends: the host's eth0 limits what it sends, the bridge port what it receives.
                for ns in ([], ["-n", name]):
                    _run("tc", *ns, "qdisc", "add", "dev", veth if not ns else INTERFACE, "root",
                         "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")
    except BaseException:
        with _handlers(_SHIELD):
            down(prefix)
        raise
    return [(n, address(i, prefix)) for i, n in enumerate(names)]


def down(prefix: str = DEFAULT_PREFIX, grace: float = 2.0) -> None:
    """Remove the hosts with this prefix and everything `up` made for them; fine when nothing is there."""
    require_root()
    names = host_names(prefix)

    def pids() -> set[int]:
        found = " ".join(_run("ip", "netns", "pids", name, check=False).stdout for name in names)
        return {int(p) for p in found.split()} - {os.getpid()}

    # Processes first: a live process keeps its namespace (and its veth) alive after `netns delete`.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)
    for link in _our_links(prefix):  # a veth takes its peer inside the host with it; qdiscs go too
        _run("ip", "link", "delete", link, check=False)
    for name in names:
        _run("ip", "netns", "delete", name, check=False)
    for d in ETC_NETNS.glob(f"{prefix}*"):
        if re.fullmatch(re.escape(prefix) + r"\d+", d.name):
            shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only when empty: it may hold other tools' namespaces
    shutil.rmtree(agent_path(prefix).parent, ignore_errors=True)


def status(prefix: str = DEFAULT_PREFIX) -> list[tuple[str, str, str]]:
    """(name, address, shaping) for each host."""
    rows = []
    for name in host_names(prefix):
        shown = _run("ip", "-n", name, "addr", "show", INTERFACE, check=False).stdout
        ip = (re.findall(r"inet ([\d.]+)", shown) or ["-"])[0]
        shows = [_run("tc", *ns, "qdisc", "show", "dev", dev, check=False).stdout
                 for ns, dev in (([], f"{prefix}v{name[len(prefix):]}"), (["-n", name], INTERFACE))]
        recv, send = [m.group(1) if m else "none" for m in (re.search(r"tbf .*?rate (\S+)", x) for x in shows)]
        rows.append((name, ip, "unshaped" if recv == send == "none" else f"tbf send {send} receive {recv}"))
    return rows


def mpiexec_options(names: Sequence[str], prefix: str = DEFAULT_PREFIX, slots: int | Sequence[int] | None = None,
                    mpich: bool = False) -> list[str]:
    """Options for Open MPI 4.1's mpiexec (MPICH's with mpich=True) that run a job across these hosts.

    `slots`: ranks per host, one count for all or one per host: [2, 1] puts ranks 0 and 1 (the
    trainer's manager and its first worker) on the first host and rank 2 on the second, as both
    MPIs fill a host's slots in order before the next.
    """
    counts = [slots] * len(names) if slots is None or isinstance(slots, int) else list(slots)
    if len(counts) != len(names):
        raise UserError(f"slots gives {len(counts)} counts for {len(names)} hosts: give one per host")
    hosts = ",".join(f"{n}:{c}" if c else n for n, c in zip(names, counts))
    if mpich:  # hydra calls its agent as ssh: `AGENT -x HOST WORDS...`
        return ["-launcher", "ssh", "-launcher-exec", str(agent_path(prefix)), "-hosts", hosts]
    # ob1 with the tcp and self BTLs: no shared memory, UCX or OFI between "hosts" that share a kernel.
    net = f"{subnet(prefix)}.0/24"
    return ["--host", hosts, "--mca", "plm_rsh_agent", str(agent_path(prefix)),
            "--mca", "oob_tcp_if_include", net, "--mca", "btl_tcp_if_include", net,
            "--mca", "pml", "ob1", "--mca", "btl", "tcp,self"]


@contextlib.contextmanager
def _handlers(handlers: dict) -> Iterator[None]:
    """Signal handlers for a while; in the main thread only, as signal() works only there."""
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, h) for s, h in handlers.items()} if main else {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Hosts:
    """`with Hosts(2, rate="100mbit", prefix="t") as hosts:` up on entry, down on any exit."""

    interface = INTERFACE

    def __init__(self, count: int, rate: str | None = None, prefix: str = DEFAULT_PREFIX):
        self.count, self.rate, self.prefix = count, rate, prefix
        self.names = [f"{prefix}{i}" for i in range(count)]
        self.bridge_address, self.agent = address(253, prefix), str(agent_path(prefix))
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Hosts:
        # SIGTERM as KeyboardInterrupt, so that a killed test or benchmark still cleans up.
        self._stack.enter_context(_handlers({signal.SIGTERM: signal.default_int_handler}))
        try:
            up(self.count, self.rate, self.prefix)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with self._stack, _handlers(_SHIELD):
            down(self.prefix)

    def address(self, i: int) -> str:
        return address(i, self.prefix)

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return host_argv(self.names[i], argv)

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(i, argv), **kw)

    def mpiexec_options(self, slots: int | Sequence[int] | None = None, mpich: bool = False) -> list[str]:
        return mpiexec_options(self.names, self.prefix, slots, mpich)


def _exec_in(host: str, argv: Sequence[str]) -> None:
    require_root()
    if not re.fullmatch(r"[\w.-]+", host) or not (Path("/run/netns") / host).exists():
        raise UserError(f"unknown host {host!r}: `python -m multinode.netns status` lists the hosts")
    sys.stdout.flush()  # exec replaces this process: nothing stays in between to forward signals
    os.execvp("ip", host_argv(host, argv or [os.environ.get("SHELL", "/bin/sh")]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["rsh"]:
            # ssh's calling form: options (ssh -x, as some launchers add) then HOST, then words for a shell.
            words = argv[1:]
            while words and words[0].startswith("-"):
                words.pop(0)
            if len(words) < 2:
                raise UserError("usage: python -m multinode.netns rsh HOST COMMAND...")
            _exec_in(words[0], ["sh", "-c", " ".join(words[1:])])
        parser = argparse.ArgumentParser(prog="python -m multinode.netns", description=__doc__.split("\n")[0])
        sub = parser.add_subparsers(dest="command", required=True)
        p_up = sub.add_parser("up", help="create the hosts")
        p_up.add_argument("--hosts", type=int, required=True)
        p_up.add_argument("--rate", help="shape every link, tc syntax: 1gbit, 100mbit")
        p_exec = sub.add_parser("exec", help="run a command inside a host")
        p_exec.add_argument("host")
        p_exec.add_argument("cmd", nargs=argparse.REMAINDER)
        for p in (p_up, sub.add_parser("down", help="remove the hosts"), sub.add_parser("status", help="list them")):
            p.add_argument("--prefix", default=DEFAULT_PREFIX)
        args = parser.parse_args(argv)
        if args.command == "exec":
            _exec_in(args.host, args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
        elif args.command == "up":
            # up cleans after SIGTERM as after Ctrl-C, even when started with SIGINT ignored (`cmd &`).
            with _handlers(dict.fromkeys((signal.SIGINT, signal.SIGTERM), signal.default_int_handler)):
                print("\n".join(f"{name} {addr}" for name, addr in up(args.hosts, args.rate, args.prefix)))
        elif args.command == "down":
            with _handlers(_SHIELD):
                down(args.prefix)
        else:
            print("\n".join(" ".join(row) for row in status(args.prefix)) or f"no hosts with prefix {args.prefix}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: removed what was created", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

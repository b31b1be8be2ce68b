"""fake-switches' own launcher (fake_switches.cmd.main) with one fix.

fake-switches 1.5.0 on Python 3 turns --password into bytes before building the switch,
so the enable password is stored as b"root" and compared with the str line the user
typed: `enable` then refuses every password but an empty one. Here the SSH login keeps
bytes (Twisted wants them) and the enable password stays a str.

Usage: python fake_cisco.py PORT [ENABLE_PASSWORD]
"""
import logging
import sys

from fake_switches import switch_factory
from fake_switches.transports.ssh_service import SwitchSshService
from twisted.internet import reactor

logging.basicConfig(level="WARNING")


def main():
    port = int(sys.argv[1])
    enable_password = sys.argv[2] if len(sys.argv) > 2 else "root"
    core = switch_factory.SwitchFactory().get("cisco_generic", "switch", enable_password)
    SwitchSshService(
        ip="127.0.0.1", port=port, switch_core=core, users={"root": b"root"}
    ).hook_to_reactor(reactor)
    reactor.run()


if __name__ == "__main__":
    main()

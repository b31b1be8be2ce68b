"""Starts fake-switches' own telnet transport (its CLI launcher only offers SSH).

Usage: fake_switch_telnet.py PORT [MODEL] [HOSTNAME]
Prints "ready" on stdout once the port listens, so the test knows when to connect.
"""
import logging
import sys

from fake_switches import switch_factory
from fake_switches.transports.telnet_service import SwitchTelnetService
from twisted.internet import reactor

logging.basicConfig(level="WARNING")

port = int(sys.argv[1])
model = sys.argv[2] if len(sys.argv) > 2 else "cisco_generic"
hostname = sys.argv[3] if len(sys.argv) > 3 else "my_switch"

# The enable password must be a str here: the telnet shell compares decoded text
# (the SSH launcher passes bytes, which would make `enable` answer "% Access denied").
core = switch_factory.SwitchFactory().get(model, hostname, "root")
SwitchTelnetService(ip="127.0.0.1", port=port, switch_core=core, users={"root": b"root"}).hook_to_reactor(reactor)
print("ready", flush=True)
reactor.run()

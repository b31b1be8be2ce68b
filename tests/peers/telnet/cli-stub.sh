#!/bin/sh
# A RouterOS-like CLI for `busybox telnetd -l`, used by tests/telnet.rs. busybox runs it
# on a real PTY per connection with telnetd's environment, so the test passes:
#   STUB_DIR       where to record: `commands` (one "PID command" line per command
#                  received) and `sessions` ("in PID NS" after login, "out PID NS" at
#                  exit, "fail PID" for a rejected login; NS = nanoseconds since epoch)
#   STUB_USER, STUB_PASSWORD   the only credentials accepted (default admin / secret)
dir=${STUB_DIR:?STUB_DIR not set}
user=${STUB_USER:-admin}
pass=${STUB_PASSWORD:-secret}

printf 'Login: '
IFS= read -r login || exit 0
# No echo for the password, as a real login does (the client must not rely on it).
stty -echo 2>/dev/null
printf 'Password: '
IFS= read -r password || exit 0
stty echo 2>/dev/null
printf '\n'
if [ "$login" != "$user" ] || [ "$password" != "$pass" ]; then
    echo "fail $$" >>"$dir/sessions"
    echo "Login incorrect"
    sleep 0.2
    exit 1
fi

echo "in $$ $(date +%s%N)" >>"$dir/sessions"
trap 'echo "out $$ $(date +%s%N)" >>"$dir/sessions"' EXIT
trap 'exit 0' HUP TERM INT

echo "  MikroTik RouterOS 7.0 (stub)"
while printf '[admin@stub] > '; IFS= read -r line; do
    echo "$$ $line" >>"$dir/commands"
    case "$line" in
    quit) exit 0 ;;
    *dup*) echo "failure: already have such entry" ;;
    *slow*) sleep 0.3; echo "done slowly" ;;
    *hang*) sleep 5; echo "too late" ;;
    "/system identity print") echo "  name: stub" ;;
    "") ;;
    *) echo "ok: $line" ;;
    esac
done

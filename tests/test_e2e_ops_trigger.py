"""End to end: the push webhook of a running supervisor. A correctly signed GitHub-style push on
127.0.0.1 makes it fetch and deploy at once (its poll interval is an hour); a bad or missing
signature is answered 401 and changes nothing; a port already taken stops it at start-up."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket

SECRET = "a-webhook-secret-of-some-length"


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("POST", "/", body=body,
                           headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def github_push(commit: str, delivery: str, secret: str = SECRET,
                before: str = "0" * 40) -> tuple[bytes, dict]:
    body = json.dumps({"ref": "refs/heads/main", "before": before, "after": commit}).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
                  "X-Hub-Signature-256": f"sha256={signature}"}


def test_a_signed_push_deploys_at_once_and_a_bad_signature_changes_nothing(world):
    port = world.free_port()
    supervisor, old_pid = world.start_serving(
        git={"poll_interval": "1h"}, trigger={"listen": f"127.0.0.1:{port}", "secret": SECRET})
    listening = supervisor.select("trigger.listening")
    assert [r["address"] for r in listening] == [f"127.0.0.1:{port}"]
    commit = world.release("2")
    mark = supervisor.mark()

    body, headers = github_push(commit, "delivery-1", secret="not-the-secret-at-all")
    assert post(port, body, headers)[0] == 401
    bad = supervisor.wait_for("trigger.rejected", after=mark, reason="bad signature",
                              status=401)
    unsigned = {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}
    assert post(port, body, unsigned)[0] == 401
    supervisor.wait_for("trigger.rejected", after=bad, reason="missing signature", status=401)
    assert SECRET not in json.dumps(supervisor.select(after=mark))

    body, headers = github_push(commit, "delivery-2")
    status, text = post(port, body, headers)

    assert (status, text.strip()) == (202, "accepted")
    accepted = supervisor.wait_for("trigger.accepted", after=mark, source="github",
                                   delivery="delivery-2", kind="push")
    started = supervisor.wait_for("child.started", commit=commit, after=accepted)
    world.wait_http("hello from 2", supervisor)
    # One check, after the good push: the refused ones queued nothing before it.
    checks = supervisor.select("git.check_requested", after=mark)
    assert len(checks) == 1 and checks[0]["_i"] > accepted["_i"]
    fetches = supervisor.select("git.fetched", after=mark)
    assert [f["upstream"] for f in fetches if f["_i"] < started["_i"]] == [commit]
    assert not world.alive(old_pid)

    # The same delivery again (a replay): answered, but no second check.
    assert post(port, body, headers) == (200, "duplicate\n")
    replayed = supervisor.wait_for("trigger.duplicate", after=started, delivery="delivery-2")
    body, headers = github_push(commit, "delivery-3", before=commit)  # another push
    assert post(port, body, headers)[0] == 202
    fresh = supervisor.wait_for("trigger.accepted", after=replayed, delivery="delivery-3")
    check = supervisor.wait_for("git.check_requested", after=started)
    assert check["_i"] > fresh["_i"], "the replayed delivery asked for a check"
    supervisor.wait_for("git.fetched", after=check, relation="same")


def test_a_trigger_port_already_in_use_stops_the_start_with_one_line(world):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        supervisor = world.start(trigger={"listen": f"127.0.0.1:{port}", "secret": SECRET})

        assert supervisor.wait_exit() == 2

    [problem] = [line for line in supervisor.lines if not line.startswith("{")]
    assert problem.startswith(f"supervisor: trigger.listen: cannot listen on 127.0.0.1:{port}: ")
    assert problem.lower().endswith("address already in use"), problem
    assert not supervisor.select("child.started"), "a child started before the listener"
    assert world.cli("status").returncode == 2, "no status: the supervisor never ran"

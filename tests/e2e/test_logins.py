"""Password guessing and the server's internal ports, on the shared deployment.

Guessing: clients in a container of their own (so nginx sees an address other than this
machine's) guess one account's password at full speed. The throttle (mlflow/stack_logins.py)
must hold them after a few checks and let only a few guesses reach a password check (each
costs ~0.2 s of CPU); the account's owner, from the address they logged in from before,
and another account, from the guessers' own address, must still get in; the owner from the
guessers' address gets in by waiting as each 429's Retry-After tells it. Asserted on the answers
the clients got and on the server's counters and log lines; the CPU the server spent is
printed.

Internal ports: from a container on each of the stack's networks, and from this machine by
the server container's own addresses, the server's port answers 403 (a forged nginx
header too) and its metrics port 401; through nginx everything works (the rest of the suite).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import uuid

import pytest
import requests

from .conftest import server_metrics, show

GUESSERS = 8
GUESS_SECONDS = 10

# Runs in a container of the server's image: python3 -c, the settings as JSON on stdin.
GUESSER = r'''
import base64, http.client, json, ssl, sys, threading, time
cfg = json.loads(sys.stdin.read())
ctx = ssl._create_unverified_context()

def call(user, password, path="/api/2.0/mlflow/experiments/search?max_results=1"):
    conn = http.client.HTTPSConnection("nginx", cfg["port"], context=ctx, timeout=120)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    conn.request("GET", cfg["base"] + path, headers={"Authorization": "Basic " + token, "Host": cfg["host"]})
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    # A 429 of nginx's request limit (not the throttle's): marked "rate".
    rate = answer.status == 429 and b"RESOURCE_EXHAUSTED" not in body
    return answer.status, "rate" if rate else answer.getheader("Retry-After")

if cfg["mode"] == "owner":
    # The owner, from the guessers' address: held (this address is not known for the
    # account), then in after waiting as told. A worker answers a hold from its memory, and
    # another worker may since have counted a later failure: Retry-After is the least wait,
    # so a client follows it until it gets in (what MLflow's client does with a 429).
    answers, waited = [], 0.0
    while True:
        status, retry = call(cfg["victim"], cfg["victim_password"])
        answers.append([status, retry])
        if status != 429 or retry == "rate" or waited > cfg["max_wait"]:
            break
        time.sleep(int(retry) + 0.5)
        waited += int(retry) + 0.5
    print(json.dumps({"answers": answers, "waited": waited}))
    sys.exit(0)

results, start = [], time.monotonic()

def guess(n):
    i = 0
    while time.monotonic() - start < cfg["seconds"]:
        status, retry = call(cfg["victim"], f"guess-{n}-{i}")
        results.append((round(time.monotonic() - start, 3), status, retry))
        i += 1

threads = [threading.Thread(target=guess, args=(n,)) for n in range(cfg["threads"])]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"guesses": results, "bystander": call(*cfg["bystander"])}))
'''

PROBE = r'''
import json, sys, urllib.request, urllib.error
answers = {}
for name, url, headers in json.loads(sys.stdin.read()):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            answers[name] = r.status
    except urllib.error.HTTPError as exc:
        answers[name] = exc.code
    except OSError as exc:
        answers[name] = f"unreachable: {exc}"
print(json.dumps(answers))
'''


def image_of(stack, service: str) -> str:
    return subprocess.run(["docker", "inspect", "--format", "{{.Config.Image}}", stack.container_ids()[service]],
                          check=True, capture_output=True, text=True).stdout.strip()


def in_container(stack, network: str, code: str, stdin: str, timeout: int = 300) -> dict:
    done = subprocess.run(["docker", "run", "--rm", "-i", "--network", network, "--entrypoint", "python3",
                           image_of(stack, "mlflow"), "-c", code],
                          input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def server_cpu_seconds(stack) -> float:
    """CPU time the server's container has used (cgroup v2, else v1)."""
    code = ("import os\n"
            "if os.path.exists('/sys/fs/cgroup/cpu.stat'):\n"
            "    stat = dict(l.split() for l in open('/sys/fs/cgroup/cpu.stat'))\n"
            "    print(int(stat['usage_usec']) / 1e6)\n"
            "else:\n"
            "    print(int(open('/sys/fs/cgroup/cpuacct/cpuacct.usage').read()) / 1e9)\n")
    return float(stack.compose("exec", "-T", "mlflow", "python3", "-c", code).stdout.strip())


def server_counters(stack) -> dict[str, float]:
    text = server_metrics(stack)
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mlflow_stack_") and "_total" in line:
            name, value = line.rsplit(" ", 1)
            counters[name.split("{")[0]] = counters.get(name.split("{")[0], 0) + float(value)
    return counters


@pytest.fixture(scope="module")
def accounts(stack):
    made = {}
    for role in ("victim", "bystander"):
        name, password = f"{role}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
        created = stack.http("POST", "/api/2.0/mlflow/users/create", json={"username": name, "password": password})
        assert created.status_code == 200, created.text
        made[role] = (name, password)
    return made


def test_guessing_a_password_is_held_after_a_few_checks_and_its_owner_still_gets_in(stack, accounts):
    values = stack.values()
    victim, bystander = accounts["victim"], accounts["bystander"]
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    # The owner logs in from this machine first: its address is then known for the account.
    assert stack.http("GET", search, auth=victim).status_code == 200
    before_counters, before_cpu = server_counters(stack), server_cpu_seconds(stack)
    cfg = {"port": int(values["HTTPS_PORT"]), "base": values["MLFLOW_BASE_PATH"], "mode": "guess",
           "host": f"{values['MLFLOW_PUBLIC_HOST']}:{values['HTTPS_PORT']}", "seconds": GUESS_SECONDS,
           "threads": GUESSERS, "victim": victim[0], "victim_password": victim[1], "bystander": bystander}

    def new_password(password: str) -> None:
        changed = stack.http("PATCH", "/api/2.0/mlflow/users/update-password",
                             json={"username": victim[0], "password": password})
        assert changed.status_code == 200, changed.text

    started = time.monotonic()
    with subprocess.Popen(["docker", "run", "--rm", "-i", "--network", f"{stack.project}_frontend",
                           "--entrypoint", "python3", image_of(stack, "mlflow"), "-c", GUESSER],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as guessers:
        guessers.stdin.write(json.dumps(cfg))
        guessers.stdin.close()
        # While they guess, the owner logs in from here again and again, each time with a
        # new password (so that no server's login cache holds it: the throttle sees every
        # one): never held, this address being known for the account.
        owner = []
        while guessers.poll() is None and time.monotonic() - started < GUESS_SECONDS + 60:
            fresh = uuid.uuid4().hex
            new_password(fresh)
            owner.append(stack.http("GET", search, auth=(victim[0], fresh)).status_code)
            time.sleep(0.2)
        out, err = guessers.stdout.read(), guessers.stderr.read()
        guessers.wait(timeout=300)
    assert guessers.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    cpu = server_cpu_seconds(stack) - before_cpu
    counters = server_counters(stack)

    guesses = seen["guesses"]
    checked = [g for g in guesses if g[1] == 401]
    held = [g for g in guesses if g[1] == 429 and g[2] != "rate"]
    limited = [g for g in guesses if g[2] == "rate"]
    show(f"password guessing: {GUESSERS} clients for {GUESS_SECONDS} s sent {len(guesses)} guesses: "
         f"{len(checked)} were checked (401), {len(held)} held by the throttle (429), {len(limited)} by nginx's "
         f"request limit; server CPU {cpu:.1f} s over the attack (with the owner's {len(owner)} password "
         "changes and logins, each a password hash)")
    assert {g[1] for g in guesses} <= {401, 429}, guesses
    assert held and all(g[2] and int(g[2]) >= 1 for g in held), held[:5]
    # Held after a count of checks, not a time: the free failures, and the guessers' calls already
    # in a worker when the last free one was counted.
    first_held = min(g[0] for g in held)
    checked_before = [g for g in checked if g[0] < first_held]
    assert len(checked_before) <= int(values["LOGIN_FREE_FAILURES"]) + GUESSERS, (first_held, checked_before)
    # 5 free failures, then one check per hold (1, 2, 4, 8 s) per server worker: the
    # guessers side by side in a worker wait for each other's check.
    workers = int(values["MLFLOW_WORKERS"]) * int(values["MLFLOW_REPLICAS"])
    assert len(checked) <= int(values["LOGIN_FREE_FAILURES"]) + 5 * workers, checked
    assert counters.get("mlflow_stack_failed_logins_total", 0) - before_counters.get(
        "mlflow_stack_failed_logins_total", 0) >= len(checked)
    assert counters.get("mlflow_stack_held_logins_total", 0) - before_counters.get(
        "mlflow_stack_held_logins_total", 0) >= len(held)
    # The owner, from an address that logged in before: never held.
    assert owner and set(owner) == {200}, owner
    # Another account, from the guessers' own address: not held.
    assert seen["bystander"][0] == 200, seen["bystander"]
    # The owner from the guessers' address: in by waiting as told (held or not, by then).
    new_password(victim[1])
    max_wait = 2 * int(values["LOGIN_LOCK_MAX_SECONDS"])
    here = in_container(stack, f"{stack.project}_frontend", GUESSER,
                        json.dumps({**cfg, "mode": "owner", "max_wait": max_wait}), timeout=max_wait + 300)
    # (Whether a hold still runs when it asks depends on when the last guess was checked.)
    answers = here["answers"]
    assert answers[-1][0] == 200, here
    assert all(a[0] == 429 and 1 <= int(a[1]) <= int(values["LOGIN_LOCK_MAX_SECONDS"]) for a in answers[:-1]), here
    show(f"password guessing: the owner, from the guessers' address afterwards, got in after {here['waited']:.1f} s "
         f"of waits as told ({[a[0] for a in answers]})")
    logs = stack.compose("logs", "--no-color", "mlflow").stdout
    assert f"failed login for {victim[0]!r} from " in logs
    assert victim[1] not in logs and "guess-0-0" not in logs

    # The admin sees who was guessed, and may let the owner in again at once.
    listed = stack.script("stack_users.sh", "failures").stdout
    assert re.search(rf"account +{re.escape(victim[0])}: \d+ failed", listed), listed
    counts = ("SELECT count(*) FROM stack_login_failures WHERE subject = '{0}' OR subject LIKE '{0}' || chr(10) || '%'"
              .format(victim[0]))
    psql = lambda sql: stack.psql(sql, "_auth")  # noqa: E731
    assert int(psql(counts)) >= 1  # the account's (the pair's went with the owner's login from there)
    unlocked = stack.script("stack_users.sh", "unlock", victim[0]).stdout
    assert "forgot" in unlocked and int(psql(counts)) == 0, unlocked


def test_a_large_body_with_a_wrong_login_is_refused_before_it_is_read(stack, accounts):
    name, _ = accounts["bystander"]
    big = b"{" + b" " * (3 << 20) + b"}"
    for data in (big, iter([big])):  # a length, then chunks
        refused = stack.http("POST", "/api/2.0/mlflow/runs/log-batch", auth=(name, "not-the-password"), data=data)
        assert refused.status_code == 401, (refused.status_code, refused.text[:200])
        assert "Basic" in refused.headers.get("WWW-Authenticate", "")
    # With the right login it reaches the server, which reads it and says what is wrong with it
    # (a log-batch body over MLflow's 1 MB).
    read = stack.http("POST", "/api/2.0/mlflow/runs/log-batch", auth=accounts["bystander"], data=big,
                      headers={"Content-Type": "application/json"})
    assert read.status_code == 413 and "request body over" in read.json()["message"], read.text[:300]


def test_the_servers_ports_answer_only_nginx_and_prometheus(stack):
    token = "Basic " + base64.b64encode(b"admin:x").decode()
    probes = lambda host: [  # noqa: E731
        ("server", f"http://{host}:5000/health", {}),
        ("server, forged nginx header", f"http://{host}:5000/api/2.0/mlflow/experiments/search?max_results=1",
         {"X-Stack-From-Nginx": "1", "Authorization": token}),
        ("metrics", f"http://{host}:9101/metrics", {}),
        ("metrics, made-up token", f"http://{host}:9101/metrics", {"Authorization": "Bearer x"}),
    ]
    expected = {"server": 403, "server, forged nginx header": 403, "metrics": 401, "metrics, made-up token": 401}
    for network in ("frontend", "backend"):
        answers = in_container(stack, f"{stack.project}_{network}", PROBE, json.dumps(probes("mlflow")))
        assert answers == expected, (network, answers)
    # From this machine, by the container's addresses on both networks.
    inspected = json.loads(subprocess.run(["docker", "inspect", stack.container_ids()["mlflow"]], check=True,
                                          capture_output=True, text=True).stdout)[0]
    addresses = [n["IPAddress"] for n in inspected["NetworkSettings"]["Networks"].values() if n["IPAddress"]]
    assert len(addresses) == 2, addresses
    for address in addresses:
        for name, url, headers in probes(address):
            answer = requests.get(url, headers=headers, timeout=10)
            assert answer.status_code == expected[name], (address, name, answer.status_code)
    # nginx's own requests are answered (every other test goes through it).
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1").status_code == 200

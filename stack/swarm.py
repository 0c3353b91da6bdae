"""Docker Swarm mode: the stack file `docker stack deploy` takes, made from
docker-compose.yml as Compose resolves it (`docker compose config`), so that
images, secrets, healthchecks, limits and networks keep their one home there.

What Swarm cannot take from a Compose file, and what it gets instead:

- build, container_name, restart, security_opt (no-new-privileges): dropped;
  Swarm has no such service options. Images are built on this machine and
  pushed to STACK_REGISTRY; the other nodes pull them from there.
- depends_on: dropped. The jobs retry until their store answers, and the
  server and gc wait until the schema is current (STACK_WAIT_FOR_SCHEMA).
- One-shot services (those with `restart: "no"`: migrate, bucket-init):
  `replicated-job`s. Swarm runs a job again at every deploy; both are no-ops
  on a current schema and an existing bucket. The deploy runs them (with the
  stores) before it updates the rest, so servers start on a current schema.
- Bind-mounted files: configs, or secrets for keys; their names carry a hash of
  the content, because Swarm's configs and secrets cannot be changed in place.
- tmpfs options (uid=...) and shm_size: tmpfs mounts (mode 1777, the default),
  /dev/shm with the same size.
- mem_limit: deploy.resources.limits.memory. Published ports: host mode, on
  every interface of the node (Swarm has no bind address).
- Every service is reached by DNS round robin (endpoint_mode dnsrr): nginx
  resolves the server per request, and no virtual IP (IPVS) is needed.
- The stores' network is attachable: the backup scripts and the schema check
  run their one-off jobs on it from a manager (stack/swarm-one-off.yml).
- db and minio run on the node labelled mlflow-stack.data=true, where their
  volumes are. nginx runs on every node (global): any node's address reaches
  the stack. The rest runs anywhere, updated one task at a time, start-first,
  rolled back when the new task does not become healthy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping

from . import settings

DATA_LABEL = "mlflow-stack.data"
# `docker stack deploy --detach` and `replicated-job` in stack files: Docker CLI 26 or later.
MIN_CLI = (26, 0)
STATEFUL = tuple(service for service, *_ in settings.STORES_SETTINGS)
# Services that read a store's volume, so run where it is (pitr: base backups of db-data).
BESIDE_STORES = ("pitr",)
# Edge services publish host ports: two tasks cannot share one node's port.
GLOBAL = ("nginx",)
# Profiles whose services need what this translation does not give them yet:
# backups (a folder and the data volumes on one node) and monitoring (nginx
# resolves its syslog target once, at start; Prometheus finds targets by DNS).
UNSUPPORTED_PROFILES = ("backup", "monitoring")
# Images built on this machine (the stack's own and the offline stand-ins):
# pushed to STACK_REGISTRY and named there.
BUILT_HERE = ("mlflow-stack/", "mlflow-stack-standin/")
# The network one-off jobs (backups, restores, the schema check) join from a
# manager, as `docker compose run` on the stack's own network (swarm-one-off.yml).
ONE_OFF_NETWORK = "backend"
# Replicated services nginx reaches by name. Swarm takes a stopping task out of its DNS,
# but nginx keeps the addresses it resolved for NGINX_DNS_SECONDS (docker-compose.yml):
# such a task serves that long and DRAIN_MARGIN more after the stop signal
# (STACK_STOP_DRAIN_SECONDS, mlflow/entrypoint.py), then has STOP_GRACE to finish.
BEHIND_NGINX = ("mlflow",)
DRAIN_MARGIN = 5
STOP_GRACE = 30
# The job the servers' schema comes from (those that depend on it in Compose wait for it on a swarm).
MIGRATE = "migrate"
# What tells those that wait for it (the entrypoint waits until the schema is current).
WAIT_FOR_SCHEMA = "STACK_WAIT_FOR_SCHEMA"

KEPT = {"image", "command", "entrypoint", "environment", "healthcheck", "logging", "networks", "read_only",
        "cap_add", "cap_drop", "secrets", "user", "init", "stop_grace_period", "stop_signal", "working_dir",
        "labels", "ulimits", "sysctls", "hostname"}
DROPPED = {"build", "container_name", "depends_on", "restart", "security_opt", "profiles", "pull_policy"}
TRANSLATED = {"mem_limit", "tmpfs", "shm_size", "volumes", "ports", "deploy"}


class SwarmError(ValueError):
    """The configuration cannot run on a swarm as it is; the message says what to do."""


def registry_image(image: str, registry: str, image_id: str = "") -> str:
    """An image built here, as the nodes pull it: under the registry, its tag followed by
    the image's own ID, so that a rebuilt image is a new name (Swarm would keep the old
    one under an unchanged tag, as a deploy does not look tags up again)."""
    if registry and image.startswith(BUILT_HERE):
        name, _, tag = image.rpartition(":")
        digest = image_id.split(":")[-1][:12]
        return f"{registry.rstrip('/')}/{name}:{tag}-{digest}" if digest else f"{registry.rstrip('/')}/{image}"
    return image


def image_ids(images) -> dict[str, str]:
    """The local image ID of each image built here."""
    ids = {}
    for image in built_here(images):
        result = _docker("image", "inspect", "--format", "{{.Id}}", image, check=False)
        if result.returncode != 0:
            raise SwarmError(f"the image {image} is not on this machine: run ./stack_deploy.sh --swarm (it builds it)")
        ids[image] = result.stdout.strip()
    return ids


def jobs(config: Mapping[str, Any]) -> list[str]:
    return sorted(name for name, svc in config["services"].items() if svc.get("restart") == "no")


def waits_for_schema(config: Mapping[str, Any]) -> list[str]:
    return sorted(name for name, svc in config["services"].items() if MIGRATE in (svc.get("depends_on") or {}))


def built_here(images) -> list[str]:
    return sorted({image for image in images if image.startswith(BUILT_HERE)})


# Swarm's limit for a config's or secret's name, which the stack prefixes with "<stack>_".
MAX_NAME = 64


# The longest stack name that leaves room for the objects' names.
MAX_PROJECT = MAX_NAME - 1 - 9 - 12


def _object_name(target: str, content: bytes, project: str, key: bytes) -> str:
    """A config or secret name: the file's name, then a keyed hash of the content (a changed
    file becomes a new object; the key keeps a secret's name from being a test of guesses),
    within Swarm's limit once the stack's name is in front."""
    digest = hmac.new(key, content, hashlib.sha256).hexdigest()[:8]
    room = MAX_NAME - len(project) - 1 - len(digest) - 1
    if len(project) > MAX_PROJECT:
        raise SwarmError(f"the stack name {project!r} is too long for Swarm's object names: use a "
                         f"COMPOSE_PROJECT_NAME of at most {MAX_PROJECT} characters")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", target.rstrip("/").rsplit("/", 1)[-1])[:room].strip("_.-") or "file"
    return f"{slug}-{digest}"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _tmpfs(entry: str) -> dict:
    target, _, options = entry.partition(":")
    mount: dict[str, Any] = {"type": "tmpfs", "target": target}
    size = re.search(r"(?:^|,)size=(\d+)([kmg]?)", options, re.I)
    if size:
        mount["tmpfs"] = {"size": int(size.group(1)) * _UNITS[size.group(2).lower()]}
    return mount


class _Objects:
    """The configs and secrets the bind mounts become."""

    def __init__(self, secret_files: set[str], project: str, key: bytes):
        self.secret_files, self.project, self.key = secret_files, project, key
        self.configs: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}

    def file(self, source: Path, target: str) -> tuple[str, dict]:
        content = source.read_bytes()
        name = _object_name(target, content, self.project, self.key)
        if str(source) in self.secret_files:
            self.secrets[name] = {"file": str(source)}
            return "secrets", {"source": name, "target": target, "mode": 0o400}
        self.configs[name] = {"file": str(source)}
        # An image's start-up hook (nginx/15-stack-token.sh) runs only if executable.
        return "configs", {"source": name, "target": target, "mode": 0o555 if os.access(source, os.X_OK) else 0o444}


def _volumes(name: str, svc: dict, objects: _Objects, out: dict) -> None:
    mounts = []
    for volume in svc.get("volumes", []):
        kind = volume["type"]
        if kind == "volume":
            mounts.append({k: volume[k] for k in ("type", "source", "target", "read_only") if k in volume})
            continue
        if kind != "bind" or not volume.get("read_only"):
            raise SwarmError(f"service {name}: a writable {kind} mount of {volume.get('source')} has no swarm "
                             "form (the folder would have to exist on every node)")
        source = Path(volume["source"])
        files = [(source, volume["target"])] if source.is_file() else \
            [(f, f"{volume['target'].rstrip('/')}/{f.name}") for f in sorted(source.iterdir())] if source.is_dir() else []
        if not files or any(not f.is_file() for f, _ in files):
            raise SwarmError(f"service {name}: {source} must be a file or a folder of files to become a swarm config")
        for path, target in files:
            kind_key, ref = objects.file(path, target)
            out.setdefault(kind_key, []).append(ref)
    for entry in svc.get("tmpfs", []):
        mounts.append(_tmpfs(entry))
    if svc.get("shm_size"):
        mounts.append({"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": int(svc["shm_size"])}})
    if mounts:
        out["volumes"] = mounts


def _deploy(name: str, svc: dict, is_job: bool) -> dict:
    unknown = set(svc.get("deploy") or {}) - {"replicas", "resources", "placement"}
    if unknown or (svc.get("deploy") or {}).get("resources") or (svc.get("deploy") or {}).get("placement"):
        raise SwarmError(f"service {name}: deploy options ({', '.join(sorted(svc['deploy']))}) other than "
                         "replicas are not carried to Swarm by stack/swarm.py yet: add them there")
    deploy: dict[str, Any] = {"endpoint_mode": "dnsrr"}
    if svc.get("mem_limit"):
        deploy["resources"] = {"limits": {"memory": str(svc["mem_limit"])}}
    if is_job:
        deploy["mode"] = "replicated-job"
        # Until its store answers (Compose waited for it to be healthy).
        deploy["restart_policy"] = {"condition": "on-failure", "delay": "5s", "max_attempts": 30}
        return deploy
    deploy["restart_policy"] = {"condition": "any", "delay": "2s"}
    rolling = {"parallelism": 1, "delay": "0s", "monitor": "20s"}
    if name in STATEFUL or name in BESIDE_STORES:
        # One task on its volume: the old one stops before the new one starts.
        deploy["replicas"] = 1
        deploy["placement"] = {"constraints": [f"node.labels.{DATA_LABEL} == true"]}
        deploy["update_config"] = {**rolling, "order": "stop-first", "failure_action": "pause"}
        return deploy
    if name in GLOBAL:
        deploy["mode"] = "global"
        order = "stop-first"
    else:
        deploy["replicas"] = int((svc.get("deploy") or {}).get("replicas") or 1)
        order = "start-first"
    deploy["update_config"] = {**rolling, "order": order, "failure_action": "rollback"}
    deploy["rollback_config"] = {"parallelism": 1, "order": order}
    return deploy


def _ports(svc: dict) -> list[dict]:
    return [{"mode": "host", "target": int(p["target"]), "published": int(p["published"]),
             "protocol": p.get("protocol", "tcp")} for p in svc.get("ports", [])]


def stack_file(config: Mapping[str, Any], registry: str = "", private_files=(), ids: Mapping[str, str] = None,
               key: bytes = b"") -> dict:
    """The stack file for `docker stack deploy`, from `docker compose config --format json`.
    Bind-mounted files named in private_files (the TLS key) become secrets, others configs;
    ids: the local image IDs of the images built here (image_ids); key: for the objects' names."""
    ids = ids or {}
    secret_files = {str(Path(p)) for p in private_files}
    objects = _Objects(secret_files, config["name"], key)
    job_names, waiting = jobs(config), waits_for_schema(config)
    for name, network in config.get("networks", {}).items():
        if set(network) - {"name", "internal", "ipam"} or network.get("ipam"):
            raise SwarmError(f"network {name}: options {sorted(network)} are not carried to Swarm by stack/swarm.py")
    for name, volume in config.get("volumes", {}).items():
        if set(volume) - {"name"}:
            raise SwarmError(f"volume {name}: options {sorted(volume)} are not carried to Swarm by stack/swarm.py "
                             "(a volume on another driver would silently become a local one)")
    secret_names = {key_: _object_name(key_, Path(s["file"]).read_bytes(), config["name"], key)
                    for key_, s in config.get("secrets", {}).items()}
    services = {}
    for name, svc in config["services"].items():
        off = set(svc.get("profiles", [])) & set(UNSUPPORTED_PROFILES)
        if off:
            raise SwarmError(f"COMPOSE_PROFILES has {', '.join(sorted(off))}: not available in swarm mode yet "
                             f"(the {name} service); take it out of COMPOSE_PROFILES in .env")
        unknown = set(svc) - KEPT - DROPPED - TRANSLATED
        if unknown:
            raise SwarmError(f"service {name} uses {', '.join(sorted(unknown))}, which stack/swarm.py does not "
                             "translate for Swarm yet: add it there")
        out = {key: value for key, value in svc.items() if key in KEPT and value is not None}
        out["image"] = registry_image(svc["image"], registry, ids.get(svc["image"], ""))
        hardening = set(svc.get("security_opt") or []) - {"no-new-privileges:true"}
        if hardening:
            raise SwarmError(f"service {name}: security_opt {sorted(hardening)} has no Swarm form; stack/swarm.py "
                             "drops only no-new-privileges (Swarm services cannot set it)")
        if name in waiting:
            out["environment"] = {**out.get("environment", {}), WAIT_FOR_SCHEMA: "true"}
        if name in BEHIND_NGINX:
            drain = int(out["environment"]["NGINX_DNS_SECONDS"]) + DRAIN_MARGIN
            out["environment"] = {**out["environment"], "STACK_STOP_DRAIN_SECONDS": str(drain)}
            out["stop_grace_period"] = f"{drain + STOP_GRACE}s"
        # Compose's secrets under /run/secrets by their own names, as in Compose.
        out["secrets"] = [{"source": secret_names[ref["source"]], "target": ref["source"]}
                          for ref in svc.get("secrets", [])]
        _volumes(name, svc, objects, out)
        if svc.get("ports"):
            out["ports"] = _ports(svc)
        out["deploy"] = _deploy(name, svc, name in job_names)
        if not out["secrets"]:
            del out["secrets"]
        services[name] = out
    networks = {key_: {"driver": "overlay", **({"internal": True} if net.get("internal") else {}),
                       **({"attachable": True} if key_ == ONE_OFF_NETWORK else {})}
                for key_, net in config.get("networks", {}).items()}
    used = {v["source"] for svc in services.values() for v in svc.get("volumes", []) if v["type"] == "volume"}
    volumes = {key_: {} for key_ in config.get("volumes", {}) if key_ in used}
    secrets = {secret_names[key_]: {"file": s["file"]} for key_, s in config.get("secrets", {}).items()}
    secrets.update(objects.secrets)
    document = {"services": services, "networks": networks, "volumes": volumes, "secrets": secrets}
    if objects.configs:
        document["configs"] = objects.configs
    return document


# --- The engine's side ---------------------------------------------------------

def _docker(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def swarm_state() -> dict:
    """{"state": "active"/"inactive"/..., "manager": bool, "nodes": int}."""
    result = _docker("info", "--format", "{{json .Swarm}}", check=False)
    info = json.loads(result.stdout or "{}") if result.returncode == 0 else {}
    return {"state": info.get("LocalNodeState", ""), "manager": bool(info.get("ControlAvailable")),
            "nodes": int(info.get("Nodes") or 0)}


def stack_running(project: str) -> bool:
    state = swarm_state()
    if state["state"] != "active" or not state["manager"]:
        return False
    names = _docker("stack", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    return project in names


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def preflight(values: Mapping[str, str], project: str, compose_running: bool) -> list[str]:
    """What stops a swarm deploy, each with what to do (empty: go)."""
    problems = []
    cli = _docker("version", "--format", "{{.Client.Version}}", check=False).stdout.strip()
    if _version(cli) < MIN_CLI:
        problems.append(f"the docker CLI is {cli or 'missing'}; swarm mode needs {'.'.join(map(str, MIN_CLI))} or "
                        "later (stack files with jobs, `stack deploy --detach`): install a newer docker-ce-cli")
    state = swarm_state()
    if state["state"] != "active":
        return problems + ["this engine is not in a swarm: `docker swarm init` here (or `docker swarm join` to an "
                           "existing one), then run this on a manager node"]
    if not state["manager"]:
        return problems + ["this node is a swarm worker: run ./stack_deploy.sh --swarm on a manager node"]
    labelled = _docker("node", "ls", "-q", "--filter", f"node.label={DATA_LABEL}=true").stdout.split()
    # Only the stores the stack runs itself are pinned (POSTGRES_HOST, S3_ENDPOINT_URL name others).
    if settings.own_stores(values) and len(labelled) != 1:
        problems.append(f"{len(labelled)} nodes carry the label {DATA_LABEL}=true; exactly one must: the node whose "
                        f"disks keep the database and the artifacts (`docker node update --label-add "
                        f"{DATA_LABEL}=true NODE`)")
    if not values.get("STACK_REGISTRY"):
        problems.append("set STACK_REGISTRY in .env to a registry every node pulls from (the images built here "
                        "are pushed there, and a one-node swarm needs it too: only a registry gives a rebuilt "
                        "image the digest Swarm rolls out by)")
    if values.get("BIND_ADDRESS") != "0.0.0.0":
        problems.append(f"BIND_ADDRESS={values.get('BIND_ADDRESS')}: a swarm publishes nginx's ports on every "
                        "interface of each node; set BIND_ADDRESS=0.0.0.0 in .env to accept that (and firewall "
                        "the nodes as needed)")
    profiles = set(filter(None, values.get("COMPOSE_PROFILES", "").split(",")))
    if profiles & set(UNSUPPORTED_PROFILES):
        problems.append(f"COMPOSE_PROFILES={values['COMPOSE_PROFILES']}: {', '.join(sorted(profiles & set(UNSUPPORTED_PROFILES)))} "
                        "not available in swarm mode yet; take it out of COMPOSE_PROFILES in .env")
    if compose_running:
        problems.append(f"the stack {project} runs here with Docker Compose: take it down first "
                        "(./stack_remove.sh keeps the data volumes), then deploy it to the swarm")
    return problems


def push(ids: Mapping[str, str], registry: str, log=print) -> None:
    """Tag each image built here under the registry and push it, so every node can pull it."""
    for image, image_id in sorted(ids.items()):
        target = registry_image(image, registry, image_id)
        log(f"==> Pushing {target}")
        _docker("tag", image, target)
        result = subprocess.run(["docker", "push", "--quiet", target], capture_output=True, text=True)
        if result.returncode != 0:
            raise SwarmError(f"pushing {target} failed: {result.stderr.strip()[-500:]}; check that STACK_REGISTRY="
                             f"{registry} is a registry this machine may push to (`docker login {registry}`)")


def services(project: str) -> list[dict]:
    """Each service of the stack: name, mode, replicas ("2/2", "0/1 (1/1 completed)") and update state."""
    rows = []
    for line in _docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={project}",
                        "--format", "{{json .}}", check=False).stdout.splitlines():
        row = json.loads(line)
        row["update"] = _docker("service", "inspect", row["Name"], "--format",
                                "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", check=False).stdout.strip()
        rows.append(row)
    return rows


def service_images(project: str) -> dict[str, str]:
    """{service: image} of the stack's services (without the stack's prefix and the digest)."""
    images = {}
    for line in _docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={project}",
                        "--format", "{{.Name}} {{.Image}}", check=False).stdout.splitlines():
        name, _, image = line.partition(" ")
        images[name.removeprefix(f"{project}_")] = image.split("@", 1)[0]
    return images


def image_python(image: str, code: str) -> str:
    """What `python3 -c CODE` prints in IMAGE on this machine ("" if it cannot be asked)."""
    if not image:
        return ""
    result = _docker("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", code, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


# Update states in which a deploy has failed: Swarm paused it or rolls it back.
FAILED_UPDATES = ("paused", "rollback_started", "rollback_paused", "rollback_completed")


def unsettled(rows: list[dict]) -> list[str]:
    """Services not (yet) as wanted: tasks short of their goal, a job not completed, an update
    not done (tasks beyond the goal are stopping ones, not a problem). Empty: the stack runs as deployed (a task counts once its healthcheck passed)."""
    problems = []
    for row in rows:
        replicas = row["Replicas"]
        job = re.fullmatch(r"\d+/\d+ \((\d+)/(\d+) completed\)", replicas)
        running = re.fullmatch(r"(\d+)/(\d+)", replicas)
        if job:
            done = job.group(1) == job.group(2)
        else:
            # More running than wanted: old tasks still stopping (a server serves on for
            # STACK_STOP_DRAIN_SECONDS after an update replaced it), not a shortfall.
            done = bool(running) and int(running.group(1)) >= int(running.group(2)) > 0
        if not done:
            problems.append(f"{row['Name']}: {replicas}")
        elif row["update"] in ("updating", *FAILED_UPDATES):
            problems.append(f"{row['Name']}: update {row['update']}")
    return problems


# The order of task states, as `docker service ps` and Docker's CLI rank them.
TASK_STATES = ("new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting",
               "running", "complete", "shutdown", "failed", "rejected", "remove", "orphaned")


def convergence(service: Mapping[str, Any], tasks: list[Mapping[str, Any]]) -> tuple[str, str]:
    """("done" | "waiting" | "failed", what) for one service after a deploy: `docker service
    inspect` of it and `docker inspect` of its up-to-date tasks (on the spec now deployed).

    Docker's CLI (`stack deploy --detach=false`) judges the same way, but then watches every
    service for its update monitor (20 s here), one after another, changed or not. Here a changed
    service is done when Swarm has completed its update, and Swarm's updater watches each new task
    for that monitor itself (and pauses or rolls back a failing update: the deploy fails); a service
    that did not change is done at once. A task counts as running once its healthcheck passed.
    Tasks on nodes that are down are left out by the caller, as the CLI does."""
    name = service["Spec"]["Name"]
    status = service.get("UpdateStatus") or {}
    update = status.get("State", "")
    if update in FAILED_UPDATES:
        return "failed", f"{name}: update {update}" + (f" ({status['Message']})" if status.get("Message") else "")
    if update == "updating":
        return "waiting", f"{name}: update in progress"
    mode = service["Spec"]["Mode"]
    if "ReplicatedJob" in mode:
        wanted = int(mode["ReplicatedJob"].get("TotalCompletions") or 1)
        iteration = ((service.get("JobStatus") or {}).get("JobIteration") or {}).get("Index")
        current = [t for t in tasks if (t.get("JobIteration") or {}).get("Index") == iteration]
        completed = sum(t["Status"]["State"] == "complete" for t in current)
        failed = sorted((t for t in current if t["Status"]["State"] in ("failed", "rejected")),
                        key=lambda t: t["Status"].get("Timestamp", ""))
        what = f"{name}: {completed}/{wanted} completed"
        if failed and failed[-1]["Status"].get("Err"):
            what += f" (last failure: {failed[-1]['Status']['Err']})"
        return ("done" if completed >= wanted else "waiting"), what
    live = [t for t in tasks if t["DesiredState"] == "running"]
    # Per slot (per node for a global service) the task furthest from running speaks for it.
    by_place: dict = {}
    for task in live:
        place = task["NodeID"] if "Global" in mode else task["Slot"]
        state = task["Status"]["State"]
        rank = TASK_STATES.index(state) if state in TASK_STATES else len(TASK_STATES)
        by_place[place] = min(by_place.get(place, rank), rank)
    running = sum(rank == TASK_STATES.index("running") for rank in by_place.values())
    if "Global" in mode:
        wanted = len(by_place)
        done = wanted > 0 and running == wanted
    else:
        wanted = int(mode["Replicated"].get("Replicas") or 0)
        done = running == wanted
    errors = [t["Status"]["Err"] for t in sorted(tasks, key=lambda t: t["Status"].get("Timestamp", ""))
              if t["Status"].get("Err")]
    what = f"{name}: {running}/{wanted} running" + (f" (last error: {errors[-1]})" if errors and not done else "")
    return ("done" if done else "waiting"), what


# Seconds a docker call of swarm-wait may take: a hung engine must not outlast the deploy's timeout.
ENGINE_TIMEOUT = 60


def deployed_state(project: str, names: list[str]) -> list[tuple[str, str]]:
    """convergence() of each named service of the stack, as it is now (tasks on nodes that are
    down left out)."""
    full = [f"{project}_{name}" for name in names]
    try:
        found = _docker("service", "inspect", *full, check=False, timeout=ENGINE_TIMEOUT)
        services = {s["Spec"]["Name"]: s for s in json.loads(found.stdout or "[]")}
        ids = _docker("service", "ps", "-q", "--no-trunc", "--filter", "_up-to-date=true",
                      *[name for name in full if name in services], check=False, timeout=ENGINE_TIMEOUT).stdout.split() \
            if services else []
        tasks = json.loads(_docker("inspect", "--type", "task", *ids, check=False, timeout=ENGINE_TIMEOUT).stdout or "[]") \
            if ids else []
        nodes = _docker("node", "ls", "--format", "{{.ID}} {{.Status}}", check=False, timeout=ENGINE_TIMEOUT).stdout
    except subprocess.TimeoutExpired:
        return [("waiting", f"the Docker engine did not answer within {ENGINE_TIMEOUT} s")]
    down = {line.split()[0] for line in nodes.splitlines() if line.endswith(" Down")}
    by_service: dict[str, list] = {}
    for task in tasks:
        if task.get("NodeID") not in down:
            by_service.setdefault(task["ServiceID"], []).append(task)
    return [convergence(services[name], by_service.get(services[name]["ID"], [])) if name in services
            else ("waiting", f"{name}: not created yet") for name in full]


def servers(document: Mapping[str, Any]) -> dict[str, int]:
    """{service: replicas} of the stack file's server tier: the services that wait for the
    schema (what a restore stops while it replaces the data, and starts again)."""
    return {name: int(svc["deploy"]["replicas"]) for name, svc in sorted(document["services"].items())
            if (svc.get("environment") or {}).get(WAIT_FOR_SCHEMA) == "true"}


def stores_first(document: Mapping[str, Any], config: Mapping[str, Any], with_jobs: bool = True) -> dict:
    """The stores and the jobs alone: deployed (and waited for) before the rest, so that
    the servers start on a schema the migrate job has made current. Without the jobs:
    the stores alone, for the schema check (and pre-upgrade backup) before migrate runs."""
    keep = set(STATEFUL) | (set(jobs(config)) if with_jobs else set())
    return {**document, "services": {k: v for k, v in document["services"].items() if k in keep}}


def prune_objects(project: str, document: Mapping[str, Any]) -> list[str]:
    """Remove this stack's configs and secrets that the deployed file no longer names (a
    changed value is a new object; the old one would stay in the swarm's store). Run once
    the stack has settled: a rollback before that may still need them."""
    removed = []
    for kind in ("secret", "config"):
        wanted = {f"{project}_{name}" for name in document.get(f"{kind}s", {})}
        listed = _docker(kind, "ls", "--filter", f"label=com.docker.stack.namespace={project}",
                         "--format", "{{.Name}}", check=False).stdout.split()
        for name in sorted(set(listed) - wanted):
            if _docker(kind, "rm", name, check=False).returncode == 0:  # one still in use stays
                removed.append(f"{kind} {name}")
    return removed

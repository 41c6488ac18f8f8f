#!/usr/bin/env python3
"""Checks the deploy files the way a cluster, Compose and a Docker build would, without any of them running.

Kubernetes (every overlay of deploy/k8s, rendered by `kubectl kustomize`):
  - core objects against the Kubernetes OpenAPI schemas, strictly (an unknown field is an error), with
    kubernetes-validate; KEDA and Prometheus Operator objects against their CRD schemas (crds.mjs);
  - the fleet's own rules: resources and a PodDisruptionBudget for every Deployment, non-root pods, worker
    liveness on /healthz (the stage loops' heartbeat) and no readiness, producer readiness on /readyz, a grace
    period above worker.shutdown_grace, one ScaledObject per stage on that stage's stream, replica ceilings of
    quota-bound stages equal to what the quota can use (docs/capacity.md), Secret keys that exist;
  - the settings every container would get (ConfigMap, Secret, env) accepted by the real binary
    (`producer settings`, which loads and validates them like `serve` and the workers do).
Compose (deploy/docker-compose.yml): `docker-compose config` with each env file, the same settings check for
every fleet service, stop_grace_period above the drain, Redis with AOF, scalable workers, existing mounts.
Dockerfile (deploy/Dockerfile): every copied file exists and is not excluded by .dockerignore, every
--from names a stage, every built binary is a workspace binary, the targets exist and run as non-root.

`--self-test` breaks a rendered overlay in known ways and fails unless every break is reported.
"""
import argparse
import base64
import copy
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"
CUSTOM_GROUPS = {"keda.sh", "monitoring.coreos.com"}
STAGES = ("parse", "chunk", "embed")
QUOTA_ANNOTATION = "upload-pipeline.dev/quota-bound"
SECONDS_ANNOTATION = "upload-pipeline.dev/provider-seconds-per-job"


class Problems(list):
    def add(self, where, message):
        self.append(f"{where}: {message}")


def duration_seconds(text):
    """A settings duration ("500ms", "30s", "5m", "1h") or a Compose one ("1m30s") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text).replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def is_custom(doc):
    return doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS


def named(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


def check_schemas(docs, problems):
    core = [d for d in docs if not is_custom(d)]
    for doc in core:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            problems.add(named(doc), f"schema: {e.message} (at {path or 'the top'})")
        except kubernetes_validate.utils.SchemaNotFoundError:
            problems.add(named(doc), f"no Kubernetes {K8S_VERSION} schema for {doc['apiVersion']}")
    custom = [d for d in docs if is_custom(d)]
    out = subprocess.run(
        ["node", str(Path(__file__).with_name("crds.mjs"))],
        input=json.dumps(custom), capture_output=True, text=True,
    )
    for line in out.stdout.splitlines():
        if not line.startswith("custom resources:"):
            problems.add("CRD schema", line)
    if out.returncode != 0 and not out.stdout.strip():
        problems.add("CRD schema", out.stderr.strip()[-500:])
    return len(core), len(custom)


def secret_values(doc):
    values = dict(doc.get("stringData") or {})
    for key, value in (doc.get("data") or {}).items():
        values[key] = base64.b64decode(value).decode()
    return values


def container_env(container, configmaps, secrets, where, problems):
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name not in configmaps:
                problems.add(where, f"envFrom names ConfigMap {name}, which the overlay does not make")
            env.update(configmaps.get(name, {}))
        if "secretRef" in source:
            env.update(secrets.get(source["secretRef"]["name"], {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom", {})
        for kind, store in (("secretKeyRef", secrets), ("configMapKeyRef", configmaps)):
            if kind in ref:
                r = ref[kind]
                values = store.get(r["name"])
                if values is None or r["key"] not in values:
                    if not r.get("optional"):
                        problems.add(where, f"{item['name']} needs key {r['key']} of {r['name']}, which does not exist")
                else:
                    env[item["name"]] = values[r["key"]]
    return env


def run_settings(producer, env, where, problems, stage=None, serve=False):
    """`producer settings` with exactly `env`: the settings a process of that environment would run with. Then
    the pre-flight check of what the process starts: `worker --stages <stage> --check` for a worker of `stage`,
    `producer serve --check` for the API; both build the providers they use (keys, model) without connecting."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    out = subprocess.run([producer, "settings"], env=clean, capture_output=True, text=True)
    if out.returncode != 0:
        problems.add(where, "settings rejected: " + " ".join(out.stderr.split())[-400:])
        return None
    preflight = None
    if stage is not None:
        preflight = ([str(Path(producer).with_name("worker")), "--stages", stage, "--check"], f"the {stage} stage")
    elif serve:
        preflight = ([producer, "serve", "--check"], "the API")
    if preflight:
        check = subprocess.run(preflight[0], env=clean, capture_output=True, text=True)
        if check.returncode != 0:
            problems.add(where, f"{preflight[1]} cannot start: " + " ".join(check.stderr.split())[-400:])
    return json.loads(out.stdout)


def quota_ceiling(stage, config):
    """Replicas a quota-bound stage can keep busy, plus one for a replica being replaced (docs/capacity.md):
    the quota's job rate times the time a job holds a slot, over the slots of one replica."""
    if stage == "embed":
        per_request = config["embedding"]["batch_size"] * config["chunking"]["max_tokens"]
        openai = config["quota"]["openai"]
        rate = min(openai["requests_per_minute"] / 60, openai["tokens_per_minute"] / 60 / per_request)
        slots = config["worker"]["concurrency"]["embed"]
    else:
        llamaparse = config["quota"]["llamaparse"]
        rate = llamaparse["uploads"] / duration_seconds(llamaparse["window"])
        slots = config["worker"]["concurrency"]["parse"]
    return rate, slots


def check_fleet(overlay, docs, template_secrets, producer, problems):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    configmaps = {n: d.get("data", {}) for n, d in by_kind.get("ConfigMap", {}).items()}
    secrets = {n: secret_values(d) for n, d in by_kind.get("Secret", {}).items()}
    for name, values in template_secrets.items():
        secrets.setdefault(name, values)
    config = configmaps.get("upload-pipeline-config")
    if config is None:
        problems.add(overlay, "no ConfigMap upload-pipeline-config")
        return
    grace = duration_seconds(config.get("UPLOAD_PIPELINE__WORKER__SHUTDOWN_GRACE", "30s"))
    prefix = config.get("UPLOAD_PIPELINE__QUEUE__KEY_PREFIX", "upload-pipeline")
    pdbs = list(by_kind.get("PodDisruptionBudget", {}).values())
    scaled = list(by_kind.get("ScaledObject", {}).values())
    stages_seen = set()
    for name, dep in by_kind.get("Deployment", {}).items():
        where = f"{overlay} Deployment/{name}"
        pod = dep["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        spec = pod["spec"]
        if not any(set(p["spec"]["selector"].get("matchLabels", {}).items()) <= set(labels.items()) for p in pdbs):
            problems.add(where, "no PodDisruptionBudget selects its pods")
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.add(where, "pods may run as root (securityContext.runAsNonRoot)")
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c.get("resources", {})
            for need in ("cpu", "memory"):
                if need not in res.get("requests", {}):
                    problems.add(where, f"container {c['name']} requests no {need}")
            if "memory" not in res.get("limits", {}):
                problems.add(where, f"container {c['name']} has no memory limit")
        container = spec["containers"][0]
        component = labels.get("app.kubernetes.io/component", "")
        period = spec.get("terminationGracePeriodSeconds", 30)
        env = container_env(container, configmaps, secrets, where, problems)
        live = container.get("livenessProbe", {}).get("httpGet", {})
        if component == "producer":
            ready = container.get("readinessProbe", {}).get("httpGet", {})
            if ready.get("path") != "/readyz":
                problems.add(where, "the producer's readiness probe must ask /readyz")
            if live.get("path") != "/healthz":
                problems.add(where, "the producer's liveness probe must ask /healthz (never a dependency)")
            run_settings(producer, env, f"{where} container {container['name']}", problems, serve=True)
            for init in spec.get("initContainers", []):
                init_env = container_env(init, configmaps, secrets, where, problems)
                run_settings(producer, init_env, f"{where} init container {init['name']}", problems)
            continue
        if not component.startswith("worker-"):
            continue
        stage = component.removeprefix("worker-")
        stages_seen.add(stage)
        if container.get("args") != ["--stages", stage]:
            problems.add(where, f"runs {container.get('args')}, not the {stage} stage")
        if live.get("path") != "/healthz" or live.get("port") not in ("metrics", 9464):
            problems.add(where, "the liveness probe must ask /healthz on the metrics port (the loops' heartbeat)")
        if "readinessProbe" in container:
            problems.add(where, "workers take no traffic: a readiness probe only hides them from nothing")
        if period <= grace:
            problems.add(where, f"terminationGracePeriodSeconds {period} is not above worker.shutdown_grace ({grace:g} s)")
        if pod["metadata"].get("annotations", {}).get("prometheus.io/port") != "9464":
            problems.add(where, "no prometheus.io/port annotation for the metrics port")
        settings = run_settings(producer, env, f"{where} container {container['name']}", problems, stage)
        targets = [s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == name]
        if len(targets) != 1:
            problems.add(where, f"{len(targets)} ScaledObjects scale it (want one)")
            continue
        so = targets[0]
        so_where = f"{overlay} ScaledObject/{so['metadata']['name']}"
        spec_so = so["spec"]
        minimum, maximum = spec_so.get("minReplicaCount", 0), spec_so.get("maxReplicaCount", 100)
        if not isinstance(minimum, int) or minimum < 1:
            problems.add(so_where, "minReplicaCount must be 1 or more: workers promote due retries and reclaim dead replicas' jobs")
        if not isinstance(maximum, int) or not isinstance(minimum, int) or maximum < minimum:
            problems.add(so_where, "maxReplicaCount below minReplicaCount")
        triggers = spec_so.get("triggers", [])
        streams = [t for t in triggers if t.get("type") == "redis-streams"]
        want = f"{prefix}:{{{stage}}}:stream"
        if len(streams) != 1 or streams[0]["metadata"].get("stream") != want:
            problems.add(so_where, f"must scale on one redis-streams trigger on {want}")
        for t in streams:
            var = t["metadata"].get("addressFromEnv")
            if var and var not in env:
                problems.add(so_where, f"addressFromEnv {var} is not in the worker's environment")
            auth = t.get("authenticationRef", {}).get("name")
            ta = by_kind.get("TriggerAuthentication", {}).get(auth)
            if auth and ta is None:
                problems.add(so_where, f"TriggerAuthentication {auth} does not exist")
            for ref in (ta or {}).get("spec", {}).get("secretTargetRef", []):
                if ref["key"] not in secrets.get(ref["name"], {}):
                    problems.add(so_where, f"TriggerAuthentication {auth} reads key {ref['key']} of {ref['name']}, which does not exist")
        if settings is None:
            continue
        bound = (stage == "embed" and settings["embedding"]["embedder"] == "openai") or (
            stage == "parse" and settings["parsing"]["parser"] == "llamaparse")
        annotations = so["metadata"].get("annotations", {})
        if bound != (annotations.get(QUOTA_ANNOTATION) == stage):
            problems.add(so_where, f"a stage behind a provider quota carries {QUOTA_ANNOTATION}: {stage}, and only such a stage")
            continue
        if bound:
            rate, slots = quota_ceiling(stage, settings)
            seconds = float(annotations.get(SECONDS_ANNOTATION, "nan"))
            ceiling = math.ceil(rate * seconds / slots) + 1
            if maximum != ceiling:
                problems.add(so_where, f"maxReplicaCount {maximum}, but the quota keeps {ceiling} busy "
                                       f"({rate:.2f} jobs/s x {seconds:g} s per job / {slots} slots, + 1)")
    for stage in STAGES:
        if stage not in stages_seen:
            problems.add(overlay, f"no worker Deployment for the {stage} stage")


OVERLAYS = ("base", "overlays/dev", "overlays/prod")


def check_k8s(producer, problems, rendered=None):
    """Checks every overlay, or the documents of `rendered` ({overlay: docs}) instead of rendering them."""
    template = yaml.safe_load((DEPLOY / "k8s/base/secret.template.yaml").read_text())
    check_schemas([template], problems)
    template_secrets = {template["metadata"]["name"]: secret_values(template)}
    counts = {}
    for overlay in rendered or OVERLAYS:
        docs = rendered[overlay] if rendered else render(DEPLOY / "k8s" / overlay)
        core, custom = check_schemas(docs, problems)
        check_fleet(overlay, docs, template_secrets, producer, problems)
        counts[overlay] = (core, custom)
    return counts


def compose_config(env_file):
    out = subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", "docker-compose.yml", "config"],
        cwd=DEPLOY, capture_output=True, text=True,
    )
    return out.returncode, out.stdout, out.stderr


def check_compose(producer, problems):
    with tempfile.TemporaryDirectory() as tmp:
        example = (DEPLOY / "compose.env.example").read_text()
        code, _, err = compose_config(DEPLOY / "compose.env.example")
        if code == 0 or "set POSTGRES_PASSWORD" not in err:
            problems.add("compose.env.example", f"the stack must refuse to start without its secrets: {err.strip()[-200:]}")
        filled = re.sub(r"^(POSTGRES_PASSWORD|DATABASE_APP_PASSWORD|JWT_SECRET|GRAFANA_ADMIN_PASSWORD)=$",
                        r"\1=deploy-check-\1", example, flags=re.M)
        filled_path = Path(tmp) / "filled.env"
        filled_path.write_text(filled)
        runs = {"compose.env.example (secrets filled in)": filled_path,
                "compose.mock.env": DEPLOY / "compose.mock.env"}
        checked = 0
        for label, env_file in runs.items():
            code, out, err = compose_config(env_file)
            if code != 0:
                problems.add(label, f"docker-compose config failed: {err.strip()[-400:]}")
                continue
            services = yaml.safe_load(out)["services"]
            want = {"postgres", "redis", "migrate", "producer", "prometheus", "grafana"} | {f"worker-{s}" for s in STAGES}
            if services.get("fake-providers", {}).get("profiles") != ["mock"]:
                problems.add(label, "fake-providers must run in the mock profile only")
            for missing in want - set(services):
                problems.add(label, f"no service {missing}")
            redis = " ".join(map(str, services.get("redis", {}).get("command", [])))
            if "--appendonly yes" not in redis or "noeviction" not in redis:
                problems.add(label, "Redis must keep an AOF and never evict (--appendonly yes, noeviction)")
            for name, svc in services.items():
                where = f"{label} service {name}"
                for vol in svc.get("volumes", []):
                    source = vol.get("source") if isinstance(vol, dict) else vol.split(":")[0]
                    if source and source.startswith("/") and not Path(source).exists() and not source.endswith("/models"):
                        problems.add(where, f"mounts {source}, which does not exist")
                env = svc.get("environment") or {}
                if "DATABASE_URL" not in env:
                    continue
                checked += 1
                stage = name.removeprefix("worker-") if name.startswith("worker-") else None
                run_settings(producer, {k: str(v) for k, v in env.items()}, where, problems, stage,
                             serve=svc.get("command") == ["serve"])
                if stage:
                    if svc.get("command") != ["--stages", stage]:
                        problems.add(where, f"runs {svc.get('command')}, not the {stage} stage")
                    if "container_name" in svc or svc.get("ports"):
                        problems.add(where, "a fixed container name or host port stops `--scale`")
                    grace = duration_seconds(env.get("UPLOAD_PIPELINE__WORKER__SHUTDOWN_GRACE", "30s"))
                    stop = duration_seconds(svc.get("stop_grace_period", "10s"))
                    if stop <= grace:
                        problems.add(where, f"stop_grace_period {stop:g} s is not above the drain ({grace:g} s)")
        return checked


def dockerignored(path, patterns):
    parts = Path(path).parts
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                ignored = not negate
                break
    return ignored


def check_dockerfile(problems):
    text = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    meta = json.loads(subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
                                     cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    binaries = {t["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}
    stages, users, current, copied = [], {}, None, 0
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "FROM":
            current = words[3] if len(words) >= 4 and words[2].upper() == "AS" else None
            base = words[1]
            users[current] = users.get(base, "root")
            stages.append(current)
        elif op == "USER":
            users[current] = words[1]
        elif op in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            flags = [w for w in words[1:] if w.startswith("--")]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                if source_stage not in stages:
                    problems.add("Dockerfile", f"{line.strip()}: --from names no earlier stage")
                continue
            for src in args[:-1]:
                matches = list(ROOT.glob(src))
                if not matches:
                    problems.add("Dockerfile", f"{line.strip()}: {src} does not exist")
                elif dockerignored(src, patterns):
                    problems.add("Dockerfile", f"{line.strip()}: {src} is excluded by .dockerignore")
                copied += 1
        elif op == "RUN" and "cargo build" in line:
            for name in re.findall(r"--bin\s+(\S+)", line):
                if name not in binaries:
                    problems.add("Dockerfile", f"builds --bin {name}, which is no binary of the workspace")
    for target in ("producer", "worker", "fake-providers"):
        if target not in stages:
            problems.add("Dockerfile", f"no target {target}")
        elif users.get(target, "root").split(":")[0] in ("root", "0"):
            problems.add("Dockerfile", f"target {target} runs as root")
    return copied


def self_test(producer):
    """Each break must be reported, or the checks above prove nothing."""
    def on(kind, name):
        def pick(docs):
            return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
        return pick

    def drop_liveness(docs):
        del on("Deployment", "worker-embed")(docs)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]

    def short_grace(docs):
        on("Deployment", "worker-chunk")(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20

    def unknown_field(docs):
        on("Deployment", "producer")(docs)["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}

    def ceiling(docs):
        on("ScaledObject", "worker-embed")(docs)["spec"]["maxReplicaCount"] = 9

    def crd_type(docs):
        on("ScaledObject", "worker-parse")(docs)["spec"]["pollingInterval"] = "often"

    def wrong_stream(docs):
        on("ScaledObject", "worker-chunk")(docs)["spec"]["triggers"][0]["metadata"]["stream"] = "upload-pipeline:{embed}:stream"

    def bad_setting(docs):
        on("ConfigMap", "upload-pipeline-config")(docs)["data"]["UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES"] = "lots"

    def no_pdb(docs):
        docs[:] = [d for d in docs if not (d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "worker-parse")]

    breaks = {
        "no liveness probe": (drop_liveness, "liveness probe must ask /healthz"),
        "grace below the drain": (short_grace, "not above worker.shutdown_grace"),
        "unknown field": (unknown_field, "schema:"),
        "ceiling above the quota": (ceiling, "but the quota keeps"),
        "CRD type": (crd_type, "pollingInterval"),
        "another stage's stream": (wrong_stream, "redis-streams trigger on upload-pipeline:{chunk}:stream"),
        "invalid setting": (bad_setting, "settings rejected"),
        "no disruption budget": (no_pdb, "no PodDisruptionBudget"),
    }
    failed = []
    prod = render(DEPLOY / "k8s/overlays/prod")
    for label, (breaker, expected) in breaks.items():
        docs = copy.deepcopy(prod)
        breaker(docs)
        problems = Problems()
        check_k8s(producer, problems, {"overlays/prod": docs})
        if not any(expected in p for p in problems):
            failed.append(f"{label}: not reported (got {problems[:3]})")
    return len(breaks), failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producer", default=str(ROOT / "target/debug/producer"), help="the producer binary")
    parser.add_argument("--self-test", action="store_true", help="also check that known breaks are reported")
    args = parser.parse_args()
    if not Path(args.producer).exists():
        raise SystemExit(f"{args.producer} is missing: build it first (cargo build --bins)")
    for tool in ("kubectl", "docker-compose", "node"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (deploy/check/run.sh installs what it can)")
    problems = Problems()
    counts = check_k8s(args.producer, problems)
    services = check_compose(args.producer, problems)
    copies = check_dockerfile(problems)
    for overlay, (core, custom) in counts.items():
        print(f"k8s {overlay}: {core} objects valid against Kubernetes {K8S_VERSION} (strict), {custom} against their CRDs")
    print(f"compose: 2 env files rendered, {services} fleet services' settings accepted")
    print(f"Dockerfile: {copies} copied paths exist and are in the build context")
    if args.self_test:
        total, failed = self_test(args.producer)
        for f in failed:
            problems.add("self-test", f)
        print(f"self-test: {total - len(failed)} of {total} deliberate breaks reported")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("deploy files: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

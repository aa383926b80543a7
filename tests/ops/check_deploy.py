"""Offline checks of deploy/: run by tests/operations.rs with the ops venv's Python.

- every kustomization names files that exist, and patches target kinds that exist;
- core kinds validate strictly against the Kubernetes 1.37 schemas (kubernetes-validate);
- custom resources (ServiceMonitor, PrometheusRule, ScaledObject) carry their required fields;
- the PrometheusRule holds exactly the groups of deploy/prometheus/alerts.yml;
- autoscaling is capped, and the StatefulSet wires static membership, probes and the volume;
- a NetworkPolicy admits only the scraper, and only to the metrics port.

Prints the archiver.toml of every ConfigMap and overlay after a line `--- CONFIG name`, so the
Rust side can load each with the real config loader. Exits non-zero listing every problem.
"""

import pathlib
import sys
import tomllib

import kubernetes_validate
import yaml

ROOT = pathlib.Path(sys.argv[1])
DEPLOY = ROOT / "deploy"
problems = []
configs = {}


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def need(condition, message):
    if not condition:
        problems.append(message)


def check_kustomization(directory):
    kustomization = load_all(directory / "kustomization.yaml")[0]
    docs = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += check_kustomization(path)
        elif path.exists():
            docs += [(path, d) for d in load_all(path)]
        else:
            problems.append(f"{directory}/kustomization.yaml: resource {resource} does not exist")
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator.get("files", []):
            path = directory / file
            need(path.exists(), f"{directory}: configMapGenerator file {file} does not exist")
            if path.exists() and file.endswith(".toml"):
                configs[f"{directory.name}/{file}"] = path.read_text()
    kinds = {(d.get("kind"), d.get("metadata", {}).get("name")) for _, d in docs}
    for patch in kustomization.get("patches", []):
        target = patch.get("target", {})
        need(
            (target.get("kind"), target.get("name")) in kinds,
            f"{directory}: patch targets {target} which the resources do not define",
        )
    return docs


docs = check_kustomization(DEPLOY / "base")
check_kustomization(DEPLOY / "overlays" / "example")
docs += [(p, d) for p in sorted((DEPLOY / "extras").glob("*.yaml")) for d in load_all(p)]

by_kind = {}
for path, doc in docs:
    kind = doc.get("kind")
    by_kind.setdefault(kind, []).append(doc)
    if doc.get("apiVersion", "").split("/")[0] in ("v1", "apps", "policy", "autoscaling", "networking.k8s.io"):
        try:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
        except Exception as error:  # ValidationError and schema lookup errors alike
            problems.append(f"{path}: {kind} does not validate: {error}")

for monitor in by_kind.get("ServiceMonitor", []):
    spec = monitor.get("spec", {})
    need(spec.get("selector", {}).get("matchLabels"), "ServiceMonitor: spec.selector.matchLabels missing")
    endpoints = spec.get("endpoints") or []
    need(endpoints and all("port" in e for e in endpoints), "ServiceMonitor: every endpoint needs a port")

for rule in by_kind.get("PrometheusRule", []):
    groups = rule.get("spec", {}).get("groups") or []
    need(groups, "PrometheusRule: spec.groups missing")
    for group in groups:
        for r in group.get("rules", []):
            need("alert" in r and "expr" in r, f"PrometheusRule: rule without alert/expr: {r}")
    alerts = load_all(DEPLOY / "prometheus" / "alerts.yml")[0]
    need(rule["spec"] == alerts, "PrometheusRule differs from deploy/prometheus/alerts.yml: regenerate it")

for scaled in by_kind.get("ScaledObject", []):
    spec = scaled.get("spec", {})
    need(spec.get("scaleTargetRef", {}).get("name"), "ScaledObject: spec.scaleTargetRef.name missing")
    need(isinstance(spec.get("maxReplicaCount"), int), "ScaledObject: maxReplicaCount (the partition count) missing")
    triggers = spec.get("triggers") or []
    need(any(t.get("type") == "kafka" for t in triggers), "ScaledObject: no kafka trigger")
    for trigger in triggers:
        meta = trigger.get("metadata", {})
        for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
            need(key in meta, f"ScaledObject: kafka trigger without {key}")

for hpa in by_kind.get("HorizontalPodAutoscaler", []):
    need(hpa["spec"].get("maxReplicas"), "HPA: maxReplicas (the partition count) missing")

for sts in by_kind.get("StatefulSet", []):
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    need(
        env.get("ARCHIVER_KAFKA_GROUP_INSTANCE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "StatefulSet: group.instance.id must come from the pod name (static membership)",
    )
    for probe in ("livenessProbe", "readinessProbe"):
        need(probe in container, f"StatefulSet: {probe} missing")
    need(container.get("securityContext", {}).get("readOnlyRootFilesystem") is True, "StatefulSet: root filesystem must be read-only")
    need(pod.get("securityContext", {}).get("runAsNonRoot") is True, "StatefulSet: must run as non-root")
    need(sts["spec"].get("volumeClaimTemplates"), "StatefulSet: a volume claim for the buffers is missing")
    # IRSA reads its projected web-identity token, not the API token: a pod that reads what any
    # producer sends has no use for credentials to the Kubernetes API.
    need(pod.get("automountServiceAccountToken") is False, "StatefulSet: automountServiceAccountToken must be false")
    limits = container.get("resources", {}).get("limits", {})
    need("ephemeral-storage" in limits, "StatefulSet: the container needs an ephemeral-storage limit (/tmp is an emptyDir)")
    for volume in pod.get("volumes", []):
        if "emptyDir" in volume:
            need((volume["emptyDir"] or {}).get("sizeLimit"), f"StatefulSet: emptyDir {volume['name']} needs a sizeLimit")
    need(pod.get("terminationGracePeriodSeconds", 30) > 25, "StatefulSet: grace period must exceed shutdown.grace_secs (25)")

# The metrics port is the only way in, and anyone who reaches it is a client: only the scraper may.
policies = by_kind.get("NetworkPolicy", [])
need(policies, "NetworkPolicy: none admits only the scraper to the metrics port")
for policy in policies:
    spec = policy["spec"]
    need(
        spec.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "kafka-s3-archiver",
        "NetworkPolicy: must select the archiver's pods",
    )
    need("Ingress" in spec.get("policyTypes", []), "NetworkPolicy: must restrict ingress")
    for rule in spec.get("ingress", []):
        need(rule.get("from"), "NetworkPolicy: an ingress rule admits every source")
        ports = [p.get("port") for p in rule.get("ports", [])]
        need(ports and all(p in ("metrics", 9187) for p in ports), f"NetworkPolicy: ingress to ports {ports}, not only metrics")

for config_map in by_kind.get("ConfigMap", []):
    for key, value in config_map.get("data", {}).items():
        if key.endswith(".toml"):
            configs[f"configmap/{key}"] = value

# Secrets come from Secrets (ARCHIVER_KAFKA_PROPERTY_* from a secretKeyRef, or property_files),
# never from a ConfigMap, whose values anyone who can read the namespace's config sees.
SECRET_MARKERS = ("password", "secret", "jaas", "token", "credential", ".key.pem", "oauthbearer.config")
for name, text in configs.items():
    properties = tomllib.loads(text).get("kafka", {}).get("properties", {})
    for key in properties:
        need(
            not any(marker in key.lower() for marker in SECRET_MARKERS),
            f"{name}: kafka.properties.{key} is a secret; take it from a Secret",
        )
for sts in by_kind.get("StatefulSet", []):
    for env in sts["spec"]["template"]["spec"]["containers"][0].get("env", []):
        if env["name"].startswith("ARCHIVER_KAFKA_PROPERTY_"):
            need("secretKeyRef" in env.get("valueFrom", {}), f"StatefulSet: {env['name']} must come from a secretKeyRef")

for name, text in configs.items():
    print(f"--- CONFIG {name}")
    print(text)

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)

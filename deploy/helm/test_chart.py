"""Tests the Helm chart with the real Helm engine (helm-python-sdk bundles
Helm v4 as a library; no `helm` binary) and validates every rendered
manifest against the Kubernetes schemas (kubernetes-validate, strict).

For the default values and other value sets: the values pass
values.schema.json, the chart lints clean, it renders, every manifest
validates, the HPA targets the proxy Deployment, and the probes and
container args name ports and flags that the binaries really accept
(checked against each binary's --help). Invalid values are rejected.

Run by scripts/chart-test.sh (part of scripts/test.sh):
    python deploy/helm/test_chart.py BIN_DIR
"""

import os
import re
import subprocess
import tempfile
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent / "petrel"
K8S_VERSION = "1.30.0"
# Kinds outside the core schemas (CRDs); checked for shape only.
CRD_KINDS = {"ServiceMonitor", "Certificate"}

USERS = {"existingSecret": "petrel-users"}
TLS_SECRETS = {"clusterSecret": "petrel-cluster-tls", "proxySecret": "petrel-proxy-tls"}

VALUE_SETS = {
    # The defaults plus the two things they require: who may call, and the
    # certificates.
    "defaults": {"proxy": {"auth": USERS}, "tls": TLS_SECRETS},
    "autoscaling-off": {
        "proxy": {"autoscaling": {"enabled": False}, "replicas": 3, "auth": {"allowAnonymous": True}},
        "tls": {"enabled": False},
        "networkPolicy": {"enabled": False},
    },
    "custom-metric": {
        "tls": {"certManager": {"enabled": True, "issuerName": "petrel-ca", "issuerKind": "ClusterIssuer",
                                "proxyDnsNames": ["mq.example.com"]}},
        "proxy": {
            "auth": USERS,
            "existingReceiptSecret": "petrel-receipt",
            "autoscaling": {
                "enabled": True,
                "customMetric": {
                    "enabled": True,
                    "name": "petrel_proxy_inflight_requests",
                    "targetAverageValue": "50",
                },
            }
        }
    },
    "five-brokers": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "proxy": {
            "auth": USERS,
            "receiptSecret": "a-long-enough-secret-value",
            "logLevel": "info,petrel_proxy=debug",
            "rateLimits": {
                "perClientRecordsPerSec": 200,
                "topics": {"orders": 1000, "_audit-log.v2": 50},
                "clients": {"billing-1": 50, "ip:10.0.0.7": 5},
            },
        },
        "broker": {"replicas": 5, "antiAffinity": "hard", "storage": {"size": "50Gi"}, "maxRecordBytes": 1048576},
        "tls": TLS_SECRETS,
    },
}

BAD_VALUES = {
    "zero brokers": {"broker": {"replicas": 0}},
    "unknown key": {"broker": {"replica": 3}},
    "short secret": {"proxy": {"receiptSecret": "short"}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "cpu over 100": {"proxy": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 150}}},
    "negative rate": {"proxy": {"rateLimits": {"topics": {"orders": -1}}}},
    "bad topic in rate limits": {"proxy": {"rateLimits": {"topics": {"a b": 1}}}},
    "unknown rate key": {"proxy": {"rateLimits": {"perTopic": 1}}},
    "tiny transaction check": {"broker": {"transactionCheckMs": 5}},
    "unknown auth key": {"proxy": {"auth": {"users": []}}},
    "unknown tls key": {"tls": {"secret": "x"}},
    "bad issuer kind": {"tls": {"certManager": {"issuerKind": "Vault"}}},
}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"  FAIL {what}")


def help_flags(bin_dir, name):
    out = subprocess.run(
        [str(Path(bin_dir) / name), "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


def flags_in(container):
    words = " ".join(container.get("command", []) + container.get("args", []))
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", words))


def binary_of(container):
    """The binary a container runs: its first word, or what `sh -c` execs."""
    words = container.get("command", []) + container.get("args", [])
    if words and words[0] in ("petrel-broker", "petrel-proxy"):
        return words[0]
    m = re.search(r"\bexec (petrel-broker|petrel-proxy)\b", " ".join(words))
    return m.group(1) if m else None


def check_config_files(bin_dir, name, values, cm, deploy, sts):
    """The ConfigMap's files are accepted by the binaries themselves, are
    mounted where --config points, and changing them does not restart the
    pods (they are reloaded live)."""
    with tempfile.TemporaryDirectory() as d:
        for key, cmd in (
            ("broker.toml", ["petrel-broker", "--id", "1", "--data-dir", d]),
            ("proxy.toml", ["petrel-proxy", "--brokers", "127.0.0.1:1", "--allow-anonymous",
                            "--receipt-secret", "chart-test-receipt-secret"]),
        ):
            check(key in cm["data"], f"{name}: ConfigMap has {key}")
            if key not in cm["data"]:
                continue
            f = Path(d) / key
            f.write_text(cm["data"][key])
            # No PETREL_* variables may override what the file says.
            env_free = {k: v for k, v in os.environ.items() if not k.startswith("PETREL_")}
            out = subprocess.run(
                [str(Path(bin_dir) / cmd[0])] + cmd[1:] + ["--config", str(f), "--print-config"],
                capture_output=True, text=True, env=env_free,
            )
            check(out.returncode == 0, f"{name}: {cmd[0]} rejects its rendered {key}: {out.stderr.strip()}")
            if out.returncode != 0:
                continue
            printed = out.stdout
            if key == "proxy.toml":
                limits = values.get("proxy", {}).get("rateLimits", {})
                for section in ("topics", "clients"):
                    for k, v in limits.get(section, {}).items():
                        check(
                            re.search(rf'^"?{re.escape(k)}"? = {v}$', printed, re.M) is not None,
                            f"{name}: proxy.toml rate limit {section}.{k} = {v} in effect",
                        )
                log = values.get("proxy", {}).get("logLevel", "info")
                check(f'log = "{log}"' in printed, f"{name}: proxy log filter from the ConfigMap")
            else:
                mrb = values.get("broker", {}).get("maxRecordBytes", 4194304)
                check(f"max_record_bytes = {mrb}" in printed, f"{name}: broker max_record_bytes in effect")
    for w in (deploy, sts):
        pod = w["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        cms = {v["name"] for v in pod.get("volumes", []) if v.get("configMap", {}).get("name") == cm["metadata"]["name"]}
        check(any(n in mounts for n in cms), f"{name}: {w['kind']} mounts the ConfigMap")
        args = " ".join(c for ct in pod["containers"] for c in ct.get("command", []) + ct.get("args", []))
        m = re.search(r"--config\s+(\S+)", args)
        check(
            m is not None and any(m.group(1).startswith(mounts[n] + "/") for n in cms if n in mounts),
            f"{name}: {w['kind']} --config points into the mounted ConfigMap",
        )
        annotations = w["spec"]["template"]["metadata"].get("annotations", {}) or {}
        check(
            not any(k.startswith("checksum/config") for k in annotations),
            f"{name}: {w['kind']} is not restarted by config changes (they reload live)",
        )


def check_auth(name, values, deploy, kinds):
    """Auth is what the values ask for: the users file mounted from its
    Secret where --auth-file points, or --allow-anonymous; the receipt
    secret from the chart's Secret or the existing one."""
    proxy = values.get("proxy", {})
    auth = proxy.get("auth", {})
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = " ".join(c.get("args", []))
    if auth.get("allowAnonymous"):
        check("--allow-anonymous" in args and "--auth-file" not in args, f"{name}: anonymous proxy")
    else:
        check("--auth-file /etc/petrel-auth/users.toml" in args, f"{name}: proxy --auth-file")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        check(vols.get("auth", {}).get("secret", {}).get("secretName") == auth["existingSecret"],
              f"{name}: users file from Secret {auth['existingSecret']}")
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        check(mounts.get("auth") == "/etc/petrel-auth", f"{name}: users file mounted")
    env = {e["name"]: e for e in c.get("env", [])}
    ref = env["PETREL_RECEIPT_SECRET"]["valueFrom"]["secretKeyRef"]["name"]
    secrets = [s["metadata"]["name"] for s in kinds.get("Secret", [])]
    if proxy.get("existingReceiptSecret"):
        check(ref == proxy["existingReceiptSecret"] and not secrets, f"{name}: existing receipt Secret used, none made")
    else:
        check(ref in secrets, f"{name}: receipt Secret made and used")


def check_tls(name, values, deploy, sts, kinds):
    """TLS flags and Secret mounts match the values; cert-manager
    Certificates make the Secrets mounted; the NetworkPolicy admits only
    brokers and proxies to the broker port; the client Service has no
    admin port."""
    tls = values.get("tls", {})
    on = tls.get("enabled", True)
    cm = tls.get("certManager", {}).get("enabled", False)
    bargs = " ".join(sts["spec"]["template"]["spec"]["containers"][0]["args"])
    pargs = " ".join(deploy["spec"]["template"]["spec"]["containers"][0]["args"])
    check(("--tls-cert" in bargs and "--tls-ca" in bargs) == on, f"{name}: broker TLS flags = {on}")
    check(("--cluster-cert" in pargs and "--tls-cert" in pargs) == on, f"{name}: proxy TLS flags = {on}")
    secrets = lambda w: {v["secret"]["secretName"] for v in w["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    certs = {c["spec"]["secretName"]: c for c in kinds.get("Certificate", [])}
    check(bool(certs) == (on and cm), f"{name}: cert-manager Certificates only when asked")
    if on:
        cluster = tls.get("clusterSecret") or next((k for k in certs if k.endswith("-cluster-tls")), None)
        proxy = tls.get("proxySecret") or next((k for k in certs if k.endswith("-proxy-tls")), None)
        check(cluster in secrets(sts), f"{name}: brokers mount the cluster certificate {cluster}")
        check({cluster, proxy} <= secrets(deploy), f"{name}: proxies mount {cluster} and {proxy}")
        if cm:
            usages = certs[cluster]["spec"]["usages"]
            check("client auth" in usages and "server auth" in usages, f"{name}: cluster cert for both ends")
            check(any(n.startswith("*.") for n in certs[cluster]["spec"]["dnsNames"]), f"{name}: broker wildcard name")
            check("mq.example.com" in certs[proxy]["spec"]["dnsNames"], f"{name}: extra proxy name")
    pols = kinds.get("NetworkPolicy", [])
    if values.get("networkPolicy", {}).get("enabled", True):
        check(len(pols) == 1, f"{name}: broker NetworkPolicy")
        rules = pols[0]["spec"]["ingress"]
        broker_port = values.get("broker", {}).get("port", 7411)
        guarded = [r for r in rules if any(p["port"] == broker_port for p in r.get("ports", []))]
        comps = sorted(f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in guarded for f in r.get("from", []))
        check(comps == ["broker", "proxy"], f"{name}: broker port only from brokers and proxies ({comps})")
    else:
        check(not pols, f"{name}: no NetworkPolicy when disabled")
    client = [s for s in kinds["Service"] if s["metadata"]["name"] == deploy["metadata"]["name"]]
    check(len(client) == 1 and all(p["name"] != "admin" for p in client[0]["spec"]["ports"]),
          f"{name}: the client Service carries no admin port")


def main(bin_dir):
    known = {b: help_flags(bin_dir, b) for b in ("petrel-broker", "petrel-proxy")}
    with helm.Chart.load(CHART) as chart:
        for name, values in VALUE_SETS.items():
            print(f"value set {name}:")
            try:
                chart.validate_schema(values)
            except helm.HelmError as e:
                check(False, f"{name}: schema rejects valid values: {e}")
                continue
            lint = helm.lint(str(CHART), values, strict=True)
            messages = [
                m for m in lint.get("messages", []) if str(m.get("severity", "")).upper() not in ("INFO", "1")
            ]
            check(not messages and not lint.get("errors"), f"{name}: lint findings {messages}")
            rendered = chart.render(values, name="petrel", namespace="mq", is_install=True)
            docs = []
            for path, text in rendered.items():
                if path.endswith("NOTES.txt"):
                    check("port-forward" in text, f"{name}: NOTES.txt explains how to connect")
                    continue
                for d in yaml.safe_load_all(text):
                    if d:
                        docs.append((path, d))
            kinds = {}
            for path, d in docs:
                kinds.setdefault(d["kind"], []).append(d)
                if d["kind"] in CRD_KINDS:
                    api = {"ServiceMonitor": "monitoring.coreos.com/", "Certificate": "cert-manager.io/"}[d["kind"]]
                    check(d.get("apiVersion", "").startswith(api), f"{path}: CRD api")
                    continue
                try:
                    kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                except Exception as e:  # noqa: BLE001 - report every kind of failure
                    check(False, f"{name}: {path} ({d['kind']}) invalid: {e}")
            deploy = kinds["Deployment"][0]
            sts = kinds["StatefulSet"][0]
            check_auth(name, values, deploy, kinds)
            check_tls(name, values, deploy, sts, kinds)
            check(sts["spec"]["replicas"] == values.get("broker", {}).get("replicas", 3), f"{name}: broker replicas")
            hpa = kinds.get("HorizontalPodAutoscaler", [])
            if values.get("proxy", {}).get("autoscaling", {}).get("enabled", True):
                check(len(hpa) == 1, f"{name}: one HPA")
                ref = hpa[0]["spec"]["scaleTargetRef"]
                check(
                    ref["kind"] == "Deployment" and ref["name"] == deploy["metadata"]["name"],
                    f"{name}: HPA targets the proxy Deployment ({ref})",
                )
                check(
                    hpa[0]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0,
                    f"{name}: scale-down stabilization window",
                )
                custom = [m for m in hpa[0]["spec"]["metrics"] if m["type"] == "Pods"]
                want_custom = values.get("proxy", {}).get("autoscaling", {}).get("customMetric", {}).get("enabled", False)
                check(bool(custom) == want_custom, f"{name}: custom metric present = {want_custom}")
                check("replicas" not in deploy["spec"], f"{name}: HPA owns the replica count")
            else:
                check(not hpa, f"{name}: no HPA when autoscaling is off")
                check(deploy["spec"]["replicas"] == 3, f"{name}: fixed proxy replicas")
            pdbs = {p["metadata"]["name"]: p["spec"] for p in kinds["PodDisruptionBudget"]}
            check(any(s.get("maxUnavailable") == 1 for s in pdbs.values()), f"{name}: broker PDB maxUnavailable 1")
            check(len(pdbs) == 2, f"{name}: broker and proxy PDBs")
            headless = [s for s in kinds["Service"] if s["spec"].get("clusterIP") == "None"]
            check(len(headless) == 1, f"{name}: headless broker Service")
            check(sts["spec"]["serviceName"] == headless[0]["metadata"]["name"], f"{name}: StatefulSet uses it")
            check(bool(sts["spec"].get("volumeClaimTemplates")), f"{name}: broker PVCs")
            check(len(kinds.get("ConfigMap", [])) == 1, f"{name}: ConfigMap")
            check_config_files(bin_dir, name, values, kinds["ConfigMap"][0], deploy, sts)
            for w in (deploy, sts):
                pod = w["spec"]["template"]["spec"]
                for c in pod["containers"]:
                    b = binary_of(c)
                    check(b is not None, f"{name}: container {c['name']} runs a Petrel binary")
                    if b is None:
                        continue
                    unknown = flags_in(c) - known[b]
                    check(not unknown, f"{name}: {b} does not accept {sorted(unknown)}")
                    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                        g = c[probe]["httpGet"]
                        check(g["path"] == path, f"{name}: {b} {probe} path {g['path']}")
                        check(g["port"] in ports, f"{name}: {b} {probe} port {g['port']} is a container port")
                    args = " ".join(c.get("args", []))
                    admin = ports.get("admin")
                    check(f"--admin-listen 0.0.0.0:{admin}" in args, f"{name}: {b} serves admin on the probed port")
                    check("preStop" in c.get("lifecycle", {}) or b == "petrel-proxy", f"{name}: broker preStop")
                check(pod["terminationGracePeriodSeconds"] > 0, f"{name}: termination grace")
            print(f"  {len(docs)} manifests rendered and validated")
        # Secure by default: without an auth choice, or without
        # certificates, the chart does not render.
        for vals, what in (({"tls": TLS_SECRETS}, "proxy.auth"), ({"proxy": {"auth": USERS}}, "tls")):
            try:
                chart.render(vals, name="petrel", namespace="mq", is_install=True)
                check(False, f"chart renders without {what}")
            except helm.HelmError as e:
                check(what in str(e), f"render error names {what}: {e}")
                print(f"no {what} choice: refused with a message")
        for name, values in BAD_VALUES.items():
            try:
                chart.validate_schema(values)
                check(False, f"schema accepted bad values: {name}")
            except helm.HelmError:
                print(f"bad values rejected: {name}")
    # The Grafana dashboard queries only metrics the code emits.
    root = CHART.parent.parent.parent
    dash = (root / "deploy" / "grafana" / "petrel-dashboard.json").read_text()
    sources = "".join(
        p.read_text() for d in ("broker", "proxy", "proto", "admin") for p in (root / d / "src").rglob("*.rs")
    )
    for m in sorted(set(re.findall(r"petrel_[a-z_]+", dash))):
        base = re.sub(r"_(bucket|count|sum)$", "", m)
        emitted = base in sources or any(
            base == f"{prefix}_{suffix}"
            for prefix in ("petrel_broker", "petrel_proxy")
            for suffix in (
                "rpc_duration_seconds",
                "rpc_errors_total",
                "inflight_requests",
                "config_reloads_total",
                "config_reload_errors_total",
            )
        )
        check(emitted, f"dashboard metric {m} is emitted by the code")
    if failures:
        print(f"chart tests: {len(failures)} failures")
        return 1
    print("chart tests: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

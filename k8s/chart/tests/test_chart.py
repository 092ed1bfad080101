"""Tests of the Helm chart k8s/chart/edgehub, offline, with the real Helm engine.

What runs here (see k8s/README.md, "Chart tests"):
- helm-python-sdk (Helm v4's Go SDK as a library) loads, lints and renders the chart, and
  enforces values.schema.json, exactly as `helm install` / `helm template` / `helm lint` do.
  `--set-file deployment.manifest=FILE` goes through Helm's own --set-file parser.
- kubernetes-validate checks every rendered object against Kubernetes' OpenAPI schemas of
  1.29 and 1.33 in strict mode (an unknown field is an error).
- Every EdgeDeployment is checked against the CRD's openAPIV3Schema (the file generated from
  k8s/src/types.rs), made strict the way the API server is: an unknown field fails instead of
  being pruned silently.

No API server runs here: none can be installed on our machines (k8s/README.md says why).

Run: scripts/install-chart-tools.sh, then
  /var/tmp/edgehub-chart-venv/bin/python k8s/chart/tests/test_chart.py -v
or `cargo test -p k8s --test chart` (which runs this file).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
import tomllib
import unittest
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

# The Go side logs each `fail` and values warning to stderr; the tests assert on the errors.
helm.disable_logging()

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CHART = REPO / "k8s" / "chart" / "edgehub"
VALUES = HERE / "values"
MANIFESTS = HERE / "manifests"
KUBE_VERSIONS = ["1.29.0", "1.33.0"]

# Each case: a values file under values/, the manifest given with --set-file (or none), and the
# namespace it is installed into. Release name "line3" throughout, as in the README.
CASES: dict[str, tuple[str, str | None, str]] = {
    "defaults": ("defaults", None, "prod"),
    "storage-class": ("storage-class", "pair.json", "prod"),
    "stopped-module": ("stopped-module", "stopped-module.json", "prod"),
    "keys-secret": ("keys-secret", "content-wrapped.json", "prod"),
    "two-modules-create-options": ("two-modules-create-options", "two-modules-create-options.json", "prod"),
    "watch-namespace": ("watch-namespace", "pair.json", "factory"),
    # The controller in a namespace of its own, watching another; no EdgeDeployment.
    "watch-other-namespace": ("watch-namespace", None, "edgehub-system"),
}
RELEASE = "line3"
CONTROLLER = f"{RELEASE}-edgehub-controller"

# What the controller may do where it watches EdgeDeployments (the chart README's
# "Permissions" table says why each verb is needed).
WATCH_RULES = [
    {"apiGroups": ["edgehub.io"], "resources": ["edgedeployments"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["edgehub.io"], "resources": ["edgedeployments/status"], "verbs": ["patch"]},
    {"apiGroups": ["apps"], "resources": ["statefulsets"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services", "configmaps", "secrets"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["list", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "delete"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
# Nodes are cluster-scoped: a ClusterRole of their own, whatever the controller watches
# (the node-loss policy reads the hub pod's node and watches lost nodes).
NODE_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
]
LEASE_RULES = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [CONTROLLER],
     "verbs": ["get", "update"]},
]


# --- helpers --------------------------------------------------------------------------------

def crate_version() -> str:
    with open(REPO / "k8s" / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of -f values and --set-file values: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def user_values(case: str, manifest: str | None) -> dict[str, Any]:
    """What `helm install line3 CHART -f values/CASE.yaml --set-file deployment.manifest=M` passes."""
    values = helm.values_from_yaml((VALUES / f"{case}.yaml").read_text(encoding="utf-8"))
    if manifest is not None:
        values = merge(values, helm.parse_set_file(f"deployment.manifest={MANIFESTS / manifest}"))
    return values


def render(values: dict[str, Any], namespace: str = "prod") -> tuple[list[dict[str, Any]], str]:
    """The objects `helm install` would apply (CRDs excluded) and the NOTES text."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objects.append(doc)
    return objects, notes


def crd() -> dict[str, Any]:
    return yaml.safe_load((CHART / "crds" / "edgedeployment.yaml").read_text(encoding="utf-8"))


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 structural schema (as in a CRD) as a JSON Schema that rejects what the API
    server would prune: objects with `properties` get additionalProperties false unless they
    preserve unknown fields; `nullable` admits null; int-or-string admits both."""
    out: dict[str, Any] = {}
    for key in ("enum", "required", "minimum", "maximum", "pattern", "minLength", "maxLength",
                "minItems", "maxItems"):
        if key in schema:
            out[key] = schema[key]
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "type" in schema:
        out["type"] = [schema["type"], "null"] if schema.get("nullable") else schema["type"]
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    elif "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = strict(schema["items"])
    return out


def cr_validator() -> jsonschema.Validator:
    """Validates an EdgeDeployment the way the API server would with the chart's CRD."""
    doc = crd()
    group = doc["spec"]["group"]
    (version,) = [v for v in doc["spec"]["versions"] if v["served"] and v["storage"]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    # Every object has these; the CRD leaves them out of its schema.
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": doc["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                "maxLength": 63}},
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def kube_validate(test: unittest.TestCase, obj: dict[str, Any], version: str) -> None:
    """kubernetes-validate --strict -k VERSION for one object."""
    try:
        got = kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        test.fail(f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {version}: {path}: {e.message}")
    test.assertEqual(got, version.rsplit(".", 1)[0], "validated against another Kubernetes version")


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"want exactly one {kind}/{name}, got {len(found)}"
    return found[0]


def arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


# --- tests ----------------------------------------------------------------------------------

class ChartMetadata(unittest.TestCase):
    def test_chart_is_v2_and_app_version_is_the_crates_version(self) -> None:
        with helm.Chart.load(CHART) as chart:
            meta = chart.metadata
            crds = chart.crds
        self.assertEqual(meta["apiVersion"], "v2")
        self.assertEqual(meta["name"], "edgehub")
        self.assertEqual(meta["appVersion"], crate_version())
        self.assertEqual([c["name"] for c in crds], ["crds/edgedeployment.yaml"])
        self.assertTrue(crds[0]["filename"].endswith("crds/edgedeployment.yaml"), crds[0]["filename"])

    def test_the_tools_are_the_pinned_ones(self) -> None:
        from importlib.metadata import version
        pins = dict(line.split("==") for line in (HERE / "requirements.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
        for name in ("helm-python-sdk", "kubernetes-validate", "jsonschema", "PyYAML"):
            self.assertEqual(version(name), pins[name], f"{name}: run scripts/install-chart-tools.sh")

    def test_lint_strict_has_no_findings(self) -> None:
        # (Helm lints in its lint mode, where `fail` only logs: the manifest checks are tested
        # by rendering, in Manifest below.)
        runs: list[tuple[str, dict[str, Any] | None, str]] = [("no values", None, "default")]
        runs += [(case, user_values(v, m), ns) for case, (v, m, ns) in CASES.items()]
        for kube in KUBE_VERSIONS:
            for label, values, namespace in runs:
                with self.subTest(kube=kube, values=label):
                    report = helm.lint(CHART, values, strict=True, namespace=namespace, kube_version=f"v{kube}")
                    self.assertEqual(report["total_charts_linted"], 1)
                    self.assertEqual(report["messages"], [])
                    self.assertEqual(report["errors"], [])

    def test_crd_is_a_valid_custom_resource_definition(self) -> None:
        for kube in KUBE_VERSIONS:
            with self.subTest(kube=kube):
                kube_validate(self, crd(), kube)


class Values(unittest.TestCase):
    def setUp(self) -> None:
        with helm.Chart.load(CHART) as chart:
            self.defaults = chart.values
            self.schema = chart.schema

    def documented_paths(self) -> list[str]:
        """The values a user sets: every key of values.yaml down to a leaf, a free-form map, or
        a Kubernetes type (resources), checked against values.schema.json on the way: the
        schema names exactly the keys values.yaml has, each with a description and strict."""
        paths: list[str] = []

        def walk(values: Any, schema: dict[str, Any], path: str) -> None:
            if path:
                self.assertTrue(schema.get("description"), f"{path}: no description in values.schema.json")
                paths.append(path)
            if "$ref" in schema:
                return  # a shared type (quantity, resources, names): values may set any subset
            props = schema.get("properties")
            if isinstance(values, dict) and props is not None:
                self.assertEqual(schema.get("additionalProperties"), False, f"{path}: schema not strict")
                self.assertEqual(sorted(values), sorted(props),
                                 f"{path or 'top'}: values.yaml and values.schema.json name different keys")
                for key, sub in values.items():
                    walk(sub, props[key], f"{path}.{key}".lstrip("."))

        walk(self.defaults, self.schema, "")
        return paths

    def test_every_value_is_in_the_schema_with_a_description_and_back(self) -> None:
        paths = self.documented_paths()
        self.assertIn("deployment.hub.storage.storageClassName", paths)
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(self.defaults)

    def test_values_yaml_comments_every_value(self) -> None:
        """values.yaml has a `# --` description above each value a user sets."""
        lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
        described: set[str] = set()
        stack: list[tuple[int, str]] = []
        for i, line in enumerate(lines):
            m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
            if not m:
                continue
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                if lines[j].strip().startswith("# --"):
                    described.add(".".join(k for _, k in stack))
                    break
                j -= 1
        leaves = [p for p in self.documented_paths()
                  if not isinstance(self.lookup(p), dict) or p.endswith("resources") or not self.lookup(p)]
        self.assertEqual([p for p in leaves if p not in described], [], "values without a '# --' line in values.yaml")

    def lookup(self, path: str) -> Any:
        value: Any = self.defaults
        for key in path.split("."):
            value = value[key]
        return value

    def test_the_readme_values_table_names_every_value(self) -> None:
        text = (REPO / "k8s" / "README.md").read_text(encoding="utf-8")
        section = text.split("\n## Values", 1)[1].split("\n## ", 1)[0]
        named = set(re.findall(r"^\| `([A-Za-z][\w.]*)`", section, flags=re.M))
        leaves = {p for p in self.documented_paths()
                  if not isinstance(self.lookup(p), dict) or p.endswith("resources") or not self.lookup(p)}
        self.assertEqual(sorted(leaves - named), [], "values missing from k8s/README.md's Values table")
        self.assertEqual(sorted(named - leaves), [], "k8s/README.md's Values table names values the chart lacks")

    def test_bad_values_are_rejected_by_the_schema(self) -> None:
        good = user_values("storage-class", "pair.json")
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(good)  # the control: the base is valid
            bad = {
                "replicas is not a number": ({"controller": {"replicas": "three"}}, "replicas"),
                "no controller": ({"controller": {"replicas": 0}}, "replicas"),
                "misspelt key": ({"deployment": {"hub": {"storge": {"size": "1Gi"}}}}, "storge"),
                "unknown top-level key": ({"replicaCount": 2}, "replicaCount"),
                "access mode": ({"deployment": {"hub": {"storage": {"accessMode": "ReadWriteMany"}}}}, "accessMode"),
                "size is no quantity": ({"deployment": {"hub": {"storage": {"size": "lots"}}}}, "size"),
                "service type": ({"deployment": {"hub": {"serviceType": "ExternalName"}}}, "serviceType"),
                "namespace name": ({"watchNamespace": "Factory_1"}, "watchNamespace"),
                "secret name": ({"deployment": {"device": {"keysSecret": "Bad_Name"}}}, "keysSecret"),
                "empty IoT Hub name": ({"deployment": {"device": {"iothubHostname": ""}}}, "iothubHostname"),
                "device id characters": ({"deployment": {"device": {"deviceId": "line 3/a"}}}, "deviceId"),
                "manifest as an object": ({"deployment": {"manifest": {"modulesContent": {}}}}, "manifest"),
                "resources typo": ({"controller": {"resources": {"limit": {"memory": "1Gi"}}}}, "limit"),
                "metrics port": ({"controller": {"metricsPort": 70000}}, "metricsPort"),
                "node-loss policy": ({"deployment": {"hub": {"nodeLoss": {"policy": "Always"}}}}, "policy"),
                "node-loss timer": ({"deployment": {"hub": {"nodeLoss": {"notReadyAfter": "1 minute"}}}},
                                    "notReadyAfter"),
            }
            for label, (patch, key) in bad.items():
                with self.subTest(label):
                    values = merge(good, patch)
                    with self.assertRaises(helm.HelmValuesError) as caught:
                        chart.validate_schema(values)
                    self.assertIn(key, str(caught.exception))
                    # `helm install` refuses the same values before rendering anything.
                    with self.assertRaises(helm.HelmValuesError):
                        chart.render(values, name=RELEASE, namespace="prod", is_install=True)


class Manifest(unittest.TestCase):
    def render_error(self, values: dict[str, Any], namespace: str = "prod") -> str:
        with self.assertRaises(helm.HelmRenderError) as caught:
            render(values, namespace)
        return str(caught.exception)

    def test_not_json_fails_rendering_with_our_message(self) -> None:
        msg = self.render_error(user_values("defaults", "not-json.json"))
        self.assertIn("deployment.manifest is not a JSON object", msg)

    def test_a_json_array_fails_rendering_with_our_message(self) -> None:
        msg = self.render_error(user_values("defaults", "array.json"))
        self.assertIn("deployment.manifest is not a JSON object", msg)

    def test_no_modules_content_fails_rendering_with_our_message(self) -> None:
        msg = self.render_error(user_values("defaults", "no-modules-content.json"))
        self.assertIn("deployment.manifest has no modulesContent object", msg)

    def test_a_deployment_the_controller_would_not_watch_fails_rendering(self) -> None:
        values = user_values("watch-namespace", "pair.json")
        msg = self.render_error(values, namespace="prod")
        self.assertIn("the controller watches only factory", msg)

    def test_one_command_install_makes_one_edgedeployment_with_defaults(self) -> None:
        """helm install line3 k8s/chart/edgehub --set-file deployment.manifest=pair.json"""
        objects, notes = render(user_values("defaults", "pair.json"))
        (ed,) = by_kind(objects)["EdgeDeployment"]
        self.assertEqual(ed["metadata"], {**ed["metadata"], "name": RELEASE, "namespace": "prod"})
        self.assertEqual(ed["spec"]["manifest"],
                         {"inline": json.loads((MANIFESTS / "pair.json").read_text(encoding="utf-8"))})
        self.assertEqual(ed["spec"]["device"], {"iothubHostname": "edgehub.local", "deviceId": RELEASE})
        self.assertEqual(ed["spec"]["hub"], {
            "storage": {"size": "1Gi", "accessMode": "ReadWriteOncePod", "retainOnDelete": True},
            "serviceType": "ClusterIP",
            "nodeLoss": {"policy": "Never", "notReadyAfter": "60s"},
        })
        self.assertEqual(cr_validator().is_valid(ed), True, list(cr_validator().iter_errors(ed)))
        self.assertIn(f"kubectl get edgedeployments -n prod", notes)


class StrictValidatorsAreNotVacuous(unittest.TestCase):
    """The validators this file relies on reject what they must (else a pass would prove nothing)."""

    def test_crd_validator_rejects_unknown_and_mistyped_fields(self) -> None:
        objects, _ = render(user_values("storage-class", "pair.json"))
        (ed,) = by_kind(objects)["EdgeDeployment"]
        validator = cr_validator()
        self.assertTrue(validator.is_valid(ed))
        broken = {
            "misspelt field": lambda e: e["spec"]["hub"]["storage"].update(storageClass="x"),
            "wrong type": lambda e: e["spec"]["hub"]["storage"].update(retainOnDelete="no"),
            "bad enum": lambda e: e["spec"]["hub"].update(serviceType="ExternalName"),
            "missing device id": lambda e: e["spec"]["device"].pop("deviceId"),
            "unknown spec field": lambda e: e["spec"].update(modules={}),
        }
        for label, breaks in broken.items():
            with self.subTest(label):
                e = copy.deepcopy(ed)
                breaks(e)
                self.assertFalse(validator.is_valid(e))
        # The manifest itself is free-form (x-kubernetes-preserve-unknown-fields).
        e = copy.deepcopy(ed)
        e["spec"]["manifest"]["inline"]["anything"] = {"goes": [1]}
        self.assertTrue(validator.is_valid(e))

    def test_kubernetes_validate_strict_rejects_an_unknown_field(self) -> None:
        objects, _ = render({})
        deployment = copy.deepcopy(by_kind(objects)["Deployment"][0])
        deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
        for kube in KUBE_VERSIONS:
            with self.subTest(kube=kube):
                with self.assertRaises(kubernetes_validate.ValidationError):
                    kubernetes_validate.validate(deployment, kube, strict=True)


class Cases(unittest.TestCase):
    """Each values file: render, validate every object, assert what matters."""

    def render_case(self, case: str) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        values_file, manifest, namespace = CASES[case]
        values = user_values(values_file, manifest)
        objects, _ = render(values, namespace)
        self.assertTrue(objects)
        validator = cr_validator()
        for obj in objects:
            label = f"{obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] == "EdgeDeployment":
                errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
                self.assertEqual(errors, [], f"{case}: {label} does not fit the CRD")
            else:
                for kube in KUBE_VERSIONS:
                    kube_validate(self, obj, kube)
        self.check_controller(case, objects, values, namespace)
        return objects, values, namespace

    def check_controller(self, case: str, objects: list[dict[str, Any]], values: dict[str, Any],
                         namespace: str) -> None:
        with helm.Chart.load(CHART) as chart:
            merged = chart.merge_values(values)
        c = merged["controller"]
        dep = one(objects, "Deployment", CONTROLLER)
        self.assertEqual(dep["metadata"]["namespace"], namespace)
        self.assertEqual(dep["spec"]["replicas"], c["replicas"])
        self.assertEqual(dep["spec"]["selector"]["matchLabels"],
                         {k: dep["spec"]["template"]["metadata"]["labels"][k]
                          for k in dep["spec"]["selector"]["matchLabels"]})
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        tag = c["image"]["tag"] or crate_version()
        self.assertEqual(container["image"], f"{c['image']['repository']}:{tag}")
        self.assertEqual(container["command"], ["/edgehub-controller"])
        args = container["args"]
        self.assertEqual(args[0], "run")
        self.assertEqual(arg_after(args, "--hub-image"), c["hubImage"] or f"localhost/edgehub:{crate_version()}")
        self.assertEqual(arg_after(args, "--lease-name"), CONTROLLER)
        self.assertEqual(arg_after(args, "--metrics-addr"), f"0.0.0.0:{c['metricsPort']}")
        self.assertEqual(arg_after(args, "--namespace"), merged["watchNamespace"] or None)
        # Non-root, read-only, nothing to escalate with.
        self.assertEqual(pod["securityContext"]["runAsNonRoot"], True)
        self.assertEqual(pod["securityContext"]["runAsUser"], 65532)
        sc = container["securityContext"]
        self.assertEqual((sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"], sc["capabilities"]),
                         (True, False, {"drop": ["ALL"]}))
        # Probes on the metrics port.
        (port,) = container["ports"]
        self.assertEqual((port["name"], port["containerPort"]), ("metrics", c["metricsPort"]))
        self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
        self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
        self.assertEqual(container["resources"], c["resources"])
        # The leader-election identity comes from the pod.
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
        self.assertEqual(env, {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"})

        # ServiceAccount, and every binding names it.
        sa_name = merged["serviceAccount"]["name"] or CONTROLLER
        self.assertEqual(pod["serviceAccountName"], sa_name)
        sa = one(objects, "ServiceAccount", sa_name)
        self.assertEqual(sa["metadata"]["namespace"], namespace)
        kinds = by_kind(objects)
        bindings = kinds.get("RoleBinding", []) + kinds.get("ClusterRoleBinding", [])
        self.assertEqual(len(bindings), 3)
        for b in bindings:
            self.assertEqual(b["subjects"], [{"kind": "ServiceAccount", "name": sa_name, "namespace": namespace}])

        # Least privilege: exactly these rules, as a Role where the controller watches one
        # namespace, as a ClusterRole where it watches all; the Lease only in its own namespace.
        watch_ns = merged["watchNamespace"]
        nodes = one(objects, "ClusterRole", f"{CONTROLLER}-nodes")
        self.assertEqual(nodes["rules"], NODE_RULES)
        self.assertEqual(one(objects, "ClusterRoleBinding", f"{CONTROLLER}-nodes")["roleRef"],
                         {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{CONTROLLER}-nodes"})
        if watch_ns:
            # Cluster-wide: only the read-only Node rules.
            self.assertEqual([r["metadata"]["name"] for r in kinds["ClusterRole"]], [f"{CONTROLLER}-nodes"])
            self.assertEqual([r["metadata"]["name"] for r in kinds["ClusterRoleBinding"]], [f"{CONTROLLER}-nodes"])
            role = one(objects, "Role", CONTROLLER)
            self.assertEqual(role["metadata"]["namespace"], watch_ns)
            binding = one(objects, "RoleBinding", CONTROLLER)
            self.assertEqual(binding["metadata"]["namespace"], watch_ns)
            self.assertEqual(binding["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                  "name": CONTROLLER})
        else:
            self.assertEqual([r["metadata"]["name"] for r in kinds.get("Role", [])], [f"{CONTROLLER}-leader-election"])
            role = one(objects, "ClusterRole", CONTROLLER)
            binding = one(objects, "ClusterRoleBinding", CONTROLLER)
            self.assertEqual(binding["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                  "name": CONTROLLER})
        self.assertEqual(role["rules"], WATCH_RULES)
        lease = one(objects, "Role", f"{CONTROLLER}-leader-election")
        self.assertEqual(lease["metadata"]["namespace"], namespace)
        self.assertEqual(lease["rules"], LEASE_RULES)
        lease_binding = one(objects, "RoleBinding", f"{CONTROLLER}-leader-election")
        self.assertEqual(lease_binding["roleRef"]["name"], f"{CONTROLLER}-leader-election")

    def edgedeployment(self, case: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        objects, values, namespace = self.render_case(case)
        eds = by_kind(objects).get("EdgeDeployment", [])
        self.assertEqual(len(eds), 1, f"{case}: want one EdgeDeployment")
        ed = eds[0]
        self.assertEqual((ed["metadata"]["name"], ed["metadata"]["namespace"]), (RELEASE, namespace))
        manifest_file = MANIFESTS / str(CASES[case][1])
        # The inline manifest is the input file, value for value (types included).
        inline = ed["spec"]["manifest"]["inline"]
        expected = json.loads(manifest_file.read_text(encoding="utf-8"))
        self.assertEqual(json.dumps(inline, sort_keys=True), json.dumps(expected, sort_keys=True))
        self.assertEqual(list(ed["spec"]["manifest"]), ["inline"])
        return ed, objects

    def test_defaults(self) -> None:
        objects, _, _ = self.render_case("defaults")
        self.assertEqual(sorted(o["kind"] for o in objects),
                         ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Deployment",
                          "Role", "RoleBinding", "ServiceAccount"])

    def test_storage_class(self) -> None:
        ed, _ = self.edgedeployment("storage-class")
        self.assertEqual(ed["spec"]["device"], {"iothubHostname": "contoso.azure-devices.net", "deviceId": "line3-gw"})
        self.assertEqual(ed["spec"]["hub"], {
            "image": "registry.example/edgehub:0.1.0",
            "storage": {"size": "20Gi", "storageClassName": "longhorn-replicated", "accessMode": "ReadWriteOnce",
                        "retainOnDelete": False},
            "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "serviceType": "LoadBalancer",
            "nodeLoss": {"policy": "ForceDeletePod", "notReadyAfter": "90s"},
        })

    def test_stopped_module(self) -> None:
        ed, _ = self.edgedeployment("stopped-module")
        modules = ed["spec"]["manifest"]["inline"]["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
        self.assertEqual({m: v["status"] for m, v in modules.items()}, {"sender": "running", "receiver": "stopped"})
        self.assertEqual(ed["spec"]["device"], {"iothubHostname": "contoso.azure-devices.net", "deviceId": RELEASE})
        # An unset storage class is left out, not "" (which would mean "no class" to Kubernetes).
        self.assertNotIn("storageClassName", ed["spec"]["hub"]["storage"])
        self.assertNotIn("image", ed["spec"]["hub"])
        self.assertNotIn("resources", ed["spec"]["hub"])

    def test_keys_secret(self) -> None:
        ed, _ = self.edgedeployment("keys-secret")
        self.assertEqual(ed["spec"]["device"], {"iothubHostname": "contoso.azure-devices.net", "deviceId": "line3",
                                                "keysSecret": "line3-module-keys-issued"})
        self.assertIn("content", ed["spec"]["manifest"]["inline"])

    def test_two_modules_create_options(self) -> None:
        ed, _ = self.edgedeployment("two-modules-create-options")
        modules = ed["spec"]["manifest"]["inline"]["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
        self.assertEqual(sorted(modules), ["camera", "filter"])
        # createOptions stay the JSON strings IoT Edge takes, chunks and all.
        camera = modules["camera"]["settings"]
        joined = camera["createOptions"] + "".join(camera[k] for k in sorted(camera) if k.startswith("createOptions0"))
        self.assertEqual(json.loads(joined)["ExposedPorts"], {"9000/tcp": {}})
        self.assertEqual(json.loads(modules["filter"]["settings"]["createOptions"])["Cmd"],
                         ["--input", "input1", "--output", "alerts"])
        self.assertEqual(ed["spec"]["device"]["deviceId"], "press-7")

    def test_watch_namespace(self) -> None:
        ed, objects = self.edgedeployment("watch-namespace")
        dep = one(objects, "Deployment", CONTROLLER)
        pod = dep["spec"]["template"]["spec"]
        self.assertEqual(pod["imagePullSecrets"], [{"name": "registry-login"}])
        self.assertEqual(pod["nodeSelector"], {"kubernetes.io/os": "linux"})
        self.assertEqual(pod["tolerations"], [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}])
        self.assertEqual(dep["spec"]["template"]["metadata"]["annotations"], {"prometheus.io/scrape": "true"})
        self.assertEqual(pod["containers"][0]["imagePullPolicy"], "Always")

    def test_watch_other_namespace(self) -> None:
        objects, _, _ = self.render_case("watch-other-namespace")
        self.assertEqual(sorted((o["kind"], o["metadata"].get("namespace", "")) for o in objects), [
            ("ClusterRole", ""),  # Nodes: cluster-scoped
            ("ClusterRoleBinding", ""),
            ("Deployment", "edgehub-system"),
            ("Role", "edgehub-system"),  # the Lease, where the controller runs
            ("Role", "factory"),  # everything else, where it watches
            ("RoleBinding", "edgehub-system"),
            ("RoleBinding", "factory"),
            ("ServiceAccount", "edgehub-system"),
        ])


class Readme(unittest.TestCase):
    def test_permissions_table_lists_exactly_the_granted_verbs_with_a_reason(self) -> None:
        """The chart README's Permissions table: one row per (API group, resource, verb), each with
        a reason, and the same set the chart grants."""
        text = (CHART / "README.md").read_text(encoding="utf-8")
        section = text.split("## Permissions", 1)[1].split("\n## ", 1)[0]
        rows = set()
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 4 or cells[0] == "API group" or set("".join(cells)) <= set("-: "):
                continue
            group, resource, verbs, why = cells
            self.assertTrue(len(why) > 20, f"no reason given for {resource} {verbs}")
            group = "" if group == "core" else group.strip("`")
            for res in resource.replace("`", "").split(","):
                for verb in verbs.replace("`", "").split(","):
                    rows.add((group, res.strip(), verb.strip()))
        granted = {(g, r, v) for rule in WATCH_RULES + NODE_RULES + LEASE_RULES
                   for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
        objects, _ = render({})
        rendered = {(g, r, v) for o in objects if o["kind"] in ("ClusterRole", "Role")
                    for rule in o["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
        self.assertEqual(rendered, granted)
        self.assertEqual(rows, granted)


class ReadmeAutoscaling(unittest.TestCase):
    """k8s/README.md, "Autoscale on the input's queue length": the YAML it tells people to apply."""

    def setUp(self) -> None:
        text = (REPO / "k8s" / "README.md").read_text(encoding="utf-8")
        section = text.split("\n### Autoscale on the input's queue length", 1)[1].split("\n## ", 1)[0]
        blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
        # Indented under list items: dedent each by its first line's indentation.
        self.docs = []
        for block in blocks:
            lines = block.splitlines()
            indent = len(lines[0]) - len(lines[0].lstrip(" "))
            self.docs.append(yaml.safe_load("\n".join(line[indent:] for line in lines)))
        self.assertEqual(len(self.docs), 3, "recording rule, adapter rule, HPA")

    def example_count(self) -> int:
        ed = yaml.safe_load((REPO / "k8s" / "examples" / "replicated.yaml").read_text(encoding="utf-8"))
        modules = ed["spec"]["manifest"]["inline"]["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
        return modules["filter"]["x-edgehub-replicas"]["count"]

    def test_the_hpa_is_valid_kubernetes_and_stays_within_the_count(self) -> None:
        hpa = self.docs[2]
        self.assertEqual((hpa["apiVersion"], hpa["kind"]), ("autoscaling/v2", "HorizontalPodAutoscaler"))
        for version in KUBE_VERSIONS:
            kube_validate(self, hpa, version)
        self.assertEqual(hpa["spec"]["scaleTargetRef"], {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "line4-filter"})
        self.assertLessEqual(hpa["spec"]["maxReplicas"], self.example_count())
        metric = hpa["spec"]["metrics"][0]["external"]["metric"]
        self.assertEqual(metric["name"], "edgehub_replicated_input_queue_length")
        adapter = self.docs[1]["externalRules"][0]
        recorded = self.docs[0]["groups"][0]["rules"][0]["record"]
        self.assertEqual(re.sub(adapter["name"]["matches"], adapter["name"]["as"].replace("$1", r"\1"), recorded), metric["name"])
        self.assertIn(recorded, adapter["seriesQuery"])

    def test_the_recording_rules_expressions_select_and_split_exactly_the_partition_queues(self) -> None:
        expr = self.docs[0]["groups"][0]["rules"][0]["expr"]
        # PromQL double-quoted strings unescape "\\" to "\"; Prometheus anchors every regex.
        quoted = [q.replace("\\\\", "\\") for q in re.findall(r'"((?:[^"\\]|\\.)*)"', expr)]
        selector = re.search(r'endpoint=~"((?:[^"\\]|\\.)*)"', expr).group(1).replace("\\\\", "\\")
        replaces = [(quoted[i + 1], quoted[i + 3]) for i, q in enumerate(quoted) if q in ("module", "input")]
        self.assertEqual(len(replaces), 2, quoted)
        (module_repl, module_re), (input_repl, input_re) = replaces
        self.assertEqual((module_repl, input_repl), ("$1", "$1"))
        # As router/src/queue_id.rs writes them: q1|in|{module}|{input}|r{partition}, % and | escaped.
        for module, inp in [("filter", "input1"), ("SimulatedTemperatureSensor", "in-2"), ("a%257Cb", "x.y")]:
            for p in (0, 17, 63):
                name = f"q1|in|{module}|{inp}|r{p}"
                self.assertIsNotNone(re.fullmatch(selector, name), name)
                self.assertEqual(re.fullmatch(module_re, name).group(1), module, name)
                self.assertEqual(re.fullmatch(input_re, name).group(1), inp, name)
        for other in ["q1|in|filter|input1|p0", "q1|in|filter|input1|p0|live", "q1|up|p0", "q1|in|filter|input1|r", "q1|in|filter|input1|r1|x"]:
            self.assertIsNone(re.fullmatch(selector, other), other)

    def test_prometheus_evaluates_the_recording_rule_to_the_sum_per_module_and_input(self) -> None:
        """`promtool test rules` (Debian's prometheus package; scripts/test.sh installs it): the
        rule, evaluated by Prometheus' own engine over partition queues and other queues."""
        promtool = shutil.which("promtool")
        self.assertIsNotNone(promtool, "no promtool: apt-get install prometheus (scripts/test.sh does)")
        series = [
            ("q1|in|filter|input1|r0", "", 5),
            ("q1|in|filter|input1|r63", "", 7),
            ("q1|in|filter|input2|r5", "", 11),
            ("q1|in|other|input1|r9", "", 2),
            ("q1|in|filter|input1|p0", "0", 1000),
            ("q1|in|filter|input1|p0|live", "0", 1000),
            ("q1|up|p0", "0", 1000),
        ]
        recorded = self.docs[0]["groups"][0]["rules"][0]["record"]
        want = {("filter", "input1"): 12, ("filter", "input2"): 11, ("other", "input1"): 2}
        test = {
            "rule_files": ["rules.yml"],
            "evaluation_interval": "1m",
            "tests": [{
                "interval": "1m",
                "input_series": [
                    {"series": f'edgehub_queue_length{{namespace="factory",endpoint="{e}",priority="{p}"}}', "values": str(v)}
                    for e, p, v in series
                ],
                "promql_expr_test": [{
                    "expr": recorded,
                    "eval_time": "0m",
                    "exp_samples": [
                        {"labels": f'{recorded}{{namespace="factory",module="{m}",input="{i}"}}', "value": v}
                        for (m, i), v in want.items()
                    ],
                }],
            }],
        }
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "rules.yml").write_text(yaml.safe_dump(self.docs[0]), encoding="utf-8")
            Path(tmp, "test.yml").write_text(yaml.safe_dump(test), encoding="utf-8")
            run = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp, capture_output=True, text=True, check=False)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertIn("SUCCESS", run.stdout)


def dump(directory: Path) -> None:
    """Writes each case's rendered EdgeDeployment as CASE.json into `directory`, for
    k8s/tests/chart.rs to read with the controller's own types, and each case's controller
    Deployment as controller/CASE.json, whose command, args and probes that test runs against
    the real controller binary."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "controller").mkdir(exist_ok=True)
    for case, (values_file, manifest, namespace) in CASES.items():
        objects, _ = render(user_values(values_file, manifest), namespace)
        (deployment,) = by_kind(objects)["Deployment"]
        (directory / "controller" / f"{case}.json").write_text(json.dumps(deployment, indent=1), encoding="utf-8")
        if manifest is None:
            continue
        (ed,) = by_kind(objects)["EdgeDeployment"]
        (directory / f"{case}.json").write_text(json.dumps(ed, indent=1), encoding="utf-8")
    objects, _ = render(user_values("defaults", "pair.json"))
    (directory / "one-command.json").write_text(json.dumps(by_kind(objects)["EdgeDeployment"][0]), encoding="utf-8")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--dump":
        dump(Path(sys.argv[2]))
        sys.exit(0)
    unittest.main()

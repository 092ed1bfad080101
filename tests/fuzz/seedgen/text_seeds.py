#!/usr/bin/env python3
"""Writes the route and manifest seed corpora from text in the repository.

Routes: every route string of the repository's manifests, and the condition texts of the
router's own tests (each also as the WHERE clause of a catch-all route). Manifests: the
repository's manifests, whole and as $edgeHub desired properties alone.
Usage: text_seeds.py <corpus dir>   (run from the repository root)
"""
import hashlib
import json
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
routes_dir = root / "route_parse"
manifest_dir = root / "manifest"
routes_dir.mkdir(parents=True, exist_ok=True)
manifest_dir.mkdir(parents=True, exist_ok=True)


def put(directory, text):
    data = text.encode()
    name = hashlib.sha1(data).hexdigest()[:16]
    (directory / name).write_bytes(data)


manifests = [pathlib.Path("hub/src/default-manifest.json"), pathlib.Path("benches/peers/edgehub-manifest.json")]
routes = set()
for path in manifests:
    text = path.read_text()
    put(manifest_dir, text)
    doc = json.loads(text)
    content = doc.get("content", doc).get("modulesContent", {})
    desired = content.get("$edgeHub", {}).get("properties.desired")
    if desired is not None:
        put(manifest_dir, json.dumps(desired, indent=1))
        for route in desired.get("routes", {}).values():
            routes.add(route["route"] if isinstance(route, dict) else route)

# A desired-properties document using every key the parser knows.
put(manifest_dir, json.dumps({
    "schemaVersion": "1.3",
    "routes": {
        "r1": {"route": "FROM /messages/modules/a/outputs/* WHERE $body.temp > 30 INTO $upstream",
               "priority": 0, "timeToLiveSecs": 60, "x-edgehub-liveFirstSecs": 5},
        "r2": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/b/inputs/in1\")",
    },
    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200, "storeLimits": {"maxSizeBytes": 1048576}},
}))

sources = list(pathlib.Path("router/src/route").glob("*.rs")) + list(pathlib.Path("router/tests").glob("*.rs"))
conditions = set()
for path in sources:
    text = path.read_text()
    for m in re.finditer(r'"((?:FROM|from) [^"\\]*(?:\\.[^"\\]*)*)"', text):
        routes.add(m.group(1).encode().decode("unicode_escape"))
    for m in re.finditer(r'"([^"\\]*(?:\\.[^"\\]*)*)"', text):
        s = m.group(1)
        if re.search(r"\$body|\$[a-zA-Z]|is_defined|concat|NOT |<>|\?\?|\{\$| = | > | < |AND|OR", s) and len(s) < 200:
            conditions.add(s.encode().decode("unicode_escape"))

for r in sorted(routes):
    put(routes_dir, r)
for c in sorted(conditions):
    put(routes_dir, c)
    put(routes_dir, f"FROM /messages/* WHERE {c} INTO $upstream")
print(f"{len(routes)} routes, {len(conditions)} conditions, {len(manifests)} manifests")

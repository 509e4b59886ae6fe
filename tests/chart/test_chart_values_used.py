"""A value the user sets reaches a rendered object, or `helm template` refuses it naming it: never a no-op.

Three guards. Every key of values.schema.json is read by a template (no key that only looks like a setting);
a read inside a check that refuses a value counts too, so that a key reaches an object is shown by rendering
for a sample of keys (`REACHES`), not for each.
Every object level of the schema refuses unknown keys, so a typo such as `engines[0].replica` or
`gateway.resorces` is an error naming it. And a key that cannot apply to an entry's kind (a pod's keys on an
engine running elsewhere, a GPU engine's keys on a simulator) is refused rather than dropped, unless it asks
for nothing (a feature turned off; a GPU key at the value GPU engines get anyway).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from fnmatch import fnmatch
from typing import Any

import pytest
import yaml

from tests.chart.conftest import APP_VERSION, CHART_DIR, EXAMPLES_DIR, GATEWAY_IMAGE, Helm, Rendered
from tests.chart.template_reads import BUILT, DYNAMIC, ITEM, ROOT, ReadFinder, ValuePath, template_reads

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
VALUES_YAML = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
TYPO = "zzUnknownKey"

# Subtrees a template writes whole (toYaml/toJson), so their own keys never appear in a template: where. The
# subtree itself is read like any key.
VERBATIM = {
    "gateway.settings": "the routing map's settings block (tests/chart/test_chart_schema.py matches its keys)",
    "engines[].timeouts": "the routing map's engine timeouts",
    "engines[].concurrency": "the routing map's engine concurrency",
    "auth.keys[]": "the keys file in the Secret",
    "httpRoute.parentRefs[]": "the HTTPRoute's parentRefs",
    "httpRoute.timeouts": "the HTTPRoute rule's timeouts",
    "*.resources": "a container's resources (merged over the preset's for engines)",
    "*.strategy.rollingUpdate": "a Deployment's rollingUpdate",
}
# Keys read under another path: engineDefaults' are merged into every deployed engine's entry
# (templates/_engines.tpl), where the templates read them as engines[].<key>.
READ_AS: dict[str, tuple[str | int, ...]] = {"engineDefaults": ("engines", 0)}
# Maps whose keys the templates read by a name known only when rendering: any of their keys is read so.
READ_BY_NAME = {
    "enginePresets": "the preset of the engine's kind, get $root.Values.enginePresets $kind",
    "engines[].probes": "each of the engine's probes, merged over the chart's probe of that name",
}
# Keys no template reads, and why that is right.
NOT_READ = {"global": "helm's own, for subcharts"}


def below_verbatim(where: str) -> bool:
    return any(fnmatch(where, f"{subtree}.*") for subtree in VERBATIM)


def _resolve(node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The node behind any chain of $refs, and whether the chain passes through a Kubernetes definition or a
    string map (copied into objects whole, checked by Kubernetes' own schema)."""
    kubernetes = False
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        kubernetes |= name.startswith("io.k8s.") or name == "stringMap"
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node, kubernetes


def chart_levels(node: dict[str, Any] = SCHEMA, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:  # fmt: skip
    """Every object level of the chart's own schema (not the embedded Kubernetes types) with its properties;
    list items are path element 0."""
    node, kubernetes = _resolve(node)
    if kubernetes:
        return
    if "properties" in node:
        yield path, node
        for key, child in node["properties"].items():
            yield from chart_levels(child, (*path, key))
    for combinator in ("anyOf", "allOf", "oneOf"):
        for child in node.get(combinator, []):
            yield from chart_levels(child, path)
    if isinstance(node.get("items"), dict):
        yield from chart_levels(node["items"], (*path, 0))


def dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path).replace(".0", "[]")


def named(path: ValuePath) -> str:
    """A reader's path as the tables above name it: engines[].probes."""
    return ".".join(path).replace(f".{ITEM}", "[]")


def is_read(reads: set[ValuePath], path: tuple[str | int, ...]) -> bool:
    """Whether a template reads this schema key, by its whole path: a read in one place (engines' `enabled`)
    is not a read in another (gateway.autoscaling's)."""
    target = (ROOT, "Values", *(ITEM if isinstance(part, int) else part for part in path))
    for read in reads:
        if read[0] == BUILT:  # a tail of the path, inside a value the templates built: parent and key at least
            if not 3 <= len(read) <= len(target):
                continue
            start = len(target) - len(read) + 1
        elif len(read) == len(target):
            start = 1
        else:
            continue
        if all(
            part == wanted or (part in (ITEM, DYNAMIC) and (wanted == ITEM or named(target[2:at]) in READ_BY_NAME))
            for at, part, wanted in zip(range(start, len(target)), read[1:], target[start:], strict=True)
        ):
            return True
    return False


def test_every_schema_key_is_read_by_a_template() -> None:
    """A key the schema accepts but no template reads would be dropped without a word. Each key is looked up
    by its whole path (tests/chart/template_reads.py follows the templates' variables and dot), so that a
    common name (`enabled`, `name`, `key`) read in one place does not stand for all the others."""
    reads = template_reads(CHART_DIR / "templates")
    unread = []
    for path, level in chart_levels():
        for key in level["properties"]:
            where = dotted((*path, key))
            if below_verbatim(where) or where in NOT_READ:
                continue
            instead = [(*READ_AS[str(path[0])], *path[1:], key)] if path and path[0] in READ_AS else []
            if not any(is_read(reads, candidate) for candidate in [(*path, key), *instead]):
                unread.append(where)
    assert not unread, f"schema keys no template reads: {unread}"
    assert set(NOT_READ) <= set(SCHEMA["properties"])


@pytest.mark.parametrize(
    ("template", "read", "unread"),
    [
        ("{{ with .Values.a }}{{ .enabled }}{{ end }}{{ .Values.b.name }}", "a.enabled", "b.enabled"),
        ("{{ range $i, $e := .Values.l }}{{ if $e.on }}{{ .name }}{{ end }}{{ end }}", "l.[].name", "l.name"),
        ('{{ $r := .Values }}{{ $x := $r.a | default dict }}{{ hasKey $x "key" }}', "a.key", "b.key"),
        ('{{ define "h" }}{{ .b.min }}{{ end }}{{ include "h" (dict "b" .Values.p) }}', "p.min", "b.min"),
        ('{{ $i := .Values.img }}{{ range $f := list "tag" }}{{ get $i $f }}{{ end }}', "img.tag", "img.digest"),
        ("{{ $m := .Values.m }}{{ range $k := $names }}{{ index $m $k }}{{ end }}", "m", "m.enabled"),
        ('{{ $e := .Values.e }}{{ $_ := set $e "built" $e.own }}{{ .Values.e.built.x }}', "e.own.x", "e.x"),
    ],
)
def test_the_template_reader_follows_dot_and_variables(template: str, read: str, unread: str) -> None:
    """The reader behind the test above: a read through `with`, `range`, variables, a helper's `(dict ...)`,
    an inline list of keys, and a renamed key counts under its own path only; a key in a variable, none."""
    reads = ReadFinder({"t.yaml": template}).run()
    assert (ROOT, "Values", *read.split(".")) in reads
    assert (ROOT, "Values", *unread.split(".")) not in reads


def test_every_object_level_refuses_unknown_keys(helm: Helm) -> None:
    """One render with an unknown key at every object level of the schema (engines[0], engines[0].lora,
    gateway.autoscaling, ...): helm refuses each, naming its path."""
    levels = [path for path, _ in chart_levels()]
    assert len(levels) > 80  # the walk reaches every level, list items included
    values: dict[str, Any] = {}
    for path in levels:
        node: Any = values
        for at, part in enumerate(path):
            empty: Any = [] if at + 1 < len(path) and isinstance(path[at + 1], int) else {}
            if isinstance(part, int):
                if not node:
                    node.append(empty)
                node = node[0]
            else:
                node = node.setdefault(part, empty)
        node[TYPO] = 1
    message = helm.template_error(values=values)
    refused = set(re.findall(rf"at '([^']*)': additional properties '{TYPO}' not allowed", message))
    missing = {"/" + "/".join(str(p) for p in path) if path else "" for path in levels} - refused
    assert not missing, f"object levels that accept an unknown key: {sorted(missing)}"


@pytest.mark.parametrize(
    ("values", "path", "key"),
    [
        ({"engines": [{"name": "a", "engine": "vllm", "model": "m", "replica": 2}]}, "/engines/0", "replica"),
        ({"gateway": {"resorces": {"limits": {"memory": "1Gi"}}}}, "/gateway", "resorces"),
        ({"engineDefaults": {"modelStorage": {"sizelimit": "10Gi"}}}, "/engineDefaults/modelStorage", "sizelimit"),
        ({"engineDefaults": {"affinity": {"nodeAfinity": {}}}}, "/engineDefaults/affinity", "nodeAfinity"),
    ],
)
def test_typos_are_refused_naming_them(helm: Helm, values: dict[str, Any], path: str, key: str) -> None:
    message = helm.template_error(values=values)
    assert f"at '{path}': additional properties '{key}' not allowed" in message, message


# --- Keys that cannot apply to an entry's kind --------------------------------------------------------------

ENGINE_PROPERTIES = SCHEMA["definitions"]["engine"]["properties"]
DEFAULTS_KEYS = set(SCHEMA["properties"]["engineDefaults"]["properties"])
# A value of each key the schema accepts; the pod keys of an engine the chart deploys.
POD_KEY_VALUES: dict[str, Any] = {
    "replicas": 2, "gpus": 2, "image": {"tag": "v1"}, "extraArgs": ["--itl-ms=5"], "env": [{"name": "A", "value": "b"}],
    "resources": {"requests": {"cpu": "1"}}, "runtimeClassName": "nvidia", "gpuResource": "amd.com/gpu",
    "shmSize": "4Gi", "hfToken": {"existingSecret": "hf"}, "modelStorage": {"type": "none"},
    "strategy": {"type": "Recreate"}, "nodeSelector": {"pool": "gpu"}, "tolerations": [{"operator": "Exists"}],
    "affinity": {"nodeAffinity": {}}, "podSecurityContext": {"runAsUser": 1}, "securityContext": {"privileged": False},
    "terminationGracePeriodSeconds": 60, "startupTimeoutSeconds": 600,
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}],
    "priorityClassName": "high", "serviceAccountName": "reader", "podAnnotations": {"a": "b"}, "podLabels": {"a": "b"},
    "extraVolumes": [{"name": "v", "emptyDir": {}}], "extraVolumeMounts": [{"name": "v", "mountPath": "/v"}],
    "initContainers": [{"name": "i", "image": "busybox:1.36"}], "envFrom": [{"secretRef": {"name": "s"}}],
    "probes": {"liveness": {"periodSeconds": 30}}, "podDisruptionBudget": {"enabled": False},
    "autoscaling": {"enabled": False}, "scaleToZero": {"enabled": False},
}  # fmt: skip
# The keys of a simulator's pod that only a GPU engine reads (the others apply to a simulator that sets them).
GPU_ENGINE_ONLY = [
    "gpus",
    "runtimeClassName",
    "gpuResource",
    "shmSize",
    "hfToken",
    "modelStorage",
    "startupTimeoutSeconds",
]


def test_pod_keys_are_every_key_but_the_routing_maps() -> None:
    """The keys refused below are all keys of an engine entry except those of its line in the routing map (and
    of a url entry's own): a new pod key is added here, so that it is refused on a url entry too."""
    routing = {"name", "engine", "url", "urls", "baseUrl", "healthPath", "apiKeySecret", "ownedBy", "simulate",
               "model", "servedModelName", "default", "aliases", "lora", "api", "headers", "timeouts", "fallback",
               "balancing", "concurrency"}  # fmt: skip
    assert set(POD_KEY_VALUES) == set(ENGINE_PROPERTIES) - routing
    assert DEFAULTS_KEYS <= set(POD_KEY_VALUES)


ELSEWHERE: list[dict[str, Any]] = [
    {"url": "http://h:8000"},
    {"urls": ["http://a:8000", "http://b:8000"]},
    {"baseUrl": "https://x/v1"},
]


@pytest.mark.parametrize("key", POD_KEY_VALUES)
def test_pod_keys_on_an_engine_elsewhere_are_refused(helm: Helm, key: str) -> None:
    address = ELSEWHERE[list(POD_KEY_VALUES).index(key) % len(ELSEWHERE)]  # each form of address in turn
    value = POD_KEY_VALUES[key]
    if isinstance(value, dict) and value.get("enabled") is False:  # turned off, it is accepted (test below)
        value = {**value, "enabled": True}
    entry = {"name": "remote", **address, "ownedBy": "vllm", "model": "m", key: value}
    message = helm.template_error(values={"engines": [entry]})
    assert f'engines[0] "remote": {key} is only for engines the chart deploys' in message, message
    if key != "scaleToZero":  # turned on, its own refusal says why (the gateway cannot scale it)
        assert "would ignore it, remove it" in message


def test_a_feature_turned_off_on_an_engine_elsewhere_is_accepted(helm: Helm) -> None:
    """`{enabled: false}` asks for nothing, so values shared across environments may keep it; on, refused."""
    off = {"scaleToZero": {"enabled": False}, "autoscaling": {"enabled": False, "maxReplicas": 4}}
    off["podDisruptionBudget"] = {"enabled": False}
    entry = {"name": "remote", "url": "http://h:8000", "ownedBy": "vllm", "model": "m", **off}
    rendered = helm.template(values={"engines": [entry]})
    assert "remote" in rendered.routing_text
    on = {**entry, "autoscaling": {"enabled": True, "maxReplicas": 4}}
    assert "autoscaling is only for engines the chart deploys" in helm.template_error(values={"engines": [on]})


# What a GPU engine gets for each of those keys when it does not set it: values.yaml's engineDefaults, gpus 1.
GPU_ENGINES_GET = {"gpus": 1, **{key: VALUES_YAML["engineDefaults"][key] for key in GPU_ENGINE_ONLY if key != "gpus"}}
SIMULATOR = {"name": "sim", "engine": "simulator", "model": "m"}


@pytest.mark.parametrize("key", GPU_ENGINE_ONLY)
def test_gpu_keys_on_a_simulator_are_refused(helm: Helm, key: str) -> None:
    """At a value other than what a GPU engine gets anyway (POD_KEY_VALUES' differ from values.yaml's)."""
    assert POD_KEY_VALUES[key] != GPU_ENGINES_GET[key]
    entry = {"name": "sim", "engine": "simulator", "model": "m", key: POD_KEY_VALUES[key]}
    message = helm.template_error(values={"engines": [entry]})
    assert f'engines[0] "sim": {key} is for GPU engines (vllm, sglang); a simulator would ignore it' in message
    anyway = "gpus 1" if key == "gpus" else f"engineDefaults.{key}"
    assert f"remove it (a simulator accepts only what GPU engines get anyway: {anyway})" in message, message


@pytest.mark.parametrize("engine", [SIMULATOR, {"name": "v", "model": "m", "engine": "vllm"}])
def test_engine_defaults_removed_is_refused_naming_it(helm: Helm, engine: dict[str, Any]) -> None:
    """`engineDefaults: null` deletes the chart's defaults (Helm's rule for null); every engine is built from
    them, so the chart says so rather than failing inside a template."""
    message = helm.template_error(values={"engineDefaults": None, "engines": [{**engine, "gpus": 1}]})
    assert "engineDefaults: must be a map" in message, message


def test_gpu_keys_at_what_gpu_engines_get_anyway_are_accepted_on_a_simulator(helm: Helm) -> None:
    """Values written for GPU engines switch to `engine: simulator` unedited when their GPU keys say what the
    chart gives a GPU engine anyway: they ask for nothing a simulator drops, and it renders as without them."""
    bare = helm.template(values={"engines": [SIMULATOR]})
    for key, value in GPU_ENGINES_GET.items():  # each alone, then all together
        assert helm.template(values={"engines": [{**SIMULATOR, key: value}]}).docs == bare.docs, key
    assert helm.template(values={"engines": [{**SIMULATOR, **GPU_ENGINES_GET}]}).docs == bare.docs
    # A map is compared as a GPU engine would get it: merged over engineDefaults' (here: every key as it is).
    partial = {**SIMULATOR, "hfToken": {"key": "token"}, "modelStorage": {"type": "emptyDir", "readOnly": False}}
    assert helm.template(values={"engines": [partial]}).docs == bare.docs


def test_production_values_switched_to_simulators_render(helm: Helm) -> None:
    """ "What GPU engines get anyway" is this release's engineDefaults: example 2's engines with their GPU keys
    written out (the token Secret and the RuntimeClass of its engineDefaults, one GPU), switched to simulators
    for a dry run, are accepted; a value of values.yaml that this release overrides is refused, naming it."""
    production = yaml.safe_load((EXAMPLES_DIR / "values-example2.yaml").read_text())
    defaults = production["engineDefaults"]
    for engine in production["engines"]:
        kind = engine.pop("engine")
        engine.update(engine="simulator", simulate=kind, gpus=1, **defaults)
        engine.pop("extraArgs")  # vLLM's and SGLang's flags, not the simulator's
    rendered = helm.template(values=production)
    for name, kind in (("vllm-llama-32-1b", "vllm"), ("sglang-llama-32-1b", "sglang")):
        spec = rendered.get("Deployment", name)["spec"]["template"]["spec"]
        assert spec["containers"][0]["args"][:3] == ["simulate", "--engine", kind]
        assert "runtimeClassName" not in spec and "HF_TOKEN" not in json.dumps(spec)
    production["engines"][1]["runtimeClassName"] = GPU_ENGINES_GET["runtimeClassName"]  # values.yaml's "", not nvidia
    message = helm.template_error(values=production)
    assert 'engines[1] "sglang-llama-32-1b": runtimeClassName is for GPU engines (vllm, sglang)' in message, message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hfToken", {"key": "hf"}),  # another item of the Secret
        ("hfToken", {"value": "t"}),  # a token where GPU engines get none
        ("modelStorage", {"mountPath": "/weights"}),
        ("shmSize", ""),
        ("gpus", 2),
    ],
)
def test_gpu_keys_near_what_gpu_engines_get_are_refused_on_a_simulator(helm: Helm, key: str, value: Any) -> None:
    message = helm.template_error(values={"engines": [{**SIMULATOR, key: value}]})
    assert f'engines[0] "sim": {key} is for GPU engines (vllm, sglang); a simulator would ignore it' in message


def test_a_simulator_keeps_what_it_uses_and_ignores_only_the_defaults(helm: Helm) -> None:
    """The other pod keys apply to a simulator that sets them; engineDefaults' GPU keys stay off it (by design,
    documented), and a url entry never receives engineDefaults."""
    own = {key: value for key, value in POD_KEY_VALUES.items() if key not in GPU_ENGINE_ONLY}
    own.update(autoscaling={"enabled": False}, podDisruptionBudget={"enabled": False}, scaleToZero={"enabled": False})
    gpu_defaults = {key: POD_KEY_VALUES[key] for key in GPU_ENGINE_ONLY if key != "gpus"}
    rendered = helm.template(
        values={
            "engineDefaults": gpu_defaults,
            "engines": [
                {"name": "sim", "engine": "simulator", "model": "m", **own},
                {"name": "remote", "url": "http://h:8000", "ownedBy": "vllm", "model": "n"},
            ],
        }
    )
    spec = rendered.get("Deployment", "sim")["spec"]["template"]["spec"]
    assert (spec["priorityClassName"], spec["serviceAccountName"]) == ("high", "reader")
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert spec["containers"][0]["args"][-1] == "--itl-ms=5" and "runtimeClassName" not in spec


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"url": "http://h:8000", "lora": {"adapters": [{"name": "a"}], "maxLoras": 2}}, "lora.maxLoras is a flag of an engine the chart starts"),
        ({"urls": ["http://a:8000"], "lora": {"maxLoraRank": 16}}, "lora.maxLoraRank is a flag of an engine the chart starts"),
        ({"url": "http://h:8000", "lora": {"runtimeUpdates": True}}, "lora.runtimeUpdates is a flag of an engine the chart starts"),
        ({"url": "http://h:8000", "lora": {"adapters": [{"name": "a", "path": "/p"}]}}, 'lora.adapters[0] "a": path is for engines the chart starts'),
        ({"engine": "simulator", "lora": {"adapters": [{"name": "a", "path": "/p"}], "maxLoras": 2}}, "lora.maxLoras sizes a GPU engine's LoRA memory; a simulator would ignore it"),
        ({"engine": "simulator", "lora": {"maxLoraRank": 16}}, "lora.maxLoraRank sizes a GPU engine's LoRA memory"),
        ({"engine": "sglang", "lora": {"adapters": [{"name": "a", "path": "/p"}], "runtimeUpdates": False}}, "lora.runtimeUpdates: false cannot be honoured"),
    ],
)  # fmt: skip
def test_lora_keys_nothing_would_read_are_refused(helm: Helm, entry: dict[str, Any], fragment: str) -> None:
    owned = {} if "engine" in entry else {"ownedBy": "vllm"}
    message = helm.template_error(values={"engines": [{"name": "e", "model": "m", **owned, **entry}]})
    assert f'engines[0] "e": {fragment}' in message, message


def test_lora_near_misses_are_accepted(helm: Helm) -> None:
    """Adapter names on a url entry, runtime updates on a simulator and on SGLang (true: what it does anyway)."""
    engines = [
        {"name": "r", "url": "http://h:8000", "ownedBy": "vllm", "model": "m", "lora": {"adapters": [{"name": "a"}]}},
        {"name": "s", "engine": "simulator", "model": "n", "lora": {"adapters": [{"name": "b", "path": "/p"}], "runtimeUpdates": True}},
        {"name": "g", "engine": "sglang", "model": "o", "lora": {"adapters": [{"name": "c", "path": "/p"}], "runtimeUpdates": True}},
    ]  # fmt: skip
    simulator = helm.template(values={"engines": engines}).get("Deployment", "s")["spec"]["template"]["spec"]
    assert "--allow-runtime-lora-updating" in simulator["containers"][0]["args"]


# --- The simulator preset's image -------------------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("preset", "gateway", "image"),
    [
        ({}, {}, GATEWAY_IMAGE),
        ({}, {"tag": "0.3.0"}, "ghcr.io/llm-gateway/llm-gateway:0.3.0"),
        ({"tag": "0.2.0"}, {}, "ghcr.io/llm-gateway/llm-gateway:0.2.0"),
        ({"tag": "0.2.0"}, {"tag": "0.3.0", "digest": DIGEST}, "ghcr.io/llm-gateway/llm-gateway:0.2.0"),
        ({"digest": DIGEST}, {}, f"ghcr.io/llm-gateway/llm-gateway@{DIGEST}"),
        ({"repository": "example.com/sim", "tag": "1"}, {}, "example.com/sim:1"),
    ],
)
def test_simulator_preset_fields_fall_back_one_by_one(helm: Helm, preset: dict[str, str], gateway: dict[str, str], image: str) -> None:  # fmt: skip
    """enginePresets.simulator.image's empty fields come from gateway.image: a tag or digest of its own is a
    version of the gateway image for the simulators, and the gateway keeps its own."""
    values = {"enginePresets": {"simulator": {"image": preset}}, "gateway": {"image": gateway}}
    rendered = helm.template(values=values)
    spec = rendered.get("Deployment", "sim-llama-32-1b")["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == image
    own = rendered.get("Deployment", "my-llm-llm-gateway")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert own.endswith(gateway.get("tag", APP_VERSION) + (f"@{DIGEST}" if "digest" in gateway else ""))


def test_a_latest_simulator_preset_is_refused(helm: Helm) -> None:
    message = helm.template_error(values={"enginePresets": {"simulator": {"image": {"tag": "latest"}}}})
    assert "llm-gateway:latest is not allowed" in message


# --- The item names of the Secrets the chart writes -------------------------------------------------------


def secret_references(node: Any) -> Iterator[tuple[str, str]]:
    """(Secret name, item) of every secretKeyRef and secret volume item below node."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        secret = node.get("secret")
        if isinstance(secret, dict):
            name = secret.get("secretName", secret.get("name"))
            yield from ((name, item["key"]) for item in secret.get("items", []))
        for child in node.values():
            yield from secret_references(child)
    elif isinstance(node, list):
        for child in node:
            yield from secret_references(child)


HASH = "ab" * 32
ITEM_NAMES = {
    "auth.key": ({"auth": {"enabled": True, "key": "clients.yaml", "keys": [{"name": "a", "sha256": HASH}]}},
                 "my-llm-llm-gateway-api-keys", "clients.yaml"),
    "engineApiKey.key": ({"engineApiKey": {"value": "v", "key": "token"}}, "my-llm-llm-gateway-engine-api-key", "token"),
    "redis.passwordKey": ({"redis": {"deploy": True, "password": "p", "passwordKey": "pw"}}, "my-llm-llm-gateway-redis", "pw"),
    "hfToken.key": ({"engines": [{"name": "a", "engine": "vllm", "model": "m", "hfToken": {"value": "t", "key": "hf"}}]},
                    "a-hf-token", "hf"),
}  # fmt: skip


@pytest.mark.parametrize("case", ITEM_NAMES)
def test_item_names_name_the_charts_own_secrets_too(helm: Helm, case: str) -> None:
    """auth.key, engineApiKey.key, redis.passwordKey and hfToken.key name the item in the user's Secret, and
    in the Secret the chart writes from an inline value (they were dropped there); every reference to a Secret
    of the chart names an item it holds."""
    values, secret, item = ITEM_NAMES[case]
    rendered = helm.template(values=values)
    written = {doc["metadata"]["name"]: set(doc["data"]) for doc in rendered.of_kind("Secret")}
    assert written[secret] == {item}
    references = {(name, key) for spec in rendered.pod_specs().values() for name, key in secret_references(spec)}
    assert (secret, item) in references
    assert all(key in written[name] for name, key in references if name in written), references


# --- Values no other test sets, each followed to the object it configures -----------------------------------


def _container(rendered: Rendered, name: str) -> dict[str, Any]:
    return rendered.get("Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def _hpa_target(rendered: Rendered) -> Any:
    return rendered.get("HorizontalPodAutoscaler", GATEWAY)["spec"]["metrics"][0]["resource"]["target"]


GATEWAY = "my-llm-llm-gateway"
SIM = "sim-llama-32-1b"
VLLM = {"name": "v", "engine": "vllm", "model": "m"}
REACHES: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "nameOverride": ({"nameOverride": "gw"}, lambda r: r.get("Deployment", "my-llm-gw")["metadata"]["labels"]["app.kubernetes.io/name"], "gw"),
    "fullnameOverride": ({"fullnameOverride": "llm"}, lambda r: r.get("Service", "llm")["spec"]["selector"]["app.kubernetes.io/component"], "gateway"),
    "clusterDomain": ({"clusterDomain": "example.internal"}, lambda r: r.routing["engines"][0]["url"], f"http://{SIM}.llm.svc.example.internal:8000"),
    "engines[].image.pullPolicy": ({"engines": [{**VLLM, "image": {"pullPolicy": "Always"}}]}, lambda r: _container(r, "v")["imagePullPolicy"], "Always"),
    "enginePresets.vllm.image.pullPolicy": ({"engines": [VLLM], "enginePresets": {"vllm": {"image": {"pullPolicy": "Never"}}}}, lambda r: _container(r, "v")["imagePullPolicy"], "Never"),
    "enginePresets.simulator.image.pullPolicy": ({"enginePresets": {"simulator": {"image": {"pullPolicy": "Always"}}}}, lambda r: (_container(r, SIM)["imagePullPolicy"], _container(r, GATEWAY)["imagePullPolicy"]), ("Always", "IfNotPresent")),
    "gateway.image.pullPolicy": ({"gateway": {"image": {"pullPolicy": "Always"}}}, lambda r: (_container(r, GATEWAY)["imagePullPolicy"], _container(r, SIM)["imagePullPolicy"]), ("Always", "Always")),
    "redis.image.pullPolicy": ({"redis": {"deploy": True, "image": {"pullPolicy": "Always"}}}, lambda r: _container(r, f"{GATEWAY}-redis")["imagePullPolicy"], "Always"),
    "modelStorage.hostPathType": ({"engines": [{**VLLM, "modelStorage": {"type": "hostPath", "hostPathType": "DirectoryOrCreate"}}]}, lambda r: r.get("Deployment", "v")["spec"]["template"]["spec"]["volumes"][1]["hostPath"], {"path": "/models", "type": "DirectoryOrCreate"}),
    "persistence.resourcePolicy": ({"persistence": {"enabled": True, "resourcePolicy": ""}}, lambda r: r.get("PersistentVolumeClaim", f"{GATEWAY}-models")["metadata"].get("annotations"), None),
    "gateway.autoscaling.targetCPUUtilizationPercentage": ({"gateway": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 55}}}, _hpa_target, {"type": "Utilization", "averageUtilization": 55}),
    "resources.claims": ({"engines": [{**VLLM, "resources": {"claims": [{"name": "gpu"}]}}], "gateway": {"resources": {"claims": [{"name": "net"}]}}}, lambda r: (_container(r, "v")["resources"]["claims"], _container(r, GATEWAY)["resources"]["claims"]), ([{"name": "gpu"}], [{"name": "net"}])),
}  # fmt: skip


@pytest.mark.parametrize("key", REACHES)
def test_value_reaches_its_object(helm: Helm, key: str) -> None:
    values, read, expected = REACHES[key]
    assert read(helm.template(values=values)) == expected

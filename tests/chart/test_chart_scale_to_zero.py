"""Scale to zero: the gateway stops an idle engine and wakes it on a request (engines[].scaleToZero).

The chart renders the routing map's `wake:` block in the gateway's own format, a Lease per such engine,
a Role that lets the gateway get and patch exactly those Deployments' scale and those Leases, no
`replicas` on their Deployments, and Ingress/HTTPRoute timeouts that let a held request wait. It refuses
what cannot work (an engine running elsewhere, discovery off, KEDA on the same engine), and an upgrade
that changes the timings touches only the routing map.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from gateway_app.config import Timeouts
from tests.chart.conftest import NAMESPACE, VALUE_SETS, Helm, Rendered
from tests.chart.test_chart_render import KUBE_VERSIONS, rendered_notes, validate_object
from tests.chart.test_chart_upgrade import engine_documents, pod_templates

GATEWAY = "my-llm-llm-gateway"
SCALE_ROLE = f"{GATEWAY}-scale-to-zero"
READ_TIMEOUT = "nginx.ingress.kubernetes.io/proxy-read-timeout"
SEND_TIMEOUT = "nginx.ingress.kubernetes.io/proxy-send-timeout"
SCHEMA_ERROR = "values don't meet the specifications of the schema"


def engine(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "model": name, **fields}


def sleeping(name: str, **scale_to_zero: Any) -> dict[str, Any]:
    return engine(name, scaleToZero={"enabled": True, **scale_to_zero})


def routes(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """The routing map parsed with PyYAML, by engine name."""
    return {entry["name"]: entry for entry in rendered.routing["engines"]}


def validate_all(rendered: Rendered) -> None:
    for doc in rendered.docs:
        for version in KUBE_VERSIONS:
            validate_object(doc, version)


@pytest.fixture(scope="module")
def example(helm: Helm) -> Rendered:
    return helm.template(VALUE_SETS["scale-to-zero"])


@pytest.fixture(scope="module")
def example_values() -> dict[str, Any]:
    return yaml.safe_load(VALUE_SETS["scale-to-zero"].read_text())


# --- The routing map --------------------------------------------------------------------------------


def test_the_example_renders_the_wake_block(example: Rendered) -> None:
    by_name = routes(example)
    assert "wake" not in by_name["vllm-llama-32-1b"]
    assert by_name["sglang-llama-32-1b"]["wake"] == {
        "deployment": "sglang-llama-32-1b",
        "replicas": 1,
        "timeout": 120,
        "idle_after": 60,  # idleMinutes: 1
        "queue": 100,
        "fallback_while_waking": False,
        "lease": "sglang-llama-32-1b-activity",
    }
    # the gateway's own loader reads the same: the Deployment and Lease the chart rendered
    wake = {spec.name: spec.wake for spec in example.load_routing().engines}
    assert wake["vllm-llama-32-1b"] is None
    sglang = wake["sglang-llama-32-1b"]
    assert sglang is not None
    example.get("Deployment", sglang.deployment)
    example.get("Lease", sglang.lease_name)
    assert (sglang.replicas, sglang.timeout, sglang.idle_after, sglang.queue) == (1, 120, 60, 100)


def test_defaults_merge_key_by_key(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "engineDefaults": {"scaleToZero": {"idleMinutes": 5, "maxWaiting": 7}},
            "engines": [
                sleeping("a", wakeTimeoutSeconds=60),  # the rest from engineDefaults, then the chart's defaults
                {
                    **sleeping("b", idleMinutes=None, replicas=2, fallbackWhileWaking=True, maxWaiting=0),
                    "fallback": "e",
                },
                engine("c", replicas=3, scaleToZero={"enabled": True}),  # wakes to its own replicas
                engine("d", replicas=0, scaleToZero={"enabled": True}),  # ... at least 1
                engine("e"),  # not enabled: no wake block, no Lease
            ],
        }
    )
    wake = {name: entry.get("wake") for name, entry in routes(rendered).items()}
    assert wake["a"] == {"deployment": "a", "replicas": 1, "timeout": 60, "idle_after": 300,
                         "queue": 7, "fallback_while_waking": False, "lease": "a-activity"}  # fmt: skip
    assert wake["b"] == {"deployment": "b", "replicas": 2, "timeout": 900, "idle_after": None,
                         "queue": 0, "fallback_while_waking": True, "lease": "b-activity"}  # fmt: skip
    assert (wake["c"]["replicas"], wake["d"]["replicas"]) == (3, 1)
    assert wake["e"] is None
    assert {lease["metadata"]["name"] for lease in rendered.of_kind("Lease")} == {
        "a-activity", "b-activity", "c-activity", "d-activity",
    }  # fmt: skip
    rendered.load_routing()


def test_engine_defaults_can_turn_it_on_for_every_engine(helm: Helm) -> None:
    """engineDefaults.scaleToZero.enabled applies to deployed engines only; url entries route as before."""
    rendered = helm.template(
        values={
            "engineDefaults": {"scaleToZero": {"enabled": True}},
            "engines": [engine("a"), {"name": "r", "url": "http://h:8000", "ownedBy": "vllm", "model": "m"}],
        }
    )
    wake = {name: entry.get("wake") for name, entry in routes(rendered).items()}
    assert wake["a"] is not None and wake["a"]["idle_after"] == 30 * 60 and wake["a"]["timeout"] == 900
    assert wake["r"] is None


# --- RBAC, Leases, replicas ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sleeping(helm: Helm) -> Rendered:
    return helm.template(values={"engines": [sleeping("a"), engine("b", replicas=2), sleeping("c")]})


def test_rbac_grants_only_scale_and_leases_by_name(two_sleeping: Rendered) -> None:
    role = two_sleeping.get("Role", SCALE_ROLE)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": ["a", "c"],
         "verbs": ["get", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["a-activity", "c-activity"],
         "verbs": ["get", "patch"]},
    ]  # fmt: skip
    binding = two_sleeping.get("RoleBinding", SCALE_ROLE)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SCALE_ROLE}
    account = two_sleeping.get("Deployment", GATEWAY)["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    # the discovery Role is unchanged, and nothing cluster-wide
    discovery = two_sleeping.get("Role", f"{GATEWAY}-discovery")
    assert discovery["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    assert {doc["kind"] for doc in two_sleeping.docs}.isdisjoint({"ClusterRole", "ClusterRoleBinding"})
    # every name the Role grants is an object the chart renders
    for name in role["rules"][0]["resourceNames"]:
        two_sleeping.get("Deployment", name)
    for name in role["rules"][1]["resourceNames"]:
        two_sleeping.get("Lease", name)
    validate_all(two_sleeping)


def test_no_scale_rights_without_sleeping_engines(helm: Helm) -> None:
    rendered = helm.template(values={"engines": [engine("a")]})
    assert [role["metadata"]["name"] for role in rendered.of_kind("Role")] == [f"{GATEWAY}-discovery"]
    assert [b["metadata"]["name"] for b in rendered.of_kind("RoleBinding")] == [f"{GATEWAY}-discovery"]
    assert not rendered.of_kind("Lease")


def test_one_lease_per_engine_without_the_gateways_fields(two_sleeping: Rendered) -> None:
    leases = {lease["metadata"]["name"]: lease for lease in two_sleeping.of_kind("Lease")}
    assert set(leases) == {entry["wake"]["lease"] for entry in routes(two_sleeping).values() if "wake" in entry}
    for name, lease in leases.items():
        assert lease["apiVersion"] == "coordination.k8s.io/v1" and lease["metadata"]["namespace"] == NAMESPACE
        # no spec: renewTime and holderIdentity are the gateways', never reset by an upgrade
        assert "spec" not in lease, name
        assert lease["metadata"]["labels"]["llm-gateway/engine"] == name.removesuffix("-activity")


def test_sleeping_engines_render_no_replicas(two_sleeping: Rendered, example: Rendered) -> None:
    for rendered, asleep, awake in (
        (two_sleeping, {"a", "c"}, {"b"}),
        (example, {"sglang-llama-32-1b"}, {"vllm-llama-32-1b"}),
    ):
        for name in asleep:
            assert "replicas" not in rendered.get("Deployment", name)["spec"], name
        for name in awake:
            assert "replicas" in rendered.get("Deployment", name)["spec"], name
    assert two_sleeping.get("Deployment", "b")["spec"]["replicas"] == 2


def test_a_sleeping_engine_with_several_pods_keeps_its_disruption_budget(helm: Helm) -> None:
    rendered = helm.template(values={"engines": [engine("a", replicas=2, scaleToZero={"enabled": True})]})
    assert rendered.get("PodDisruptionBudget", "a")["spec"]["maxUnavailable"] == 1
    assert "replicas" not in rendered.get("Deployment", "a")["spec"]


# --- Timeouts on the way to the gateway -----------------------------------------------------------------


def ingress_timeouts(helm: Helm, values: dict[str, Any]) -> tuple[str | None, str | None]:
    rendered = helm.template(values={"ingress": {"enabled": True}, **values})
    annotations = rendered.get("Ingress", GATEWAY)["metadata"]["annotations"]
    return annotations.get(READ_TIMEOUT), annotations.get(SEND_TIMEOUT)


def test_the_chart_assumes_the_gateways_first_byte_timeout() -> None:
    """_engines.tpl counts 600 s for the first byte after a wake when nothing else is set."""
    assert Timeouts().first_byte == 600


@pytest.mark.parametrize(
    ("values", "seconds"),
    [
        ({"engines": [engine("a")]}, "3600"),  # no wake: the chart's hour
        ({"engines": [sleeping("a")]}, "3600"),  # 900 + 600 fits in the hour
        ({"engines": [sleeping("a", wakeTimeoutSeconds=3500), sleeping("b", wakeTimeoutSeconds=100)]}, "4100"),
        ({"engines": [{**sleeping("a", wakeTimeoutSeconds=3500), "timeouts": {"first_byte": 1000}}]}, "4500"),
        ({"engines": [sleeping("a", wakeTimeoutSeconds=3000)], "gateway": {"settings": {"timeouts": {"first_byte": 1200}}}},
         "4200"),
        ({"engines": [sleeping("a", wakeTimeoutSeconds=100)], "gateway": {"settings": {"timeouts": {"first_byte": None}}}},
         "3700"),  # no first-byte limit counts as the hour
        ({"engines": [{**sleeping("a", wakeTimeoutSeconds=3000), "timeouts": {"first_byte": None}}],
          "gateway": {"settings": {"timeouts": {"first_byte": 1200}}}},
         "4200"),  # an engine's null keeps the map-wide value
    ],
)  # fmt: skip
def test_ingress_timeouts_cover_a_wake(helm: Helm, values: dict[str, Any], seconds: str) -> None:
    assert ingress_timeouts(helm, values) == (seconds, seconds)


def test_a_users_ingress_timeout_wins(helm: Helm) -> None:
    values = {"engines": [sleeping("a", wakeTimeoutSeconds=5000)]}
    user = {"enabled": True, "annotations": {READ_TIMEOUT: "7200", SEND_TIMEOUT: None}}
    rendered = helm.template(values={**values, "ingress": user})
    annotations = rendered.get("Ingress", GATEWAY)["metadata"]["annotations"]
    assert annotations[READ_TIMEOUT] == "7200" and SEND_TIMEOUT not in annotations
    # a shorter one wins too, and NOTES.txt says what it will cut
    low = {"enabled": True, "annotations": {READ_TIMEOUT: "600"}}
    assert ingress_timeouts(helm, {**values, "ingress": low})[0] == "600"
    notes = rendered_notes(helm, "-f", str(helm.values_file({**values, "ingress": low})))
    assert f"WARNING: ingress.annotations sets {READ_TIMEOUT} to 600 s, less than the 5600 s" in notes


def test_http_route_does_not_cut_a_held_request(helm: Helm) -> None:
    route = {"enabled": True, "parentRefs": [{"name": "public"}]}

    def timeouts(engines: list[dict[str, Any]], own: dict[str, str] | None = None) -> Any:
        values = {"engines": engines, "httpRoute": {**route, **({"timeouts": own} if own else {})}}
        rendered = helm.template(values=values)
        validate_all(rendered)
        (rule,) = rendered.get("HTTPRoute", GATEWAY)["spec"]["rules"]
        return rule.get("timeouts")

    assert timeouts([engine("a")]) is None  # the implementation's defaults, as before
    assert timeouts([engine("a")], {"request": "1h"}) == {"request": "1h"}
    assert timeouts([sleeping("a")]) == {"request": "0s"}
    assert timeouts([sleeping("a")], {"backendRequest": "30m"}) == {"request": "0s", "backendRequest": "30m"}
    assert timeouts([sleeping("a")], {"request": "2h"}) == {"request": "2h"}


def test_notes_explain_the_wait(helm: Helm) -> None:
    notes = rendered_notes(helm, "-f", str(VALUE_SETS["scale-to-zero"]))
    assert "sglang-llama-32-1b: to 0 pods after 1 min without requests; a request waits up to 120 s" in notes
    assert "OpenAI SDKs give up after 600 s" in notes
    assert "vllm-llama-32-1b: to 0" not in notes
    # 120 s of wake is longer than the 110 s a stopping gateway pod drains
    assert 'a request held for engine "sglang-llama-32-1b" longer than that is cut' in notes
    calm = rendered_notes(
        helm, "-f", str(helm.values_file({"engines": [sleeping("a", idleMinutes=None, wakeTimeoutSeconds=60)]}))
    )
    assert "a: to 0 pods after (never: kubectl -n llm scale deployment/a --replicas=0)" in calm
    assert "is cut" not in calm and "WARNING" not in calm
    assert "stream idle timeout" not in notes  # no HTTPRoute
    routed = {"httpRoute": {"enabled": True, "parentRefs": [{"name": "public"}]}, "engines": [sleeping("a")]}
    assert "cuts a request silent for 5 min (its stream idle timeout)" in rendered_notes(
        helm, "-f", str(helm.values_file(routed))
    )


# --- Refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"engines": [engine("a"), {"name": "r", "url": "http://h:8000", "ownedBy": "vllm", "model": "m",
                                     "scaleToZero": {"enabled": True}}]},
         'engines[1] "r": scaleToZero is only for engines the chart deploys'),
        ({"engines": [sleeping("a")], "gateway": {"discovery": {"enabled": False}}},
         'engines[0] "a": scaleToZero.enabled needs gateway.discovery.enabled'),
        ({"engines": [engine("a", scaleToZero={"enabled": True},
                             autoscaling={"enabled": True, "serverAddress": "http://p:9090"})]},
         'engines[0] "a": scaleToZero.enabled and autoscaling.enabled (KEDA) would both own'),
        ({"engineDefaults": {"autoscaling": {"enabled": True, "serverAddress": "http://p:9090"}},
          "engines": [sleeping("a")]},
         'engines[0] "a": scaleToZero.enabled and autoscaling.enabled (KEDA)'),
        ({"engines": [sleeping("a", fallbackWhileWaking=True)]},
         'engines[0] "a": scaleToZero.fallbackWhileWaking needs fallback'),
    ],
)  # fmt: skip
def test_what_cannot_work_is_refused(helm: Helm, values: dict[str, Any], fragment: str) -> None:
    message = helm.template_error(values=values)
    assert fragment in message, message
    assert "llm-gateway/templates/values/checks.yaml" in message, message


@pytest.mark.parametrize(
    ("scale_to_zero", "path"),
    [
        ({"enabled": True, "idleMinutes": 0}, "scaleToZero/idleMinutes"),
        ({"enabled": True, "wakeTimeoutSeconds": 0}, "scaleToZero/wakeTimeoutSeconds"),
        ({"enabled": True, "replicas": 0}, "scaleToZero/replicas"),
        ({"enabled": True, "maxWaiting": -1}, "scaleToZero/maxWaiting"),
        ({"enabled": True, "idleSeconds": 60}, "scaleToZero"),
    ],
)
def test_schema_refuses_nonsense(helm: Helm, scale_to_zero: dict[str, Any], path: str) -> None:
    message = helm.template_error(values={"engines": [engine("a", scaleToZero=scale_to_zero)]})
    assert SCHEMA_ERROR in message and f"/engines/0/{path}'" in message, message


# --- Upgrades --------------------------------------------------------------------------------------------


def changed_objects(before: Rendered, after: Rendered) -> set[tuple[str, str]]:
    return {
        (doc["kind"], doc["metadata"]["name"])
        for doc in before.docs + after.docs
        if doc not in before.docs or doc not in after.docs
    }


@pytest.mark.parametrize("roll", [False, True])
def test_changing_the_timings_touches_only_the_routing_map(
    helm: Helm, example_values: dict[str, Any], roll: bool
) -> None:
    before_values = copy.deepcopy(example_values)
    before_values["gateway"]["rollOnConfigChange"] = roll
    after_values = copy.deepcopy(before_values)
    after_values["engines"][1]["scaleToZero"].update(idleMinutes=45, wakeTimeoutSeconds=600, maxWaiting=10, replicas=2)
    after_values["engines"][1]["fallback"] = "vllm-llama-32-1b"
    after_values["engines"][1]["scaleToZero"]["fallbackWhileWaking"] = True
    before, after = helm.template(values=before_values), helm.template(values=after_values)
    assert routes(before)["sglang-llama-32-1b"]["wake"] != routes(after)["sglang-llama-32-1b"]["wake"]
    # the engines' Deployments are the same text, byte for byte (so neither restarted nor rescaled)
    timings_only = copy.deepcopy(after_values)
    timings_only["engines"][1]["scaleToZero"]["replicas"] = None
    assert engine_documents(helm, before_values) == engine_documents(helm, timings_only)
    expected = {("ConfigMap", f"{GATEWAY}-routes")}
    if roll:
        expected.add(("Deployment", GATEWAY))  # the checksum/config annotation, as for any routing change
    # replicas: 2 also gives the engine a PodDisruptionBudget (and may change its rollout strategy), never
    # its pod template
    assert changed_objects(before, helm.template(values=timings_only)) == expected
    old, new = pod_templates(before), pod_templates(after)
    assert new["sglang-llama-32-1b"] == old["sglang-llama-32-1b"]
    assert new["vllm-llama-32-1b"] == old["vllm-llama-32-1b"]
    assert (new[GATEWAY] == old[GATEWAY]) is not roll


def test_turning_it_on_restarts_nothing(helm: Helm, example_values: dict[str, Any]) -> None:
    """Only the Deployment's replicas go (the pods stay), plus the map, the Lease and the Role."""
    off_values = copy.deepcopy(example_values)
    del off_values["engines"][1]["scaleToZero"]
    on, off = helm.template(values=example_values), helm.template(values=off_values)
    assert pod_templates(on) == pod_templates(off)
    on_engine, off_engine = on.get("Deployment", "sglang-llama-32-1b"), off.get("Deployment", "sglang-llama-32-1b")
    assert {k: v for k, v in off_engine["spec"].items() if k != "replicas"} == on_engine["spec"]
    assert changed_objects(on, off) == {
        ("ConfigMap", f"{GATEWAY}-routes"), ("Deployment", "sglang-llama-32-1b"), ("Lease", "sglang-llama-32-1b-activity"),
        ("Role", SCALE_ROLE), ("RoleBinding", SCALE_ROLE), ("Pod", f"{GATEWAY}-test-models"),
    }  # fmt: skip


def test_helm_test_leaves_sleeping_engines_out(example: Rendered) -> None:
    (pod,) = example.of_kind("Pod")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert json.loads(env["EXPECTED"]) == [["meta-llama/Llama-3.2-1B-Instruct", "vllm"]]

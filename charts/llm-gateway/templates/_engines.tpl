{{/*
The engine list, resolved once per template: defaults applied, presets chosen, derived fields added,
and every rule that values.schema.json cannot express checked here with a message naming the engine.

Usage: {{- range (include "llm-gateway.engines" . | fromJson).engines }}

Each resolved entry keeps the user's keys and adds:
  kind         vllm | sglang | simulator | external
  deployed     true unless kind is external
  servedModel  the id clients send (servedModelName, else model) = the routing map's `model`
  owns         the routing map's owned_by
  routeUrl     where the gateway sends this engine's requests
  imageRef, pullPolicy, resolvedResources, resolvedStrategy, replicas, gpus   (deployed engines)
*/}}
{{- define "llm-gateway.engines" -}}
{{- $root := . -}}
{{- /* Keys of engineDefaults that only make sense for GPU engines; simulators never inherit them. */ -}}
{{- $gpuOnly := list "runtimeClassName" "gpuResource" "shmSize" "hfToken" "modelStorage" "podSecurityContext" "securityContext" "terminationGracePeriodSeconds" "startupTimeoutSeconds" -}}
{{- $gatewayService := include "llm-gateway.fullname" $root -}}
{{- $resolved := list -}}
{{- $nameAt := dict -}}
{{- $routeAt := dict -}}
{{- $defaultAt := dict -}}
{{- range $i, $raw := $root.Values.engines -}}
{{- $e := deepCopy $raw -}}
{{- $where := printf "engines[%d] %q" $i (toString $e.name) -}}

{{- /* Exactly one of engine / url. */ -}}
{{- if and $e.engine $e.url -}}
{{- fail (printf "%s: set either engine (the chart deploys it) or url (an engine running elsewhere), not both" $where) -}}
{{- end -}}
{{- if and (not $e.engine) (not $e.url) -}}
{{- fail (printf "%s: set engine (vllm, sglang or simulator) to deploy one, or url to route to one running elsewhere" $where) -}}
{{- end -}}
{{- $kind := $e.engine | default "external" -}}
{{- $_ := set $e "kind" $kind -}}
{{- $_ := set $e "deployed" (ne $kind "external") -}}

{{- /* Unique names: they become Deployment and Service names. */ -}}
{{- if hasKey $nameAt $e.name -}}
{{- fail (printf "%s: duplicate name, already used by engines[%v]; names become Deployment and Service names and must be unique" $where (get $nameAt $e.name)) -}}
{{- end -}}
{{- $_ := set $nameAt $e.name $i -}}
{{- if and $e.deployed (eq $e.name $gatewayService) -}}
{{- fail (printf "%s: the name is taken by the gateway's own Service; rename the engine or set fullnameOverride" $where) -}}
{{- end -}}

{{- /* owned_by: fixed by the engine kind, given by the user only for url entries. */ -}}
{{- if $e.simulate -}}
{{- if ne $kind "simulator" -}}
{{- fail (printf "%s: simulate is only for engine: simulator" $where) -}}
{{- end -}}
{{- end -}}
{{- if eq $kind "external" -}}
{{- if not $e.ownedBy -}}
{{- fail (printf "%s: a url entry needs ownedBy (the owned_by clients send to pick this engine)" $where) -}}
{{- end -}}
{{- $_ := set $e "owns" $e.ownedBy -}}
{{- $_ := set $e "routeUrl" $e.url -}}
{{- else -}}
{{- $owns := ternary ($e.simulate | default "vllm") $kind (eq $kind "simulator") -}}
{{- if $e.ownedBy -}}
{{- fail (printf "%s: ownedBy is only for url entries; a %s engine is owned_by %q" $where $kind $owns) -}}
{{- end -}}
{{- $_ := set $e "owns" $owns -}}
{{- $_ := set $e "routeUrl" (printf "http://%s.%s.svc.%s:8000" $e.name $root.Release.Namespace $root.Values.clusterDomain) -}}
{{- end -}}

{{- /* One (model, owned_by) per engine, one default per model. */ -}}
{{- $served := $e.servedModelName | default $e.model -}}
{{- $_ := set $e "servedModel" $served -}}
{{- $routeKey := printf "%s\x00%s" $served $e.owns -}}
{{- if hasKey $routeAt $routeKey -}}
{{- $other := get $routeAt $routeKey -}}
{{- fail (printf "%s: model %q with owned_by %q is already served by engines[%v]; give one a different servedModelName" $where $served $e.owns $other) -}}
{{- end -}}
{{- $_ := set $routeAt $routeKey $i -}}
{{- if $e.default -}}
{{- if hasKey $defaultAt $served -}}
{{- fail (printf "%s: model %q already has a default engine (engines[%v]); mark only one default per model" $where $served (get $defaultAt $served)) -}}
{{- end -}}
{{- $_ := set $defaultAt $served $i -}}
{{- end -}}

{{- if $e.deployed -}}
{{- /* Defaults: a key set on the engine wins whole; simulators skip the GPU-only keys. */ -}}
{{- range $key, $value := $root.Values.engineDefaults -}}
{{- if and (not (hasKey $e $key)) (or (ne $kind "simulator") (not (has $key $gpuOnly))) -}}
{{- $_ := set $e $key (deepCopy $value) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $e "replicas" (ternary $e.replicas 1 (hasKey $e "replicas") | int) -}}
{{- $_ := set $e "gpus" ($e.gpus | default 1 | int) -}}

{{- /* Image: the engine's fields over the preset's; the simulator's preset falls back to the gateway image. */ -}}
{{- $preset := get $root.Values.enginePresets $kind -}}
{{- $base := deepCopy $preset.image -}}
{{- if and (eq $kind "simulator") (not $base.repository) -}}
{{- $gw := $root.Values.gateway.image -}}
{{- $base = dict "repository" $gw.repository "tag" ($gw.tag | default $root.Chart.AppVersion) "digest" $gw.digest "pullPolicy" ($base.pullPolicy | default $gw.pullPolicy) -}}
{{- end -}}
{{- $own := $e.image | default dict -}}
{{- $img := dict -}}
{{- range $field := list "repository" "tag" "digest" "pullPolicy" -}}
{{- $_ := set $img $field (get $own $field | default (get $base $field)) -}}
{{- end -}}
{{- if and (get $own "repository") (not (get $own "tag")) (not (get $own "digest")) -}}
{{- fail (printf "%s: image.repository is set, so set image.tag (or image.digest) too" $where) -}}
{{- end -}}
{{- $_ := set $e "imageRef" (include "llm-gateway.imageRef" (dict "image" $img "what" $where)) -}}
{{- $_ := set $e "pullPolicy" ($img.pullPolicy | default "IfNotPresent") -}}

{{- /* Resources: the engine's or the preset's, whole; GPU engines always get their GPUs. */ -}}
{{- $res := deepCopy (ternary $e.resources $preset.resources (hasKey $e "resources") | default dict) -}}
{{- if ne $kind "simulator" -}}
{{- $limits := $res.limits | default dict -}}
{{- $requests := $res.requests | default dict -}}
{{- $_ := set $limits $e.gpuResource $e.gpus -}}
{{- $_ := set $requests $e.gpuResource $e.gpus -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $res "requests" $requests -}}
{{- $token := $e.hfToken | default dict -}}
{{- if and $token.existingSecret $token.value -}}
{{- fail (printf "%s: hfToken: set existingSecret or value, not both" $where) -}}
{{- end -}}
{{- $storage := $e.modelStorage | default dict -}}
{{- if and (eq (toString $storage.type) "pvc") (not $storage.claimName) -}}
{{- fail (printf "%s: modelStorage.type pvc needs modelStorage.claimName" $where) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $e "resolvedResources" $res -}}

{{- /* Strategy: the engine's or engineDefaults', else the kind's preset (GPU engines: Recreate). */ -}}
{{- $strategy := deepCopy ($e.strategy | default $preset.strategy | default dict) -}}
{{- if and (eq (toString $strategy.type) "Recreate") (not (kindIs "invalid" $strategy.rollingUpdate)) -}}
{{- fail (printf "%s: strategy type Recreate takes no rollingUpdate (Kubernetes refuses the pair); drop rollingUpdate or use type RollingUpdate" $where) -}}
{{- end -}}
{{- $_ := set $e "resolvedStrategy" $strategy -}}
{{- end -}}
{{- $resolved = append $resolved $e -}}
{{- end -}}

{{- /* A fallback names another engine of the list (the gateway refuses the map otherwise). */ -}}
{{- range $i, $e := $resolved -}}
{{- if $e.fallback -}}
{{- if not (hasKey $nameAt $e.fallback) -}}
{{- fail (printf "engines[%d] %q: fallback %q is not the name of any engine; name another entry of engines" $i $e.name $e.fallback) -}}
{{- end -}}
{{- if eq $e.fallback $e.name -}}
{{- fail (printf "engines[%d] %q: fallback names the engine itself; name another entry of engines" $i $e.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Aliases: never a model id, and one alias names one model. */ -}}
{{- $aliasOf := dict -}}
{{- range $i, $e := $resolved -}}
{{- range $alias := $e.aliases | default list -}}
{{- range $other := $resolved -}}
{{- if eq $alias $other.servedModel -}}
{{- fail (printf "engines[%d] %q: alias %q is already the model id of engine %q" $i $e.name $alias $other.name) -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $aliasOf $alias) (ne (get $aliasOf $alias) $e.servedModel) -}}
{{- fail (printf "engines[%d] %q: alias %q already names model %q; an alias names one model" $i $e.name $alias (get $aliasOf $alias)) -}}
{{- end -}}
{{- $_ := set $aliasOf $alias $e.servedModel -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "engines" $resolved) -}}
{{- end -}}

{{/*
The routing map's text. Scalars are written with toJson, which YAML reads as double-quoted strings,
so model ids like "/models/x" or "a: b" survive unchanged. Takes (dict "root" $ "engines" $list).

With discovery, a deployed engine also names its Service: the gateway watches the Service's
EndpointSlices and balances over the ready pods, and uses `url` (the Service) until the first answer
from the API and whenever no pod is ready.
*/}}
{{- define "llm-gateway.routingMap" -}}
{{- $discovery := include "llm-gateway.discovery" .root -}}
{{- $namespace := .root.Release.Namespace -}}
# Rendered by the llm-gateway Helm chart from its values; edit the values, not this ConfigMap.
{{- with .root.Values.gateway.settings }}
settings:
  {{- toYaml . | nindent 2 }}
{{- end }}
engines:
{{- range .engines }}
  - name: {{ .name | toJson }}
    model: {{ .servedModel | toJson }}
    owned_by: {{ .owns | toJson }}
    url: {{ .routeUrl | toJson }}
    {{- if and $discovery .deployed }}
    discovery: {service: {{ .name | toJson }}, namespace: {{ $namespace | toJson }}, port: 8000}
    {{- end }}
    {{- if .default }}
    default: true
    {{- end }}
    {{- with .aliases }}
    aliases: {{ toJson . }}
    {{- end }}
    {{- with .headers }}
    headers: {{ toJson . }}
    {{- end }}
    {{- with .timeouts }}
    timeouts: {{ toJson . }}
    {{- end }}
    {{- with .fallback }}
    fallback: {{ toJson . }}
    {{- end }}
    {{- with .concurrency }}
    concurrency: {{ toJson . }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
Names, labels and images shared by every template.

Label rule: object metadata carries the full set (chart version included); pod templates carry only
labels that do not change with the chart version or the list of engines, so that `helm upgrade` with
one more engine (or a new chart version with the same presets) leaves running engines untouched.
*/}}

{{- define "llm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or <release> when the release name already contains the chart name. */}}
{{- define "llm-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full labels for object metadata (never for pod templates or selectors). */}}
{{- define "llm-gateway.labels" -}}
helm.sh/chart: {{ include "llm-gateway.chart" . }}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-gateway
{{- end }}

{{/* The release's identity; stable for the life of the release. */}}
{{- define "llm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-gateway.gateway.selectorLabels" -}}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Selector of one engine's pods. Takes (dict "root" $ "engine" $e). */}}
{{- define "llm-gateway.engine.selectorLabels" -}}
{{ include "llm-gateway.selectorLabels" .root }}
app.kubernetes.io/component: engine
llm-gateway/engine: {{ .engine.name }}
{{- end }}

{{/* Selector of all engine pods of the release (NetworkPolicy, ServiceMonitor). */}}
{{- define "llm-gateway.engines.selectorLabels" -}}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{- define "llm-gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "llm-gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"true" when the gateway discovers engine pods through the Kubernetes API: gateway.discovery.enabled and
at least one deployed engine (url entries have no Service to watch). It then gets a Role on
EndpointSlices, bound to its ServiceAccount, and mounts the account's token. Empty otherwise.
*/}}
{{- define "llm-gateway.discovery" -}}
{{- $deployed := false -}}
{{- range (include "llm-gateway.engines" . | fromJson).engines }}{{ if .deployed }}{{ $deployed = true }}{{ end }}{{ end -}}
{{- if and .Values.gateway.discovery.enabled $deployed -}}
{{- if eq (include "llm-gateway.serviceAccountName" .) "default" -}}
{{- fail "gateway.discovery.enabled: the gateway would read EndpointSlices as the namespace's \"default\" ServiceAccount, and every pod using that account would gain the right too; set gateway.serviceAccount.create: true, name an account of the gateway's own in gateway.serviceAccount.name, or set gateway.discovery.enabled: false" -}}
{{- end -}}
true
{{- end -}}
{{- end }}

{{- define "llm-gateway.discoveryRoleName" -}}
{{- printf "%s-discovery" (include "llm-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-gateway.routesConfigMapName" -}}
{{- printf "%s-routes" (include "llm-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Where the gateway pods mount the per-engine keys (engines[].apiKeySecret): <dir>/<engine name>/api-key.
*/}}
{{- define "llm-gateway.engineKeysDir" -}}
/var/run/secrets/llm-gateway/engine-keys
{{- end }}

{{/*
An image reference from {repository, tag, digest}; refuses a missing tag or "latest" (a moving tag
makes rollouts irreproducible and defeats IfNotPresent). Takes (dict "image" $img "what" "gateway").
*/}}
{{- define "llm-gateway.imageRef" -}}
{{- $img := .image -}}
{{- if not $img.repository }}
{{- fail (printf "%s: image.repository is empty" .what) }}
{{- end }}
{{- if eq (toString $img.tag) "latest" }}
{{- fail (printf "%s: image %s:latest is not allowed; pin a version" .what $img.repository) }}
{{- end }}
{{- if and (not $img.tag) (not $img.digest) }}
{{- fail (printf "%s: image %s needs a tag or a digest" .what $img.repository) }}
{{- end }}
{{- $img.repository }}{{ if $img.tag }}:{{ $img.tag }}{{ end }}{{ if $img.digest }}@{{ $img.digest }}{{ end }}
{{- end }}

{{/* The gateway image; its tag defaults to the chart's appVersion. */}}
{{- define "llm-gateway.gateway.image" -}}
{{- $img := .Values.gateway.image -}}
{{- $tag := $img.tag | default .Chart.AppVersion -}}
{{- include "llm-gateway.imageRef" (dict "image" (dict "repository" $img.repository "tag" $tag "digest" $img.digest) "what" "gateway") }}
{{- end }}

{{/*
The gateway's request body limit: gateway.settings.max_body_bytes, else the gateway's own default
(gateway_app/config.py Settings.max_body_bytes, 16 MiB; tests/chart checks that the two agree).
*/}}
{{- define "llm-gateway.maxBodyBytes" -}}
{{- $settings := .Values.gateway.settings | default dict -}}
{{- $settings.max_body_bytes | default 16777216 | int64 -}}
{{- end }}

{{/*
The gateway's budget for request bodies held at once: gateway.settings.client_limits.max_body_memory,
else the gateway's own default (gateway_app/config.py ClientLimits.max_body_memory, 128 MiB; tests/chart
checks that the two agree).
*/}}
{{- define "llm-gateway.maxBodyMemory" -}}
{{- $limits := (.Values.gateway.settings | default dict).client_limits | default dict -}}
{{- $limits.max_body_memory | default 134217728 | int64 -}}
{{- end }}

{{/* maxBodyBytes as an nginx size (client_max_body_size): whole MiB as "m", whole KiB as "k", else bytes. */}}
{{- define "llm-gateway.nginxBodySize" -}}
{{- $bytes := include "llm-gateway.maxBodyBytes" . | int64 -}}
{{- if eq (mod $bytes 1048576) 0 -}}
{{- printf "%dm" (div $bytes 1048576) -}}
{{- else if eq (mod $bytes 1024) 0 -}}
{{- printf "%dk" (div $bytes 1024) -}}
{{- else -}}
{{- printf "%d" $bytes -}}
{{- end -}}
{{- end }}

{{/*
The Ingress's nginx read and send timeouts (seconds, as a string): 3600, so that a non-streaming answer
that arrives only after a long generation is not cut, or more when a request held while a scaleToZero
engine wakes can be silent longer (its wake timeout plus its first-byte timeout, see _engines.tpl).
*/}}
{{- define "llm-gateway.ingressTimeoutSeconds" -}}
{{- $seconds := 3600 -}}
{{- range (include "llm-gateway.engines" . | fromJson).engines -}}
{{- with .wake }}{{ $seconds = max $seconds (.readTimeout | int) }}{{ end -}}
{{- end -}}
{{- $seconds | toString -}}
{{- end }}

{{/* The engines the gateway scales to zero (scaleToZero.enabled): their resolved entries. */}}
{{- define "llm-gateway.sleepingEngines" -}}
{{- $found := list -}}
{{- range (include "llm-gateway.engines" . | fromJson).engines }}{{ if .wake }}{{ $found = append $found . }}{{ end }}{{ end -}}
{{- toJson (dict "engines" $found) -}}
{{- end }}

{{/* One field of the wake blocks of some engines, as a JSON list. Takes (dict "engines" $list "field" "lease"). */}}
{{- define "llm-gateway.wakeField" -}}
{{- $values := list -}}
{{- range .engines }}{{ $values = append $values (get .wake $.field) }}{{ end -}}
{{- toJson $values -}}
{{- end }}

{{- define "llm-gateway.scaleRoleName" -}}
{{- printf "%s-scale-to-zero" (include "llm-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-gateway.redis.selectorLabels" -}}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{/*
Merge the map .src into the map .dst in place: maps merge key by key, a null in .src removes the key,
anything else from .src replaces .dst's (lists whole). Unlike sprig's mergeOverwrite, an empty value
("", false, 0) from .src wins too. Takes (dict "dst" $map "src" $map); renders nothing.
*/}}
{{- define "llm-gateway.mergeInto" -}}
{{- $dst := .dst -}}
{{- range $key, $value := .src -}}
{{- if kindIs "invalid" $value -}}
{{- $_ := unset $dst $key -}}
{{- else if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) -}}
{{- include "llm-gateway.mergeInto" (dict "dst" (get $dst $key) "src" $value) -}}
{{- else -}}
{{- $_ := set $dst $key (deepCopy $value) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
A Kubernetes quantity times a whole number, in the quantity's own unit: "8Gi" x 4 = "32Gi", "500m" x 2 =
"1000m", "1.5" x 2 = "3". Takes (dict "quantity" "8Gi" "by" 4).
*/}}
{{- define "llm-gateway.scaleQuantity" -}}
{{- $text := toString .quantity -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text -}}
{{- $unit := trimPrefix $number $text -}}
{{- if contains "." $number -}}
{{- printf "%v%s" (mulf (float64 $number) .by) $unit -}}
{{- else -}}
{{- printf "%d%s" (mul (int64 $number) .by) $unit -}}
{{- end -}}
{{- end }}

{{/* The PersistentVolumeClaim for model weights that the chart creates (persistence.enabled). */}}
{{- define "llm-gateway.modelsClaimName" -}}
{{- printf "%s-models" (include "llm-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Refuses a PodDisruptionBudget that allows no eviction at all: minAvailable of at least the fewest pods
there are (or 100%), or maxUnavailable 0 (or 0%). Every node drain would then wait forever. Takes
(dict "budget" {minAvailable, maxUnavailable} "fewest" 2 "pods" "gateway.replicas (2)" "what" "gateway.podDisruptionBudget").
*/}}
{{- define "llm-gateway.checkDisruptionBudget" -}}
{{- $min := .budget.minAvailable -}}
{{- $hint := "a node drain could never evict a pod and would wait forever; set minAvailable below it, or use maxUnavailable: 1 (and minAvailable: null)" -}}
{{- if not (kindIs "invalid" $min) -}}
{{- if kindIs "string" $min -}}
{{- if ge (trimSuffix "%" $min | int) 100 -}}
{{- fail (printf "%s.minAvailable %q keeps every pod: %s" .what $min $hint) -}}
{{- end -}}
{{- else if ge ($min | int) (.fewest | int) -}}
{{- fail (printf "%s.minAvailable (%v) is at least %s: %s" .what $min .pods $hint) -}}
{{- end -}}
{{- else if eq (trimSuffix "%" (toString .budget.maxUnavailable)) "0" -}}
{{- fail (printf "%s.maxUnavailable %v lets no pod go: a node drain would wait forever; set it to 1 or more" .what .budget.maxUnavailable) -}}
{{- end -}}
{{- end }}

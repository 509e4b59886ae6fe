{{/*
API keys, the engine credential and the rate-limit store, resolved once per template and checked here
with a message naming the value at fault (like the engine list in _engines.tpl).

Usage: {{- $auth := include "llm-gateway.auth" . | fromJson }}

  keys.enabled          API keys are on
  keys.secretName       the Secret holding the keys file; keys.secretKey: its item
  keys.create           the chart writes that Secret from auth.keys
  keys.file             where the gateway reads it (--keys-file)
  engineKey.*           the same for the engine credential (--engine-api-key-file, engines' --api-key)
  redis.url             where the counters live; "" = each gateway pod's memory
  redis.deploy          the chart runs Redis as redis.name
  redis.passwordSecret  the Secret holding the Redis password ("" = none); redis.passwordKey: its item
  redis.createSecret    the chart writes that Secret from redis.password
  limitsSet             per-key rate limits are configured in the values (defaults or an inline key)
*/}}
{{- define "llm-gateway.auth" -}}
{{- $root := . -}}
{{- $fullname := include "llm-gateway.fullname" $root -}}
{{- $secretsDir := "/var/run/secrets/llm-gateway" -}}

{{- /* API keys: on only when asked, so that listing keys never silently leaves the gateway open. */ -}}
{{- $auth := $root.Values.auth | default dict -}}
{{- $inline := $auth.keys | default list -}}
{{- if and (not $auth.enabled) (or $inline $auth.existingSecret) -}}
{{- fail "auth: keys or existingSecret are set but auth.enabled is false, so the gateway would be open; set auth.enabled: true (or remove them)" -}}
{{- end -}}
{{- if and $inline $auth.existingSecret -}}
{{- fail "auth: set keys or existingSecret, not both" -}}
{{- end -}}
{{- $keys := dict "enabled" ($auth.enabled | default false) "create" false -}}
{{- $limitsSet := false -}}
{{- if $auth.enabled -}}
{{- /* The item holding the keys file: in existingSecret, or in the Secret the chart writes from keys. */ -}}
{{- $secretKey := $auth.key | default "keys.yaml" -}}
{{- $_ := set $keys "secretName" ($auth.existingSecret | default (printf "%s-api-keys" $fullname | trunc 63 | trimSuffix "-")) -}}
{{- $_ := set $keys "secretKey" $secretKey -}}
{{- $_ := set $keys "create" (empty $auth.existingSecret) -}}
{{- $_ := set $keys "file" (printf "%s/api-keys/%s" $secretsDir $secretKey) -}}
{{- $_ := set $keys "count" (len $inline) -}}
{{- /* The gateway refuses a keys file with a repeated name or key; refuse it here, before any pod. */ -}}
{{- $known := dict -}}
{{- $served := dict -}}
{{- range (include "llm-gateway.engines" $root | fromJson).engines -}}
{{- $_ := set $known .servedModel true -}}
{{- $_ := set $served .servedModel true -}}
{{- range .aliases | default list }}{{ $_ := set $known . true }}{{ end -}}
{{- $_ := set $known (printf "%s:*" .servedModel) true -}}
{{- $model := .servedModel -}}
{{- range .adapterNames | default list }}{{ $_ := set $known . true }}{{ $_ := set $known (printf "%s:%s" $model .) true }}{{ end -}}
{{- end -}}
{{- /* Adapters loaded at run time are known only then: with discovery, any name may become one. */ -}}
{{- $discoverAdapters := (($root.Values.gateway.settings | default dict).discover_adapters) | default false -}}
{{- $nameAt := dict -}}
{{- $hashAt := dict -}}
{{- range $i, $k := $inline -}}
{{- $where := printf "auth.keys[%d] %q" $i (toString $k.name) -}}
{{- if hasKey $nameAt $k.name -}}
{{- fail (printf "%s: duplicate name, already used by auth.keys[%v]; names identify clients in logs and metrics" $where (get $nameAt $k.name)) -}}
{{- end -}}
{{- $_ := set $nameAt $k.name $i -}}
{{- $hash := lower $k.sha256 -}}
{{- if hasKey $hashAt $hash -}}
{{- fail (printf "%s: the same key (sha256) is already auth.keys[%v]; give every client its own key" $where (get $hashAt $hash)) -}}
{{- end -}}
{{- $_ := set $hashAt $hash $i -}}
{{- range $k.models | default list -}}
{{- /* With discovery a bare name may be an adapter loaded later; `<model>:*` and `<model>:<adapter>`
       still name a model of the map. */ -}}
{{- $base := "" -}}
{{- if contains ":" . }}{{ $base = regexReplaceAll ":[^:]*$" . "" }}{{ end -}}
{{- if and (not (hasKey $known .)) (or (not $discoverAdapters) (and (contains ":" .) (not (hasKey $served $base)))) -}}
{{- fail (printf "%s: model %q is neither a model id nor an alias of any engine (nor one of their LoRA adapters, nor <model>:*); the key could never use it" $where .) -}}
{{- end -}}
{{- end -}}
{{- if or (not (kindIs "invalid" $k.requests_per_minute)) (not (kindIs "invalid" $k.tokens_per_minute)) -}}
{{- $limitsSet = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $settingsLimits := (($root.Values.gateway.settings | default dict).limits) | default dict -}}
{{- if or (not (kindIs "invalid" $settingsLimits.requests_per_minute)) (not (kindIs "invalid" $settingsLimits.tokens_per_minute)) -}}
{{- $limitsSet = true -}}
{{- end -}}

{{- /* The engine credential. */ -}}
{{- $ek := $root.Values.engineApiKey | default dict -}}
{{- if and $ek.existingSecret $ek.value -}}
{{- fail "engineApiKey: set existingSecret or value, not both" -}}
{{- end -}}
{{- $engineKey := dict "enabled" (not (and (empty $ek.existingSecret) (empty $ek.value))) "create" (not (empty $ek.value)) -}}
{{- if $engineKey.enabled -}}
{{- $item := $ek.key | default "api-key" -}}
{{- $_ := set $engineKey "secretName" ($ek.existingSecret | default (printf "%s-engine-api-key" $fullname | trunc 63 | trimSuffix "-")) -}}
{{- $_ := set $engineKey "secretKey" $item -}}
{{- $_ := set $engineKey "file" (printf "%s/engine-api-key/%s" $secretsDir $item) -}}
{{- end -}}

{{- /* The rate-limit store: the user's Redis, the chart's, or none. */ -}}
{{- $r := $root.Values.redis | default dict -}}
{{- if and $r.url $r.deploy -}}
{{- fail "redis: set url (your Redis) or deploy: true (the chart's), not both" -}}
{{- end -}}
{{- if and $r.existingSecret $r.password -}}
{{- fail "redis: set existingSecret or password, not both" -}}
{{- end -}}
{{- if and (or $r.existingSecret $r.password) (not (or $r.url $r.deploy)) -}}
{{- fail "redis: a password is set but there is no Redis; set redis.url or redis.deploy: true" -}}
{{- end -}}
{{- $redisName := printf "%s-redis" $fullname | trunc 63 | trimSuffix "-" -}}
{{- $redis := dict "deploy" ($r.deploy | default false) "name" $redisName "url" ($r.url | default "") "passwordSecret" "" "passwordKey" "" "createSecret" false -}}
{{- if $r.deploy -}}
{{- $_ := set $redis "url" (printf "redis://%s.%s.svc.%s:6379/0" $redisName $root.Release.Namespace $root.Values.clusterDomain) -}}
{{- end -}}
{{- if $r.existingSecret -}}
{{- $_ := set $redis "passwordSecret" $r.existingSecret -}}
{{- $_ := set $redis "passwordKey" ($r.passwordKey | default "password") -}}
{{- else if $r.password -}}
{{- $_ := set $redis "passwordSecret" $redisName -}}
{{- $_ := set $redis "passwordKey" ($r.passwordKey | default "password") -}}
{{- $_ := set $redis "createSecret" true -}}
{{- end -}}

{{- toJson (dict "keys" $keys "engineKey" $engineKey "redis" $redis "limitsSet" $limitsSet) -}}
{{- end -}}

{{/*
The engine list, resolved once per template: defaults applied, presets chosen, derived fields added,
and every rule that values.schema.json cannot express checked here with a message naming the engine.

Usage: {{- range (include "llm-gateway.engines" . | fromJson).engines }}

Each resolved entry keeps the user's keys and adds:
  kind         vllm | sglang | simulator | external
  deployed     true unless kind is external
  servedModel  the id clients send (servedModelName, else model) = the routing map's `model`
  owns         the routing map's owned_by
  routeUrl     where the gateway sends this engine's requests (for NOTES: urls joined, or baseUrl)
  apiKeyFile   external engines with apiKeySecret: where the gateway pods mount that key
  imageRef, pullPolicy, resolvedResources, resolvedStrategy, replicas, gpus   (deployed engines)
  scalesToZero  scaleToZero.enabled (deployed engines only)
  wake          with scalesToZero: the routing map's `wake:` block (replicas is then the count a wake
                scales to), plus `readTimeout`, the longest a held request can be silent (see ingress.yaml)
*/}}
{{- define "llm-gateway.engines" -}}
{{- $root := . -}}
{{- if not (kindIs "map" $root.Values.engineDefaults) -}}
{{- fail "engineDefaults: must be a map (null removes the chart's defaults that every engine is built from; to change one, set that key)" -}}
{{- end -}}
{{- /* Keys of engineDefaults that only make sense for GPU engines; simulators never inherit them (a
       simulator needs no GPU node, so the GPU nodes' nodeSelector, tolerations and affinity stay off it). */ -}}
{{- $gpuOnly := list "runtimeClassName" "gpuResource" "shmSize" "hfToken" "modelStorage" "podSecurityContext" "securityContext" "terminationGracePeriodSeconds" "startupTimeoutSeconds" "nodeSelector" "tolerations" "affinity" "extraVolumes" "extraVolumeMounts" "initContainers" "envFrom" "probes" -}}
{{- /* Keys only a deployed engine's objects read (its pod, PodDisruptionBudget, ScaledObject, wake), refused on
       url/urls/baseUrl entries: the per-engine keys of the pod, and every key engineDefaults may hold. */ -}}
{{- $deployedOnly := list "replicas" "gpus" "image" "extraArgs" "env" "resources" "runtimeClassName" "gpuResource" "shmSize" "hfToken" "modelStorage" "strategy" "nodeSelector" "tolerations" "affinity" "podSecurityContext" "securityContext" "terminationGracePeriodSeconds" "startupTimeoutSeconds" "topologySpreadConstraints" "priorityClassName" "serviceAccountName" "podAnnotations" "podLabels" "extraVolumes" "extraVolumeMounts" "initContainers" "envFrom" "probes" "podDisruptionBudget" "autoscaling" "scaleToZero" -}}
{{- /* Keys only a GPU engine's pod reads, refused on a simulator entry (the others of $gpuOnly apply to a
       simulator that sets them itself: scheduling, security contexts, volumes, probes, grace period). */ -}}
{{- $gpuEngineOnly := list "gpus" "runtimeClassName" "gpuResource" "shmSize" "hfToken" "modelStorage" "startupTimeoutSeconds" -}}
{{- /* engineDefaults keys merged with the engine's rather than replaced (see below). */ -}}
{{- $mergedMaps := list "hfToken" "modelStorage" "nodeSelector" "podAnnotations" "podLabels" "podSecurityContext" "securityContext" "probes" "podDisruptionBudget" "autoscaling" "scaleToZero" -}}
{{- $namedLists := dict "extraVolumes" "name" "extraVolumeMounts" "mountPath" "initContainers" "name" -}}
{{- /* Flags the chart passes, and the value to set instead. */ -}}
{{- $servedName := "set servedModelName instead: the gateway routes by the name the chart passes, and an engine serving another name answers 404" -}}
{{- $listen := "remove it: the chart makes the engine listen on 0.0.0.0:8000, where its Service and probes point" -}}
{{- $parallel := "set gpus instead: the chart passes the tensor-parallel size from gpus and requests that many GPUs for the pod" -}}
{{- $model := "set model instead" -}}
{{- /* `llm-gateway simulate`'s own flags that values may set (the chart sets --engine, --model, --host, --port and
       --api-key; tests/chart keeps this list equal to the command's). */ -}}
{{- $simulatorFlags := list "--timing" "--ttft-ms" "--itl-ms" "--prefill-tokens-per-s" "--decode-ms" "--decode-ms-per-running" "--max-running" "--cache-blocks" "--block-tokens" "--lora-modules" "--allow-runtime-lora-updating" "--log-level" -}}
{{- $chartFlags := dict "--served-model-name" $servedName "--port" $listen "--host" $listen "--tensor-parallel-size" $parallel "-tp" $parallel "--tp" $parallel "--tp-size" $parallel "--api-key" "set engineApiKey instead: the gateway must send the key the engines check" "--model" $model "--model-path" $model "--engine" "set simulate instead" -}}
{{- $gatewayService := include "llm-gateway.fullname" $root -}}
{{- $resolved := list -}}
{{- $nameAt := dict -}}
{{- $routeAt := dict -}}
{{- $defaultAt := dict -}}
{{- range $i, $raw := $root.Values.engines -}}
{{- $e := deepCopy $raw -}}
{{- $where := printf "engines[%d] %q" $i (toString $e.name) -}}

{{- /* Exactly one of engine / url / urls / baseUrl; the external engines' own keys only on them. */ -}}
{{- if and $e.engine (or $e.url $e.urls $e.baseUrl) -}}
{{- fail (printf "%s: set either engine (the chart deploys it) or url, urls or baseUrl (an engine running elsewhere), not both" $where) -}}
{{- end -}}
{{- if and (not $e.engine) (not (or $e.url $e.urls $e.baseUrl)) -}}
{{- fail (printf "%s: set engine (vllm, sglang or simulator) to deploy one, or url, urls or baseUrl to route to one running elsewhere" $where) -}}
{{- end -}}
{{- if and $e.urls $e.url -}}
{{- fail (printf "%s: set url (one replica) or urls (several), not both" $where) -}}
{{- end -}}
{{- if and $e.baseUrl (or $e.url $e.urls) -}}
{{- fail (printf "%s: set baseUrl (an OpenAI-compatible base URL, e.g. https://api.groq.com/openai/v1) or url/urls (an engine's root, where /health and /v1/... live), not both" $where) -}}
{{- end -}}
{{- if and $e.engine $e.apiKeySecret -}}
{{- fail (printf "%s: apiKeySecret is only for url, urls and baseUrl entries; a deployed engine checks the shared engineApiKey, which the gateway sends to it" $where) -}}
{{- end -}}
{{- /* A credential in headers would land in plain text in the routing ConfigMap (and the gateway refuses it). */ -}}
{{- range $header, $_ := $e.headers | default dict -}}
{{- if has (lower $header) (list "authorization" "x-api-key") -}}
{{- fail (printf "%s: headers: %s would be written in plain text into the routing ConfigMap; give the key with apiKeySecret (a Secret) instead" $where $header) -}}
{{- end -}}
{{- end -}}
{{- if and (not $e.engine) ($e.scaleToZero | default dict).enabled -}}
{{- fail (printf "%s: scaleToZero is only for engines the chart deploys (engine: vllm, sglang or simulator); the gateway cannot scale an engine running elsewhere (url, urls, baseUrl)" $where) -}}
{{- end -}}
{{- $kind := $e.engine | default "external" -}}
{{- $_ := set $e "kind" $kind -}}
{{- $_ := set $e "deployed" (ne $kind "external") -}}
{{- /* api: the engine's own API where vLLM and SGLang differ; deployed engines take it from their kind. */ -}}
{{- if and $e.api $e.deployed -}}
{{- fail (printf "%s: api is only for url and urls entries; a %s engine's API follows from its kind" $where $kind) -}}
{{- end -}}
{{- if and $e.api $e.baseUrl -}}
{{- fail (printf "%s: api is for url and urls entries; a baseUrl provider speaks the OpenAI API" $where) -}}
{{- end -}}
{{- $_ := set $e "engineApi" (ternary ($e.simulate | default "vllm") ($e.api | default (ternary $kind "" (has $kind (list "vllm" "sglang")))) (eq $kind "simulator")) -}}
{{- /* Keys that nothing would read for this kind of entry are refused, never dropped: the pod keys on an
       entry running elsewhere, the GPU keys on a simulator (set on the entry itself; engineDefaults' stay
       off simulators by design). A null is an unset key, and a feature turned off ({enabled: false}) on an
       entry running elsewhere asks for nothing. */ -}}
{{- $lora := $e.lora | default dict -}}
{{- if eq $kind "external" -}}
{{- range $key := $deployedOnly -}}
{{- $value := index $e $key | default dict -}}
{{- $off := and (kindIs "map" $value) (hasKey $value "enabled") (eq (toString $value.enabled) "false") -}}
{{- if and (hasKey $e $key) (not (kindIs "invalid" (index $e $key))) (not $off) -}}
{{- fail (printf "%s: %s is only for engines the chart deploys (engine: vllm, sglang or simulator); an entry with url, urls or baseUrl runs elsewhere and the chart would ignore it, remove it" $where $key) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "maxLoras" "maxLoraRank" "targetModules" "runtimeUpdates" -}}
{{- if and (hasKey $lora $key) (not (kindIs "invalid" (index $lora $key))) -}}
{{- fail (printf "%s: lora.%s is a flag of an engine the chart starts; an entry with url, urls or baseUrl is started elsewhere (set it there), remove it" $where $key) -}}
{{- end -}}
{{- end -}}
{{- range $j, $adapter := $lora.adapters | default list -}}
{{- if $adapter.path -}}
{{- fail (printf "%s: lora.adapters[%d] %q: path is for engines the chart starts; an entry with url, urls or baseUrl lists its adapters by name only, remove path" $where $j $adapter.name) -}}
{{- end -}}
{{- end -}}
{{- else if eq $kind "simulator" -}}
{{- /* A GPU key at the value a GPU engine of this release gets anyway (engineDefaults', merged as for a GPU
       engine; gpus: 1) asks for nothing a simulator drops, so values written for GPU engines may keep it when
       switched to simulators; the simulator renders as without it. Any other value is refused. */ -}}
{{- range $key := $gpuEngineOnly -}}
{{- $own := index $e $key -}}
{{- if and (hasKey $e $key) (not (kindIs "invalid" $own)) -}}
{{- $anyway := ternary 1 (index $root.Values.engineDefaults $key) (eq $key "gpus") -}}
{{- $asGpuEngine := dict "value" $own -}}
{{- if and (has $key $mergedMaps) (kindIs "map" $anyway) (kindIs "map" $own) -}}
{{- include "llm-gateway.overDefault" (dict "key" $key "default" $anyway "own" $own "into" $asGpuEngine) -}}
{{- end -}}
{{- if ne (toJson $asGpuEngine.value) (toJson $anyway) -}}
{{- fail (printf "%s: %s is for GPU engines (vllm, sglang); a simulator would ignore it, remove it (a simulator accepts only what GPU engines get anyway: %s)" $where $key (ternary "gpus 1" (printf "engineDefaults.%s" $key) (eq $key "gpus"))) -}}
{{- end -}}
{{- $_ := unset $e $key -}}
{{- end -}}
{{- end -}}
{{- range $key := list "maxLoras" "maxLoraRank" -}}
{{- if and (hasKey $lora $key) (not (kindIs "invalid" (index $lora $key))) -}}
{{- fail (printf "%s: lora.%s sizes a GPU engine's LoRA memory; a simulator would ignore it, remove it" $where $key) -}}
{{- end -}}
{{- end -}}
{{- else if and (eq $kind "sglang") (eq (toString (get $lora "runtimeUpdates")) "false") -}}
{{- fail (printf "%s: lora.runtimeUpdates: false cannot be honoured: SGLang started with --enable-lora always serves /load_lora_adapter and /unload_lora_adapter; remove it (API keys without admin cannot call them through the gateway)" $where) -}}
{{- end -}}
{{- /* LoRA adapters: unique names; a deployed engine needs each adapter's path for its flags. */ -}}
{{- $adapterNames := list -}}
{{- range $j, $adapter := $lora.adapters | default list -}}
{{- if has $adapter.name $adapterNames -}}
{{- fail (printf "%s: lora.adapters[%d]: the adapter %q is listed twice" $where $j $adapter.name) -}}
{{- end -}}
{{- if and $e.deployed (not $adapter.path) -}}
{{- fail (printf "%s: lora.adapters[%d] %q: set path (a path inside the pod or a Hugging Face repo id); the engine loads it at start" $where $j $adapter.name) -}}
{{- end -}}
{{- $adapterNames = append $adapterNames $adapter.name -}}
{{- end -}}
{{- $_ := set $e "adapterNames" $adapterNames -}}
{{- if and $lora.targetModules (ne $kind "sglang") -}}
{{- fail (printf "%s: lora.targetModules is SGLang's --lora-target-modules; a %s engine reads the modules from each adapter, remove it" $where $kind) -}}
{{- end -}}
{{- /* SGLang sizes its LoRA memory at start: from the adapters listed, else from both of these. */ -}}
{{- if and (eq $kind "sglang") $e.lora (not $adapterNames) (not (and $lora.maxLoraRank $lora.targetModules)) -}}
{{- fail (printf "%s: lora: SGLang started without adapters needs both lora.maxLoraRank and lora.targetModules (--max-lora-rank, --lora-target-modules, e.g. [all]) to size its LoRA memory; it refuses to start otherwise" $where) -}}
{{- end -}}
{{- if and $e.baseUrl $adapterNames -}}
{{- fail (printf "%s: lora is not for baseUrl entries: a provider lists its fine-tunes as models, route them as entries of their own" $where) -}}
{{- end -}}

{{- /* Unique names: they become Deployment and Service names. */ -}}
{{- if hasKey $nameAt $e.name -}}
{{- fail (printf "%s: duplicate name, already used by engines[%v]; names become Deployment and Service names and must be unique" $where (get $nameAt $e.name)) -}}
{{- end -}}
{{- $_ := set $nameAt $e.name $i -}}
{{- if and $e.deployed (eq $e.name $gatewayService) -}}
{{- fail (printf "%s: the name is taken by the gateway's own Service; rename the engine or set fullnameOverride" $where) -}}
{{- end -}}

{{- /* owned_by: fixed by the engine kind, given by the user only for url/urls/baseUrl entries. */ -}}
{{- if $e.simulate -}}
{{- if ne $kind "simulator" -}}
{{- fail (printf "%s: simulate is only for engine: simulator" $where) -}}
{{- end -}}
{{- end -}}
{{- if eq $kind "external" -}}
{{- if not $e.ownedBy -}}
{{- fail (printf "%s: an entry with url, urls or baseUrl needs ownedBy (the owned_by clients send to pick this engine)" $where) -}}
{{- end -}}
{{- $_ := set $e "owns" $e.ownedBy -}}
{{- $_ := set $e "routeUrl" ($e.url | default $e.baseUrl | default (join ", " ($e.urls | default list))) -}}
{{- with $e.apiKeySecret -}}
{{- $_ := set $e "apiKeyFile" (printf "%s/%s/api-key" (include "llm-gateway.engineKeysDir" $root) $e.name) -}}
{{- end -}}
{{- else -}}
{{- $owns := ternary ($e.simulate | default "vllm") $kind (eq $kind "simulator") -}}
{{- if $e.ownedBy -}}
{{- fail (printf "%s: ownedBy is only for url, urls and baseUrl entries; a %s engine is owned_by %q" $where $kind $owns) -}}
{{- end -}}
{{- $_ := set $e "owns" $owns -}}
{{- $_ := set $e "routeUrl" (printf "http://%s.%s.svc.%s:8000" $e.name $root.Release.Namespace $root.Values.clusterDomain) -}}
{{- end -}}

{{- /* One (model, owned_by) per engine, one default per model. */ -}}
{{- $served := $e.servedModelName | default $e.model -}}
{{- $_ := set $e "servedModel" $served -}}
{{- $discoverAdapters := (($root.Values.gateway.settings | default dict).discover_adapters) | default false -}}
{{- if and (eq $e.engineApi "sglang") (contains ":" $served) (or $adapterNames $discoverAdapters) -}}
{{- fail (printf "%s: model %q contains ':', and SGLang reads <base>:<adapter> up to the first ':', so its LoRA adapters cannot be named; set servedModelName to a name without ':'" $where $served) -}}
{{- end -}}
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
{{- $gpu := ne $kind "simulator" -}}
{{- /* Defaults. Maps merge key by key (the engine's key wins, null drops the default's); lists of named
       items merge by name (by mountPath for mounts); envFrom adds to the default's; any other key set on
       the engine replaces the default's. Simulators skip the GPU-only keys. */ -}}
{{- range $key, $value := $root.Values.engineDefaults -}}
{{- if or $gpu (not (has $key $gpuOnly)) -}}
{{- if not (hasKey $e $key) -}}
{{- $_ := set $e $key (deepCopy $value) -}}
{{- else if and (has $key $mergedMaps) (kindIs "map" $value) (kindIs "map" (get $e $key)) -}}
{{- $merged := dict -}}
{{- include "llm-gateway.overDefault" (dict "key" $key "default" $value "own" (get $e $key) "into" $merged) -}}
{{- $_ := set $e $key $merged.value -}}
{{- else if and (hasKey $namedLists $key) (kindIs "slice" $value) (kindIs "slice" (get $e $key)) -}}
{{- $field := get $namedLists $key -}}
{{- $ownNames := list -}}
{{- range get $e $key }}{{ $ownNames = append $ownNames (get . $field) }}{{ end -}}
{{- $merged := list -}}
{{- range $value }}{{ if not (has (get . $field) $ownNames) }}{{ $merged = append $merged (deepCopy .) }}{{ end }}{{ end -}}
{{- $_ := set $e $key (concat $merged (get $e $key)) -}}
{{- else if and (eq $key "envFrom") (kindIs "slice" $value) (kindIs "slice" (get $e $key)) -}}
{{- $_ := set $e $key (concat (deepCopy $value) (get $e $key)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $autoscaling := $e.autoscaling | default dict -}}
{{- $_ := set $e "scaledByKeda" (and $autoscaling.enabled true) -}}
{{- $_ := set $e "replicas" (ternary $e.replicas 1 (hasKey $e "replicas") | int) -}}
{{- $_ := set $e "gpus" ($e.gpus | default 1 | int) -}}

{{- /* Scale to zero: the gateway scales the Deployment up when a request comes and no pod is ready, and
       to zero after idleMinutes without requests. It sees the engine wake through the EndpointSlices,
       and it alone owns the replica count (the Deployment renders none, KEDA must not own it too). */ -}}
{{- $sleep := $e.scaleToZero | default dict -}}
{{- $_ := set $e "scalesToZero" (and $sleep.enabled true) -}}
{{- if $e.scalesToZero -}}
{{- if not $root.Values.gateway.discovery.enabled -}}
{{- fail (printf "%s: scaleToZero.enabled needs gateway.discovery.enabled: the gateway sees the engine wake up through its Service's EndpointSlices" $where) -}}
{{- end -}}
{{- if $e.scaledByKeda -}}
{{- fail (printf "%s: scaleToZero.enabled and autoscaling.enabled (KEDA) would both own the Deployment's replica count; enable one of them" $where) -}}
{{- end -}}
{{- if and $sleep.fallbackWhileWaking (not $e.fallback) -}}
{{- fail (printf "%s: scaleToZero.fallbackWhileWaking needs fallback, the engine that serves while this one wakes up" $where) -}}
{{- end -}}
{{- /* A wake scales to scaleToZero.replicas, else to the engine's own replicas (at least 1). */ -}}
{{- $wakeReplicas := ternary ($sleep.replicas | int) (max $e.replicas 1 | int) (not (kindIs "invalid" $sleep.replicas)) -}}
{{- $_ := set $e "replicas" $wakeReplicas -}}
{{- $timeout := ternary ($sleep.wakeTimeoutSeconds | int) 900 (hasKey $sleep "wakeTimeoutSeconds") -}}
{{- $idleAfter := ternary (mul ($sleep.idleMinutes | int) 60) nil (hasKey $sleep "idleMinutes") -}}
{{- /* The longest a held request is silent before its first byte: the wake, then the engine's first-byte
       timeout (its own, else gateway.settings', else the gateway's default of 600 s; no limit counts as
       3600, the Ingress's default read timeout). ingress.yaml keeps nginx's timeouts above it. */ -}}
{{- $firstByte := 600 -}}
{{- $mapTimeouts := ($root.Values.gateway.settings | default dict).timeouts | default dict -}}
{{- if hasKey $mapTimeouts "first_byte" -}}
{{- $firstByte = ternary 3600 ($mapTimeouts.first_byte | default 0 | ceil | int) (kindIs "invalid" $mapTimeouts.first_byte) -}}
{{- end -}}
{{- /* An engine's own null keeps the map-wide value (gateway_app/config.py TimeoutOverrides). */ -}}
{{- with ($e.timeouts | default dict).first_byte -}}
{{- $firstByte = . | ceil | int -}}
{{- end -}}
{{- $_ := set $e "wake" (dict
      "deployment" $e.name
      "replicas" $wakeReplicas
      "timeout" $timeout
      "idle_after" $idleAfter
      "queue" (ternary ($sleep.maxWaiting | int) 100 (hasKey $sleep "maxWaiting"))
      "fallback_while_waking" (and $sleep.fallbackWhileWaking true)
      "lease" (printf "%s-activity" $e.name)
      "readTimeout" (add $timeout $firstByte)) -}}
{{- end -}}

{{- /* KEDA: a Prometheus to ask, and bounds that make sense. */ -}}
{{- if $e.scaledByKeda -}}
{{- if not $autoscaling.serverAddress -}}
{{- fail (printf "%s: autoscaling.enabled needs autoscaling.serverAddress, the Prometheus KEDA queries (e.g. http://prometheus-operated.monitoring.svc:9090)" $where) -}}
{{- end -}}
{{- if gt ($autoscaling.minReplicas | int) ($autoscaling.maxReplicas | int) -}}
{{- fail (printf "%s: autoscaling.minReplicas (%v) is larger than autoscaling.maxReplicas (%v)" $where $autoscaling.minReplicas $autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- /* A PodDisruptionBudget for an engine that may have several pods, allowing at least one eviction. */ -}}
{{- $budget := $e.podDisruptionBudget | default dict -}}
{{- $most := ternary ($autoscaling.maxReplicas | int) $e.replicas $e.scaledByKeda -}}
{{- $_ := set $e "disruptionBudget" (and $budget.enabled (gt $most 1)) -}}
{{- if $e.disruptionBudget -}}
{{- $fewest := ternary ($autoscaling.minReplicas | int) $e.replicas $e.scaledByKeda -}}
{{- $pods := ternary (printf "autoscaling.minReplicas (%d)" $fewest) (printf "replicas (%d)" $fewest) $e.scaledByKeda -}}
{{- include "llm-gateway.checkDisruptionBudget" (dict "budget" $budget "fewest" $fewest "pods" $pods "what" (printf "%s: podDisruptionBudget" $where)) -}}
{{- end -}}

{{- /* Command-line flags the chart sets from values: a second copy would serve a name the routing map
       does not know, listen where no Service points, or use GPUs the pod did not ask for. */ -}}
{{- range $arg := $e.extraArgs | default list -}}
{{- $flag := first (splitList "=" $arg) -}}
{{- if hasPrefix "--" $flag -}}{{- $flag = replace "_" "-" $flag -}}{{- end -}}
{{- $instead := get $chartFlags $flag -}}
{{- if and $instead (or (ne $flag "--engine") (eq $kind "simulator")) -}}
{{- fail (printf "%s: extraArgs: %s is set by the chart; %s" $where $flag $instead) -}}
{{- end -}}
{{- if and $e.lora (has $flag (list "--enable-lora" "--lora-modules" "--lora-paths" "--max-loras" "--max-loras-per-batch" "--max-lora-rank" "--lora-target-modules")) -}}
{{- fail (printf "%s: extraArgs: %s is set by the chart from lora; set it there" $where $flag) -}}
{{- end -}}
{{- /* A simulator runs `llm-gateway simulate`, which exits on a flag it does not know: an engine's flag left
       in values switched to simulators would crash-loop the pod. Written in full (no abbreviations). */ -}}
{{- if and (eq $kind "simulator") (hasPrefix "--" $flag) (not (has $flag $simulatorFlags)) -}}
{{- fail (printf "%s: extraArgs: %s is not a flag of llm-gateway simulate (the simulator takes %s); vLLM's and SGLang's flags are for GPU engines" $where $flag (join ", " $simulatorFlags)) -}}
{{- end -}}
{{- end -}}

{{- /* Image: the engine's fields over the preset's; the simulator's preset falls back to the gateway image
       field by field: without a repository of its own it runs the gateway's, at the preset's tag or digest
       when one is set (a version of the gateway image), else at the gateway's. */ -}}
{{- $preset := get $root.Values.enginePresets $kind -}}
{{- $base := deepCopy $preset.image -}}
{{- if and (eq $kind "simulator") (not $base.repository) -}}
{{- $gw := $root.Values.gateway.image -}}
{{- $version := ternary (dict "tag" $base.tag "digest" $base.digest) (dict "tag" ($gw.tag | default $root.Chart.AppVersion) "digest" $gw.digest) (or (not (empty $base.tag)) (not (empty $base.digest))) -}}
{{- $base = dict "repository" $gw.repository "tag" $version.tag "digest" $version.digest "pullPolicy" ($base.pullPolicy | default $gw.pullPolicy) -}}
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

{{- /* Resources: the preset's, scaled by gpus for GPU engines (the preset is sized for one GPU), with the
       engine's requests and limits merged over them (null drops one); GPU engines always get their GPUs. */ -}}
{{- $res := deepCopy ($preset.resources | default dict) -}}
{{- if and $gpu (gt $e.gpus 1) -}}
{{- range $part := list "requests" "limits" -}}
{{- $quantities := get $res $part | default dict -}}
{{- range $name, $quantity := $quantities -}}
{{- $_ := set $quantities $name (include "llm-gateway.scaleQuantity" (dict "quantity" $quantity "by" $e.gpus)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- include "llm-gateway.mergeInto" (dict "dst" $res "src" ($e.resources | default dict)) -}}
{{- if $gpu -}}
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
{{- /* /dev/shm from engineDefaults is sized for one GPU, like the preset: it grows with gpus. */ -}}
{{- if and $e.shmSize (not (hasKey $raw "shmSize")) (gt $e.gpus 1) -}}
{{- $_ := set $e "shmSize" (include "llm-gateway.scaleQuantity" (dict "quantity" $e.shmSize "by" $e.gpus)) -}}
{{- end -}}
{{- $storage := $e.modelStorage | default dict -}}
{{- if eq (toString $storage.type) "pvc" -}}
{{- if not $storage.claimName -}}
{{- if not $root.Values.persistence.enabled -}}
{{- fail (printf "%s: modelStorage.type pvc needs modelStorage.claimName (an existing claim), or persistence.enabled: true (the chart's claim)" $where) -}}
{{- end -}}
{{- $_ := set $storage "claimName" (include "llm-gateway.modelsClaimName" $root) -}}
{{- $_ := set $storage "chartClaim" true -}}
{{- end -}}
{{- end -}}
{{- /* The model cache on the node's disk: reserve what it may grow to, so the scheduler counts it. */ -}}
{{- if and (eq (toString $storage.type) "emptyDir") $storage.sizeLimit (not (hasKey $requests "ephemeral-storage")) -}}
{{- $_ := set $requests "ephemeral-storage" $storage.sizeLimit -}}
{{- end -}}
{{- end -}}
{{- $_ := set $e "resolvedResources" $res -}}

{{- /* extraVolumes and extraVolumeMounts may not take the names and paths of the chart's own volumes. */ -}}
{{- $storage := $e.modelStorage | default dict -}}
{{- $chartVolumes := dict -}}
{{- if not $gpu }}{{ $_ := set $chartVolumes "tmp" "/tmp" }}{{ end -}}
{{- if and $gpu $e.shmSize }}{{ $_ := set $chartVolumes "dshm" "/dev/shm" }}{{ end -}}
{{- if and $gpu (ne (toString ($storage.type | default "none")) "none") }}{{ $_ := set $chartVolumes "models" (trimSuffix "/" ($storage.mountPath | default "/models")) }}{{ end -}}
{{- range $e.extraVolumes | default list -}}
{{- if hasKey $chartVolumes .name -}}
{{- fail (printf "%s: extraVolumes: the name %q is the chart's own volume; choose another name" $where .name) -}}
{{- end -}}
{{- end -}}
{{- range $e.extraVolumeMounts | default list -}}
{{- if has (trimSuffix "/" .mountPath) (values $chartVolumes) -}}
{{- fail (printf "%s: extraVolumeMounts: %s is where the chart mounts its own volume; set modelStorage.mountPath or shmSize instead, or choose another path" $where .mountPath) -}}
{{- end -}}
{{- end -}}

{{- /* Strategy: the engine's or engineDefaults', else the kind's preset (GPU engines: Recreate; with
       several replicas, or under KEDA, one pod at a time and never a surge pod waiting for a GPU). */ -}}
{{- $strategy := deepCopy ($e.strategy | default dict) -}}
{{- if not $strategy -}}
{{- if and $gpu (or (gt $e.replicas 1) $e.scaledByKeda) -}}
{{- $strategy = dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" 0 "maxUnavailable" 1) -}}
{{- else -}}
{{- $strategy = deepCopy ($preset.strategy | default dict) -}}
{{- end -}}
{{- end -}}
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
{{- /* A LoRA adapter's name is a model id of its own: not another model's id or alias, one base model. */ -}}
{{- $adapterOf := dict -}}
{{- range $i, $e := $resolved -}}
{{- range $adapter := $e.adapterNames -}}
{{- range $other := $resolved -}}
{{- if eq $adapter $other.servedModel -}}
{{- fail (printf "engines[%d] %q: adapter %q is the model id of engine %q" $i $e.name $adapter $other.name) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $aliasOf $adapter -}}
{{- fail (printf "engines[%d] %q: adapter %q is an alias of model %q" $i $e.name $adapter (get $aliasOf $adapter)) -}}
{{- end -}}
{{- if and (hasKey $adapterOf $adapter) (ne (get $adapterOf $adapter) $e.servedModel) -}}
{{- fail (printf "engines[%d] %q: adapter %q is already an adapter of model %q; engines serving one adapter share its base model" $i $e.name $adapter (get $adapterOf $adapter)) -}}
{{- end -}}
{{- $_ := set $adapterOf $adapter $e.servedModel -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "engines" $resolved) -}}
{{- end -}}

{{/*
An engine's map (hfToken, modelStorage, nodeSelector, ...) over engineDefaults' map of that key: merged key by
key, the engine's key wins and its null drops the default's. Takes (dict "key" "hfToken" "default" $map "own"
$map "into" $dict) and sets .into.value; renders nothing.
*/}}
{{- define "llm-gateway.overDefault" -}}
{{- $merged := deepCopy .default -}}
{{- /* A Secret name and a value are two ways to give one token: the engine's choice empties the other. */ -}}
{{- if and (eq .key "hfToken") (or .own.existingSecret .own.value) -}}
{{- $_ := set $merged "existingSecret" "" -}}
{{- $_ := set $merged "value" "" -}}
{{- end -}}
{{- include "llm-gateway.mergeInto" (dict "dst" $merged "src" .own) -}}
{{- $_ := set .into "value" $merged -}}
{{- end -}}

{{/*
The routing map's text. Scalars are written with toJson, which YAML reads as double-quoted strings,
so model ids like "/models/x" or "a: b" survive unchanged. Takes (dict "root" $ "engines" $list).

With discovery, a deployed engine also names its Service: the gateway watches the Service's
EndpointSlices and balances over the ready pods, and uses `url` (the Service) until the first answer
from the API and whenever no pod is ready. An engine with scaleToZero also gets `wake:`: the Deployment
the gateway scales and the Lease in which the gateway pods share the time of its last request.
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
    {{- if .urls }}
    urls: {{ toJson .urls }}
    {{- else if .baseUrl }}
    base_url: {{ .baseUrl | toJson }}
    {{- else }}
    url: {{ .routeUrl | toJson }}
    {{- end }}
    {{- /* Only when set: null turns active checks off, unset keeps the gateway's default. */}}
    {{- if hasKey . "healthPath" }}
    health_path: {{ toJson .healthPath }}
    {{- end }}
    {{- with .apiKeyFile }}
    api_key_file: {{ toJson . }}
    {{- end }}
    {{- if and $discovery .deployed }}
    discovery: {service: {{ .name | toJson }}, namespace: {{ $namespace | toJson }}, port: 8000}
    {{- end }}
    {{- with .wake }}
    wake:
      deployment: {{ .deployment | toJson }}
      replicas: {{ .replicas }}
      timeout: {{ .timeout }}
      idle_after: {{ toJson .idle_after }}
      queue: {{ .queue }}
      fallback_while_waking: {{ .fallback_while_waking }}
      lease: {{ .lease | toJson }}
    {{- end }}
    {{- if .default }}
    default: true
    {{- end }}
    {{- with .aliases }}
    aliases: {{ toJson . }}
    {{- end }}
    {{- with .adapterNames }}
    adapters: {{ toJson . }}
    {{- end }}
    {{- /* Always for deployed engines: adapters loaded at run time (discover_adapters, or LoRA turned on
           through extraArgs) must reach SGLang as <base>:<adapter>, which a bare name would not. */}}
    {{- with .engineApi }}
    api: {{ toJson . }}
    {{- end }}
    {{- with .headers }}
    headers: {{ toJson . }}
    {{- end }}
    {{- with .timeouts }}
    timeouts: {{ toJson . }}
    {{- end }}
    {{- with .balancing }}
    balancing: {{ toJson . }}
    {{- end }}
    {{- with .fallback }}
    fallback: {{ toJson . }}
    {{- end }}
    {{- with .concurrency }}
    concurrency: {{ toJson . }}
    {{- end }}
{{- end }}
{{- end }}

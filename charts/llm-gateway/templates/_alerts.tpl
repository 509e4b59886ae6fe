{{/*
The gateway's alert rules as the `groups:` of a Prometheus rule file: the spec of the PrometheusRule
(prometheusrule.yaml), and, rendered with the default values, rules/llm-gateway.rules.yaml for a
Prometheus without the Operator (tests/chart/test_chart_monitoring.py keeps the two equal and runs
promtool on them).

Every aggregation keeps `namespace` and `job` (with a ServiceMonitor: the gateway's Service), so that two
releases scraped by one Prometheus alert apart. The gateway labels endpoints and upstream errors by engine
only; which model an engine serves comes from llm_gateway_engine_info (1 per engine of the routing map each
gateway pod serves) for the no-ready-engine alert, and from llm_gateway_requests_total (which carries both,
for models that had requests) for the error ratio.
Prometheus' own {{ $labels }} / {{ $value }} templates are written as Helm raw strings.
*/}}
{{- define "llm-gateway.alertGroups" -}}
{{- $rule := .Values.prometheusRule -}}
groups:
  - name: llm-gateway
    rules:
{{- with $rule.errorRatio }}{{ if .enabled }}
      # Failed = 5xx answers, plus streams that broke or went idle after they had started: those were
      # already counted with status 200, while other upstream errors are also 5xx answers (adding all
      # of them would count those twice). `or` is a union here: its sides never share a label set.
      - alert: LLMGatewayHighErrorRatio
        expr: |-
          sum by (namespace, job, model) (
              rate(llm_gateway_requests_total{model!="", status=~"5.."}[{{ .window }}])
            or
              group by (namespace, job, engine, model) (llm_gateway_engine_info)
            * on (namespace, job, engine) group_left ()
              sum by (namespace, job, engine) (rate(llm_gateway_upstream_errors_total{kind=~"broken_stream|timeout_idle"}[{{ .window }}]))
          )
          /
          sum by (namespace, job, model) (rate(llm_gateway_requests_total{model!=""}[{{ .window }}]))
          > {{ .threshold }}
        for: {{ .for }}
        labels:
          severity: {{ .severity }}
          {{- with $rule.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{ `Requests for {{ $labels.model }} fail ({{ $value | humanizePercentage }})` | quote }}
          description: {{ printf "%s%s%s" `{{ $value | humanizePercentage }} of the requests for model {{ $labels.model }} through gateway {{ $labels.job }} failed over the last ` .window ` (5xx answers and streams cut after they started). The dashboard's error panels show the status and the upstream error kind.` | quote }}
{{- end }}{{ end }}
{{- with $rule.noReadyEngine }}{{ if .enabled }}
      # A model is down when no gateway pod sees a ready endpoint of any of its engines. Each pod's
      # endpoints get their model from that pod's own routing map (llm_gateway_engine_info): a model
      # nobody has asked for yet is covered, and after a reload the alert follows the new map.
      - alert: LLMGatewayNoReadyEngine
        expr: |-
          max by (namespace, job, model) (
              llm_gateway_endpoint_available
            * on (namespace, job, instance, engine) group_left (model)
              llm_gateway_engine_info
          ) == 0
        for: {{ .for }}
        labels:
          severity: {{ .severity }}
          {{- with $rule.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{ `No engine can serve {{ $labels.model }}` | quote }}
          description: {{ `Every endpoint of every engine of model {{ $labels.model }} is failing its health checks or ejected in gateway {{ $labels.job }}: its requests fail, or go to a fallback engine if one is set. Check the engines' pods and the dashboard's Endpoint availability panel.` | quote }}
{{- end }}{{ end }}
{{- with $rule.timeToFirstByte }}{{ if .enabled }}
      # Streams only: their first byte is the first token, what users wait for. A non-streaming answer's
      # first byte comes with the whole generation (the dashboard shows it apart).
      - alert: LLMGatewaySlowTimeToFirstByte
        expr: |-
          histogram_quantile(0.95,
            sum by (namespace, job, model, engine, le) (rate(llm_gateway_time_to_first_byte_seconds_bucket{model!="", stream="true"}[{{ .window }}]))
          ) > {{ .thresholdSeconds }}
        for: {{ .for }}
        labels:
          severity: {{ .severity }}
          {{- with $rule.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{ `Slow first byte of streams for {{ $labels.model }} on {{ $labels.engine }} (p95 {{ $value | humanizeDuration }})` | quote }}
          description: {{ printf "%s%v%s" `The 95th percentile of the time to first byte of streams (the time to first token clients see) of model {{ $labels.model }} on engine {{ $labels.engine }} is {{ $value | humanizeDuration }} (threshold ` .thresholdSeconds ` s). Compare the engine's own time to first token and queue on the dashboard: a long engine queue means too little capacity.` | quote }}
{{- end }}{{ end }}
{{- with $rule.gatewayRestarts }}{{ if .enabled }}
      # process_start_time_seconds changes when a container restarts in place; the gateway's own
      # llm_gateway_config_engines picks the gateway's process series out of every target's.
      - alert: LLMGatewayRestarted
        expr: |-
          changes(process_start_time_seconds[{{ .window }}]) >= {{ .threshold }}
          and on (job, instance) last_over_time(llm_gateway_config_engines[{{ .window }}])
        labels:
          severity: {{ .severity }}
          {{- with $rule.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{ `Gateway {{ $labels.instance }} restarted` | quote }}
          description: {{ printf "%s%s%s" `The gateway process at {{ $labels.instance }} ({{ $labels.job }}) started {{ $value }} time(s) in the last ` .window `; its open streams were cut. Look at the pod's last state (OOMKilled, liveness probe) and its logs.` | quote }}
{{- end }}{{ end }}
{{- with $rule.configReloadFailed }}{{ if .enabled }}
      # A routing map or keys file that the gateway refused stays out of service: the pod keeps the last
      # good one, and nothing else shows it (helm upgrade --wait succeeds, the pods stay ready). The
      # gateway says so for as long as the refused file is mounted; `for` rides out a rollout, whose old
      # pods may briefly get a map that names a file only the new pods mount.
      - alert: LLMGatewayConfigReloadFailed
        expr: max by (namespace, job, instance, file) (llm_gateway_config_file_refused) > 0
        for: {{ .for }}
        labels:
          severity: {{ .severity }}
          {{- with $rule.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{ `Gateway {{ $labels.instance }} refused its {{ $labels.file }}` | quote }}
          description: {{ printf "%s%s%s" `The gateway at {{ $labels.instance }} ({{ $labels.job }}) refused the mounted {{ $labels.file }} file for at least ` .for ` and still serves the previous one: routes or keys changed with helm upgrade are not in service. The gateway's log names the error (look for "change refused"); fix the values and upgrade again.` | quote }}
{{- end }}{{ end }}
{{- end }}

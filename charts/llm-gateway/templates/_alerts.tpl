{{/*
The gateway's alert rules as the `groups:` of a Prometheus rule file: the spec of the PrometheusRule
(prometheusrule.yaml), and, rendered with the default values, rules/llm-gateway.rules.yaml for a
Prometheus without the Operator (tests/chart/test_chart_monitoring.py keeps the two equal and runs
promtool on them).

Every aggregation keeps `namespace` and `job` (with a ServiceMonitor: the gateway's Service), so that two
releases scraped by one Prometheus alert apart. The gateway labels endpoints and upstream errors by engine
only; the engine -> model map comes from llm_gateway_requests_total, which carries both.
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
              group by (namespace, job, engine, model) (llm_gateway_requests_total{model!=""})
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
      # A model is down when the best endpoint of each of its engines, as seen by any gateway pod, is 0.
      - alert: LLMGatewayNoReadyEngine
        expr: |-
          max by (namespace, job, model) (
              group by (namespace, job, engine, model) (llm_gateway_requests_total{model!=""})
            * on (namespace, job, engine) group_left ()
              max by (namespace, job, engine) (llm_gateway_endpoint_available)
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
      - alert: LLMGatewaySlowTimeToFirstByte
        expr: |-
          histogram_quantile(0.95,
            sum by (namespace, job, model, engine, le) (rate(llm_gateway_time_to_first_byte_seconds_bucket{model!=""}[{{ .window }}]))
          ) > {{ .thresholdSeconds }}
        for: {{ .for }}
        labels:
          severity: {{ .severity }}
          {{- with $rule.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{ `Slow first byte for {{ $labels.model }} on {{ $labels.engine }} (p95 {{ $value | humanizeDuration }})` | quote }}
          description: {{ printf "%s%v%s" `The 95th percentile of the time to first byte of model {{ $labels.model }} on engine {{ $labels.engine }} is {{ $value | humanizeDuration }} (threshold ` .thresholdSeconds ` s). Compare the engine's own time to first token and queue on the dashboard: a long engine queue means too little capacity.` | quote }}
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
{{- end }}

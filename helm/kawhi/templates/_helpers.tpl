{{/*
Names and labels.
*/}}
{{- define "kawhi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kawhi.fullname" -}}
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

{{- define "kawhi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kawhi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kawhi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "kawhi.commonLabels" -}}
helm.sh/chart: {{ include "kawhi.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kawhi
{{- end }}

{{- define "kawhi.labels" -}}
{{ include "kawhi.commonLabels" . }}
{{ include "kawhi.selectorLabels" . }}
{{- end }}

{{- define "kawhi.redis.labels" -}}
{{ include "kawhi.commonLabels" . }}
{{ include "kawhi.redis.selectorLabels" . }}
{{- end }}

{{- define "kawhi.redis.fullname" -}}
{{- printf "%s-redis" (include "kawhi.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kawhi.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kawhi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "kawhi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kawhi.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image: repository@digest, or repository:tag with the tag defaulting to
<appVersion>-<variant> (the Dockerfile's VARIANT).
*/}}
{{- define "kawhi.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default (printf "%s-%s" .Chart.AppVersion $img.variant) $img.tag) }}
{{- end }}
{{- end }}

{{/*
Settings the chart sets itself; they may not appear in .Values.config.
*/}}
{{- define "kawhi.reservedSettings" -}}
model device dtype host port grpc_port api_keys redis_url
{{- end }}

{{/*
Does the chart's own Secret have anything to hold?  "true" or "".
*/}}
{{- define "kawhi.secret.needed" -}}
{{- if or (and .Values.auth.apiKeys (not .Values.auth.existingSecret)) (and .Values.redis.external.url (not .Values.redis.external.existingSecret)) }}true{{ end }}
{{- end }}

{{/*
Fail early on contradictory values (the schema checks types, this checks combinations).
*/}}
{{- define "kawhi.validate" -}}
{{- $redisSources := 0 }}
{{- if .Values.redis.enabled }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- if .Values.redis.external.url }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- if .Values.redis.external.existingSecret }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- if gt $redisSources 1 }}
{{- fail "redis: set at most one of redis.enabled, redis.external.url, redis.external.existingSecret" }}
{{- end }}
{{- if and .Values.auth.apiKeys .Values.auth.existingSecret }}
{{- fail "auth: set auth.apiKeys or auth.existingSecret, not both" }}
{{- end }}
{{- if and .Values.model.existingClaim .Values.model.volume }}
{{- fail "model: set model.existingClaim or model.volume, not both" }}
{{- end }}
{{- if and .Values.model.path (not (or .Values.model.existingClaim .Values.model.volume)) }}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.mountPath)) .Values.model.path }}
{{- fail (printf "model.path %s is under model.mountPath but no volume is mounted there: set model.existingClaim or model.volume" .Values.model.path) }}
{{- end }}
{{- end }}
{{- if and .Values.probes.useGrpc (not .Values.grpc.enabled) }}
{{- fail "probes.useGrpc needs grpc.enabled: the gRPC health probe asks the gRPC port" }}
{{- end }}
{{- $reserved := splitList " " (include "kawhi.reservedSettings" .) }}
{{- range $key, $_ := .Values.config }}
{{- if has $key $reserved }}
{{- fail (printf "config.%s is set by the chart (model.*, auth.*, redis.*, grpc.*, service.port); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- $drain := int (default 60 .Values.config.drain_timeout_s) }}
{{- $needed := add $drain (int .Values.lifecycle.preStopSleepSeconds) }}
{{- if lt (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least config.drain_timeout_s + lifecycle.preStopSleepSeconds (%d), or draining pods are killed mid-request" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.queueDepth.enabled .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.extraMetrics)) }}
{{- fail "autoscaling: enable autoscaling.queueDepth, set targetCPUUtilizationPercentage or add extraMetrics" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (kindIs "invalid" .Values.podDisruptionBudget.minAvailable) (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable" }}
{{- end }}
{{- end }}

{{/* Names: chart-prefixed helpers, truncated to 63 characters (DNS labels). */}}
{{- define "vision-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vision-platform.fullname" -}}
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

{{/* A component's object name: <fullname>-<component>. Call with (list $ "classification"). */}}
{{- define "vision-platform.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "vision-platform.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vision-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. Call with (list $ "component"). */}}
{{- define "vision-platform.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "vision-platform.chart" $root }}
{{ include "vision-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: {{ include "vision-platform.name" $root }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades. Call with (list $ "component"). */}}
{{- define "vision-platform.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vision-platform.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "vision-platform.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vision-platform.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The project image; variant "full", "slim" or "mlflow". Call with (list $ "slim"). */}}
{{- define "vision-platform.image" -}}
{{- $root := index . 0 }}
{{- $variant := index . 1 }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if ne $variant "full" }}{{ $tag = printf "%s-%s" $tag $variant }}{{ end }}
{{- printf "%s:%s" $root.Values.image.repository $tag }}
{{- end }}

{{/*
Deep merge of two maps, the second winning key by key; nested maps merged, everything else (lists, false,
0) replaced. Sprig's merge/mergeOverwrite treat false and 0 as unset, so `enabled: false` on one service
could not override a default `true`. Call with (dict "base" $defaults "over" $values); returns YAML.
*/}}
{{- define "vision-platform.merge" -}}
{{- $out := deepCopy (.base | default dict) }}
{{- range $k, $v := (.over | default dict) }}
{{- $cur := get $out $k }}
{{- if and (kindIs "map" $v) (kindIs "map" $cur) }}
{{- $_ := set $out $k (include "vision-platform.merge" (dict "base" $cur "over" $v) | fromYaml) }}
{{- else }}
{{- $_ := set $out $k $v }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* A service's effective values: serviceDefaults merged with services.<name>. Call with (list $ name cfg). */}}
{{- define "vision-platform.serviceValues" -}}
{{- $root := index . 0 }}
{{- $svc := include "vision-platform.merge" (dict "base" $root.Values.serviceDefaults "over" (index . 2)) | fromYaml }}
{{- if not $svc.grpcService }}
{{- $_ := set $svc "grpcService" (printf "vision.v1.%s" (title (index . 1))) }}
{{- end }}
{{- toYaml $svc }}
{{- end }}

{{/* A worker's effective values: workerDefaults merged with workers.<name>. Call with (list $ cfg). */}}
{{- define "vision-platform.workerValues" -}}
{{- $root := index . 0 }}
{{- include "vision-platform.merge" (dict "base" $root.Values.workerDefaults "over" (index . 1)) }}
{{- end }}

{{/*
Threads `vision serve` will run in a container with these resources: ceil(limits.cpu), as
services/vision/core/cpus.py reads it from the cgroup quota; "node" when there is no CPU limit (then the node's
CPUs, unless settings.threads is set). Call with the resources map.
*/}}
{{- define "vision-platform.threadsForResources" -}}
{{- $cpu := "" }}
{{- with .limits }}{{ $cpu = toString (index . "cpu" | default "") }}{{ end }}
{{- if not $cpu }}
{{- "node" }}
{{- else if hasSuffix "m" $cpu }}
{{- max 1 (ceil (divf (trimSuffix "m" $cpu | float64) 1000)) | int }}
{{- else }}
{{- max 1 (ceil ($cpu | float64)) | int }}
{{- end }}
{{- end }}

{{/* Addresses of in-chart dependencies. */}}
{{- define "vision-platform.tritonUrl" -}}
{{- printf "%s:%v" (include "vision-platform.componentName" (list . "triton")) .Values.triton.ports.grpc }}
{{- end }}

{{- define "vision-platform.redisUrl" -}}
{{- if .Values.jobs.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "vision-platform.componentName" (list . "redis")) }}
{{- else }}
{{- required "jobs.redis.externalUrl is required when jobs.redis.enabled is false" .Values.jobs.redis.externalUrl }}
{{- end }}
{{- end }}

{{- define "vision-platform.registryUri" -}}
{{- if .Values.registry.externalUri }}
{{- .Values.registry.externalUri }}
{{- else }}
{{- printf "http://%s:%v" (include "vision-platform.componentName" (list . "mlflow")) .Values.registry.mlflow.port }}
{{- end }}
{{- end }}

{{/* Volumes every vision container needs with a read-only root filesystem. */}}
{{- define "vision-platform.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: cache
  emptyDir:
    sizeLimit: 2Gi
{{- if .Values.modelStore.enabled }}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ default (include "vision-platform.componentName" (list . "models")) .Values.modelStore.existingClaim }}
{{- end }}
{{- end }}

{{- define "vision-platform.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/vision
{{- if .Values.modelStore.enabled }}
- name: model-store
  mountPath: {{ .Values.modelStore.mountPath }}
{{- end }}
{{- end }}

{{/* Env of every vision container: settings from the ConfigMap, then extras. Call with (list $ extraEnv). */}}
{{- define "vision-platform.visionEnv" -}}
{{- $root := index . 0 -}}
envFrom:
  - configMapRef:
      name: {{ include "vision-platform.componentName" (list $root "settings") }}
{{- $env := concat ($root.Values.extraEnv | default list) (index . 1 | default list) }}
{{- with $env }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Secret holding the gRPC services' TLS certificate: the chart's cert-manager Certificate, or security.tls.secretName. */}}
{{- define "vision-platform.tlsSecretName" -}}
{{- $tls := .Values.security.tls }}
{{- if $tls.certManager.enabled }}
{{- include "vision-platform.componentName" (list . "grpc-tls") }}
{{- else }}
{{- required "security.tls.enabled needs security.tls.secretName (a kubernetes.io/tls Secret) or security.tls.certManager.enabled" $tls.secretName }}
{{- end }}
{{- end }}

{{/*
Env of a gRPC service container for security: TLS files, the plaintext health port, tokens, the allow-list.
Refuses to render a Jobs service nobody is authorized to drive. Call with the root; returns a YAML list.
*/}}
{{- define "vision-platform.securityEnv" -}}
{{- $sec := .Values.security }}
{{- $jobs := .Values.services.jobs | default dict }}
{{- if and $jobs.enabled (not (or $sec.auth.tokensSecret $sec.auth.allow $sec.auth.open)) }}
{{- fail "services.jobs changes state (submit, cancel): set security.auth.tokensSecret, security.auth.allow (with security.tls.mutual) or security.auth.open (a mesh authorizes)" }}
{{- end }}
{{- if and $sec.auth.allow (not (and $sec.tls.enabled $sec.tls.mutual)) }}
{{- fail "security.auth.allow names client certificates: it needs security.tls.enabled and security.tls.mutual" }}
{{- end }}
{{- if and $sec.auth.open (or $sec.auth.tokensSecret $sec.auth.allow) }}
{{- fail "security.auth.open lets anyone in: it cannot go with tokensSecret or allow" }}
{{- end }}
{{- if $sec.tls.enabled }}
- {name: VISION_TLS_CERT, value: /etc/vision/tls/tls.crt}
- {name: VISION_TLS_KEY, value: /etc/vision/tls/tls.key}
{{- if $sec.tls.mutual }}
- {name: VISION_TLS_CLIENT_CA, value: /etc/vision/tls/ca.crt}
{{- end }}
- {name: VISION_HEALTH_PORT, value: {{ .Values.ports.health | quote }}}
{{- end }}
{{- if $sec.auth.tokensSecret }}
- {name: VISION_AUTH_TOKENS, value: /etc/vision/tokens}
{{- end }}
{{- with $sec.auth.allow }}
- {name: VISION_AUTH_ALLOW, value: {{ join "," . | quote }}}
{{- end }}
{{- if $sec.auth.open }}
- {name: VISION_AUTH_OPEN, value: "true"}
{{- end }}
{{- end }}

{{/* Volumes and mounts of a gRPC service container for security (whole Secrets, never subPath: kubelet updates those in place). */}}
{{- define "vision-platform.securityVolumes" -}}
{{- if .Values.security.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "vision-platform.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- with .Values.security.auth.tokensSecret }}
- name: tokens
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- define "vision-platform.securityMounts" -}}
{{- if .Values.security.tls.enabled }}
- {name: tls, mountPath: /etc/vision/tls, readOnly: true}
{{- end }}
{{- if .Values.security.auth.tokensSecret }}
- {name: tokens, mountPath: /etc/vision/tokens, readOnly: true}
{{- end }}
{{- end }}

{{/* Names, labels and the checks shared by the templates. */}}

{{- define "natsconn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natsconn.fullname" -}}
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

{{- define "natsconn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natsconn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "natsconn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "natsconn.labels" -}}
helm.sh/chart: {{ include "natsconn.chart" . }}
{{ include "natsconn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: bridge
{{- end }}

{{- define "natsconn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "natsconn.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "natsconn.configMapName" -}}
{{- default (include "natsconn.fullname" .) .Values.existingConfigMap }}
{{- end }}

{{- define "natsconn.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where natsconn reads its pipeline file; the Dockerfile's CMD names the same path. */}}
{{- define "natsconn.configDir" -}}/etc/natsconn{{- end }}
{{- define "natsconn.configPath" -}}/etc/natsconn/pipeline.yaml{{- end }}

{{/* Default mount path of a secretFiles entry. */}}
{{- define "natsconn.secretMountPath" -}}
{{- default (printf "/var/run/secrets/natsconn/%s" .name) .mountPath }}
{{- end }}

{{/*
natsconn.noInlineSecrets: fail the render when the inline pipeline holds a secret
value instead of a reference. Walks the whole tree; called with
(dict "v" VALUE "path" "pipeline").
- keys that hold secrets (password, token, nkey_seed, sasl_password, ...) must be
  ${VAR} or ${file:/path} references;
- a URL with a password (scheme://user:pw@host) must have a reference as the password.
*/}}
{{- define "natsconn.noInlineSecrets" -}}
{{- $v := .v }}
{{- $path := .path }}
{{- if kindIs "map" $v }}
{{- range $k, $item := $v }}
{{- $here := printf "%s.%s" $path $k }}
{{- if and (kindIs "string" $item) (regexMatch "(?i)^(password|passwd|token|nkey_seed|key_password|sasl_password|secret|api_key|secret_key)$" $k) }}
{{- if not (regexMatch "^\\$\\{[^}]+\\}$" $item) }}
{{- fail (printf "%s holds a literal secret; put it in a Secret and reference it: %s: ${NAME} with secretEnv, or %s: ${file:/path} with secretFiles" $here $k $k) }}
{{- end }}
{{- end }}
{{- include "natsconn.noInlineSecrets" (dict "v" $item "path" $here) }}
{{- end }}
{{- else if kindIs "slice" $v }}
{{- range $i, $item := $v }}
{{- include "natsconn.noInlineSecrets" (dict "v" $item "path" (printf "%s[%d]" $path $i)) }}
{{- end }}
{{- else if kindIs "string" $v }}
{{- if or (regexMatch "://[^/@:\\s]*:[^$/@\\s][^/@\\s]*@" $v) (regexMatch "(^|\\s)password=[^$\\s]" $v) }}
{{- fail (printf "%s has a password written inside a URL or DSN; use a reference instead, e.g. redis://user:${REDIS_PASSWORD}@host:6379 with secretEnv" $path) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment of the natsconn containers (main and validate). */}}
{{- define "natsconn.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- range .Values.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
      {{- if hasKey . "optional" }}
      optional: {{ .optional }}
      {{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of the natsconn containers (main and validate). */}}
{{- define "natsconn.volumeMounts" -}}
- name: config
  mountPath: {{ include "natsconn.configDir" . }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- range .Values.secretFiles }}
- name: {{ .name }}
  mountPath: {{ include "natsconn.secretMountPath" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Worker processes: `workers: auto` is the container's CPU limit rounded up (1
without one; "1500m" -> 2, "2" -> 2, 0.5 -> 1); a number is itself.
*/}}
{{- define "natsconn.workers" -}}
{{- $w := .Values.workers -}}
{{- if eq (toString $w) "auto" -}}
{{- $cpu := toString (dig "limits" "cpu" "" (.Values.resources | default dict)) -}}
{{- if eq $cpu "" -}}
1
{{- else if hasSuffix "m" $cpu -}}
{{- max 1 (div (add (atoi (trimSuffix "m" $cpu)) 999) 1000) -}}
{{- else -}}
{{- max 1 (int (ceil (float64 $cpu))) -}}
{{- end -}}
{{- else -}}
{{- int $w -}}
{{- end -}}
{{- end -}}

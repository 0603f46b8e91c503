{{- define "agentperf.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "agentperf.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "agentperf.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "agentperf.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "agentperf.targetHost" -}}
{{- if .Values.target.host }}{{ .Values.target.host }}
{{- else }}http://{{ include "agentperf.fullname" . }}-simulator:{{ .Values.simulator.port }}{{ end }}
{{- end }}

{{/* The API key as an environment variable from the user's Secret (nothing when none is named). */}}
{{- define "agentperf.apiKeyEnv" -}}
{{- if .Values.target.apiKeySecret.name }}
env:
  - name: OPENAI_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ .Values.target.apiKeySecret.name }}
        key: {{ .Values.target.apiKeySecret.key }}
{{- end }}
{{- end }}

{{- define "agentperf.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

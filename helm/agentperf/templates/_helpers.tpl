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
{{- include "agentperf.podSecurity" . }}
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

{{/* The pods' security context: the image's user, and the runs volume writable by it (fsGroup). */}}
{{- define "agentperf.podSecurity" -}}
{{- with .Values.podSecurityContext }}
securityContext: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The master's wait for the chart's simulator (nothing against a real target). */}}
{{- define "agentperf.waitForSimulator" -}}
{{- if not .Values.target.host }}
initContainers:
  - name: wait-for-simulator
    image: {{ include "agentperf.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - sh
      - -c
      - until python -c "import urllib.request; urllib.request.urlopen('{{ include "agentperf.targetHost" . }}/health', timeout=2)"; do sleep 1; done
{{- end }}
{{- end }}

{{/* The master's Prometheus options (a list's items), its ports, and the pod annotations for discovery. */}}
{{- define "agentperf.metricsArgs" -}}
{{- if .Values.master.metricsPort }}
- --metrics-port
- {{ .Values.master.metricsPort | quote }}
- --metrics-host
- "0.0.0.0"
{{- end }}
{{- end }}

{{- define "agentperf.masterPorts" -}}
ports:
  - name: master
    containerPort: {{ .Values.master.port }}
  {{- if .Values.master.metricsPort }}
  - name: metrics
    containerPort: {{ .Values.master.metricsPort }}
  {{- end }}
  {{- if eq .Values.mode "webui" }}
  - name: web
    containerPort: {{ .Values.webui.port }}
  {{- end }}
{{- end }}

{{- define "agentperf.masterPodMetadata" -}}
labels:
  {{- include "agentperf.selector" (dict "root" . "component" "master") | nindent 2 }}
{{- if .Values.master.metricsPort }}
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .Values.master.metricsPort | quote }}
{{- end }}
{{- end }}

{{/* The run folder's volume, mounted at /runs on the master. */}}
{{- define "agentperf.runsVolume" -}}
volumes:
  - name: runs
    {{- if .Values.master.runsVolume }}
    {{- toYaml .Values.master.runsVolume | nindent 4 }}
    {{- else }}
    emptyDir: {}
    {{- end }}
{{- end }}

{{/* A worker pod's container, the same in both modes: a Locust worker that connects to the master. */}}
{{- define "agentperf.workerContainer" -}}
- name: worker
  image: {{ include "agentperf.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - locust
    - -f
    - {{ printf "/opt/agentperf/locustfiles/%s" (eq .Values.mode "webui" | ternary .Values.webui.locustfile "capacity.py") | quote }}
    - --worker
    - --master-host
    - {{ printf "%s-master" (include "agentperf.fullname" .) | quote }}
    - --master-port
    - {{ .Values.master.port | quote }}
  {{- with (include "agentperf.apiKeyEnv" . | trim) }}{{ . | nindent 2 }}{{ end }}
  {{- with .Values.worker.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

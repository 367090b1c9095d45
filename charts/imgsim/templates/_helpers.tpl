{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "imgsim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, unless the release name already contains the chart name. */}}
{{- define "imgsim.fullname" -}}
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

{{- define "imgsim.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imgsim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imgsim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imgsim.labels" -}}
helm.sh/chart: {{ include "imgsim.chart" . }}
{{ include "imgsim.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imgsim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imgsim.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* <fullname>-<suffix> within 63 characters: the full name is cut first. */}}
{{- define "imgsim.componentName" -}}
{{- printf "%s-%s" (include "imgsim.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}
{{- end }}

{{/* One service account per component, each with only what it needs: the server's (reads bundles), the
pipeline Jobs' (read data, write MLflow artifacts) and the page's (no cloud role). Not created: the server's
name serves every component, as before. */}}
{{- define "imgsim.pipelineServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imgsim.componentName" (dict "root" . "suffix" "pipeline")) .Values.serviceAccount.pipeline.name }}
{{- else }}
{{- default (include "imgsim.serviceAccountName" .) .Values.serviceAccount.pipeline.name }}
{{- end }}
{{- end }}

{{- define "imgsim.uiServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imgsim.componentName" (dict "root" . "suffix" "ui")) .Values.serviceAccount.ui.name }}
{{- else }}
{{- default (include "imgsim.serviceAccountName" .) .Values.serviceAccount.ui.name }}
{{- end }}
{{- end }}

{{/* The graph node and its container share this name: Seldon matches them by name. */}}
{{- define "imgsim.nodeName" -}}similarity{{- end }}

{{/* The predictor's name; Seldon's REST/gRPC Service is <fullname>-<predictor>. */}}
{{- define "imgsim.predictor" -}}default{{- end }}

{{- define "imgsim.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{/* Pod and container security settings shared by every pod of the chart. */}}
{{- define "imgsim.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 8888
runAsGroup: 8888
fsGroup: 8888
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "imgsim.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The pipeline pods' shared parts (training and extraction Jobs): MLflow env, data and scratch volumes. */}}
{{- define "imgsim.pipelineEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ .Values.training.mlflowTrackingUri | quote }}
- name: MLFLOW_EXPERIMENT_NAME
  value: imgsim
{{- end }}

{{- define "imgsim.pipelineMounts" -}}
- {name: data, mountPath: /data, readOnly: true}
- {name: work, mountPath: /work}
- {name: tmp, mountPath: /tmp}
- {name: shm, mountPath: /dev/shm}
{{- end }}

{{- define "imgsim.pipelineVolumes" -}}
- name: data
  persistentVolumeClaim:
    claimName: {{ .Values.training.dataClaim }}
    readOnly: true
- name: work
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: 2Gi
{{- end }}

{{/* Requests and limits plus nvidia.com/gpu when gpus > 0. Call with (dict "resources" R "gpus" N). */}}
{{- define "imgsim.pipelineResources" -}}
requests:
  {{- toYaml .resources.requests | nindent 2 }}
limits:
  {{- with .resources.limits }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- if gt (int .gpus) 0 }}
  nvidia.com/gpu: {{ .gpus }}
  {{- end }}
{{- end }}

{{/* Pod-level settings of the pipeline pods. Call with (dict "root" $ "nodeSelector" S "tolerations" T). */}}
{{- define "imgsim.pipelinePodSettings" -}}
serviceAccountName: {{ include "imgsim.pipelineServiceAccountName" .root }}
automountServiceAccountToken: false
securityContext:
  {{- include "imgsim.podSecurityContext" .root | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

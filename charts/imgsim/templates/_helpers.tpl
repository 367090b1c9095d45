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

{{/* The graph node and its container share this name: Seldon matches them by name. Under protocol v2 Seldon's
executor asks the node's model by that name (/v2/models/<name>/infer): model_server/v2's model, imgsim. */}}
{{- define "imgsim.nodeName" -}}
{{- if eq .Values.server.protocol "v2" }}imgsim{{ else }}similarity{{ end }}
{{- end }}

{{/* The predictor's name; Seldon's REST/gRPC Service is <fullname>-<predictor>. */}}
{{- define "imgsim.predictor" -}}default{{- end }}

{{- define "imgsim.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{/* The server's image for server.protocol: the Seldon wrapper's (image.repository) or MLServer's
(image.v2Repository); the same tag. */}}
{{- define "imgsim.serverImage" -}}
{{- $repository := ternary .Values.image.v2Repository .Values.image.repository (eq .Values.server.protocol "v2") }}
{{- include "imgsim.image" (dict "appVersion" .Chart.AppVersion "repository" $repository "tag" .Values.image.tag) }}
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

{{/* MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from a Secret (keys username, password) in the release's
namespace; nothing for an empty name (a tracking server without authentication). Call with the Secret's name. */}}
{{- define "imgsim.mlflowCredentials" -}}
{{- with . }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: username}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: password}
{{- end }}
{{- end }}

{{/* "true" when model.uri names an MLflow registry version: the server then reads the gallery from the registry
itself (MLflow env, the serving identity) and no storage initializer runs. */}}
{{- define "imgsim.fromRegistry" -}}
{{- if hasPrefix "models:/" .Values.model.uri }}true{{ end }}
{{- end }}

{{/* The pipeline pods' shared parts (training and extraction Jobs): MLflow env, data and scratch volumes. */}}
{{- define "imgsim.pipelineEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ .Values.mlflow.trackingUri | quote }}
- name: MLFLOW_EXPERIMENT_NAME
  value: imgsim
{{- include "imgsim.mlflowCredentials" .Values.mlflow.pipelineCredentialsSecret }}
{{- end }}

{{/* The server's MLflow env when it reads the registry (model.uri models:/...): the serving identity. */}}
{{- define "imgsim.serverMlflowEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ .Values.mlflow.trackingUri | quote }}
{{- include "imgsim.mlflowCredentials" .Values.mlflow.servingCredentialsSecret }}
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

{{/* One componentSpec of the SeldonDeployment: the pods of one graph node. dict: root, name (the node's and
its container's), resources, minReplicas, maxReplicas; interface and type for a node of a sharded graph (its
container then runs that wrapper class and declares the ports Seldon would otherwise number across the graph). */}}
{{- define "imgsim.component" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- metadata:
    labels:
      {{- include "imgsim.labels" $root | nindent 6 }}
      app.kubernetes.io/component: server
      imgsim.io/graph-node: {{ .name }}
    {{- with $v.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- if $v.autoscaling.enabled }}
  hpaSpec:
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    metricsv2:
      - type: Resource
        resource:
          name: cpu
          target:
            type: Utilization
            averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
  {{- end }}
  {{- if $v.podDisruptionBudget.enabled }}
  pdbSpec:
    minAvailable: {{ $v.podDisruptionBudget.minAvailable }}
  {{- end }}
  spec:
    serviceAccountName: {{ include "imgsim.serviceAccountName" $root }}
    automountServiceAccountToken: false  # the server never calls the Kubernetes API
    terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
    securityContext:
      {{- include "imgsim.podSecurityContext" $root | nindent 6 }}
    {{- with $v.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: {{ .name }}
        {{- if eq $v.server.protocol "v2" }}
        {{- include "imgsim.mlserverContainer" $root | nindent 8 }}
        {{- else }}
        image: {{ include "imgsim.serverImage" $root }}
        imagePullPolicy: {{ $v.image.pullPolicy }}
        {{- if .interface }}
        command: ["seldon-core-microservice", {{ .interface | quote }}, "--service-type", {{ .type | quote }}]
        ports:
          - {name: http, containerPort: 9000, protocol: TCP}
          - {name: grpc, containerPort: 9500, protocol: TCP}
          - {name: metrics, containerPort: 6000, protocol: TCP}
        {{- end }}
        env:
          - name: GUNICORN_WORKERS
            value: {{ $v.server.gunicornWorkers | int64 | quote }}
          - name: GUNICORN_THREADS
            value: {{ $v.server.gunicornThreads | int64 | quote }}
          - name: GRPC_WORKERS
            value: {{ $v.server.grpcWorkers | int64 | quote }}
          - name: OMP_NUM_THREADS
            value: {{ $v.server.threads | int64 | quote }}
          {{- if include "imgsim.fromRegistry" $root }}
          {{- include "imgsim.serverMlflowEnv" $root | nindent 10 }}
          {{- end }}
        {{- include "imgsim.probes" (dict "root" $root "live" "/health/ping" "ready" "/health/status") | nindent 8 }}
        {{- end }}
        resources:
          {{- toYaml .resources | nindent 10 }}
        securityContext:
          {{- include "imgsim.containerSecurityContext" $root | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
    volumes:
      - name: tmp
        emptyDir:
          {{- /* from the registry, each server process downloads the gallery here */}}
          sizeLimit: {{ ternary $v.model.downloadSizeLimit "1Gi" (eq (include "imgsim.fromRegistry" $root) "true") }}
{{- end }}

{{/* How Seldon's storage initializer reads model.uri: a secret's credentials, or the service account's role. */}}
{{- define "imgsim.modelStorage" -}}
{{- if .Values.model.envSecretRefName }}
envSecretRefName: {{ .Values.model.envSecretRefName }}
{{- else }}
serviceAccountName: {{ include "imgsim.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/* The server's settings (ServiceConfig's), once: name, Seldon parameter type, value. model_uri: where the storage
initializer put the bundle, or the registry version the server reads itself. */}}
{{- define "imgsim.serverSettings" -}}
- [model_uri, STRING, {{ ternary .Values.model.uri "/mnt/models" (eq (include "imgsim.fromRegistry" .) "true") | quote }}]
{{- with .Values.model.bundleSha256 }}
- [bundle_sha256, STRING, {{ . | quote }}]
{{- end }}
- [default_k, INT, {{ .Values.model.defaultK | int64 | quote }}]
- [max_k, INT, {{ .Values.model.maxK | int64 | quote }}]
- [search_k, INT, {{ .Values.model.searchK | int64 | quote }}]
- [runtime, STRING, {{ .Values.server.runtime | quote }}]
- [threads, INT, {{ .Values.server.threads | int64 | quote }}]
- [max_request_bytes, INT, {{ .Values.server.maxRequestBytes | int64 | quote }}]
- [max_image_bytes, INT, {{ .Values.server.maxImageBytes | int64 | quote }}]
- [max_pixels, INT, {{ .Values.server.maxPixels | int64 | quote }}]
- [max_request_pixels, INT, {{ .Values.server.maxRequestPixels | int64 | quote }}]
- [max_concurrent_decodes, INT, {{ .Values.server.maxConcurrentDecodes | int64 | quote }}]
- [poll_interval_s, FLOAT, {{ .Values.server.pollIntervalS | float64 | quote }}]
{{- end }}

{{/* The server's settings as Seldon graph parameters, for a whole bundle and for a sharded graph's nodes. */}}
{{- define "imgsim.serverParameters" -}}
{{- range include "imgsim.serverSettings" . | fromYamlArray }}
- {name: {{ index . 0 }}, type: {{ index . 1 }}, value: {{ index . 2 | quote }}}
{{- end }}
{{- end }}

{{/* Startup, readiness and liveness probes on the server's REST port. dict: root, live, ready (paths). */}}
{{- define "imgsim.probes" -}}
{{- $p := .root.Values.probes -}}
startupProbe:
  httpGet: {path: {{ .live }}, port: 9000}
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
readinessProbe:
  httpGet: {path: {{ .ready }}, port: 9000}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
livenessProbe:
  httpGet: {path: {{ .live }}, port: 9000}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
{{- end }}

{{/* The MLServer container's image, ports, settings and probes (server.protocol v2): Seldon's ports (REST 9000,
gRPC 9500, where its executor calls the node; metrics 6000 at /prometheus, where it scrapes them), and the
server's settings as the IMGSIM_* variables model_server/v2 reads (graph parameters do not reach MLServer). */}}
{{- define "imgsim.mlserverContainer" -}}
{{- $v := .Values -}}
image: {{ include "imgsim.serverImage" . }}
imagePullPolicy: {{ $v.image.pullPolicy }}
ports:
  - {name: http, containerPort: 9000, protocol: TCP}
  - {name: grpc, containerPort: 9500, protocol: TCP}
  - {name: metrics, containerPort: 6000, protocol: TCP}
env:
  - {name: MLSERVER_HTTP_PORT, value: "9000"}
  - {name: MLSERVER_GRPC_PORT, value: "9500"}
  - {name: MLSERVER_METRICS_PORT, value: "6000"}
  - {name: MLSERVER_METRICS_ENDPOINT, value: /prometheus}
  - name: MLSERVER_GRPC_MAX_MESSAGE_LENGTH
    value: {{ $v.server.grpcMaxMessageBytes | int64 | quote }}
  - name: OMP_NUM_THREADS
    value: {{ $v.server.threads | int64 | quote }}
  {{- range include "imgsim.serverSettings" . | fromYamlArray }}
  - name: {{ printf "IMGSIM_%s" (index . 0) | upper }}
    value: {{ index . 2 | quote }}
  {{- end }}
  {{- if include "imgsim.fromRegistry" . }}
  {{- include "imgsim.serverMlflowEnv" . | nindent 2 }}
  {{- end }}
{{- /* Ready when the model is: /v2/health/ready answers 200 with no model loaded at all. */}}
{{ include "imgsim.probes" (dict "root" . "live" "/v2/health/live" "ready" "/v2/models/imgsim/ready") }}
{{- end }}

{{/* A podSelector for this release's pods of one component. Call with (dict "root" $ "component" C). */}}
{{- define "imgsim.componentSelector" -}}
matchLabels:
  {{- include "imgsim.selectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Egress rules every pod of the release has: DNS (networkPolicy.dns, UDP and TCP: large answers come over TCP)
and networkPolicy.extraEgress. */}}
{{- define "imgsim.egressCommon" -}}
{{- $np := .Values.networkPolicy -}}
- to:
    - namespaceSelector:
        {{- toYaml $np.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml $np.dns.podSelector | nindent 8 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Egress to the MLflow tracking server (networkPolicy.mlflow). */}}
{{- define "imgsim.egressMlflow" -}}
{{- $m := .Values.networkPolicy.mlflow -}}
- to:
    - namespaceSelector:
        {{- toYaml $m.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml $m.podSelector | nindent 8 }}
  ports:
    - {port: {{ $m.port }}, protocol: TCP}
{{- end }}

{{/* Egress to the artifact store's endpoint (networkPolicy.artifactStore: S3, and STS for IRSA). Include it only
when artifactStore.ipBlocks lists some: a rule with no `to` would admit every address. */}}
{{- define "imgsim.egressArtifactStore" -}}
{{- $a := .Values.networkPolicy.artifactStore -}}
- to:
    {{- range $a.ipBlocks }}
    - ipBlock:
        {{- toYaml . | nindent 8 }}
    {{- end }}
  ports:
    - {port: {{ $a.port }}, protocol: TCP}
{{- end }}

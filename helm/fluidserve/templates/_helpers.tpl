{{/* Chart name. */}}
{{- define "fluidserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. Kept to 40 characters because KubeRay derives longer
names from the RayService name (a RayCluster suffix, then -head-svc, -serve-svc).
*/}}
{{- define "fluidserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fluidserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fluidserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fluidserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fluidserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fluidserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Number of model actors: workers x (modelActorsPerWorker, or one per GPU, or one). */}}
{{- define "fluidserve.numModelActors" -}}
{{- $perWorker := int .Values.workers.modelActorsPerWorker }}
{{- if eq $perWorker 0 }}{{ $perWorker = max (int .Values.workers.gpus) 1 }}{{ end }}
{{- mul (int .Values.workers.replicas) $perWorker }}
{{- end }}

{{/* The Serve config (same schema as deploy/configs/*.yaml), as YAML. */}}
{{- define "fluidserve.serveConfig" -}}
{{- $v := .Values }}
{{- $args := dict
  "model" $v.model.id
  "policy" $v.policy.name
  "policy_args" ($v.policy.args | default dict)
  "num_model_actors" (include "fluidserve.numModelActors" . | int)
  "model_actor_resources" (dict
    "num_gpus" (ternary 1 0 (gt (int $v.workers.gpus) 0))
    "num_cpus" $v.workers.modelActorCpus)
  "gpu_memory_utilization" $v.kvCache.gpuMemoryUtilization
  "enforce_eager" (default false $v.model.enforceEager)
  "kv_cache_tokens" (int $v.kvCache.tokens)
  "block_size" (int $v.kvCache.blockSize)
  "max_num_seqs" (int $v.scheduler.maxNumSeqs)
  "max_queue_len" (int $v.scheduler.maxQueueLen)
  "max_queue_wait_s" (float64 $v.scheduler.maxQueueWaitS)
  "max_queued_tokens" (int $v.scheduler.maxQueuedTokens)
  "stream_interval_s" (float64 $v.scheduler.streamIntervalS)
  "scheduler_graceful_shutdown_s" (float64 $v.scheduler.gracefulShutdownS)
  "dtype" $v.model.dtype
  "api_key_env" "FLUIDSERVE_API_KEY"
  "ingress_replicas" (int $v.ingress.replicas)
}}
{{- $runtimeEnv := dict }}
{{- if $v.model.hubTokenSecret.name }}
{{- /* A reference Ray expands on each node from the container's env (the Secret): the
       token never enters the Serve config. Child actors inherit env_vars. */}}
{{- $_ := set $runtimeEnv "env_vars" (dict "HF_TOKEN" "${HF_TOKEN}") }}
{{- end }}
{{- $app := dict
  "name" "fluidserve"
  "route_prefix" "/"
  "import_path" $v.serve.importPath
  "runtime_env" $runtimeEnv
  "args" $args
}}
{{- with $v.ingress.autoscaling }}
{{- if .enabled }}
{{- $autoscaling := dict
  "min_replicas" (int .minReplicas)
  "max_replicas" (int .maxReplicas)
  "target_ongoing_requests" .targetOngoingRequests
}}
{{- $_ := set $app "deployments" (list (dict "name" .deploymentName "num_replicas" "auto" "autoscaling_config" $autoscaling)) }}
{{- end }}
{{- end }}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" (int $v.serve.port))
  "applications" (list $app)
}}
{{- toYaml $config }}
{{- end }}

{{/* Env of every Ray container: secrets only by reference. */}}
{{- define "fluidserve.env" -}}
- name: HF_HOME
  value: /home/ray/.cache/huggingface
{{- with .Values.model.hubTokenSecret }}
{{- if .name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.apiKeySecret }}
{{- if .name }}
- name: FLUIDSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fluidserve.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
- name: model-cache
  mountPath: /home/ray/.cache/huggingface
{{- end }}

{{/* Pod volumes; call with (dict "shm" <size> "root" $). */}}
{{- define "fluidserve.volumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
- name: model-cache
  emptyDir:
    sizeLimit: {{ .root.Values.model.cacheSizeLimit }}
{{- end }}

{{/* rayStartParams as a flow map; KubeRay wants every value as a string. */}}
{{- define "fluidserve.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := . }}{{ $_ := set $params $k (toString $v) }}{{ end }}
{{- toJson $params }}
{{- end }}

{{/*
Label that selects this release's Ray pods. A dedicated key, because KubeRay adds its own
app.kubernetes.io/* labels to the pods it creates.
*/}}
{{- define "fluidserve.podSelectorLabels" -}}
fluidserve.io/rayservice: {{ include "fluidserve.fullname" . }}
{{- end }}

{{/*
lorafleet.name: the chart name, or nameOverride.
*/}}
{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
lorafleet.fullname: the prefix of every resource name (release name, plus the chart name unless the
release name already contains it). Component names append "-<component>", so keep room: 40 characters.
*/}}
{{- define "lorafleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
lorafleet.chart: chart name and version, for the helm.sh/chart label.
*/}}
{{- define "lorafleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
lorafleet.labels: the standard labels of one component.
Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ include "lorafleet.chart" .root }}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- end -}}

{{/*
lorafleet.selectorLabels: the labels that select one component's pods (never change them on upgrade).
Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
lorafleet.image: the image of a LoRA Fleet component. Without GPUs, inference and trainer use the
"-cpu" images (deploy/docker/*-cpu.Dockerfile). Call with (dict "root" $ "component" "inference").
*/}}
{{- define "lorafleet.image" -}}
{{- $root := .root -}}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag -}}
{{- $suffix := "" -}}
{{- if and (not $root.Values.gpu.enabled) (ne .component "gateway") -}}
{{- $suffix = "-cpu" -}}
{{- end -}}
{{- printf "%s/%s:%s%s" $root.Values.image.prefix .component $tag $suffix -}}
{{- end -}}

{{/*
lorafleet.baseModel: the base model every service must agree on. Empty model.name picks Qwen2.5-7B on
GPUs and the embedded SmolLM2-135M (shipped in the CPU images) without.
*/}}
{{- define "lorafleet.baseModel" -}}
{{- if .Values.model.name -}}
{{- .Values.model.name -}}
{{- else if .Values.gpu.enabled -}}
Qwen/Qwen2.5-7B-Instruct
{{- else -}}
HuggingFaceTB/SmolLM2-135M-Instruct
{{- end -}}
{{- end -}}

{{/*
lorafleet.s3Endpoint: host:port of the object store: the bundled MinIO's Service, or s3.endpoint.
*/}}
{{- define "lorafleet.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s-minio:9000" (include "lorafleet.fullname" .) -}}
{{- else -}}
{{- .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{/*
lorafleet.storeUrl: LORAFLEET_STORE_URL, s3://bucket[/prefix].
*/}}
{{- define "lorafleet.storeUrl" -}}
{{- $prefix := trimAll "/" .Values.s3.prefix -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s" .Values.s3.bucket $prefix -}}
{{- else -}}
{{- printf "s3://%s" .Values.s3.bucket -}}
{{- end -}}
{{- end -}}

{{/*
lorafleet.authSecretName / lorafleet.s3SecretName: the Secret holding the admin key / the S3 keys:
an existing one when given, otherwise the chart's own.
*/}}
{{- define "lorafleet.authSecretName" -}}
{{- default (include "lorafleet.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "lorafleet.s3SecretName" -}}
{{- default (include "lorafleet.fullname" .) .Values.s3.existingSecret -}}
{{- end -}}

{{/*
lorafleet.validate: combinations of values that cannot work fail the render, naming the value, so a
bad release never reaches the cluster as a crash loop. Secrets themselves are checked with `required`
in secret.yaml; this covers what the schema cannot express.
*/}}
{{- define "lorafleet.validate" -}}
{{- if and (not .Values.minio.enabled) (not .Values.s3.endpoint) -}}
{{- fail "s3.endpoint is required when minio.enabled=false: set s3.endpoint=host:port of your S3 service (or minio.enabled=true)" -}}
{{- end -}}
{{- if and .Values.minio.enabled .Values.s3.endpoint -}}
{{- fail "s3.endpoint is set but minio.enabled=true: set minio.enabled=false to use an external S3 endpoint, or leave s3.endpoint empty" -}}
{{- end -}}
{{- if lt (int .Values.inference.maxCpuLoras) (int .Values.inference.maxLoras) -}}
{{- fail (printf "inference.maxCpuLoras (%v) must be >= inference.maxLoras (%v): the CPU cache holds every adapter of a batch" .Values.inference.maxCpuLoras .Values.inference.maxLoras) -}}
{{- end -}}
{{- if and .Values.grpcTls.enabled (not .Values.grpcTls.secretName) -}}
{{- fail "grpcTls.secretName is required when grpcTls.enabled=true: name a Secret with tls.crt, tls.key and ca.crt (docs/security.md)" -}}
{{- end -}}
{{- if and .Values.minio.enabled (not .Values.s3.existingSecret) (lt (len .Values.s3.secretKey) 8) -}}
{{- fail "s3.secretKey must be at least 8 characters: it is the bundled MinIO's root password (or set s3.existingSecret)" -}}
{{- end -}}
{{- end -}}

{{/*
lorafleet.inferenceTargets: LORAFLEET_GATEWAY_INFERENCE_TARGETS, every inference pod's stable DNS name
through the headless Service (pod-0..pod-N-1), so the gateway can route each adapter to one replica.
*/}}
{{- define "lorafleet.inferenceTargets" -}}
{{- $name := printf "%s-inference" (include "lorafleet.fullname" .) -}}
{{- $targets := list -}}
{{- range $i := until (int .Values.inference.replicas) -}}
{{- $targets = append $targets (printf "%s-%d.%s-headless.%s.svc.%s:50051" $name $i $name $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $targets -}}
{{- end -}}

{{/*
lorafleet.resources: a container's resources with nvidia.com/gpu added to the limits when GPUs are on.
Call with (dict "resources" .Values.inference.resources "gpus" N) where N is 0 without GPUs.
*/}}
{{- define "lorafleet.resources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := deepCopy (default dict (get $res "limits")) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/*
lorafleet.podSecurityContext / lorafleet.securityContext: every pod runs as the images' non-root
user 10001 with a read-only root filesystem; HOME and /tmp are writable volumes.
*/}}
{{- define "lorafleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lorafleet.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
lorafleet.commonEnv: the environment every LoRA Fleet container gets: the shared ConfigMap and the
S3 credentials from their Secret.
*/}}
{{- define "lorafleet.commonEnv" -}}
- name: LORAFLEET_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.s3SecretName" . }}
      key: access-key
- name: LORAFLEET_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.s3SecretName" . }}
      key: secret-key
{{- if .Values.model.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.hfTokenSecret }}
      key: HF_TOKEN
{{- end }}
{{- end -}}

{{/*
lorafleet.grpcTlsMount / lorafleet.grpcTlsVolume: the gRPC mTLS Secret, read-only at /etc/lorafleet/grpc-tls,
in the gateway, inference and trainer pods (rendered only with grpcTls.enabled). The configmap-common
LORAFLEET_GRPC_TLS_* variables point into it.
*/}}
{{- define "lorafleet.grpcTlsMount" -}}
{{- if .Values.grpcTls.enabled -}}
- {name: grpc-tls, mountPath: /etc/lorafleet/grpc-tls, readOnly: true}
{{- end -}}
{{- end -}}

{{- define "lorafleet.grpcTlsVolume" -}}
{{- if .Values.grpcTls.enabled -}}
- name: grpc-tls
  secret:
    secretName: {{ .Values.grpcTls.secretName }}
    defaultMode: 0440
{{- end -}}
{{- end -}}

{{/*
lorafleet.grpcProbe: the probe handler of a gRPC port. Kubernetes' native grpc probe cannot present a
client certificate, so with grpcTls.enabled the image's own health check runs instead (it reads the
LORAFLEET_GRPC_TLS_* variables the service reads). Call with (dict "root" $ "port" 50051).
*/}}
{{- define "lorafleet.grpcProbe" -}}
{{- if .root.Values.grpcTls.enabled -}}
exec:
  command: ["python3", "-m", "lorafleet_common.healthcheck", "--timeout", "3", "grpc", "127.0.0.1:{{ .port }}"]
timeoutSeconds: 5
{{- else -}}
grpc: {port: {{ .port }}}
{{- end -}}
{{- end -}}

{{/*
lorafleet.configChecksum: a pod annotation that changes whenever the chart's ConfigMaps or Secret
change, so `helm upgrade` rolls the pods.
*/}}
{{- define "lorafleet.configChecksum" -}}
checksum/config: {{ print (include (print .Template.BasePath "/configmap-common.yaml") .) (include (print .Template.BasePath "/secret.yaml") .) | sha256sum }}
{{- end -}}

{{/*
lorafleet.pullSecrets: imagePullSecrets from image.pullSecrets.
*/}}
{{- define "lorafleet.pullSecrets" -}}
{{- with .Values.image.pullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

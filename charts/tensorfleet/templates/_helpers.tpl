{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "tensorfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: RELEASE-tensorfleet, or RELEASE when it already contains the chart name.
At most 52 characters (as fullnameOverride in the schema), so that FULLNAME-metrics, a Service, stays a
DNS label of at most 63 for any release name Helm accepts (53). */}}
{{- define "tensorfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tensorfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tensorfleet.labels" -}}
helm.sh/chart: {{ include "tensorfleet.chart" . }}
{{ include "tensorfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tensorfleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the operator pods. */}}
{{- define "tensorfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tensorfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tensorfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tensorfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The tensorfleet image: REPOSITORY@DIGEST when a digest is given, else REPOSITORY:TAG (tag defaults to appVersion). */}}
{{- define "tensorfleet.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces the operator serves: the watched ones, or none (meaning all). */}}
{{- define "tensorfleet.clusterwide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/* The default engine store as the operator's settings: TENSORFLEET_ENGINE_STORE as pvc://CLAIM/PATH or
s3://BUCKET/PREFIX, and for s3 the endpoint, region and credentials Secret name. Nothing for type none. */}}
{{- define "tensorfleet.engineStoreEnv" -}}
{{- $env := list -}}
{{- if eq .type "pvc" -}}
{{- $claim := required "engines.store.pvc.claimName is required when engines.store.type is pvc" .pvc.claimName -}}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE" "value" (printf "pvc://%s/%s" $claim (trimAll "/" .pvc.path))) -}}
{{- else if eq .type "s3" -}}
{{- $bucket := required "engines.store.s3.bucket is required when engines.store.type is s3" .s3.bucket -}}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE" "value" (printf "s3://%s/%s" $bucket (trimAll "/" .s3.prefix))) -}}
{{- with .s3.endpoint }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_ENDPOINT" "value" .) }}{{ end -}}
{{- with .s3.region }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_REGION" "value" .) }}{{ end -}}
{{- with .s3.credentialsSecret }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_SECRET" "value" .) }}{{ end -}}
{{- end -}}
{{- with $env }}{{ toYaml . }}{{ end -}}
{{- end }}

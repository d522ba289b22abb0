{{/*
Operator settings read by parts that land with other issues (docs/notes/issue-7.md lists which code
reads each). Until then the operator ignores them: it reads only the TENSORFLEET_* variables it knows.
*/}}
{{- define "tensorfleet.pendingEnv" -}}
{{- $v := .root.Values -}}
{{- $env := list -}}
{{- /* issue 3: engines */ -}}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_JOB_IMAGE" "value" (default .image $v.engines.jobImage)) -}}
{{- with $v.engines.builderImage }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_BUILDER_IMAGE" "value" .) }}{{ end -}}
{{- $store := $v.engines.store -}}
{{- if ne $store.type "none" }}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_TYPE" "value" $store.type) -}}
{{- end }}
{{- if eq $store.type "pvc" }}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_PVC_CLAIM" "value" (required "engines.store.pvc.claimName is required when engines.store.type is pvc" $store.pvc.claimName)) -}}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_PVC_PATH" "value" $store.pvc.path) -}}
{{- else if eq $store.type "s3" }}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_S3_BUCKET" "value" (required "engines.store.s3.bucket is required when engines.store.type is s3" $store.s3.bucket)) -}}
{{- $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_S3_PREFIX" "value" $store.s3.prefix) -}}
{{- with $store.s3.endpoint }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_S3_ENDPOINT" "value" .) }}{{ end -}}
{{- with $store.s3.region }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_S3_REGION" "value" .) }}{{ end -}}
{{- with $store.s3.credentialsSecret }}{{ $env = append $env (dict "name" "TENSORFLEET_ENGINE_STORE_S3_CREDENTIALS_SECRET" "value" .) }}{{ end -}}
{{- end }}
{{- /* issue 6: autoscaling */ -}}
{{- $env = append $env (dict "name" "TENSORFLEET_AUTOSCALING_SCRAPE_INTERVAL_SECONDS" "value" (toString $v.autoscaling.scrapeIntervalSeconds)) -}}
{{- if $v.autoscaling.hpa }}{{ $env = append $env (dict "name" "TENSORFLEET_AUTOSCALING_HPA" "value" "true") }}{{ end -}}
{{- if $v.autoscaling.keda }}{{ $env = append $env (dict "name" "TENSORFLEET_AUTOSCALING_KEDA" "value" "true") }}{{ end -}}
{{- toYaml $env }}
{{- end }}

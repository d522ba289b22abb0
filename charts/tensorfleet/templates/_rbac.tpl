{{/*
The operator's permissions: exactly what its code uses, proven by tests/integration/test_rbac.py,
which runs the operator against the API emulator, records every request it makes and compares them
with these rules. When code starts using a new resource or verb, add the rule here and a step that
exercises it to SCENARIO in that test; the test fails until both agree.
*/}}

{{/* Rules for the namespaced resources the operator reconciles: a ClusterRole's, or one Role's per watched namespace. */}}
{{- define "tensorfleet.rbac.namespacedRules" -}}
# InferenceServices: kopf lists and watches them and patches its finalizer into their metadata.
- apiGroups: [tensorfleet.io]
  resources: [inferenceservices]
  verbs: [list, watch, patch]
# Conditions, replicas and URL go through the status subresource only.
- apiGroups: [tensorfleet.io]
  resources: [inferenceservices/status]
  verbs: [patch]
# Serving Deployments: server-side apply (patch, and create when missing); pruned when a GPU product
# or the runtime is dropped from the spec.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch, delete]
# The Service in front of the pods and the gateway's ConfigMap: server-side apply.
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch]
# Events about InferenceServices (Ready, NotReady, InvalidSpec, ...), posted on transitions only.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.autoscaling.hpa }}
# (pending: issue 6) HorizontalPodAutoscalers for spec.autoscaling.mode hpa.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, watch, create, patch, delete]
{{- end }}
{{- if .Values.autoscaling.keda }}
# (pending: issue 6) KEDA ScaledObjects for spec.autoscaling.mode keda.
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [list, watch, create, patch, delete]
{{- end }}
{{- end }}

{{/* What kopf itself needs at startup, cluster-wide: the CRDs (to notice API changes). */}}
{{- define "tensorfleet.rbac.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if not (include "tensorfleet.clusterwide" .) }}
# Serving named namespaces, kopf lists and watches Namespaces to notice them come and go.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}

{{/* kopf peering: every replica reads all peering objects and writes its keep-alive into ours only. */}}
{{- define "tensorfleet.rbac.peeringRules" -}}
- apiGroups: [kopf.dev]
  resources: [{{ .plural }}]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [{{ .plural }}]
  resourceNames: [{{ .name | quote }}]
  verbs: [patch]
{{- end }}

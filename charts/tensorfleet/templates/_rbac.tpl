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
# The Service in front of the pods: server-side apply.
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch]
# The gateway's ConfigMaps: server-side apply; one per pod revision (<name>-gateway-<hash>), pruned once no
# pod of that revision can start any more.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch]
# Events about InferenceServices and Engines (Ready, InvalidSpec, ScaledUp, BuildFailed, ...), on transitions only.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Engines: one per model and GPU product, created for triton services, shared between services (an owner
# reference more or less) and deleted when no service needs them any more; kopf's finalizer on them.
- apiGroups: [tensorfleet.io]
  resources: [engines]
  verbs: [list, watch, create, patch, delete]
# Build progress, the artifact and failures go through the status subresource only.
- apiGroups: [tensorfleet.io]
  resources: [engines/status]
  verbs: [patch]
# What the operator creates carries owner references with blockOwnerDeletion (children of InferenceServices,
# Engines, build Jobs of Engines): with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift's
# default) that needs update on the owner's finalizers. The emulator in test_rbac.py asks as the plugin does.
- apiGroups: [tensorfleet.io]
  resources: [inferenceservices/finalizers, engines/finalizers]
  verbs: [update]
# Engine build Jobs: created per attempt, deleted once their outcome is recorded or superseded.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, delete]
# Pods: build pods' termination messages (the build's report), serving pods' engine-fetch reports and,
# for autoscaling.mode tensorfleet, the ready pods whose gateways are scraped. Read only.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# autoscaling.mode tensorfleet sets replicas through the scale subresource, never the Deployments.
- apiGroups: [tensorfleet.io]
  resources: [inferenceservices/scale]
  verbs: [patch]
{{- if .Values.autoscaling.hpa }}
# HorizontalPodAutoscalers for autoscaling.mode hpa: server-side apply, pruned when the mode changes; the
# operator also lists them before scaling, to refuse to fight one it did not create.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, watch, create, patch, delete]
{{- else }}
# Before scaling (autoscaling.mode tensorfleet) the operator lists the namespace's HorizontalPodAutoscalers,
# to refuse to fight one that targets the service. It watches and writes them only with autoscaling.hpa.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list]
{{- end }}
{{- if .Values.autoscaling.keda }}
# KEDA ScaledObjects for autoscaling.mode keda: server-side apply, pruned when the mode changes. Without
# autoscaling.keda the operator never reads the KEDA API.
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [list, watch, create, patch, delete]
{{- end }}
{{- end }}

{{/* Cluster-scoped reads, in either mode: CRDs (kopf notices API changes) and Nodes (GPU discovery). */}}
{{- define "tensorfleet.rbac.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
# GPU discovery: the products, GPU counts and compute capabilities from GPU feature discovery's node labels.
- apiGroups: [""]
  resources: [nodes]
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

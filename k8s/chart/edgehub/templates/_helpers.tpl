{{/*
Names. The controller's objects are all called <release>-edgehub-controller (cut to 63
characters); the EdgeDeployment is called after the release itself.
*/}}
{{- define "edgehub.controllerName" -}}
{{- printf "%s-edgehub-controller" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edgehub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "edgehub.controllerName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Lease the controller replicas elect their leader with. */}}
{{- define "edgehub.leaseName" -}}
{{- include "edgehub.controllerName" . -}}
{{- end -}}

{{- define "edgehub.selectorLabels" -}}
app.kubernetes.io/name: edgehub-controller
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{- define "edgehub.labels" -}}
{{ include "edgehub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
{{- end -}}

{{- define "edgehub.controllerImage" -}}
{{- printf "%s:%s" .Values.controller.image.repository (default .Chart.AppVersion .Values.controller.image.tag) -}}
{{- end -}}

{{- define "edgehub.hubImage" -}}
{{- default (printf "localhost/edgehub:%s" .Chart.AppVersion) .Values.controller.hubImage -}}
{{- end -}}

{{/*
What the controller may do in the namespaces it watches: exactly the verbs reconcile uses.
The chart README's "Permissions" table says why each one is needed (a test compares the two).
*/}}
{{- define "edgehub.watchRules" -}}
- apiGroups: ["edgehub.io"]
  resources: ["edgedeployments"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["edgehub.io"]
  resources: ["edgedeployments/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["list", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

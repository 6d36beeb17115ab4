{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "kpw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of every object: the release name, plus the chart name unless it is in it. */}}
{{- define "kpw.fullname" -}}
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

{{- define "kpw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kpw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kpw.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kpw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: admission-webhook
app.kubernetes.io/part-of: kaspr
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the `helm test` objects: never the Deployment's selector labels, so neither its
ReplicaSets nor the Service can pick the test Pod up. */}}
{{- define "kpw.testSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-self-test" (include "kpw.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kpw.testLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kpw.testSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: self-test
app.kubernetes.io/part-of: kaspr
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kpw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kpw.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the webhook serves from: its own (self-managed), cert-manager's, or the user's. */}}
{{- define "kpw.certSecretName" -}}
{{- if eq .Values.certificates.mode "provided" }}
{{- required "certificates.provided.secretName is required in provided mode" .Values.certificates.provided.secretName }}
{{- else }}
{{- printf "%s-tls" (include "kpw.fullname" .) }}
{{- end }}
{{- end }}

{{- define "kpw.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Host of webhook.url, when set; it goes into the self-managed certificate. */}}
{{- define "kpw.urlHost" -}}
{{- with .Values.webhook.url }}
{{- (urlParse .).hostname }}
{{- end }}
{{- end }}

{{/* clientConfig of one webhook; call with (dict "root" $ "path" "/mutate"). */}}
{{- define "kpw.clientConfig" -}}
{{- $v := .root.Values }}
{{- if $v.webhook.url }}
url: {{ printf "%s%s" (trimSuffix "/" $v.webhook.url) .path | quote }}
{{- else }}
service:
  name: {{ include "kpw.fullname" .root }}
  namespace: {{ .root.Release.Namespace }}
  path: {{ .path }}
  port: {{ $v.webhook.servicePort }}
{{- end }}
{{- if eq $v.certificates.mode "provided" }}
{{- $ca := required "certificates.provided.caBundle is required in provided mode" $v.certificates.provided.caBundle }}
caBundle: {{ ternary ($ca | b64enc) ($ca | trim) (hasPrefix "-----BEGIN" (trim $ca)) }}
{{- end }}
{{- end }}

{{/* Namespaces the API server never sends to the webhook: kube-system, the release's own (so the
webhook can never block its own recovery) and webhook.excludeNamespaces. */}}
{{- define "kpw.namespaceSelector" -}}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values:
        {{- range (concat (list "kube-system" .Release.Namespace) .Values.webhook.excludeNamespaces | uniq) }}
        - {{ . | quote }}
        {{- end }}
{{- end }}

{{- define "kpw.annotations.caInjection" -}}
{{- if eq .Values.certificates.mode "cert-manager" }}
cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "kpw.fullname" .) }}
{{- end }}
{{- end }}

{{/* Refuse settings that cannot work, at render time. */}}
{{- define "kpw.checks" -}}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $drain := add .Values.server.shutdownDelaySeconds .Values.server.shutdownTimeoutSeconds }}
{{- if le $grace (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed server.shutdownDelaySeconds + server.shutdownTimeoutSeconds (%d)" $grace (int $drain)) }}
{{- end }}
{{- if and .Values.webhook.url (not (hasPrefix "https://" .Values.webhook.url)) }}
{{- fail "webhook.url must start with https://" }}
{{- end }}
{{- end }}

{{/* What the controller writes: StatefulSet rollouts (annotation patch) and the PVC cache. */}}
{{- define "kpw.workloadRules" -}}
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The app pods' install containers' termination messages (degraded caches).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- if .Values.builds.enabled }}
# Package-set builds (docs/builds.md): the build Jobs, the lock ConfigMaps, and the lock the
# build prints into its pod's log.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
{{- end }}
{{- end }}

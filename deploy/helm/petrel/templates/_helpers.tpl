{{- define "petrel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "petrel.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "petrel.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "petrel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "petrel.broker" -}}{{ include "petrel.fullname" . }}-broker{{- end -}}
{{- define "petrel.brokerHeadless" -}}{{ include "petrel.fullname" . }}-broker-headless{{- end -}}
{{- define "petrel.proxy" -}}{{ include "petrel.fullname" . }}-proxy{{- end -}}

{{/* Stable DNS name of broker pod i (0-based). */}}
{{- define "petrel.brokerHost" -}}
{{ include "petrel.broker" .root }}-{{ .i }}.{{ include "petrel.brokerHeadless" .root }}.{{ .root.Release.Namespace }}.svc.cluster.local
{{- end -}}

{{/* --peers: 1=host:port,2=host:port,... for every broker. */}}
{{- define "petrel.peers" -}}
{{- $root := . -}}
{{- $peers := list -}}
{{- range $i, $_ := until (int .Values.broker.replicas) -}}
{{- $peers = append $peers (printf "%d=%s:%d" (add $i 1) (include "petrel.brokerHost" (dict "root" $root "i" $i)) (int $root.Values.broker.port)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* --brokers of the proxies: every broker's address. */}}
{{- define "petrel.brokerList" -}}
{{- $root := . -}}
{{- $list := list -}}
{{- range $i, $_ := until (int .Values.broker.replicas) -}}
{{- $list = append $list (printf "%s:%d" (include "petrel.brokerHost" (dict "root" $root "i" $i)) (int $root.Values.broker.port)) -}}
{{- end -}}
{{- join "," $list -}}
{{- end -}}

{{/* TLS Secrets: given, or made by cert-manager; fails without either. */}}
{{- define "petrel.tlsOn" -}}
{{- if .Values.tls.enabled -}}
{{- if not (or .Values.tls.certManager.enabled (and .Values.tls.clusterSecret .Values.tls.proxySecret)) -}}
{{- fail "tls: set tls.clusterSecret and tls.proxySecret (Secrets with tls.crt, tls.key, ca.crt), or tls.certManager.enabled with an issuer, or tls.enabled=false on a trusted network" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}
{{- define "petrel.clusterTlsSecret" -}}
{{- .Values.tls.clusterSecret | default (printf "%s-cluster-tls" (include "petrel.fullname" .)) -}}
{{- end -}}
{{- define "petrel.proxyTlsSecret" -}}
{{- .Values.tls.proxySecret | default (printf "%s-proxy-tls" (include "petrel.fullname" .)) -}}
{{- end -}}
